"""``kvcomp-bench`` command line: argparse subcommands, one module each."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import accuracy, files_bench, generate_bench, memory_bench, ops_bench


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--plain", action="store_true", help="plain-text tables even if rich is installed")
    parser = argparse.ArgumentParser(
        prog="kvcomp-bench", description="Microbenchmarks of kvcomp, the KV-cache compression library.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    ops_p = sub.add_parser("ops", parents=[common], help="op timings vs dense SDPA and memory bandwidth",
                           description=ops_bench.__doc__)
    ops_bench.add_arguments(ops_p)
    ops_p.set_defaults(run=ops_bench.run)
    mem_p = sub.add_parser("memory", parents=[common], help="bytes per token and capacity per format",
                           description=memory_bench.__doc__)
    memory_bench.add_arguments(mem_p)
    mem_p.set_defaults(run=memory_bench.run)
    acc_p = sub.add_parser("accuracy", parents=[common], help="pass-key, perplexity and fidelity per policy "
                           "on a real model", description=accuracy.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    accuracy.add_arguments(acc_p)
    acc_p.set_defaults(run=accuracy.run)
    files_p = sub.add_parser("files", parents=[common], help=".kvc save/load time, and what validating, signing "
                             "and encrypting cost", description=files_bench.__doc__)
    files_bench.add_arguments(files_p)
    files_p.set_defaults(run=files_bench.run)
    gen_p = sub.add_parser("generate", parents=[common], help="end-to-end generation per cache: prefill, decode "
                           "tokens/s, bytes and memory, against DynamicCache", description=generate_bench.__doc__)
    generate_bench.add_arguments(gen_p)
    gen_p.set_defaults(run=generate_bench.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Returns the exit code; bad arguments raise SystemExit(2) (argparse's
    convention) or return 2 when found after parsing (unknown model, format)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``kvcomp-bench files``: saving and loading ``.kvc`` files, and what
validating, signing and encrypting them costs.

One sequence of --tokens tokens (random heavy-tailed K/V, never zeros) in a
cache of --layers layers, --kv-heads KV heads and --head-dim per policy
preset, saved plain, signed (``key=``, HMAC-SHA256) and encrypted
(``encrypt_key=``, AES-256-GCM) to a temporary folder; each file loaded
--repeats times. Reported: the file's size, the median save and load time,
and the load's parts from ``load_report`` (read, verify: trailer, decryption
and payload parsing; validate; build), validate's share of the load."""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import torch

import kvcomp
from kvcomp.policies import PRESETS

from .ops_bench import positive_int
from .report import print_table, write_json
from .timing import git_commit

MODES = {"plain": {}, "signed": {"key": b"k" * 32}, "encrypted": {"encrypt_key": b"e" * 32}}


def add_arguments(p) -> None:
    p.add_argument("--policies", default="int4,int8,int3,kivi2",
                   help="comma-separated presets of kvcomp.policies (default: int4,int8,int3,kivi2)")
    p.add_argument("--tokens", type=positive_int, default=32768, help="tokens in the cache (default 32768)")
    p.add_argument("--layers", type=positive_int, default=4, help="layers (default 4)")
    p.add_argument("--kv-heads", type=positive_int, default=8, help="KV heads (default 8)")
    p.add_argument("--head-dim", type=positive_int, default=128, help="head_dim (default 128)")
    p.add_argument("--repeats", type=positive_int, default=3, help="loads per file (default 3; median)")
    p.add_argument("--quick", action="store_true", help="2,048 tokens, 2 layers, int4 only: seconds")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")


def filled_cache(policy, tokens: int, layers: int, heads: int, head_dim: int) -> kvcomp.PagedKVCache:
    cache = kvcomp.PagedKVCache(layers, heads, head_dim, policy, max_tokens=tokens + 4 * policy.block_size,
                                dtype=torch.float16)
    cache.add_sequence(0)
    torch.manual_seed(0)
    chunk = 4096
    for l in range(layers):
        for start in range(0, tokens, chunk):
            n = min(chunk, tokens - start)
            # heavy tails (Student-t, 3 dof) as real K/V have; never zeros
            k, v = (torch.distributions.StudentT(3.0).sample((1, n, heads, head_dim)).clamp(-60, 60).half()
                    for _ in range(2))
            cache.append(l, [0], k, v)
    return cache


def run(args) -> int:
    names = ["int4"] if args.quick else [s.strip() for s in args.policies.split(",") if s.strip()]
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        print(f"kvcomp-bench files: error: unknown policies {unknown}; presets: {sorted(PRESETS)}",
              file=sys.stderr)
        return 2
    tokens, layers = (2048, 2) if args.quick else (args.tokens, args.layers)
    modes = dict(MODES)
    try:
        import cryptography  # noqa: F401
    except ImportError:
        modes.pop("encrypted")
        print("kvcomp-bench files: the cryptography package is not installed: no encrypted files", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            cache = filled_cache(PRESETS[name](), tokens, layers, args.kv_heads, args.head_dim)
            for mode, keys in modes.items():
                path = os.path.join(folder, f"{name}-{mode}.kvc")
                t0 = time.perf_counter()
                cache.save(path, **keys)
                save_s = time.perf_counter() - t0
                reports = [kvcomp.PagedKVCache.load(path, **keys).load_report
                           for _ in range(args.repeats)]
                med = {k: statistics.median(r[k] for r in reports) for k in reports[0]}
                rows.append({"policy": name, "mode": mode, "file_mib": os.path.getsize(path) / 2**20,
                             "save_s": save_s, "load_s": med["total_s"], "read_s": med["read_s"],
                             "verify_s": med["verify_s"], "validate_s": med["validate_s"],
                             "build_s": med["build_s"], "validate_pct": 100 * med["validate_fraction"]})
                os.unlink(path)
            del cache
    cols = [("policy", "policy", "{}"), ("file", "mode", "{}"), ("MiB", "file_mib", "{:.1f}"),
            ("save s", "save_s", "{:.3f}"), ("load s", "load_s", "{:.3f}"), ("read s", "read_s", "{:.3f}"),
            ("verify s", "verify_s", "{:.3f}"), ("validate s", "validate_s", "{:.3f}"),
            ("build s", "build_s", "{:.3f}"), ("validate %", "validate_pct", "{:.1f}")]
    print_table(f"kvcomp-bench files: {tokens} tokens, {layers} layers x {args.kv_heads} KV heads x "
                f"head_dim {args.head_dim}, fp16, {torch.get_num_threads()} threads", cols, rows, plain=args.plain)
    if args.json:
        write_json(args.json, {"tokens": tokens, "layers": layers, "kv_heads": args.kv_heads,
                               "head_dim": args.head_dim, "threads": torch.get_num_threads(),
                               "torch": torch.__version__, "kvcomp": kvcomp.__version__, "commit": git_commit(),
                               "rows": rows})
    return 0

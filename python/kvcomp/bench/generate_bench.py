"""``kvcomp-bench generate``: real end-to-end generation on a model (default
the built-in SmolLM2-135M-Instruct), per cache and context length: prefill
time, decode tokens per second, bytes the cache holds, and resident memory
(added after the prefill, and the peak over the start), against
``DynamicCache`` and transformers' ``QuantizedCache`` (--peers, where the
backend installs) in the same run. Ratios are against DynamicCache at the
same length.

Each (cache, length) runs in a fresh process (so peak memory is its own):
the prompt is the first --lengths tokens of --text (repeated if short), one
prefill forward, then --new-tokens greedy decode steps. --repeats rounds run
every (cache, length) once each, interleaved, so a slow spell of a shared
machine spreads over all caches; the table reports each one's median."""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from .ops_bench import positive_int
from .report import print_table, write_json

DEFAULT_TEXT = os.path.join(os.path.dirname(__file__), "..", "..", "..", "..", "shared", "data",
                            "pride-and-prejudice-1342.txt")


def add_arguments(p) -> None:
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default) or a model folder")
    p.add_argument("--policies", default="full,int8,int4,int3,kivi2,combined",
                   help="comma-separated kvcomp.policies presets (default full,int8,int4,int3,kivi2,combined)")
    p.add_argument("--peers", default="quanto-int4", help="QuantizedCache peers (kvcomp.bench.peers; '' for none)")
    p.add_argument("--lengths", default="1024,4096", help="prompt lengths in tokens (default 1024,4096)")
    p.add_argument("--new-tokens", type=positive_int, default=32, help="decode steps (default 32)")
    p.add_argument("--text", default=DEFAULT_TEXT, help="the prompt's text (default: a public-domain novel)")
    p.add_argument("--attn", default="kvcomp", help="attention implementation for kvcomp's caches (default "
                                                    "kvcomp; DynamicCache and peers use sdpa)")
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="rounds of every (cache, length); medians are reported (default 3)")
    p.add_argument("--quick", action="store_true", help="256 tokens, 8 steps, full and int4, 1 round: a smoke run")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", metavar="PATH", help="tokens/s and bytes held against context length (PNG)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one (cache, length) in this process


def live_rss() -> int:
    """Resident bytes of this process after gc and malloc_trim."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS: RSS is what is live
    except OSError:
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one(args, which: str, length: int) -> dict:
    """Prefill and decode with one cache, in this process."""
    import torch
    from transformers import DynamicCache
    from kvcomp import policies
    from . import models, peers
    from ..integrations.hf import cache_kwarg
    model, tok = models.load(models.resolve(args.model))
    with open(args.text, encoding="utf-8") as f:
        ids = tok(f.read(), return_tensors="pt").input_ids
    ids = ids.repeat(1, -(-length // ids.shape[1]))[:, :length]
    kind, _, name = which.partition(":")
    if kind == "kvcomp":
        from kvcomp.integrations.hf import KVCompCache
        make, attn = lambda: KVCompCache(policy=policies.PRESETS[name](), config=model.config), args.attn
    elif kind == "peer":
        make, attn = peers.PEERS[name].factory(model.config), "sdpa"
    else:
        make, attn = lambda: DynamicCache(config=model.config), "sdpa"
    model.set_attn_implementation(attn)
    with torch.inference_mode():
        model(input_ids=ids[:, :16], use_cache=True, **cache_kwarg(model, make()))  # warm up
        base = live_rss()
        cache = make()
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwarg(model, cache))
        prefill_s = time.perf_counter() - t0
        token = out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(args.new_tokens):
            out = model(input_ids=token, use_cache=True, **cache_kwarg(model, cache))
            token = out.logits[:, -1:].argmax(-1)
        decode_s = time.perf_counter() - t0
    added = live_rss() - base
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    elements = 2 * cfg.num_hidden_layers * (getattr(cfg, "num_key_value_heads", None) or heads) * \
        (getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    n = length + args.new_tokens
    if kind == "kvcomp":
        held = cache.stats()["bytes"]
    elif kind == "peer":  # as if stored for an fp16 model (see peers.bits_per_element)
        held = peers.PEERS[name].bits_per_element(n) / 8 * elements * n
    else:
        held = sum(l.keys.numel() + l.values.numel() for l in cache.layers) * next(model.parameters()).element_size()
    return {"cache": which, "length": length, "attention": attn, "prefill_s": prefill_s,
            "decode_tokens_per_s": args.new_tokens / decode_s, "held_bytes": held,
            "rss_added_mib": added / 2**20, "peak_over_start_mib": peak / 2**20}


def run(args) -> int:
    if args.one:
        which, length = args.one.rsplit("@", 1)
        print(json.dumps(one(args, which, int(length))))
        return 0
    from kvcomp.policies import PRESETS
    from . import peers
    names = ["full", "int4"] if args.quick else [s.strip() for s in args.policies.split(",") if s.strip()]
    try:
        lengths = [256] if args.quick else [int(x) for x in args.lengths.split(",")]
    except ValueError:
        lengths = []
    bad = [n for n in names if n not in PRESETS]
    want_peers = [] if args.quick else [s.strip() for s in args.peers.split(",") if s.strip()]
    if bad or not lengths or any(n <= 0 for n in lengths) or any(p not in peers.PEERS for p in want_peers):
        print(f"kvcomp-bench generate: error: unknown policies {bad} (presets: {sorted(PRESETS)}), peers "
              f"{want_peers} (known: {sorted(peers.PEERS)}) or bad --lengths {args.lengths!r}", file=sys.stderr)
        return 2
    if not os.path.isfile(args.text):
        print(f"kvcomp-bench generate: error: --text {args.text!r} is not a file", file=sys.stderr)
        return 2
    new = 8 if args.quick else args.new_tokens
    skipped = [p for p in want_peers if not peers.PEERS[p].available()]
    caches = ["dynamic"] + [f"peer:{p}" for p in want_peers if p not in skipped] + [f"kvcomp:{n}" for n in names]
    runs = {(which, length): [] for length in lengths for which in caches}
    for _ in range(1 if args.quick else args.repeats):
        for which, length in runs:
            cmd = [sys.executable, "-m", "kvcomp.bench.cli", "generate", "--one", f"{which}@{length}",
                   "--model", args.model, "--text", args.text, "--new-tokens", str(new), "--attn", args.attn]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            runs[which, length].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = [_median_row(r) for r in runs.values()]
    for length in lengths:
        ref = next(r for r in rows if r["length"] == length and r["cache"] == "dynamic")
        for r in rows:
            if r["length"] == length:
                r["prefill_x"] = r["prefill_s"] / ref["prefill_s"]
                r["decode_x"] = ref["decode_tokens_per_s"] / r["decode_tokens_per_s"]  # time per token
                r["bytes_x"] = ref["held_bytes"] / r["held_bytes"] if r["held_bytes"] else None
    cols = [("cache", "cache", "{}"), ("tokens", "length", "{}"), ("prefill s", "prefill_s", "{:.2f}"),
            ("x DC", "prefill_x", "{:.2f}"), ("decode tok/s", "decode_tokens_per_s", "{:.1f}"),
            ("time/token x DC", "decode_x", "{:.2f}"), ("held MiB", "held_bytes", lambda b: f"{b / 2**20:.1f}"),
            ("DC bytes /", "bytes_x", "{:.2f}"), ("RSS +MiB", "rss_added_mib", "{:.0f}"),
            ("peak +MiB", "peak_over_start_mib", "{:.0f}")]
    import torch
    rounds = 1 if args.quick else args.repeats
    print_table(f"kvcomp-bench generate: {args.model}, {new} new tokens, {torch.get_num_threads()} threads, "
                f"median of {rounds} rounds (DC: DynamicCache)", cols, rows, plain=args.plain)
    if skipped:
        print(f"peers not installed, skipped: {skipped}")
    result = {"model": args.model, "new_tokens": new, "rounds": rounds, "text": os.path.basename(args.text),
              "rows": rows, "peers_skipped": skipped, "torch": torch.__version__}
    from .timing import git_commit
    result["commit"] = git_commit()
    if args.json:
        write_json(args.json, result)
    if args.plot:
        _plot(result, args.plot)
    return 0


def _median_row(runs: list[dict]) -> dict:
    """One (cache, length): the median of each timing and memory figure over
    its rounds, and every round's prefill and decode figures as measured."""
    row = dict(runs[0])
    for key in ("prefill_s", "decode_tokens_per_s", "rss_added_mib", "peak_over_start_mib"):
        row[key] = statistics.median(r[key] for r in runs)
    row["rounds"] = [{k: r[k] for k in ("prefill_s", "decode_tokens_per_s")} for r in runs]
    return row


def _plot(result: dict, path: str) -> None:
    from .plots import pyplot
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for cache in dict.fromkeys(r["cache"] for r in result["rows"]):
        rows = sorted((r for r in result["rows"] if r["cache"] == cache), key=lambda r: r["length"])
        x = [r["length"] for r in rows]
        a.plot(x, [r["decode_tokens_per_s"] for r in rows], marker="o", label=cache)
        b.plot(x, [r["held_bytes"] / 2**20 for r in rows], marker="o", label=cache)
    for ax, label in ((a, "decode tokens/s"), (b, "cache bytes held (MiB)")):
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"kvcomp-bench generate: {result['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

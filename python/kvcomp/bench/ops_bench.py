"""``kvcomp-bench ops``: decode attention, top-k and quantize-on-write timings
against dense SDPA, dequantize-then-SDPA, and the machine's memory bandwidth."""
from __future__ import annotations

import argparse
import functools
import os
import sys

import torch
import torch.nn.functional as F

import kvcomp
from kvcomp import ops

from . import timing
from .report import print_table, write_json
from .workload import ALL_FORMATS, QUICK_FORMATS, Geometry, dense, fill_cache, make_kv, write_cache

# Defaults per mode; None in argparse means "take it from here".
FULL = dict(context=32768, formats=ALL_FORMATS, repeats=30, warmup=2, max_seconds=2.0,
            write_tokens=16384, bandwidth_repeats=5)
QUICK = dict(context=4096, formats=QUICK_FORMATS, repeats=10, warmup=1, max_seconds=0.5,
             write_tokens=4096, bandwidth_repeats=3)
NUM_QUERIES = 8  # distinct query tensors, rotated so no call reuses the last one's


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--quick", action="store_true", help="small workload, well under a minute")
    p.add_argument("--json", metavar="PATH", help="write all numbers to PATH")
    p.add_argument("--formats", help=f"comma-separated specs (default: {','.join(ALL_FORMATS)}; "
                                     f"--quick: {','.join(QUICK_FORMATS)})")
    p.add_argument("--batch", type=_positive, default=1)
    p.add_argument("--context", type=_positive, help="tokens per sequence (default 32768; quick 4096)")
    p.add_argument("--heads", type=_positive, default=32, help="query heads")
    p.add_argument("--kv-heads", type=_positive, default=8)
    p.add_argument("--head-dim", type=int, choices=[64, 128, 256], default=128)
    p.add_argument("--block-size", type=int, choices=[16, 32, 64, 128], default=16)
    p.add_argument("--repeats", type=_positive, help="timed samples per op (default 30; quick 10)")
    p.add_argument("--warmup", type=int, help="untimed calls first (default 2; quick 1)")
    p.add_argument("--max-seconds", type=float,
                   help="stop sampling an op after this long (>= 3 samples; default 2, quick 0.5)")
    p.add_argument("--topk-k", type=_positive, default=1024, help="k of the top-k benchmark")
    p.add_argument("--write-tokens", type=_positive, help="tokens per quantize_write call")
    p.add_argument("--bandwidth-mib", type=_positive, default=512,
                   help="buffer for the bandwidth reference (>= 512 to defeat caches)")
    p.add_argument("--threads", type=_positive, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-flush", action="store_true",
                   help="do not evict the last-level cache before each sample")
    p.add_argument("--seed", type=int, default=0)


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _resolve(args) -> tuple[dict, list[tuple[str, kvcomp.KVFormat]]]:
    """Fill mode defaults and validate everything before any slow work.
    Raises ValueError with a message for the user."""
    mode = dict(QUICK if args.quick else FULL)
    for key in mode:
        if getattr(args, key, None) is not None:
            mode[key] = getattr(args, key)
    if isinstance(mode["formats"], str):
        mode["formats"] = [s.strip() for s in mode["formats"].split(",") if s.strip()]
    if not mode["formats"]:
        raise ValueError("--formats: no format given")
    fmts = []
    for spec in mode["formats"]:
        try:
            fmt = kvcomp.KVFormat.parse(spec)
            fmt.tile_bytes(args.head_dim, args.block_size)  # geometry check
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"--formats: bad format {spec!r}: {e}") from None
        fmts.append((spec, fmt))
    if args.heads % args.kv_heads:
        raise ValueError(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available in this torch build/machine")
    return mode, fmts


def run(args) -> int:
    try:
        mode, fmts = _resolve(args)
    except ValueError as e:
        print(f"kvcomp-bench ops: error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    with torch.inference_mode():  # no autograd bookkeeping in any timed call
        return _run(args, mode, fmts)


def _run(args, mode: dict, fmts) -> int:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    geom = Geometry(args.batch, mode["context"], args.heads, args.kv_heads, args.head_dim, args.block_size)
    timer = timing.Timer(device, flush=not args.no_flush)
    measure = dict(repeats=mode["repeats"], warmup=mode["warmup"], max_seconds=mode["max_seconds"])
    gen = torch.Generator().manual_seed(args.seed)
    act_dtype = torch.float16 if cuda else torch.float32  # what a model would hand the cache

    result = _machine(device, timer, args.bandwidth_mib, mode["bandwidth_repeats"])
    result["config"] = dict(geom.as_dict(), quick=args.quick, repeats=mode["repeats"],
                            warmup=mode["warmup"], max_seconds=mode["max_seconds"],
                            query_dtype=str(act_dtype).replace("torch.", ""),
                            cache_flush=not args.no_flush)
    print(f"kvcomp-bench ops on {result['device']} ({device.type}, {result['threads']} threads), "
          f"read bandwidth {result['read_bandwidth_gbps']:.1f} GB/s", file=sys.stderr)

    key, value = make_kv(geom, device, act_dtype, gen)
    queries = [torch.randn(geom.batch, geom.num_heads, geom.head_dim, generator=gen)
               .to(device=device, dtype=act_dtype) for _ in range(NUM_QUERIES)]
    base_dtypes = (torch.float16, torch.bfloat16) if cuda else (torch.float32, torch.bfloat16)
    read_bw = result["read_bandwidth_gbps"]
    result["baselines"] = [_dense_baseline(timer, geom, key, value, queries, dt, measure, read_bw)
                           for dt in base_dtypes]
    result["baselines"].append(_dense_baseline(timer, geom, key, value, queries, act_dtype, measure,
                                               read_bw, kind="matmul"))
    result["decode"] = [dict(spec=spec, **_decode_row(timer, geom, fmt, key, value, queries, measure,
                                                      result, gen))
                        for spec, fmt in fmts]
    result["topk"] = [_topk_row(timer, geom, device, min(args.topk_k, geom.context), measure, gen)]
    result["quantize_write"] = [dict(spec=spec, **_write_row(timer, geom, fmt, key, value, device,
                                                             min(mode["write_tokens"], key.shape[0]),
                                                             measure, gen))
                                for spec, fmt in fmts]
    if not cuda and hasattr(os, "getloadavg"):
        result["load_average_1min_end"] = os.getloadavg()[0]
    _print(result, cuda, plain=getattr(args, "plain", False))
    if args.json:
        write_json(args.json, result)
    return 0


def _machine(device, timer, mib: int, repeats: int) -> dict:
    info = {"device": timing.device_name(device), "device_type": device.type,
            "torch": torch.__version__, "kvcomp": kvcomp.__version__,
            "layout_version": int(kvcomp.LAYOUT_VERSION), "commit": timing.git_commit(),
            "threads": torch.get_num_threads(),
            "read_bandwidth_gbps": timing.read_bandwidth_gbps(timer, mib, repeats)}
    if device.type == "cpu":
        if hasattr(os, "getloadavg"):  # a busy shared machine explains noisy numbers
            info["load_average_1min"] = os.getloadavg()[0]
        # One core cannot saturate DRAM: the 1-thread figure bounds a kernel
        # that fails to parallelize.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            info["read_bandwidth_1thread_gbps"] = timing.read_bandwidth_gbps(timer, mib, repeats)
        finally:
            torch.set_num_threads(threads)
    info["copy_bandwidth_gbps"] = timing.copy_bandwidth_gbps(timer, mib, repeats)
    return info


def _sdpa(q, k, v, groups: int):
    """SDPA of [b, h, 1, d] queries; K/V have h // groups heads (GQA) unless
    expanded beforehand."""
    if groups > 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v)


@functools.lru_cache(maxsize=None)
def _gqa_supported() -> bool:
    q = torch.zeros(1, 2, 1, 16)
    k = torch.zeros(1, 1, 1, 16)
    try:
        F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
        return True
    except (TypeError, RuntimeError):
        return False


def _matmul_attention(q, k, v):
    """Eager attention of [b, h, d] queries: GQA by viewing the query heads as
    [b, kvh, group, d], so K/V are read once with no copies. On CPU this beats
    torch's SDPA for a single query, so it is the stronger dense baseline."""
    b, h, d = q.shape
    qg = q.view(b, k.shape[1], h // k.shape[1], d) * d ** -0.5
    p = torch.softmax(torch.matmul(qg, k.transpose(-1, -2)).float(), dim=-1).to(v.dtype)
    return torch.matmul(p, v).view(b, h, d)


def _dense_baseline(timer, geom: Geometry, key, value, queries, dtype, measure, read_bw,
                    kind: str = "sdpa") -> dict:
    """Dense attention (``kind`` sdpa or matmul) over the same tokens, held
    uncompressed in ``dtype``."""
    k, v = dense(key, geom, dtype), dense(value, geom, dtype)
    groups = geom.num_heads // geom.num_kv_heads
    if kind == "matmul":
        qs = [q.to(dtype) for q in queries]
        r = timer.measure(lambda i: _matmul_attention(qs[i % len(qs)], k, v), **measure)
    else:
        if groups > 1 and not _gqa_supported():
            # Old torch: expand outside the timed region (and count the bytes it reads).
            k, v, groups = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), 1
        qs = [q.to(dtype)[:, :, None] for q in queries]
        r = timer.measure(lambda i: _sdpa(qs[i % len(qs)], k, v, groups), **measure)
    name = kind + "_" + {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    nbytes = (k.numel() + v.numel()) * k.element_size()
    gbps = nbytes / r["ms"] / 1e6
    return {"name": name, "ms": r["ms"], "min_ms": r["min_ms"], "samples": r["n"], "bytes": nbytes,
            "gbps": gbps, "frac_of_read_bw": gbps / read_bw, "gflops": geom.flops() / r["ms"] / 1e6}


def _decode_row(timer, geom: Geometry, fmt, key, value, queries, measure, result, gen) -> dict:
    print(f"  decode {fmt.name} ...", file=sys.stderr)  # the full run takes minutes
    pool, tables, seq_lens = fill_cache(fmt, key, value, geom, timer.device, gen)
    scale = geom.head_dim ** -0.5
    groups = geom.num_heads // geom.num_kv_heads
    gqa = _gqa_supported()

    def decode(i):
        return ops.paged_decode_attention(queries[i % len(queries)], pool, tables, seq_lens,
                                          fmt.name, scale)

    def dequant_sdpa(i):
        # The QuantizedCache-style path: expand the whole cache, then attend.
        q = queries[i % len(queries)]
        k, v = ops.gather_dequant(pool, tables, seq_lens, fmt.name, q.dtype)
        if groups > 1 and not gqa:
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        return _sdpa(q[:, :, None], k, v, groups if gqa else 1)[:, :, 0]

    r = timer.measure(decode, **measure)
    dq = timer.measure(dequant_sdpa, **measure)
    # Sanity: both paths read the same cache, so they must agree.
    err = (decode(0)[0].float() - dequant_sdpa(0).float()).abs().max().item()
    tile = fmt.bytes_per_token(geom.head_dim, geom.block_size) * geom.block_size
    touched = int(torch.div(seq_lens.long() + geom.block_size - 1, geom.block_size,
                            rounding_mode="floor").sum())
    nbytes = touched * geom.num_kv_heads * tile
    gbps = nbytes / r["ms"] / 1e6
    row = dict(format=fmt.name, **geom.as_dict(), ms=r["ms"], min_ms=r["min_ms"], samples=r["n"],
               bytes=nbytes, gbps=gbps, frac_of_read_bw=gbps / result["read_bandwidth_gbps"])
    if timer.cuda:
        row["frac_of_copy_bw"] = gbps / result["copy_bandwidth_gbps"]
    row["gflops"] = geom.flops() / r["ms"] / 1e6
    for base in result["baselines"]:
        row[f"speedup_vs_{base['name']}"] = base["ms"] / r["ms"]
    row.update(speedup_vs_dequant_sdpa=dq["ms"] / r["ms"], dequant_sdpa_ms=dq["ms"],
               max_abs_err_vs_dequant_sdpa=err)
    return row


def _topk_row(timer, geom: Geometry, device, k: int, measure, gen) -> dict:
    """heavy_hitter_topk against torch.topk, alone and with the index sort that
    gives the op's ascending-position output."""
    shape = (geom.batch, geom.num_kv_heads, geom.context)
    scores = [torch.rand(shape, generator=gen).to(device) for _ in range(4)]
    seq_lens = torch.full((geom.batch,), geom.context, dtype=torch.int32, device=device)
    ours = timer.measure(lambda i: ops.heavy_hitter_topk(scores[i % 4], seq_lens, k), **measure)
    plain = timer.measure(lambda i: torch.topk(scores[i % 4], k, dim=-1), **measure)
    srt = timer.measure(lambda i: torch.topk(scores[i % 4], k, dim=-1).indices.sort(dim=-1), **measure)
    return {"batch": geom.batch, "num_kv_heads": geom.num_kv_heads, "context": geom.context, "k": k,
            "ms": ours["ms"], "torch_topk_ms": plain["ms"], "torch_topk_sorted_ms": srt["ms"],
            "speedup_vs_torch_topk": plain["ms"] / ours["ms"],
            "speedup_vs_torch_topk_sorted": srt["ms"] / ours["ms"]}


def _write_row(timer, geom: Geometry, fmt, key, value, device, tokens: int, measure, gen) -> dict:
    """Quantize-on-write of ``tokens`` tokens to shuffled slots; per-channel
    formats can only be sealed, so for them this times seal_blocks of the same
    tokens from an fp16 hot pool."""
    wgeom = Geometry(1, tokens, geom.num_heads, geom.num_kv_heads, geom.head_dim, geom.block_size)
    k, v = key[:tokens], value[:tokens]
    pool = kvcomp.allocate_pool(wgeom.num_blocks, geom.block_size, geom.num_kv_heads,
                                geom.head_dim, fmt, device)
    slots = torch.randperm(wgeom.num_blocks * geom.block_size, generator=gen)[:tokens].to(device)
    if fmt.per_channel:
        hot = kvcomp.allocate_pool(wgeom.num_blocks, geom.block_size, geom.num_kv_heads,
                                   geom.head_dim, "fp16", device)
        write_cache(kvcomp.KVFormat.parse("fp16"), k, v, hot, slots, wgeom, device)
        blocks = torch.randperm(wgeom.num_blocks, generator=gen).to(device=device, dtype=torch.int32)
        op = "seal_blocks"
        r = timer.measure(lambda i: ops.seal_blocks(hot, blocks, pool, blocks, "fp16", fmt.name), **measure)
        nbytes = wgeom.num_blocks * geom.num_kv_heads * fmt.tile_bytes(geom.head_dim, geom.block_size)
    else:
        op = "quantize_write"
        r = timer.measure(lambda i: ops.quantize_write(k, v, pool, slots, fmt.name), **measure)
        nbytes = tokens * geom.num_kv_heads * fmt.bytes_per_token(geom.head_dim, geom.block_size)
    return {"format": fmt.name, "op": op, "tokens": tokens, "num_kv_heads": geom.num_kv_heads,
            "head_dim": geom.head_dim, "block_size": geom.block_size, "ms": r["ms"],
            "bytes": nbytes, "gbps": nbytes / r["ms"] / 1e6,
            "tokens_per_s": tokens / (r["ms"] / 1e3)}


def _print(result: dict, cuda: bool, plain: bool) -> None:
    c = result["config"]
    bw = f"read {result['read_bandwidth_gbps']:.1f} GB/s"
    if "read_bandwidth_1thread_gbps" in result:
        bw += f" (1 thread {result['read_bandwidth_1thread_gbps']:.1f})"
    bw += f", copy {result['copy_bandwidth_gbps']:.1f} GB/s (read+write)"
    title = (f"paged_decode_attention  batch={c['batch']} context={c['context']} heads={c['num_heads']}"
             f"/{c['num_kv_heads']} head_dim={c['head_dim']} block={c['block_size']}  [{bw}]")
    f2, f3 = "{:.2f}", "{:.3f}"
    cols = [("format", "label", "{}"), ("ms", "ms", f3), ("MB read", "bytes", lambda b: f"{b / 1e6:.1f}"),
            ("GB/s", "gbps", "{:.1f}"), ("% read BW", "frac_of_read_bw", lambda x: f"{100 * x:.0f}%")]
    if cuda:
        cols += [("% copy BW", "frac_of_copy_bw", lambda x: f"{100 * x:.0f}%")]
    cols += [("GFLOP/s", "gflops", "{:.1f}")]
    cols += [(f"x {b['name']}", f"speedup_vs_{b['name']}", f2) for b in result["baselines"]]
    cols += [("x dequant+sdpa", "speedup_vs_dequant_sdpa", f2)]
    rows = [dict(label=b["name"] + " (dense)", **b) for b in result["baselines"]]
    rows += [dict(label=_label(r), **r) for r in result["decode"]]
    print_table(title, cols, rows, plain)
    print_table(f"heavy_hitter_topk  rows={c['batch'] * c['num_kv_heads']} x {c['context']}",
                [("k", "k", "{}"), ("kvcomp ms", "ms", f3), ("torch.topk ms", "torch_topk_ms", f3),
                 ("topk+sort ms", "torch_topk_sorted_ms", f3), ("x topk", "speedup_vs_torch_topk", f2),
                 ("x topk+sort", "speedup_vs_torch_topk_sorted", f2)], result["topk"], plain)
    print_table("quantize-on-write (bytes written to the pool)",
                [("format", "label", "{}"), ("op", "op", "{}"), ("tokens", "tokens", "{}"),
                 ("ms", "ms", f3), ("GB/s", "gbps", f2), ("Mtok/s", "tokens_per_s", lambda t: f"{t / 1e6:.2f}")],
                [dict(label=_label(r), **r) for r in result["quantize_write"]], plain)


def _label(row: dict) -> str:
    """The spec as typed, with the canonical name when they differ (kivi2)."""
    return row["spec"] if row["spec"] == row["format"] else f"{row['spec']} ({row['format']})"

"""``kvcomp-bench ops``: decode attention, top-k and quantize-on-write timings
against dense SDPA, dequantize-then-SDPA, and the machine's memory bandwidth.

One geometry by default; ``--sweep`` runs the issue's grid instead (formats
x batch x context, one JSON with a ``decode`` row per point). On CUDA every
op is timed by replaying a CUDA graph of one call, bracketed by CUDA events,
after the L2 is flushed; the median of the samples is reported."""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys

import torch
import torch.nn.functional as F

import kvcomp
from kvcomp import ops

from . import timing
from .report import print_table, write_json
from .workload import (ALL_FORMATS, QUICK_FORMATS, SWEEP_BATCHES, SWEEP_CONTEXTS, SWEEP_FORMATS,
                       Geometry, dense, dense_bytes, fill_cache, make_dense_kv, make_kv, pool_bytes,
                       shuffled_tables, write_cache, write_dense)

# Defaults per mode; None in argparse means "take it from here".
FULL = dict(context=32768, formats=ALL_FORMATS, repeats=30, warmup=2, max_seconds=2.0,
            write_tokens=16384, bandwidth_repeats=5)
QUICK = dict(context=4096, formats=QUICK_FORMATS, repeats=10, warmup=1, max_seconds=0.5,
             write_tokens=4096, bandwidth_repeats=3)
SWEEP = dict(context=None, formats=SWEEP_FORMATS, repeats=20, warmup=3, max_seconds=1.0,
             write_tokens=65536, bandwidth_repeats=10)
NUM_QUERIES = 8  # distinct query tensors, rotated so no call reuses the last one's
TOPK_BATCHES = (1, 16)
TOPK_CONTEXTS = (32768, 131072)
# Besides the largest pool and the dense K/V: decode workspace, graph pools, chunk copies.
SWEEP_MARGIN_BYTES = 2 << 30


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--quick", action="store_true", help="small workload, well under a minute")
    p.add_argument("--sweep", action="store_true",
                   help=f"the grid of formats ({','.join(SWEEP_FORMATS)}) x --sweep-batches x "
                        f"--sweep-contexts at --heads/--kv-heads/--head-dim, each against dense fp16 "
                        f"SDPA; plus quantize_write and top-k rows. Shapes that do not fit in device "
                        f"memory are skipped (and listed as such)")
    p.add_argument("--sweep-batches", type=_int_list,
                   help=f"batches of --sweep (default {','.join(map(str, SWEEP_BATCHES))})")
    p.add_argument("--sweep-contexts", type=_int_list,
                   help=f"contexts of --sweep (default {','.join(map(str, SWEEP_CONTEXTS))})")
    p.add_argument("--topk-contexts", type=_int_list,
                   help=f"scores per row of --sweep's top-k rows (default "
                        f"{','.join(map(str, TOPK_CONTEXTS))})")
    p.add_argument("--json", metavar="PATH", help="write all numbers to PATH")
    p.add_argument("--formats", help=f"comma-separated specs (default: {','.join(ALL_FORMATS)}; "
                                     f"--quick: {','.join(QUICK_FORMATS)}; "
                                     f"--sweep: {','.join(SWEEP_FORMATS)})")
    p.add_argument("--batch", type=_positive, default=1)
    p.add_argument("--context", type=_positive, help="tokens per sequence (default 32768; quick 4096)")
    p.add_argument("--heads", type=_positive, default=32, help="query heads")
    p.add_argument("--kv-heads", type=_positive, default=8)
    p.add_argument("--head-dim", type=int, choices=[64, 128, 256], default=128)
    p.add_argument("--block-size", type=int, choices=[16, 32, 64, 128], default=16)
    p.add_argument("--repeats", type=_positive, help="timed samples per op (default 30; quick 10; sweep 20)")
    p.add_argument("--warmup", type=int, help="untimed calls first (default 2; quick 1; sweep 3)")
    p.add_argument("--max-seconds", type=float,
                   help="stop sampling an op after this long (>= 3 samples; default 2, quick 0.5)")
    p.add_argument("--topk-k", type=_positive, default=1024, help="k of the top-k benchmark")
    p.add_argument("--write-tokens", type=_positive,
                   help="tokens per quantize_write call (default 16384; quick 4096; sweep 65536)")
    p.add_argument("--bandwidth-mib", type=_positive,
                   help="buffer for the bandwidth references (default 512 on CPU, 1024 on CUDA; "
                        ">= 512 to defeat caches)")
    p.add_argument("--threads", type=_positive, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-flush", action="store_true",
                   help="do not evict the last-level cache before each sample")
    p.add_argument("--seed", type=int, default=0)


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [_positive(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of positive integers: {text!r}")
    if not values:
        raise argparse.ArgumentTypeError("empty list")
    return values


def _resolve(args) -> tuple[dict, list[tuple[str, kvcomp.KVFormat]]]:
    """Fill mode defaults and validate everything before any slow work.
    Raises ValueError with a message for the user."""
    sweep = getattr(args, "sweep", False)
    if sweep and args.quick:
        raise ValueError("--sweep and --quick exclude each other")
    mode = dict(SWEEP if sweep else QUICK if args.quick else FULL)
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
    if args.bandwidth_mib is None:
        args.bandwidth_mib = 1024 if args.device == "cuda" else 512
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
        if getattr(args, "sweep", False):
            return _run_sweep(args, mode, fmts)
        return _run(args, mode, fmts)


def _run(args, mode: dict, fmts) -> int:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    geom = Geometry(args.batch, mode["context"], args.heads, args.kv_heads, args.head_dim, args.block_size)
    timer = timing.Timer(device, flush=not args.no_flush)
    measure = dict(repeats=mode["repeats"], warmup=mode["warmup"], max_seconds=mode["max_seconds"])
    gen = torch.Generator().manual_seed(args.seed)
    act_dtype = _act_dtype(device)

    result = _machine(device, timer, args.bandwidth_mib, mode["bandwidth_repeats"])
    result["config"] = dict(geom.as_dict(), quick=args.quick, repeats=mode["repeats"],
                            warmup=mode["warmup"], max_seconds=mode["max_seconds"],
                            query_dtype=_dtype_name(act_dtype), cache_flush=not args.no_flush,
                            timing=_timing_note(timer))
    _announce(result, device)

    key, value = make_kv(geom, device, act_dtype, gen)
    queries = _queries(geom, device, act_dtype, gen)
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
    tokens = min(mode["write_tokens"], key.shape[0])
    result["quantize_write"] = [dict(spec=spec, **_write_row(timer, geom, fmt, key[:tokens], value[:tokens],
                                                             measure, gen, result))
                                for spec, fmt in fmts]
    if not cuda and hasattr(os, "getloadavg"):
        result["load_average_1min_end"] = os.getloadavg()[0]
    _print(result, cuda, plain=getattr(args, "plain", False))
    if args.json:
        write_json(args.json, result)
    return 0


def _act_dtype(device: torch.device) -> torch.dtype:
    """What a model would hand the cache: fp16 on GPUs, fp32 on CPUs."""
    return torch.float16 if device.type == "cuda" else torch.float32


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _timing_note(timer) -> str:
    flush = "; last-level cache flushed before each sample" if timer._flush_buf is not None else ""
    if timer.cuda:
        return ("median of CUDA-event-timed replays of a CUDA graph of one call (eager with "
                f"validation off where capture fails), after warm-up{flush}; inputs rotated among "
                f"{NUM_QUERIES} query sets (and pool copies when a pool is smaller than twice the L2)")
    return f"median of perf_counter-timed calls after warm-up{flush}"


def _announce(result: dict, device) -> None:
    print(f"kvcomp-bench ops on {result['device']} ({device.type}, {result['threads']} threads), "
          f"read bandwidth {result['read_bandwidth_gbps']:.1f} GB/s, "
          f"copy {result['copy_bandwidth_gbps']:.1f} GB/s", file=sys.stderr)


def _queries(geom: Geometry, device, dtype, gen) -> list[torch.Tensor]:
    return [torch.randn(geom.batch, geom.num_heads, geom.head_dim, generator=gen).to(device=device, dtype=dtype)
            for _ in range(NUM_QUERIES)]


def _machine(device, timer, mib: int, repeats: int) -> dict:
    cuda = device.type == "cuda"
    commit = timing.git_commit()
    info = {"device": timing.device_name(device), "device_type": device.type,
            "torch": torch.__version__, "kvcomp": kvcomp.__version__,
            "layout_version": int(kvcomp.LAYOUT_VERSION),
            # The device machine gets the tree without .git: "unknown" unless
            # $KVCOMP_COMMIT names it (CPU runs keep null, as before).
            "commit": commit if commit or not cuda else "unknown",
            "threads": torch.get_num_threads(),
            "read_bandwidth_gbps": timing.read_bandwidth_gbps(timer, mib, repeats)}
    if cuda:
        props = torch.cuda.get_device_properties(device)
        info.update(cuda=torch.version.cuda, sm_count=props.multi_processor_count,
                    compute_capability=f"{props.major}.{props.minor}",
                    memory_bytes=int(props.total_memory), l2_bytes=int(getattr(props, "L2_cache_size", 0)))
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
    copy = timing.copy_bandwidth(timer, mib, repeats)
    info.update(copy_bandwidth_gbps=copy["best"], copy_bandwidth_median_gbps=copy["median"],
                copy_bandwidth_bytes=copy["bytes"])
    return info


# ------------------------------------------------------------ dense baselines
def _flash(device):
    """SDPA restricted to the flash backend on CUDA (the issue's baseline);
    torch's own choice on CPU."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def _sdpa(q, k, v, groups: int):
    """SDPA of [b, h, 1, d] queries; K/V have h // groups heads (GQA) unless
    expanded beforehand. Flash backend on CUDA."""
    with _flash(q.device):
        if groups > 1:
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v)


@functools.lru_cache(maxsize=None)
def _gqa_supported(device_type: str = "cpu") -> bool:
    """Whether SDPA takes enable_gqa (on CUDA: with the flash backend)."""
    dtype = torch.float16 if device_type == "cuda" else torch.float32
    q = torch.zeros(1, 2, 1, 64, device=device_type, dtype=dtype)
    k = torch.zeros(1, 1, 1, 64, device=device_type, dtype=dtype)
    try:
        _sdpa(q, k, k, 2)
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
    name = kind + "_" + {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    if kind == "matmul":
        qs = [q.to(dtype) for q in queries]
        r = timer.measure_calls([functools.partial(_matmul_attention, q, k, v) for q in qs], **measure)
        extra = {}
    else:
        r, extra = _time_sdpa(timer, geom, k, v, [q.to(dtype) for q in queries], measure)
    return dict(_baseline_row(name, geom, k, v, r, read_bw), **extra)


def _time_sdpa(timer, geom: Geometry, k, v, queries, measure) -> tuple[dict, dict]:
    """SDPA over dense [b, kvh, ctx, d] K/V: GQA through enable_gqa where the
    backend takes it, else K/V expanded to every query head outside the
    timed region. Returns the timing and how GQA was done."""
    groups = geom.num_heads // geom.num_kv_heads
    gqa = "none" if groups == 1 else "enable_gqa"
    if groups > 1 and not _gqa_supported(k.device.type):
        k, v, groups, gqa = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), 1, "expanded"
    qs = [q[:, :, None] for q in queries]
    r = timer.measure_calls([functools.partial(_sdpa, q, k, v, groups) for q in qs], **measure)
    backend = "flash" if k.is_cuda else "default"
    return r, {"gqa": gqa, "backend": backend}


def _baseline_row(name: str, geom: Geometry, k, v, r: dict, read_bw: float) -> dict:
    nbytes = (k.numel() + v.numel()) * k.element_size()
    gbps = nbytes / r["ms"] / 1e6
    return {"name": name, "ms": r["ms"], "min_ms": r["min_ms"], "samples": r["n"], "graph": r["graph"],
            "bytes": nbytes, "gbps": gbps, "frac_of_read_bw": gbps / read_bw,
            "gflops": geom.flops() / r["ms"] / 1e6}


# ------------------------------------------------------------ decode
def _decode_bytes(fmt, geom: Geometry, seq_lens: torch.Tensor) -> int:
    """Compressed bytes a decode call reads: whole tiles (K+V+metadata) of the
    blocks the sequences use, for every KV head."""
    tile = fmt.tile_bytes(geom.head_dim, geom.block_size)
    touched = int(torch.div(seq_lens.long() + geom.block_size - 1, geom.block_size,
                            rounding_mode="floor").sum())
    return touched * geom.num_kv_heads * tile


def _pool_copies(timer, pool: torch.Tensor) -> list[torch.Tensor]:
    """The pool, plus copies on CUDA when it is smaller than twice the L2, so
    rotating among them keeps the data out of L2 even without the flush."""
    l2 = timing._last_level_cache_bytes(timer.device)
    if not timer.cuda or pool.numel() >= 2 * l2:
        return [pool]
    n = min(NUM_QUERIES, -(-2 * l2 // max(pool.numel(), 1)))
    return [pool] + [pool.clone() for _ in range(n - 1)]


def _decode_calls(timer, fmt, geom: Geometry, pool, tables, seq_lens, queries):
    pools = _pool_copies(timer, pool)
    scale = geom.head_dim ** -0.5
    return [functools.partial(ops.paged_decode_attention, q, pools[i % len(pools)], tables, seq_lens,
                              fmt.name, scale) for i, q in enumerate(queries)]


def _decode_row(timer, geom: Geometry, fmt, key, value, queries, measure, result, gen) -> dict:
    print(f"  decode {fmt.name} ...", file=sys.stderr)  # the full run takes minutes
    pool, tables, seq_lens = fill_cache(fmt, key, value, geom, timer.device, gen)
    groups = geom.num_heads // geom.num_kv_heads
    gqa = _gqa_supported(timer.device.type)

    def dequant_sdpa(q):
        # The QuantizedCache-style path: expand the whole cache, then attend.
        k, v = ops.gather_dequant(pool, tables, seq_lens, fmt.name, q.dtype)
        if groups > 1 and not gqa:
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        return _sdpa(q[:, :, None], k, v, groups if gqa else 1)[:, :, 0]

    calls = _decode_calls(timer, fmt, geom, pool, tables, seq_lens, queries)
    r = timer.measure_calls(calls, **measure)
    # gather_dequant's output size depends on seq_lens (read on the host): eager.
    with timing.cuda_validation(False):
        dq = timer.measure(lambda i: dequant_sdpa(queries[i % len(queries)]), **measure)
    # Sanity: both paths read the same cache, so they must agree.
    err = (calls[0]()[0].float() - dequant_sdpa(queries[0]).float()).abs().max().item()
    nbytes = _decode_bytes(fmt, geom, seq_lens)
    gbps = nbytes / r["ms"] / 1e6
    row = dict(format=fmt.name, **geom.as_dict(), ms=r["ms"], min_ms=r["min_ms"], samples=r["n"],
               graph=r["graph"], bytes=nbytes, gbps=gbps, frac_of_read_bw=gbps / result["read_bandwidth_gbps"])
    if timer.cuda:
        row["frac_of_copy_bw"] = gbps / result["copy_bandwidth_gbps"]
    row["gflops"] = geom.flops() / r["ms"] / 1e6
    for base in result["baselines"]:
        row[f"speedup_vs_{base['name']}"] = base["ms"] / r["ms"]
    row.update(speedup_vs_dequant_sdpa=dq["ms"] / r["ms"], dequant_sdpa_ms=dq["ms"],
               max_abs_err_vs_dequant_sdpa=err)
    return row


# ------------------------------------------------------------ top-k, writes
def _topk_row(timer, geom: Geometry, device, k: int, measure, gen) -> dict:
    """heavy_hitter_topk against torch.topk, alone and with the index sort that
    gives the op's ascending-position output."""
    shape = (geom.batch, geom.num_kv_heads, geom.context)
    scores = [torch.rand(shape, generator=gen).to(device) for _ in range(4)]
    seq_lens = torch.full((geom.batch,), geom.context, dtype=torch.int32, device=device)
    ours = timer.measure_calls([functools.partial(ops.heavy_hitter_topk, s, seq_lens, k) for s in scores],
                               **measure)
    plain = timer.measure_calls([functools.partial(torch.topk, s, k, dim=-1) for s in scores], **measure)
    srt = timer.measure_calls([functools.partial(_topk_sorted, s, k) for s in scores], **measure)
    return {"batch": geom.batch, "num_kv_heads": geom.num_kv_heads, "context": geom.context, "k": k,
            "rows": geom.batch * geom.num_kv_heads, "ms": ours["ms"], "graph": ours["graph"],
            "torch_topk_ms": plain["ms"], "torch_topk_sorted_ms": srt["ms"],
            "speedup_vs_torch_topk": plain["ms"] / ours["ms"],
            "speedup_vs_torch_topk_sorted": srt["ms"] / ours["ms"]}


def _topk_sorted(scores, k):
    return torch.topk(scores, k, dim=-1).indices.sort(dim=-1)


def _write_row(timer, geom: Geometry, fmt, k, v, measure, gen, result) -> dict:
    """Quantize-on-write of ``k``/``v`` ``[tokens, kvh, hd]`` into the blocks
    of one sequence laid out behind a shuffled block table (prefill into a
    paged cache); per-channel formats can only be sealed, so for them this
    times seal_blocks of the same tokens from an fp16 hot pool.
    Bytes counted: activations (and slots / block ids) read + pool written."""
    device = k.device
    tokens = k.shape[0]
    wgeom = Geometry(1, tokens, geom.num_heads, geom.num_kv_heads, geom.head_dim, geom.block_size)
    pool = kvcomp.allocate_pool(wgeom.num_blocks, geom.block_size, geom.num_kv_heads,
                                geom.head_dim, fmt, device)
    tables, slots, _ = shuffled_tables(wgeom, device, gen)
    if fmt.per_channel:
        hot_fmt = kvcomp.KVFormat.parse("fp16")
        hot = kvcomp.allocate_pool(wgeom.num_blocks, geom.block_size, geom.num_kv_heads,
                                   geom.head_dim, hot_fmt, device)
        write_cache(hot_fmt, k, v, hot, slots, wgeom, device)
        blocks = tables.reshape(-1)
        op = "seal_blocks"
        r = timer.measure_calls([functools.partial(ops.seal_blocks, hot, blocks, pool, blocks, "fp16",
                                                   fmt.name)], **measure)
        read = hot.numel() + 2 * blocks.numel() * 4
        written = pool.numel()
    else:
        op = "quantize_write"
        r = timer.measure_calls([functools.partial(ops.quantize_write, k, v, pool, slots, fmt.name)],
                                **measure)
        read = 2 * k.numel() * k.element_size() + slots.numel() * 8
        written = tokens * geom.num_kv_heads * fmt.bytes_per_token(geom.head_dim, geom.block_size)
    nbytes = read + written
    gbps = nbytes / r["ms"] / 1e6
    row = {"format": fmt.name, "op": op, "tokens": tokens, "num_kv_heads": geom.num_kv_heads,
           "head_dim": geom.head_dim, "block_size": geom.block_size, "act_dtype": _dtype_name(k.dtype),
           "ms": r["ms"], "graph": r["graph"], "bytes_read": read, "bytes_written": written,
           "bytes": nbytes, "gbps": gbps, "tokens_per_s": tokens / (r["ms"] / 1e3)}
    if timer.cuda:
        row["frac_of_copy_bw"] = gbps / result["copy_bandwidth_gbps"]
    return row


# ------------------------------------------------------------ the sweep
def _run_sweep(args, mode: dict, fmts) -> int:
    device = torch.device(args.device)
    timer = timing.Timer(device, flush=not args.no_flush)
    measure = dict(repeats=mode["repeats"], warmup=mode["warmup"], max_seconds=mode["max_seconds"])
    batches = args.sweep_batches or SWEEP_BATCHES
    contexts = args.sweep_contexts or SWEEP_CONTEXTS
    act_dtype = torch.float16  # queries and the dense baseline's K/V, as the issue asks
    result = _machine(device, timer, args.bandwidth_mib, mode["bandwidth_repeats"])
    result["config"] = dict(sweep=True, formats=[f.name for _, f in fmts], batches=batches, contexts=contexts,
                            num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                            block_size=args.block_size, repeats=mode["repeats"], warmup=mode["warmup"],
                            max_seconds=mode["max_seconds"], query_dtype=_dtype_name(act_dtype),
                            cache_flush=not args.no_flush, timing=_timing_note(timer),
                            sdpa_baseline="scaled_dot_product_attention over the same tokens held dense "
                                          "in fp16 (CUDA: flash backend only), one query per sequence")
    _announce(result, device)
    result.update(decode=[], sdpa=[], skipped=[])
    for batch in batches:
        for context in contexts:
            geom = Geometry(batch, context, args.heads, args.kv_heads, args.head_dim, args.block_size)
            skip = _sweep_skip(geom, fmts, device)
            if skip:
                print(f"  skip batch {batch} x context {context}: {skip['reason']}", file=sys.stderr)
                result["skipped"].append(skip)
                continue
            try:
                base, rows = _sweep_point(timer, geom, fmts, measure, result, args.seed)
            except torch.cuda.OutOfMemoryError as e:  # the estimate was short
                torch.cuda.empty_cache()
                result["skipped"].append({"batch": batch, "context": context,
                                          "formats": [f.name for _, f in fmts],
                                          "reason": f"out of memory: {str(e).splitlines()[0]}"})
                continue
            result["sdpa"].append(base)
            result["decode"] += rows
    result["quantize_write"] = _sweep_writes(timer, args, mode, fmts, measure, result)
    result["topk"] = _sweep_topk(timer, args, measure)
    _print_sweep(result, plain=getattr(args, "plain", False))
    if args.json:
        write_json(args.json, result)
    return 0


def _sweep_need(geom: Geometry, fmts) -> int:
    """Device bytes one grid point needs at its peak: dense fp16 K/V (the
    SDPA baseline, and the source the pools are written from), the largest
    pool (one format at a time) and a margin."""
    biggest = max(pool_bytes(fmt, geom) for _, fmt in fmts)
    return dense_bytes(geom, torch.float16) + biggest + SWEEP_MARGIN_BYTES


def _sweep_skip(geom: Geometry, fmts, device) -> dict | None:
    """A 'skipped' record if the point does not fit in free device memory
    (estimated before allocating anything), else None. CPU: never skipped."""
    if device.type != "cuda":
        return None
    need, free = _sweep_need(geom, fmts), timing.cuda_free_bytes(device)
    if need <= free:
        return None
    return {"batch": geom.batch, "context": geom.context, "formats": [f.name for _, f in fmts],
            "needed_bytes": need, "free_bytes": free,
            "reason": f"needs ~{need / 2**30:.1f} GiB (dense fp16 K/V + largest pool + margin), "
                      f"{free / 2**30:.1f} GiB free"}


def _sweep_point(timer, geom: Geometry, fmts, measure, result, seed: int):
    """One (batch, context): dense fp16 K/V drawn on the device, SDPA timed on
    them, then per format a pool written from them and decode timed."""
    device = timer.device
    print(f"  batch {geom.batch} x context {geom.context} ...", file=sys.stderr)
    key, value = make_dense_kv(geom, device, torch.float16, seed)
    gen = torch.Generator().manual_seed(seed + geom.batch * 1_000_003 + geom.context)
    queries = _queries(geom, device, torch.float16, gen)
    r, how = _time_sdpa(timer, geom, key, value, queries, measure)
    base = dict(_baseline_row("sdpa_fp16", geom, key, value, r, result["read_bandwidth_gbps"]),
                batch=geom.batch, context=geom.context, **how)
    ref = _sdpa(queries[0][:, :, None], key, value, geom.num_heads // geom.num_kv_heads)[:, :, 0].float()
    tables, _, seq_lens = shuffled_tables(geom, device, gen)
    rows = []
    for spec, fmt in fmts:
        pool = kvcomp.allocate_pool(geom.num_blocks, geom.block_size, geom.num_kv_heads, geom.head_dim,
                                    fmt, device)
        with timing.cuda_validation(False):  # synthetic, finite data: skip the host-side checks
            write_dense(fmt, key, value, pool, tables, geom)
        calls = _decode_calls(timer, fmt, geom, pool, tables, seq_lens, queries)
        d = timer.measure_calls(calls, **measure)
        err = (calls[0]()[0].float() - ref).abs().max().item()
        rows.append(_sweep_row(spec, fmt, geom, d, base, result, seq_lens, err))
        del calls, pool
    del key, value
    return base, rows


def _sweep_row(spec, fmt, geom: Geometry, d: dict, base: dict, result: dict, seq_lens, err: float) -> dict:
    nbytes = _decode_bytes(fmt, geom, seq_lens)
    gbps = nbytes / d["ms"] / 1e6
    return dict(format=fmt.name, spec=spec, **geom.as_dict(), ms=d["ms"], min_ms=d["min_ms"],
                samples=d["n"], graph=d["graph"], bytes=nbytes, gbps=gbps,
                frac_of_copy_bw=gbps / result["copy_bandwidth_gbps"],
                frac_of_read_bw=gbps / result["read_bandwidth_gbps"],
                sdpa_fp16_ms=base["ms"], speedup_vs_sdpa_fp16=base["ms"] / d["ms"],
                gflops=geom.flops() / d["ms"] / 1e6, max_abs_err_vs_sdpa_fp16=err)


def _sweep_writes(timer, args, mode, fmts, measure, result) -> list[dict]:
    """quantize_write of ``write_tokens`` fp16 tokens (>= 64k by default) per format."""
    tokens = mode["write_tokens"]
    geom = Geometry(1, tokens, args.heads, args.kv_heads, args.head_dim, args.block_size)
    key, value = make_dense_kv(geom, timer.device, _act_dtype(timer.device), args.seed + 7)
    k, v = key[0].transpose(0, 1).contiguous(), value[0].transpose(0, 1).contiguous()  # [tokens, kvh, hd]
    del key, value
    gen = torch.Generator().manual_seed(args.seed + 11)
    return [dict(spec=spec, **_write_row(timer, geom, fmt, k, v, measure, gen, result)) for spec, fmt in fmts]


def _sweep_topk(timer, args, measure) -> list[dict]:
    """k = --topk-k over each of --topk-contexts scores per row, batch 1 and 16."""
    gen = torch.Generator().manual_seed(args.seed + 13)
    rows = []
    for batch in TOPK_BATCHES:
        for context in args.topk_contexts or TOPK_CONTEXTS:
            geom = Geometry(batch, context, args.heads, args.kv_heads, args.head_dim, args.block_size)
            rows.append(_topk_row(timer, geom, timer.device, min(args.topk_k, context), measure, gen))
    return rows


# ------------------------------------------------------------ tables
F2, F3 = "{:.2f}", "{:.3f}"


def _pct(x) -> str:
    return f"{100 * x:.0f}%"


def _print(result: dict, cuda: bool, plain: bool) -> None:
    c = result["config"]
    bw = f"read {result['read_bandwidth_gbps']:.1f} GB/s"
    if "read_bandwidth_1thread_gbps" in result:
        bw += f" (1 thread {result['read_bandwidth_1thread_gbps']:.1f})"
    bw += f", copy {result['copy_bandwidth_gbps']:.1f} GB/s (read+write)"
    title = (f"paged_decode_attention  batch={c['batch']} context={c['context']} heads={c['num_heads']}"
             f"/{c['num_kv_heads']} head_dim={c['head_dim']} block={c['block_size']}  [{bw}]")
    cols = [("format", "label", "{}"), ("ms", "ms", F3), ("MB read", "bytes", lambda b: f"{b / 1e6:.1f}"),
            ("GB/s", "gbps", "{:.1f}"), ("% read BW", "frac_of_read_bw", _pct)]
    if cuda:
        cols += [("% copy BW", "frac_of_copy_bw", _pct)]
    cols += [("GFLOP/s", "gflops", "{:.1f}")]
    cols += [(f"x {b['name']}", f"speedup_vs_{b['name']}", F2) for b in result["baselines"]]
    cols += [("x dequant+sdpa", "speedup_vs_dequant_sdpa", F2)]
    rows = [dict(label=b["name"] + " (dense)", **b) for b in result["baselines"]]
    rows += [dict(label=_label(r), **r) for r in result["decode"]]
    print_table(title, cols, rows, plain)
    _print_topk(result["topk"], plain)
    _print_writes(result["quantize_write"], cuda, plain)


def _print_topk(rows, plain: bool) -> None:
    print_table("heavy_hitter_topk",
                [("batch", "batch", "{}"), ("rows", "rows", "{}"), ("context", "context", "{}"), ("k", "k", "{}"),
                 ("kvcomp ms", "ms", F3), ("torch.topk ms", "torch_topk_ms", F3),
                 ("topk+sort ms", "torch_topk_sorted_ms", F3), ("x topk", "speedup_vs_torch_topk", F2),
                 ("x topk+sort", "speedup_vs_torch_topk_sorted", F2)], rows, plain)


def _print_writes(rows, cuda: bool, plain: bool) -> None:
    cols = [("format", "label", "{}"), ("op", "op", "{}"), ("tokens", "tokens", "{}"), ("ms", "ms", F3),
            ("MB r+w", "bytes", lambda b: f"{b / 1e6:.1f}"), ("GB/s", "gbps", F2)]
    if cuda:
        cols += [("% copy BW", "frac_of_copy_bw", _pct)]
    cols += [("Mtok/s", "tokens_per_s", lambda t: f"{t / 1e6:.2f}")]
    print_table("quantize-on-write (bytes: activations read + pool written)", cols,
                [dict(label=_label(r), **r) for r in rows], plain)


def _print_sweep(result: dict, plain: bool) -> None:
    c = result["config"]
    title = (f"paged_decode_attention sweep on {result['device']}: heads {c['num_heads']}/{c['num_kv_heads']}, "
             f"head_dim {c['head_dim']}, block {c['block_size']}  [copy {result['copy_bandwidth_gbps']:.0f} GB/s]")
    print_table(title, [("format", "label", "{}"), ("batch", "batch", "{}"), ("context", "context", "{}"),
                        ("ms", "ms", F3), ("MB read", "bytes", lambda b: f"{b / 1e6:.1f}"),
                        ("GB/s", "gbps", "{:.0f}"), ("% copy BW", "frac_of_copy_bw", _pct),
                        ("sdpa fp16 ms", "sdpa_fp16_ms", F3), ("x sdpa fp16", "speedup_vs_sdpa_fp16", F2)],
                [dict(label=_label(r), **r) for r in result["decode"]], plain)
    for s in result["skipped"]:
        print(f"skipped: batch {s['batch']} x context {s['context']}: {s['reason']}")
    cuda = result["device_type"] == "cuda"
    _print_topk(result["topk"], plain)
    _print_writes(result["quantize_write"], cuda, plain)


def _label(row: dict) -> str:
    """The spec as typed, with the canonical name when they differ (kivi2)."""
    return row["spec"] if row["spec"] == row["format"] else f"{row['spec']} ({row['format']})"

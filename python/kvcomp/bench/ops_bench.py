"""``kvcomp-bench ops``: paged_decode_attention, heavy_hitter_topk,
quantize_write and seal_blocks timings per format and shape, against dense
SDPA, the dequantize-then-SDPA path (transformers' QuantizedCache),
torch.topk, FlashInfer / flash-attn decode where importable, and the memory
bandwidth measured in the same run.

--batch and --context take comma-separated lists: every format is timed at
every batch x context, on fresh random K/V. ``--sweep`` runs the issue's GPU
grid instead (dense fp16 baselines only; points that do not fit in device
memory are skipped). On CUDA every op is timed by replaying a CUDA graph of
one call, bracketed by CUDA events, after the L2 is flushed; the median of
the samples is reported."""
from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import os
import sys

import torch
import torch.nn.functional as F

import kvcomp
from kvcomp import ops

from . import plots, timing
from .report import print_table, write_json
from .workload import (ALL_FORMATS, QUICK_FORMATS, SWEEP_BATCHES, SWEEP_CONTEXTS, SWEEP_FORMATS,
                       Geometry, dense, dense_bytes, fill_cache, make_dense_kv, make_kv, pool_bytes,
                       shuffled_tables, write_cache, write_dense)

# Defaults per mode; None in argparse means "take it from here".
FULL = dict(batch=[1], context=[32768], formats=ALL_FORMATS, repeats=30, warmup=2, max_seconds=2.0,
            write_tokens=16384, bandwidth_repeats=5)
QUICK = dict(batch=[1], context=[4096], formats=QUICK_FORMATS, repeats=10, warmup=1, max_seconds=0.5,
             write_tokens=4096, bandwidth_repeats=3)
SWEEP = dict(batch=SWEEP_BATCHES, context=SWEEP_CONTEXTS, formats=SWEEP_FORMATS, repeats=20, warmup=3,
             max_seconds=1.0, write_tokens=65536, bandwidth_repeats=10)
NUM_QUERIES = 8  # distinct query tensors, rotated so no call reuses the last one's
TOPK_BATCHES = (1, 16)
TOPK_CONTEXTS = (32768, 131072)
HOT_FORMAT = "fp16"  # the hot tier seal_blocks moves into each cold format
# Besides the largest pool and the dense K/V: decode workspace, graph pools, chunk copies.
SWEEP_MARGIN_BYTES = 2 << 30
BASELINES_NOTE = ("sdpa_*: scaled_dot_product_attention over the same tokens held dense (CUDA: flash "
                  "backend only); matmul_*: eager q.K^T, softmax, p.V; dequant_sdpa: gather_dequant of the "
                  "whole cache to the query dtype, then SDPA (transformers' QuantizedCache path); "
                  "flash_attn_fp16 / flashinfer_fp16: their decode kernels over dense fp16 K/V (CUDA, "
                  "when importable); torch.topk for heavy_hitter_topk")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto (default): cuda if available, else cpu")
    p.add_argument("--quick", action="store_true", help="small workload, well under a minute")
    p.add_argument("--sweep", action="store_true",
                   help=f"the issue's GPU grid: formats ({','.join(SWEEP_FORMATS)}) x --batch (default "
                        f"{','.join(map(str, SWEEP_BATCHES))}) x --context (default "
                        f"{','.join(map(str, SWEEP_CONTEXTS))}) at --heads/--kv-heads/--head-dim, each "
                        f"against dense fp16 SDPA; plus quantize_write, seal_blocks and top-k rows. Shapes "
                        f"that do not fit in device memory are skipped (and listed as such)")
    p.add_argument("--topk-contexts", type=_int_list,
                   help=f"scores per row of --sweep's top-k rows (default "
                        f"{','.join(map(str, TOPK_CONTEXTS))})")
    p.add_argument("--json", metavar="PATH", help="write all numbers to PATH")
    p.add_argument("--plot", metavar="PNG",
                   help="plot decode ms vs context per format (one panel per batch, dense baselines "
                        "dashed) to PNG; give several --context values for curves. Needs matplotlib")
    p.add_argument("--formats", help=f"comma-separated specs (default: {','.join(ALL_FORMATS)}; "
                                     f"--quick: {','.join(QUICK_FORMATS)}; "
                                     f"--sweep: {','.join(SWEEP_FORMATS)})")
    p.add_argument("--batch", type=_int_list,
                   help="sequences per decode call, comma-separated (default 1; --sweep "
                        f"{','.join(map(str, SWEEP_BATCHES))})")
    p.add_argument("--context", type=_int_list,
                   help="tokens per sequence, comma-separated (default 32768; --quick 4096; --sweep "
                        f"{','.join(map(str, SWEEP_CONTEXTS))})")
    p.add_argument("--heads", type=positive_int, default=32, help="query heads")
    p.add_argument("--kv-heads", type=positive_int, default=8)
    p.add_argument("--head-dim", type=int, choices=[64, 128, 256], default=128)
    p.add_argument("--block-size", type=int, choices=[16, 32, 64, 128], default=16)
    p.add_argument("--repeats", type=positive_int, help="timed samples per op (default 30; quick 10; sweep 20)")
    p.add_argument("--warmup", type=int, help="untimed calls first (default 2; quick 1; sweep 3)")
    p.add_argument("--max-seconds", type=float,
                   help="stop sampling an op after this long (>= 3 samples; default 2, quick 0.5)")
    p.add_argument("--topk-k", type=positive_int, default=1024, help="k of the top-k benchmark")
    p.add_argument("--write-tokens", type=positive_int,
                   help="tokens per quantize_write and seal_blocks call (default 16384; quick 4096; "
                        "sweep 65536)")
    p.add_argument("--bandwidth-mib", type=positive_int,
                   help="buffer for the bandwidth references (default 512 on CPU, 1024 on CUDA; "
                        ">= 512 to defeat caches)")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-flush", action="store_true",
                   help="do not evict the last-level cache before each sample")
    p.add_argument("--seed", type=int, default=0)


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [positive_int(t) for t in text.split(",") if t.strip()]
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"not a comma-separated list of positive integers: {text!r}")
    if not values:
        raise argparse.ArgumentTypeError("empty list")
    return values


def _resolve(args) -> tuple[dict, list[tuple[str, kvcomp.KVFormat]]]:
    """Fill mode defaults and validate everything before any slow work.
    Raises ValueError with a message for the user."""
    if args.sweep and args.quick:
        raise ValueError("--sweep and --quick exclude each other")
    mode = dict(SWEEP if args.sweep else QUICK if args.quick else FULL)
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
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available in this torch build/machine")
    if args.bandwidth_mib is None:
        args.bandwidth_mib = 1024 if args.device == "cuda" else 512
    if args.plot:
        plots.pyplot()  # fail now, not after minutes of timing, if matplotlib is missing
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
        if args.sweep:
            return _run_sweep(args, mode, fmts)
        return _run(args, mode, fmts)


def _run(args, mode: dict, fmts) -> int:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    timer = timing.Timer(device, flush=not args.no_flush)
    measure = dict(repeats=mode["repeats"], warmup=mode["warmup"], max_seconds=mode["max_seconds"])
    gen = torch.Generator().manual_seed(args.seed)
    act_dtype = _act_dtype(device)

    result = _machine(device, timer, args.bandwidth_mib, mode["bandwidth_repeats"])
    result["config"] = dict(batches=mode["batch"], contexts=mode["context"], num_heads=args.heads,
                            num_kv_heads=args.kv_heads, head_dim=args.head_dim, block_size=args.block_size,
                            quick=args.quick, repeats=mode["repeats"], warmup=mode["warmup"],
                            max_seconds=mode["max_seconds"], query_dtype=_dtype_name(act_dtype),
                            cache_flush=not args.no_flush, timing=_timing_note(timer),
                            baselines=BASELINES_NOTE, bandwidth_reference=_bw_reference(cuda))
    _announce(result, device)
    result.update(baselines=[], baselines_unavailable=[], decode=[], topk=[])
    for batch, context in itertools.product(mode["batch"], mode["context"]):
        geom = Geometry(batch, context, args.heads, args.kv_heads, args.head_dim, args.block_size)
        _decode_point(timer, geom, fmts, measure, result, gen, act_dtype)
        result["topk"].append(_topk_row(timer, geom, min(args.topk_k, context), measure, gen, result))
    wgeom = Geometry(1, mode["write_tokens"], args.heads, args.kv_heads, args.head_dim, args.block_size)
    key, value = make_kv(wgeom, device, act_dtype, gen)
    _writes(timer, wgeom, key, value, fmts, measure, gen, result)
    if not cuda and hasattr(os, "getloadavg"):
        result["load_average_1min_end"] = os.getloadavg()[0]
    _print(result, plain=args.plain)
    _save(args, result)
    return 0


def _save(args, result: dict) -> None:
    if args.plot:
        result["plot"] = plots.plot_ops(result, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.json:
        write_json(args.json, result)


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


def _bw_reference(cuda: bool) -> str:
    """The bandwidth the tables compare reads with: a large copy on GPUs; a
    read-only reduction on CPUs, where a copy also pays write-allocate
    traffic and so understates what reads get."""
    return "copy" if cuda else "read"


def _bw(gbps: float, result: dict) -> dict:
    """A row's GB/s as fractions of both bandwidths measured in this run."""
    return {"frac_of_read_bw": gbps / result["read_bandwidth_gbps"],
            "frac_of_copy_bw": gbps / result["copy_bandwidth_gbps"]}


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


def _dense_baseline(timer, geom: Geometry, key, value, queries, dtype, measure, result,
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
    return dict(_baseline_row(name, geom, k, v, r, result), **extra)


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


def _baseline_row(name: str, geom: Geometry, k, v, r: dict, result: dict) -> dict:
    nbytes = (k.numel() + v.numel()) * k.element_size()
    gbps = nbytes / r["ms"] / 1e6
    return {"name": name, "batch": geom.batch, "context": geom.context, "ms": r["ms"], "min_ms": r["min_ms"],
            "samples": r["n"], "graph": r["graph"], "bytes": nbytes, "gbps": gbps, **_bw(gbps, result),
            "gflops": geom.flops() / r["ms"] / 1e6}


# ------------------------------------------------------------ FlashInfer, flash-attn
def _flash_attn_calls(geom: Geometry, k, v, queries):
    from flash_attn import flash_attn_with_kvcache
    kc, vc = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()  # its layout: [b, ctx, kvh, d]
    lens = torch.full((geom.batch,), geom.context, dtype=torch.int32, device=k.device)
    return [functools.partial(flash_attn_with_kvcache, q.half()[:, None], kc, vc, cache_seqlens=lens)
            for q in queries]


def _flashinfer_calls(geom: Geometry, k, v, queries):
    import flashinfer
    bs, pages, dev = geom.block_size, geom.blocks_per_seq, k.device

    def paged(x):  # [b, kvh, ctx, d] -> pages of block_size tokens, HND: [b * pages, kvh, bs, d]
        x = F.pad(x, (0, 0, 0, pages * bs - geom.context))
        x = x.view(geom.batch, geom.num_kv_heads, pages, bs, geom.head_dim).transpose(1, 2)
        return x.reshape(-1, geom.num_kv_heads, bs, geom.head_dim)

    cache = (paged(k), paged(v))
    indptr = torch.arange(geom.batch + 1, dtype=torch.int32, device=dev) * pages
    indices = torch.arange(geom.batch * pages, dtype=torch.int32, device=dev)
    last = torch.full((geom.batch,), geom.context - (pages - 1) * bs, dtype=torch.int32, device=dev)
    workspace = torch.empty(128 << 20, dtype=torch.uint8, device=dev)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, kv_layout="HND")
    wrapper.plan(indptr, indices, last, geom.num_heads, geom.num_kv_heads, geom.head_dim, bs)
    return [functools.partial(wrapper.run, q.half(), cache) for q in queries]


EXTERNAL_BASELINES = {"flash_attn_fp16": _flash_attn_calls, "flashinfer_fp16": _flashinfer_calls}


def _external_baselines(timer, geom: Geometry, dense_kv, queries, measure, result) -> list[dict]:
    """flash-attn and FlashInfer decode over the tokens held dense in fp16
    (``dense_kv``: K and V ``[b, kvh, ctx, d]``), where importable: CUDA
    only. What could not be timed goes to ``baselines_unavailable`` with the
    reason, per batch x context."""
    rows = []
    for name, make_calls in EXTERNAL_BASELINES.items():
        reason = None
        if not timer.cuda:
            reason = "CUDA only"
        else:
            try:
                r = timer.measure_calls(make_calls(geom, *dense_kv, queries), **measure)
                rows.append(_baseline_row(name, geom, *dense_kv, r, result))
            except ImportError as e:
                reason = f"not importable: {e}"
            except Exception as e:  # third-party code: another API version, a shape it rejects, OOM
                torch.cuda.empty_cache()
                reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        if reason:
            result["baselines_unavailable"].append(
                {"name": name, "batch": geom.batch, "context": geom.context, "reason": reason})
    return rows


# ------------------------------------------------------------ decode
def _decode_point(timer, geom: Geometry, fmts, measure, result, gen, act_dtype) -> None:
    """One batch x context on fresh random K/V: the dense baselines, then
    paged decode per format, each row with its speedup over every baseline."""
    print(f"  batch {geom.batch} x context {geom.context} ...", file=sys.stderr)
    key, value = make_kv(geom, timer.device, act_dtype, gen)
    queries = _queries(geom, timer.device, act_dtype, gen)
    dtypes = (torch.float16, torch.bfloat16) if timer.cuda else (torch.float32, torch.bfloat16)
    bases = [_dense_baseline(timer, geom, key, value, queries, dt, measure, result) for dt in dtypes]
    bases.append(_dense_baseline(timer, geom, key, value, queries, act_dtype, measure, result, kind="matmul"))
    dense_kv = (dense(key, geom, torch.float16), dense(value, geom, torch.float16)) if timer.cuda else None
    bases += _external_baselines(timer, geom, dense_kv, queries, measure, result)
    del dense_kv
    result["baselines"] += bases
    for spec, fmt in fmts:
        row = _decode_row(timer, geom, fmt, key, value, queries, measure, result, gen, bases)
        result["decode"].append(dict(spec=spec, **row))


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


def _decode_row(timer, geom: Geometry, fmt, key, value, queries, measure, result, gen, bases) -> dict:
    print(f"    decode {fmt.name} ...", file=sys.stderr)  # the full run takes minutes
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
               graph=r["graph"], bytes=nbytes, gbps=gbps, **_bw(gbps, result),
               gflops=geom.flops() / r["ms"] / 1e6)
    for base in bases:
        row[f"speedup_vs_{base['name']}"] = base["ms"] / r["ms"]
    row.update(speedup_vs_dequant_sdpa=dq["ms"] / r["ms"], dequant_sdpa_ms=dq["ms"],
               max_abs_err_vs_dequant_sdpa=err)
    return row


# ------------------------------------------------------------ top-k, writes, seals
def _topk_row(timer, geom: Geometry, k: int, measure, gen, result) -> dict:
    """heavy_hitter_topk against torch.topk, alone and with the index sort that
    gives the op's ascending-position output. Bytes: the fp32 scores read."""
    device = timer.device
    shape = (geom.batch, geom.num_kv_heads, geom.context)
    scores = [torch.rand(shape, generator=gen).to(device) for _ in range(4)]
    seq_lens = torch.full((geom.batch,), geom.context, dtype=torch.int32, device=device)
    ours = timer.measure_calls([functools.partial(ops.heavy_hitter_topk, s, seq_lens, k) for s in scores],
                               **measure)
    plain = timer.measure_calls([functools.partial(torch.topk, s, k, dim=-1) for s in scores], **measure)
    srt = timer.measure_calls([functools.partial(_topk_sorted, s, k) for s in scores], **measure)
    nbytes = scores[0].numel() * 4
    gbps = nbytes / ours["ms"] / 1e6
    return {"batch": geom.batch, "num_kv_heads": geom.num_kv_heads, "context": geom.context, "k": k,
            "rows": geom.batch * geom.num_kv_heads, "ms": ours["ms"], "graph": ours["graph"],
            "bytes": nbytes, "gbps": gbps, **_bw(gbps, result),
            "torch_topk_ms": plain["ms"], "torch_topk_sorted_ms": srt["ms"],
            "speedup_vs_torch_topk": plain["ms"] / ours["ms"],
            "speedup_vs_torch_topk_sorted": srt["ms"] / ours["ms"]}


def _topk_sorted(scores, k):
    return torch.topk(scores, k, dim=-1).indices.sort(dim=-1)


def _writes(timer, geom: Geometry, k, v, fmts, measure, gen, result) -> None:
    """``quantize_write`` rows (per-token formats; per-channel ones can only
    be sealed) and ``seal_blocks`` rows (every format) for the ``geom.context``
    tokens of ``k``/``v`` ``[tokens, kvh, hd]``."""
    print(f"  quantize_write, seal_blocks of {geom.context} tokens ...", file=sys.stderr)
    result["quantize_write"] = [dict(spec=spec, **_write_row(timer, geom, fmt, k, v, measure, gen, result))
                                for spec, fmt in fmts if not fmt.per_channel]
    result["seal_blocks"] = [dict(spec=spec, **_seal_row(timer, geom, fmt, k, v, measure, gen, result))
                             for spec, fmt in fmts]


def _write_row(timer, geom: Geometry, fmt, k, v, measure, gen, result) -> dict:
    """Quantize-on-write of every token into the blocks of one sequence laid
    out behind a shuffled block table (prefill into a paged cache).
    Bytes: activations and slots read, pool written."""
    pool = kvcomp.allocate_pool(geom.num_blocks, geom.block_size, geom.num_kv_heads, geom.head_dim, fmt,
                                timer.device)
    _, slots, _ = shuffled_tables(geom, timer.device, gen)
    r = timer.measure_calls([functools.partial(ops.quantize_write, k, v, pool, slots, fmt.name)], **measure)
    read = 2 * k.numel() * k.element_size() + slots.numel() * 8
    written = geom.context * geom.num_kv_heads * fmt.bytes_per_token(geom.head_dim, geom.block_size)
    return dict(_io_row(fmt, "quantize_write", geom, r, read, written, result), act_dtype=_dtype_name(k.dtype))


def _seal_row(timer, geom: Geometry, fmt, k, v, measure, gen, result) -> dict:
    """seal_blocks of every block from an fp16 hot pool into ``fmt`` (the hot
    tier's full blocks moving to the cold tier), hot and cold blocks behind
    two shuffled tables. Bytes: hot tiles and block ids read, cold tiles written."""
    device = timer.device
    hot = kvcomp.allocate_pool(geom.num_blocks, geom.block_size, geom.num_kv_heads, geom.head_dim, HOT_FORMAT,
                               device)
    hot_tables, slots, _ = shuffled_tables(geom, device, gen)
    write_cache(kvcomp.KVFormat.parse(HOT_FORMAT), k, v, hot, slots, geom, device)
    cold = kvcomp.allocate_pool(geom.num_blocks, geom.block_size, geom.num_kv_heads, geom.head_dim, fmt, device)
    cold_tables, _, _ = shuffled_tables(geom, device, gen)
    src, dst = hot_tables.reshape(-1), cold_tables.reshape(-1)
    r = timer.measure_calls([functools.partial(ops.seal_blocks, hot, src, cold, dst, HOT_FORMAT, fmt.name)],
                            **measure)
    read = hot.numel() + (src.numel() + dst.numel()) * 4
    return dict(_io_row(fmt, "seal_blocks", geom, r, read, cold.numel(), result), hot_format=HOT_FORMAT)


def _io_row(fmt, op: str, geom: Geometry, r: dict, read: int, written: int, result: dict) -> dict:
    nbytes = read + written
    gbps = nbytes / r["ms"] / 1e6
    return {"format": fmt.name, "op": op, "tokens": geom.context, "num_kv_heads": geom.num_kv_heads,
            "head_dim": geom.head_dim, "block_size": geom.block_size, "ms": r["ms"], "min_ms": r["min_ms"],
            "samples": r["n"], "graph": r["graph"], "bytes_read": read, "bytes_written": written,
            "bytes": nbytes, "gbps": gbps, **_bw(gbps, result), "tokens_per_s": geom.context / (r["ms"] / 1e3)}


# ------------------------------------------------------------ the sweep
def _run_sweep(args, mode: dict, fmts) -> int:
    device = torch.device(args.device)
    timer = timing.Timer(device, flush=not args.no_flush)
    measure = dict(repeats=mode["repeats"], warmup=mode["warmup"], max_seconds=mode["max_seconds"])
    act_dtype = torch.float16  # queries and the dense baseline's K/V, as the issue asks
    result = _machine(device, timer, args.bandwidth_mib, mode["bandwidth_repeats"])
    result["config"] = dict(sweep=True, formats=[f.name for _, f in fmts], batches=mode["batch"],
                            contexts=mode["context"], num_heads=args.heads, num_kv_heads=args.kv_heads,
                            head_dim=args.head_dim, block_size=args.block_size, repeats=mode["repeats"],
                            warmup=mode["warmup"], max_seconds=mode["max_seconds"],
                            query_dtype=_dtype_name(act_dtype), cache_flush=not args.no_flush,
                            timing=_timing_note(timer),
                            sdpa_baseline="scaled_dot_product_attention over the same tokens held dense "
                                          "in fp16 (CUDA: flash backend only), one query per sequence",
                            baselines=BASELINES_NOTE, bandwidth_reference="copy")
    _announce(result, device)
    result.update(decode=[], sdpa=[], baselines=[], baselines_unavailable=[], skipped=[])
    for batch, context in itertools.product(mode["batch"], mode["context"]):
        geom = Geometry(batch, context, args.heads, args.kv_heads, args.head_dim, args.block_size)
        skip = _sweep_skip(geom, fmts, device)
        if skip:
            print(f"  skip batch {batch} x context {context}: {skip['reason']}", file=sys.stderr)
            result["skipped"].append(skip)
            continue
        try:
            _sweep_point(timer, geom, fmts, measure, result, args.seed)
        except torch.cuda.OutOfMemoryError as e:  # the estimate was short
            torch.cuda.empty_cache()
            result["skipped"].append({"batch": batch, "context": context,
                                      "formats": [f.name for _, f in fmts],
                                      "reason": f"out of memory: {str(e).splitlines()[0]}"})
    wgeom = Geometry(1, mode["write_tokens"], args.heads, args.kv_heads, args.head_dim, args.block_size)
    key, value = make_dense_kv(wgeom, device, _act_dtype(device), args.seed + 7)
    k, v = key[0].transpose(0, 1).contiguous(), value[0].transpose(0, 1).contiguous()  # [tokens, kvh, hd]
    del key, value
    _writes(timer, wgeom, k, v, fmts, measure, torch.Generator().manual_seed(args.seed + 11), result)
    result["topk"] = _sweep_topk(timer, args, measure, result)
    _print_sweep(result, plain=args.plain)
    _save(args, result)
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


def _sweep_point(timer, geom: Geometry, fmts, measure, result, seed: int) -> None:
    """One (batch, context): dense fp16 K/V drawn on the device, SDPA (and
    flash-attn / FlashInfer where importable) timed on them, then per format
    a pool written from them and decode timed."""
    device = timer.device
    print(f"  batch {geom.batch} x context {geom.context} ...", file=sys.stderr)
    key, value = make_dense_kv(geom, device, torch.float16, seed)
    gen = torch.Generator().manual_seed(seed + geom.batch * 1_000_003 + geom.context)
    queries = _queries(geom, device, torch.float16, gen)
    r, how = _time_sdpa(timer, geom, key, value, queries, measure)
    base = dict(_baseline_row("sdpa_fp16", geom, key, value, r, result), **how)
    external = _external_baselines(timer, geom, (key, value), queries, measure, result)
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
        row = _sweep_row(spec, fmt, geom, d, base, result, seq_lens, err)
        row.update({f"speedup_vs_{b['name']}": b["ms"] / d["ms"] for b in external})
        rows.append(row)
        del calls, pool
    del key, value
    # Appended only once the whole point ran (an OOM skips it entirely).
    result["sdpa"].append(base)
    result["baselines"] += external
    result["decode"] += rows


def _sweep_row(spec, fmt, geom: Geometry, d: dict, base: dict, result: dict, seq_lens, err: float) -> dict:
    nbytes = _decode_bytes(fmt, geom, seq_lens)
    gbps = nbytes / d["ms"] / 1e6
    return dict(format=fmt.name, spec=spec, **geom.as_dict(), ms=d["ms"], min_ms=d["min_ms"],
                samples=d["n"], graph=d["graph"], bytes=nbytes, gbps=gbps, **_bw(gbps, result),
                sdpa_fp16_ms=base["ms"], speedup_vs_sdpa_fp16=base["ms"] / d["ms"],
                gflops=geom.flops() / d["ms"] / 1e6, max_abs_err_vs_sdpa_fp16=err)


def _sweep_topk(timer, args, measure, result) -> list[dict]:
    """k = --topk-k over each of --topk-contexts scores per row, batch 1 and 16."""
    gen = torch.Generator().manual_seed(args.seed + 13)
    rows = []
    for batch in TOPK_BATCHES:
        for context in args.topk_contexts or TOPK_CONTEXTS:
            geom = Geometry(batch, context, args.heads, args.kv_heads, args.head_dim, args.block_size)
            rows.append(_topk_row(timer, geom, min(args.topk_k, context), measure, gen, result))
    return rows


# ------------------------------------------------------------ tables
F2, F3 = "{:.2f}", "{:.3f}"


def _pct(x) -> str:
    return f"{100 * x:.0f}%"


def _bw_col(result: dict) -> tuple:
    ref = result["config"]["bandwidth_reference"]
    return (f"% {ref} BW", f"frac_of_{ref}_bw", _pct)


def _bandwidths(result: dict) -> str:
    bw = f"read {result['read_bandwidth_gbps']:.1f} GB/s"
    if "read_bandwidth_1thread_gbps" in result:
        bw += f" (1 thread {result['read_bandwidth_1thread_gbps']:.1f})"
    return bw + f", copy {result['copy_bandwidth_gbps']:.1f} GB/s (read+write)"


def _print(result: dict, plain: bool) -> None:
    c = result["config"]
    for batch, context in itertools.product(c["batches"], c["contexts"]):
        bases = [b for b in result["baselines"] if (b["batch"], b["context"]) == (batch, context)]
        decode = [r for r in result["decode"] if (r["batch"], r["context"]) == (batch, context)]
        title = (f"paged_decode_attention  batch={batch} context={context} heads={c['num_heads']}"
                 f"/{c['num_kv_heads']} head_dim={c['head_dim']} block={c['block_size']}  "
                 f"[{_bandwidths(result)}]")
        cols = [("format", "label", "{}"), ("ms", "ms", F3), ("MB read", "bytes", lambda b: f"{b / 1e6:.1f}"),
                ("GB/s", "gbps", "{:.1f}"), _bw_col(result), ("GFLOP/s", "gflops", "{:.1f}")]
        cols += [(f"x {b['name']}", f"speedup_vs_{b['name']}", F2) for b in bases]
        cols += [("x dequant+sdpa", "speedup_vs_dequant_sdpa", F2)]
        rows = [dict(label=b["name"] + " (dense)", **b) for b in bases]
        rows += [dict(label=_label(r), **r) for r in decode]
        print_table(title, cols, rows, plain)
    _print_unavailable(result)
    _print_topk(result, plain)
    _print_writes(result, plain)


def _print_unavailable(result: dict) -> None:
    reasons = dict.fromkeys(f"{u['name']} ({u['reason']})" for u in result["baselines_unavailable"])
    if reasons:
        print(f"baselines not timed: {'; '.join(reasons)}\n")


def _print_topk(result: dict, plain: bool) -> None:
    print_table("heavy_hitter_topk (bytes: the fp32 scores read)",
                [("batch", "batch", "{}"), ("rows", "rows", "{}"), ("context", "context", "{}"), ("k", "k", "{}"),
                 ("kvcomp ms", "ms", F3), ("GB/s", "gbps", "{:.1f}"), _bw_col(result),
                 ("torch.topk ms", "torch_topk_ms", F3), ("topk+sort ms", "torch_topk_sorted_ms", F3),
                 ("x topk", "speedup_vs_torch_topk", F2), ("x topk+sort", "speedup_vs_torch_topk_sorted", F2)],
                result["topk"], plain)


def _print_writes(result: dict, plain: bool) -> None:
    cols = [("format", "label", "{}"), ("op", "op", "{}"), ("tokens", "tokens", "{}"), ("ms", "ms", F3),
            ("MB r+w", "bytes", lambda b: f"{b / 1e6:.1f}"), ("GB/s", "gbps", F2),
            ("% copy BW", "frac_of_copy_bw", _pct), ("Mtok/s", "tokens_per_s", lambda t: f"{t / 1e6:.2f}")]
    rows = [dict(label=_label(r), **r) for r in result["quantize_write"]]
    rows += [dict(label=f"{HOT_FORMAT} -> {_label(r)}", **r) for r in result["seal_blocks"]]
    print_table("quantize_write and seal_blocks (bytes read + written; write ops compared with the copy)",
                cols, rows, plain)


def _print_sweep(result: dict, plain: bool) -> None:
    c = result["config"]
    title = (f"paged_decode_attention sweep on {result['device']}: heads {c['num_heads']}/{c['num_kv_heads']}, "
             f"head_dim {c['head_dim']}, block {c['block_size']}  [copy {result['copy_bandwidth_gbps']:.0f} GB/s]")
    names = dict.fromkeys(b["name"] for b in result["baselines"])
    print_table(title, [("format", "label", "{}"), ("batch", "batch", "{}"), ("context", "context", "{}"),
                        ("ms", "ms", F3), ("MB read", "bytes", lambda b: f"{b / 1e6:.1f}"),
                        ("GB/s", "gbps", "{:.0f}"), ("% copy BW", "frac_of_copy_bw", _pct),
                        ("sdpa fp16 ms", "sdpa_fp16_ms", F3), ("x sdpa fp16", "speedup_vs_sdpa_fp16", F2)]
                + [(f"x {n}", f"speedup_vs_{n}", F2) for n in names],
                [dict(label=_label(r), **r) for r in result["decode"]], plain)
    for s in result["skipped"]:
        print(f"skipped: batch {s['batch']} x context {s['context']}: {s['reason']}")
    _print_unavailable(result)
    _print_topk(result, plain)
    _print_writes(result, plain)


def _label(row: dict) -> str:
    """The spec as typed, with the canonical name when they differ (kivi2)."""
    return row["spec"] if row["spec"] == row["format"] else f"{row['spec']} ({row['format']})"

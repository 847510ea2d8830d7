"""CUDA ops against the CPU ops and the float64 reference (``pytest -m cuda``).

Every test runs the CUDA op and the CPU op on the same random inputs (the
CPU suite's hypothesis strategies and heavy-tailed data, never zeros) and
checks both against tests/reference.py. Outputs are poisoned before each
call: buffers the op updates in place start as random bytes or NaN, and the
memory torch's caching allocator will hand out for fresh outputs is filled
with 0xFF (NaN in every float dtype) or 0xAB, so elements an op fails to
write show up.

Pools: CUDA and CPU kernels share the format math (csrc/kvcomp/format.h),
but the compilers may contract a*b+c into an FMA differently (nvcc does by
default, the host compiler per its flags), which can move a code by one
where the exact value sits on a rounding tie. So a CUDA-written pool must
(a) leave every byte the op does not write untouched, (b) decode to values
within the format's error bound of the input (the contract), and (c) match
the CPU-written bytes in >= 99.9% of the written bytes (a tie is rare; the
slack of a couple of bytes lets a tiny pool have one).

Skipped as a whole without a CUDA device. With one, a build without CUDA
kernels FAILS every test (a skip would hide a missing kernel).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

pytestmark = pytest.mark.cuda

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from hypothesis import given, settings, strategies as st  # noqa: E402

import kvcomp  # noqa: E402
from kvcomp import ops  # noqa: E402
from helpers import (ACT_DTYPES, ALL_FORMATS, HOT_FORMATS, TOKEN_FORMATS, assert_bounded,  # noqa: E402
                     assert_within_fp32_ulps, attention_shapes, build_cache, dtype_eps, examples,
                     gen_from, head_dims_for, heavy_tailed, rel_err)
from reference import (U32, channel_error_bound, parse_format, ref_accumulate_scores,  # noqa: E402
                       ref_attention, ref_compact, ref_compact_positions, ref_decode_pool, ref_gather,
                       ref_quantize_write, ref_seal_blocks, ref_topk, token_error_bound)
from test_attention import REL_TOL_FP32, logit_error_bound  # noqa: E402
from test_compact import random_keep  # noqa: E402
from test_merge import _check_merge, _states  # noqa: E402
from test_quantize_write import _tokens, write_case  # noqa: E402
from test_scores import _scores, score_case, topk_case  # noqa: E402
from test_seal import _hot_pool, seal_case  # noqa: E402

DEV = torch.device("cuda")
OPS = ("quantize_write", "seal_blocks", "paged_decode_attention", "merge_attention_states",
       "accumulate_scores", "heavy_hitter_topk", "compact", "gather_dequant")
MAX_DIFF_FRAC = 1e-3  # written pool bytes that may differ from the CPU's (rounding ties)
DIFF_SLACK_BYTES = 2


def _probe() -> str | None:
    """None if a tiny CUDA op runs; else the NotImplementedError's first line."""
    x = torch.ones(1, 1, 16, device=DEV)
    lse = torch.zeros(1, 1, device=DEV)
    try:
        ops.merge_attention_states(x, lse, x, lse)
    except NotImplementedError as e:
        return str(e).splitlines()[0]
    except Exception:  # a kernel that exists but fails: the tests will say how
        pass
    return None


_MISSING = _probe()


@pytest.fixture(autouse=True)
def _cuda_kernels_built():
    if _MISSING is not None:
        pytest.fail("CUDA is available but kvcomp was built without CUDA kernels (build with nvcc, "
                    f"e.g. bench/device_check.sh build): {_MISSING}", pytrace=False)


# ------------------------------------------------------------------ helpers
def dev(x):
    """x on the GPU (tensors keep their strides); other values as they are."""
    return x.to(DEV) if isinstance(x, torch.Tensor) else x


def dev_copy(t: torch.Tensor) -> torch.Tensor:
    """A device copy of a buffer the op will update in place (never an alias)."""
    return t.to(DEV, copy=True)


def poison_allocator(byte: int = 0xFF) -> None:
    """Fills memory that torch's caching allocator holds free with ``byte``,
    so the op's freshly allocated outputs start as garbage (0xFF: NaN in
    fp32/fp16/bf16). Best effort: blocks of the sizes small and large
    allocations are carved from are filled, then freed back to the cache."""
    bufs = [torch.empty(64 << 20, dtype=torch.uint8, device=DEV)]
    bufs += [torch.empty(512 << 10, dtype=torch.uint8, device=DEV) for _ in range(16)]
    bufs += [torch.empty(4 << 10, dtype=torch.uint8, device=DEV) for _ in range(64)]
    for b in bufs:
        b.fill_(byte)
    del bufs


def random_bytes(shape, g) -> torch.Tensor:
    return torch.randint(0, 256, tuple(shape), generator=g, dtype=torch.uint8)


def written_mask(ref_write, pool: torch.Tensor) -> torch.Tensor:
    """Bytes a pool-writing op writes, per the reference: those that come out
    the same whether the pool started as all 0x00 or all 0xFF."""
    return ref_write(torch.zeros_like(pool)) == ref_write(torch.full_like(pool, 0xFF))


def assert_pools_match(got: torch.Tensor, expect: torch.Tensor, written: torch.Tensor, what: str):
    """got: CUDA-written pool; expect: CPU-written pool from the same start."""
    got = got.cpu()
    untouched = ~written
    if not torch.equal(got[untouched], expect[untouched]):
        bad = ((got != expect) & untouched).nonzero()
        raise AssertionError(f"{what}: {len(bad)} bytes the op must not write changed; first at "
                             f"{bad[0].tolist()}")
    diff = int(((got != expect) & written).sum())
    n = int(written.sum())
    allowed = int(MAX_DIFF_FRAC * n) + DIFF_SLACK_BYTES
    assert diff <= allowed, f"{what}: {diff} of {n} written bytes differ from the CPU op's (allowed {allowed})"


def assert_decodes_within_bounds(pool, fmt: str, blocks, offsets, k, v, what: str):
    """Tokens (blocks[i], offsets[i]) of the pool decode (reference decoder)
    to k[i], v[i] [n, hkv, hd] within the contract's per-token bound."""
    Kt, Vt = ref_decode_pool(pool.cpu(), fmt)
    rf = parse_format(fmt)
    for side, X, T, name in ((rf.k, k, Kt, "key"), (rf.v, v, Vt, "value")):
        x = X.cpu().to(torch.float32).double()
        xh = T[blocks, :, offsets]
        if side.raw:
            dt = side.torch_dtype
            assert torch.equal(xh, x.to(dt).double()), f"{what} {name}: {side.kind} is not exact rounding"
        else:
            assert_bounded(xh, x, token_error_bound(side, x), f"{what} {name}")


def assert_within_dtype_ulps(actual, expect64, dtype, what=""):
    """Within one ulp of ``dtype`` of the float64 value (fp32: helpers' check)."""
    if dtype == torch.float32:
        return assert_within_fp32_ulps(actual, expect64, 1, what)
    a, e = actual.double(), expect64.double()
    tol = 2 * dtype_eps(dtype) * e.abs() + 2.0 ** -24
    bad = (a - e).abs() > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} elements beyond 1 {dtype} ulp; first at {bad.nonzero()[0].tolist()}"


def cuda_cache(c):
    """The device copies of a helpers.Cache's pool, block tables and lengths."""
    return dev(c.pool), dev(c.block_tables), dev(c.seq_lens)


def test_every_op_has_a_cuda_kernel():
    missing = [n for n in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"kvcomp::{n}", "CUDA")]
    assert not missing, f"no CUDA kernel registered for {missing}"


# ------------------------------------------------------------ quantize_write
def _check_quantize_write(fmt, k, v, slots, pool0, what):
    """CUDA quantize_write vs CPU vs reference from the same starting bytes."""
    cpu = pool0.clone()
    ops.quantize_write(k, v, cpu, slots, fmt)
    gpu = dev_copy(pool0)
    ops.quantize_write(dev(k), dev(v), gpu, dev(slots), fmt)
    written = written_mask(lambda p: ref_quantize_write(p, k, v, slots, fmt), pool0)
    assert_pools_match(gpu, cpu, written, what)
    bs = parse_format(fmt).geometry(pool0.shape[2])[1]
    keep = (slots >= 0).nonzero().flatten()
    s = slots[keep]
    assert_decodes_within_bounds(gpu, fmt, s // bs, s % bs, k[keep], v[keep], what)


@settings(max_examples=examples(100))
@given(write_case())
def test_quantize_write(c):
    g = gen_from(c["seed"])
    pool0 = random_bytes(kvcomp.allocate_pool(c["num_blocks"], c["bs"], c["hkv"], c["hd"], c["fmt"]).shape, g)
    k, v, slots = _tokens(c, g)
    _check_quantize_write(c["fmt"], k, v, slots, pool0, c["fmt"])


@pytest.mark.parametrize("fmt", TOKEN_FORMATS)
def test_quantize_write_every_format(fmt):
    """Many tokens per launch (more than a block per KV head), shuffled slots,
    some skipped; every activation dtype, head_dims 64 to 256."""
    dims = head_dims_for(fmt, (64, 128, 256))
    for i, dtype in enumerate(ACT_DTYPES):
        hd = dims[i % len(dims)]
        g = gen_from(zlib.crc32(f"{fmt}{dtype}{hd}".encode()))
        nb, bs, hkv = 16, 16, 4
        pool0 = random_bytes(kvcomp.allocate_pool(nb, bs, hkv, hd, fmt).shape, g)
        n = 200
        slots = torch.randperm(nb * bs, generator=g)[:n]
        slots[::17] = -1
        k = heavy_tailed((n, hkv, hd), g, dtype, magnitude=[1e-2, 1.0, 30.0][i % 3])
        v = heavy_tailed((n, hkv, hd), g, dtype)
        _check_quantize_write(fmt, k, v, slots, pool0, f"{fmt} hd {hd} {dtype}")


def test_quantize_write_non_contiguous_inputs():
    g = gen_from(5)
    k = heavy_tailed((2, 10, 64), g).transpose(0, 1)  # [10, 2, 64] strided
    v = heavy_tailed((64, 2, 10), g).permute(2, 1, 0)
    slots = torch.arange(20, dtype=torch.int64)[::2]
    for fmt in ("fp16", "int8", "int4", "fp8_e4m3/int2"):
        pool0 = random_bytes(kvcomp.allocate_pool(2, 16, 2, 64, fmt).shape, g)
        _check_quantize_write(fmt, k, v, slots, pool0, f"{fmt} strided")


# ------------------------------------------------------------ seal_blocks
def _check_seal(hot, src, dst, cold0, hot_fmt, cold_fmt, what):
    cpu = cold0.clone()
    ops.seal_blocks(hot, src, cpu, dst, hot_fmt, cold_fmt)
    gpu, hot_d = dev_copy(cold0), dev_copy(hot)
    ops.seal_blocks(hot_d, dev(src), gpu, dev(dst), hot_fmt, cold_fmt)
    assert torch.equal(hot_d.cpu(), hot), f"{what}: seal_blocks changed the hot pool"
    written = written_mask(lambda p: ref_seal_blocks(hot, src, p, dst, hot_fmt, cold_fmt), cold0)
    assert_pools_match(gpu, cpu, written, what)
    Kh, Vh = ref_decode_pool(hot, hot_fmt)
    Kc, Vc = ref_decode_pool(gpu.cpu(), cold_fmt)
    rf = parse_format(cold_fmt)
    for side, H, C, name in ((rf.k, Kh, Kc, "K"), (rf.v, Vh, Vc, "V")):
        x, xh = H[src.long()], C[dst.long()]
        if side.raw:
            dt = side.torch_dtype
            assert torch.equal(xh, x.to(dt).double()), f"{what} {name}: not exact rounding"
        else:
            bound = channel_error_bound(side, x) if side.per_channel else token_error_bound(side, x)
            assert_bounded(xh, x, bound, f"{what} {name}")


@settings(max_examples=examples(100))
@given(seal_case())
def test_seal_blocks(c):
    g = gen_from(c["seed"])
    hot, src, dst = _hot_pool(c, g)
    cold0 = random_bytes(kvcomp.allocate_pool(c["cold_blocks"], c["bs"], c["hkv"], c["hd"], c["cold"]).shape, g)
    _check_seal(hot, src, dst, cold0, c["hot"], c["cold"], f"{c['hot']} -> {c['cold']}")


@pytest.mark.parametrize("cold", ALL_FORMATS)
def test_seal_blocks_every_format(cold):
    """Several blocks per launch; small and large blocks; every hot format."""
    for i, bs in enumerate((16, 128, 32)):
        hot = HOT_FORMATS[(zlib.crc32(cold.encode()) + i) % len(HOT_FORMATS)]
        g = gen_from(zlib.crc32(f"{cold}{hot}{bs}".encode()))
        hd = head_dims_for(cold, (128, 64))[0]
        c = dict(hot=hot, hd=hd, bs=bs, hkv=2, hot_blocks=10, cold_blocks=12, n=8, dtype=torch.float32,
                 mag=1.0)
        hot_pool, src, dst = _hot_pool(c, g)
        cold0 = random_bytes(kvcomp.allocate_pool(12, bs, 2, hd, cold).shape, g)
        _check_seal(hot_pool, src, dst, cold0, hot, cold, f"{hot} -> {cold} bs {bs}")


# ------------------------------------------------------------ decode attention
def check_attention_cuda(c, q, scale, with_logits=True, reference_decoder=True):
    """paged_decode_attention on the GPU vs the CPU op and float64 attention
    over gather_dequant's K/V (and the reference decoder's); lse; logits_out."""
    fmt = c.fmt
    B, Hq, _ = q.shape
    max_len = int(c.seq_lens.max()) if B else 0
    pool, bt, sl = cuda_cache(c)
    logits = torch.full((B, Hq, max_len + 3), math.nan, device=DEV) if with_logits else None
    poison_allocator()
    out, lse = ops.paged_decode_attention(dev(q), pool, bt, sl, fmt, scale, logits)
    assert torch.equal(pool.cpu(), c.pool), "paged_decode_attention modified the pool"
    assert out.shape == q.shape and out.dtype == q.dtype and out.device.type == DEV.type
    assert lse.shape == (B, Hq) and lse.dtype == torch.float32
    out, lse = out.cpu(), lse.cpu()
    cpu_out, _ = ops.paged_decode_attention(q, c.pool, c.block_tables, c.seq_lens, fmt, scale)

    empty = c.seq_lens == 0
    assert bool((out[empty] == 0).all()), "seq_len 0 must give out 0"
    assert bool((lse[empty] == -math.inf).all()), "seq_len 0 must give lse -inf"
    full = ~empty
    if not full.any():
        return out, lse
    K, V = ops.gather_dequant(c.pool, c.block_tables, c.seq_lens, fmt, torch.float32)
    ref_out, ref_lse, ref_logits = ref_attention(q.double(), K.double(), V.double(), c.seq_lens, scale)
    refs = [("gather_dequant", ref_out)]
    if reference_decoder:
        RK, RV = ref_gather(c.pool, c.block_tables, c.seq_lens, fmt)
        refs.append(("reference decoder", ref_attention(q.double(), RK, RV, c.seq_lens, scale)[0]))
    tol = REL_TOL_FP32 + (dtype_eps(q.dtype) if q.dtype != torch.float32 else 0)
    refs.append(("the CPU op", cpu_out.double()))
    for name, ro in refs:
        err = (out.double() - ro).norm(dim=-1) / ro.norm(dim=-1).clamp(min=1e-300)
        worst = err[full].max().item()
        limit = 2 * tol if name == "the CPU op" else tol
        assert worst <= limit, f"{fmt}: out rel err {worst:.3g} > {limit:.3g} vs {name}"

    bound = logit_error_bound(q, K, c.seq_lens, scale)
    mask = torch.arange(max_len)[None, :] < c.seq_lens.long()[:, None]
    lse_tol = torch.where(mask[:, None, :], bound, torch.zeros_like(bound)).amax(-1) \
        + 4 * U32 * ref_lse.abs().nan_to_num(posinf=0, neginf=0) + 1e-6
    lse_err = (lse.double() - ref_lse).abs()
    assert bool((lse_err[full] <= lse_tol[full]).all()), f"{fmt}: lse err {lse_err[full].max().item():.3g}"
    if with_logits:
        m = mask[:, None, :].expand(B, Hq, max_len)
        got = logits[..., :max_len].cpu().double()
        assert bool(torch.isfinite(got[m]).all()), f"{fmt}: logits_out not written for every cached token"
        lerr = (got - ref_logits.nan_to_num(neginf=0)).abs()
        ltol = bound + 2 * U32 * ref_logits.abs().nan_to_num(posinf=0, neginf=0)
        bad = (lerr > ltol) & m
        assert not bad.any(), f"{fmt}: logits_out differs from scale*q.k at {bad.nonzero()[0].tolist()}"
    return out, lse


@settings(max_examples=examples(150))
@given(shape=attention_shapes(), dtype=st.sampled_from(ACT_DTYPES),
       seed=st.integers(0, 2**31 - 1), with_logits=st.booleans())
def test_decode_attention(shape, dtype, seed, with_logits):
    g = gen_from(seed)
    c = build_cache(shape["fmt"], shape["seq_lens"], shape["num_kv_heads"], shape["head_dim"],
                    shape["block_size"], g)
    B, hkv, hd = len(shape["seq_lens"]), shape["num_kv_heads"], shape["head_dim"]
    q = torch.randn(B, hkv * shape["group"], hd, generator=g).to(dtype)
    check_attention_cuda(c, q, hd ** -0.5, with_logits)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_decode_attention_every_format(fmt):
    """MQA, GQA 4 and 8, MHA; every block size; ragged lengths with 0."""
    hd = 128 if parse_format(fmt).head_dim_ok(128) else 64
    for i, (hkv, G, bs) in enumerate([(1, 8, 16), (2, 4, 32), (4, 1, 64), (2, 8, 128), (1, 32, 16)]):
        g = gen_from(zlib.crc32(fmt.encode()) + i)
        lens = [0, 1, bs - 1, bs, bs + 1, 3 * bs + 5]
        c = build_cache(fmt, lens, hkv, hd, bs, g)
        q = torch.randn(len(lens), hkv * G, hd, generator=g).to(ACT_DTYPES[i % 3])
        check_attention_cuda(c, q, hd ** -0.5, reference_decoder=i == 0)


@pytest.mark.parametrize("hd", [64, 128, 256])
@pytest.mark.parametrize("fmt", ["fp16", "int8", "int4", "kivi2"])
def test_decode_attention_head_dims(fmt, hd):
    g = gen_from(hd)
    c = build_cache(fmt, [300, 0, 45, 129], 2, hd, 32, g)
    q = torch.randn(4, 8, hd, generator=g, dtype=torch.float32).half()
    check_attention_cuda(c, q, hd ** -0.5)


@pytest.mark.parametrize("fmt,hkv,G,hd,bs", [
    ("fp16", 2, 4, 128, 16), ("bf16", 1, 8, 64, 32), ("fp8_e4m3", 1, 8, 128, 64), ("int8", 2, 1, 64, 128),
    ("int4", 2, 4, 128, 16), ("int4", 2, 8, 256, 32), ("int2", 1, 32, 128, 16), ("kivi2", 2, 4, 128, 32),
    ("int4c/int4", 1, 4, 64, 64)])
def test_decode_attention_long(fmt, hkv, G, hd, bs):
    """Long contexts (20k tokens) beside short and empty rows: the multi-split
    path and its log-sum-exp reduction; MQA to MHA, every head_dim."""
    g = gen_from(zlib.crc32(f"{fmt}{hkv}{G}{hd}".encode()))
    c = build_cache(fmt, [20000, 0, 1], hkv, hd, bs, g)
    q = torch.randn(3, hkv * G, hd, generator=g).half()
    check_attention_cuda(c, q, hd ** -0.5, reference_decoder=False)


def test_decode_attention_many_sequences():
    """A batch that fills the GPU without splitting (64 sequences, ragged)."""
    g = gen_from(41)
    lens = torch.randint(0, 1000, (64,), generator=g).tolist()
    lens[:3] = [0, 1, 999]
    c = build_cache("int4", lens, 4, 128, 16, g)
    q = torch.randn(64, 32, 128, generator=g).half()
    check_attention_cuda(c, q, 128 ** -0.5, reference_decoder=False)


def test_decode_attention_scale_extremes():
    g = gen_from(12)
    c = build_cache("int4", [100, 37], 2, 128, 32, g)
    q = torch.randn(2, 4, 128, generator=g)
    check_attention_cuda(c, q, 1.0)
    out, lse = check_attention_cuda(c, q, 0.0)
    assert torch.allclose(lse.double(), torch.log(c.seq_lens.double())[:, None].expand(2, 4), atol=1e-5)


def test_decode_attention_shared_blocks():
    """Two sequences naming the same blocks (prefix sharing)."""
    g = gen_from(13)
    c = build_cache("fp8_e4m3", [70], 2, 64, 32, g)
    bt = torch.cat([c.block_tables, c.block_tables])
    sl = torch.tensor([70, 40], dtype=torch.int32)
    q = torch.randn(1, 4, 64, generator=g).expand(2, 4, 64).contiguous()
    out, lse = ops.paged_decode_attention(dev(q), dev(c.pool), dev(bt), dev(sl), "fp8_e4m3", 0.125)
    cpu_out, cpu_lse = ops.paged_decode_attention(q, c.pool, bt, sl, "fp8_e4m3", 0.125)
    assert rel_err(out.cpu(), cpu_out) <= 2 * REL_TOL_FP32
    assert torch.allclose(lse.cpu(), cpu_lse, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ merge, scores
@settings(max_examples=examples(100))
@given(seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from(ACT_DTYPES),
       shape=st.sampled_from([(3, 4, 64), (1, 1, 128), (2, 8, 256), (5, 16), (2, 3, 2, 32), (64, 32, 128)]),
       spread=st.sampled_from([0.0, 1.0, 10.0, 100.0]), inf_frac=st.sampled_from([0.0, 0.3]))
def test_merge_attention_states(seed, dtype, shape, spread, inf_frac):
    g = gen_from(seed)
    oa, la, ob, lb = _states(shape, dtype, g, spread)
    if inf_frac:
        la[torch.rand(la.shape, generator=g) < inf_frac] = -math.inf
        lb[torch.rand(lb.shape, generator=g) < inf_frac] = -math.inf
    poison_allocator()
    out, lse = _check_merge(dev(oa), dev(la), dev(ob), dev(lb))  # vs float64, on the device
    cpu_out, cpu_lse = ops.merge_attention_states(oa, la, ob, lb)
    out, lse = out.cpu(), lse.cpu()
    assert torch.equal(torch.isinf(lse), torch.isinf(cpu_lse))
    assert bool(torch.isfinite(out).all())
    eps = U32 if dtype == torch.float32 else dtype_eps(dtype)
    assert rel_err(out, cpu_out) <= 16 * eps
    fin = torch.isfinite(cpu_lse)
    assert bool(((lse - cpu_lse).abs()[fin] <= 8 * U32 * (cpu_lse.abs()[fin] + 1)).all())


def _accumulate_tol(logits, lse, ref, G, L):
    """The CPU test's bound: each term exp(l - lse) costs ~(|l - lse| + 4) u,
    the sum over the group (G + 2) u of the result."""
    B, Hq = lse.shape
    lse_d = lse.double()
    terms = torch.exp(logits.double()[..., :L] - lse_d[..., None].masked_fill(torch.isinf(lse_d)[..., None], 0))
    dist = (logits.double()[..., :L] - lse_d[..., None]).abs().nan_to_num(posinf=0)
    term_err = (terms * (dist + 4) * U32).reshape(B, Hq // G, G, L).sum(2)
    return term_err + (G + 2) * U32 * ref.abs() + 1e-30


@given(score_case())
def test_accumulate_scores(c):
    g = gen_from(c["seed"])
    B, Hq, L = c["batch"], c["hkv"] * c["G"], c["L"]
    logits = torch.randn(B, Hq, L + c["extra"], generator=g) * c["spread"]
    sl = torch.tensor(c["lens"], dtype=torch.int32)
    mask = torch.arange(L + c["extra"])[None, :] < sl.long()[:, None]
    lse = torch.logsumexp(logits.double().masked_fill(~mask[:, None], -math.inf), -1).float()
    before = torch.rand(B, c["hkv"], L, generator=g) * 3
    scores = dev_copy(before)
    ops.accumulate_scores(dev(logits), dev(lse), dev(sl), scores)
    scores = scores.cpu()
    cpu = before.clone()
    ops.accumulate_scores(logits, lse, sl, cpu)
    ref = ref_accumulate_scores(logits, lse, sl, before)
    for b in range(B):
        n = int(sl[b])
        assert torch.equal(scores[b, :, n:], before[b, :, n:]), "scores past seq_len were written"
    tol = _accumulate_tol(logits, lse, ref, c["G"], L)
    for name, expect in (("reference", ref), ("the CPU op", cpu.double())):
        err = (scores.double() - expect).abs()
        limit = tol if name == "reference" else 2 * tol
        assert bool((err <= limit).all()), f"accumulate vs {name}: err/tol {(err / limit).max().item():.3g}"


# ------------------------------------------------------------------- top-k
def check_topk(scores, sl, k, exact_reference=True):
    poison_allocator(0xAB)
    got = ops.heavy_hitter_topk(dev(scores), dev(sl), k)
    assert got.dtype == torch.int32 and got.device.type == DEV.type
    assert got.shape == (scores.shape[0], scores.shape[1], k)
    got = got.cpu()
    cpu = ops.heavy_hitter_topk(scores, sl, k)
    if not torch.equal(got, cpu):
        bad = (got != cpu).nonzero()[0].tolist()
        raise AssertionError(f"top-k differs from the CPU op at {bad}: {got[tuple(bad[:2])].tolist()} vs "
                             f"{cpu[tuple(bad[:2])].tolist()}")
    if exact_reference:
        assert torch.equal(got, ref_topk(scores, sl, k))


@settings(max_examples=examples(150))
@given(topk_case())
def test_topk(c):
    g = gen_from(c["seed"])
    check_topk(_scores(c, g), torch.tensor(c["lens"], dtype=torch.int32), c["k"])


def test_topk_ties_and_short_rows():
    s = torch.tensor([[[1.0, 3.0, 3.0, 2.0, 3.0, 3.0, 0.5]]])
    check_topk(s, torch.tensor([7], dtype=torch.int32), 3)
    check_topk(s, torch.tensor([7], dtype=torch.int32), 5)
    check_topk(torch.zeros(1, 1, 50), torch.tensor([50], dtype=torch.int32), 4)
    check_topk(torch.tensor([[[1.0, 2.0, 9.0, 9.0]]]), torch.tensor([2], dtype=torch.int32), 1)
    s = torch.randn(3, 2, 10)
    sl = torch.tensor([0, 3, 10], dtype=torch.int32)
    for k in (1, 5, 10, 15):  # k > seq_len, k > L
        check_topk(s, sl, k)


def test_topk_special_values():
    """NaN (ordered lowest, as on the CPU), +-inf, -0 == +0: same as the CPU op."""
    g = gen_from(23)
    s = torch.randn(2, 3, 3000, generator=g)
    s[0, 0, ::7] = math.nan
    s[0, 1, ::5] = math.inf
    s[0, 2, ::3] = -math.inf
    s[1, 0, :] = 0.0
    s[1, 0, ::2] = -0.0
    s[1, 1, :] = math.nan
    sl = torch.tensor([3000, 2500], dtype=torch.int32)
    for k in (1, 100, 1024, 2999):
        check_topk(s, sl, k, exact_reference=False)


@pytest.mark.parametrize("distinct", [3, 1000, None])
@pytest.mark.parametrize("L", [32768, 131072])
def test_topk_long_rows(L, distinct):
    """k = 1024 of 32k and 128k scores a row (the bench's shapes), with many
    ties (few distinct values), ragged seq_lens."""
    g = gen_from(L + (distinct or 0))
    c = dict(batch=2, H=4, L=L, distinct=distinct)
    s = _scores(c, g)
    sl = torch.tensor([L, L // 3 + 7], dtype=torch.int32)
    for k in (1024, 1, 5000):
        check_topk(s, sl, k, exact_reference=False)  # ref_topk is a Python sort: too slow here
    # spot-check one row against the reference's definition
    row = s[1, 2, : int(sl[1])]
    order = sorted(range(len(row)), key=lambda i: (-float(row[i]), i))[:1024]
    got = ops.heavy_hitter_topk(dev(s), dev(sl), 1024).cpu()
    assert got[1, 2].tolist() == sorted(order)


def test_topk_non_contiguous():
    s = torch.randn(50, 3, 2).permute(2, 1, 0)
    check_topk(s, torch.tensor([50, 20], dtype=torch.int32), 7)


# ------------------------------------------------------------ gather_dequant
@settings(max_examples=examples(100))
@given(shape=attention_shapes(), dtype=st.sampled_from(ACT_DTYPES), seed=st.integers(0, 2**31 - 1))
def test_gather_dequant(shape, dtype, seed):
    g = gen_from(seed)
    fmt = shape["fmt"]
    c = build_cache(fmt, shape["seq_lens"], shape["num_kv_heads"], shape["head_dim"], shape["block_size"], g)
    pool, bt, sl = cuda_cache(c)
    poison_allocator()
    K, V = ops.gather_dequant(pool, bt, sl, fmt, dtype)
    assert K.dtype == V.dtype == dtype and K.device.type == DEV.type
    RK, RV = ref_gather(c.pool, c.block_tables, c.seq_lens, fmt)
    assert K.shape == RK.shape and V.shape == RV.shape
    K, V = K.cpu(), V.cpu()
    for name, X, R in (("K", K, RK), ("V", V, RV)):
        assert_within_dtype_ulps(X, R, dtype, f"{fmt} gather {name} {dtype}")
        for b in range(len(shape["seq_lens"])):  # R is 0 there, so this is exact
            assert bool((X[b, :, int(c.seq_lens[b]):] == 0).all()), f"{name} not zero past seq_len"


# ------------------------------------------------------------------ compact
def check_compact_cuda(c, keep):
    """CUDA compact vs the CPU op and the reference compaction."""
    fmt, bs = c.fmt, c.block_size
    rf = parse_format(fmt)
    before = c.pool.clone()
    R0 = ref_gather(before, c.block_tables, c.seq_lens, fmt)
    cpu = before.clone()
    ops.compact(cpu, c.block_tables, keep, fmt)
    gpu = dev_copy(before)
    ops.compact(gpu, dev(c.block_tables), dev(keep), fmt)
    gpu = gpu.cpu()
    pos = ref_compact_positions(keep)
    B, H = keep.shape[:2]
    n_after = torch.tensor([max(len(p) for p in pos[b]) for b in range(B)], dtype=torch.int32)
    G1 = ref_gather(gpu, c.block_tables, n_after, fmt)
    C1 = ref_gather(cpu, c.block_tables, n_after, fmt)
    Kc, Vc = ref_compact(R0[0], R0[1], keep)
    for side, A1, B1, C, name in ((rf.k, G1[0], C1[0], Kc, "K"), (rf.v, G1[1], C1[1], Vc, "V")):
        for b in range(B):
            for h in range(H):
                n = len(pos[b][h])
                if not side.per_channel:  # tokens move bit-exactly
                    assert torch.equal(A1[b, h, :n], C[b][h]), f"{fmt} {name}[{b},{h}] not moved exactly"
                    continue
                for first in range(0, n, bs):  # re-quantized per destination block
                    x = C[b][h][first: first + bs]
                    bound = channel_error_bound(side, x)
                    for got, who in ((A1, "CUDA"), (B1, "CPU")):
                        err = (got[b, h, first: first + len(x)] - x).abs()
                        assert bool((err <= bound).all()), f"{fmt} {name}[{b},{h}] ({who}) beyond the bound"
    named = set(c.block_tables[c.block_tables >= 0].tolist())
    for blk in range(before.shape[0]):
        if blk not in named:
            assert torch.equal(gpu[blk], before[blk]), f"spare block {blk} was written"


@settings(max_examples=examples(100))
@given(seed=st.integers(0, 2**31 - 1), fmt=st.sampled_from(ALL_FORMATS),
       bs=st.sampled_from([16, 32, 64, 128]), hkv=st.sampled_from([1, 2, 3]),
       lens=st.lists(st.integers(0, 300), min_size=1, max_size=3),
       frac=st.sampled_from([None, 0.1, 0.5, 0.95]), minus_ones=st.booleans())
def test_compact(seed, fmt, bs, hkv, lens, frac, minus_ones):
    g = gen_from(seed)
    hd = head_dims_for(fmt, (64, 128))[0]
    c = build_cache(fmt, lens, hkv, hd, bs, g)
    check_compact_cuda(c, random_keep(lens, hkv, g, keep_frac=frac, minus_ones=minus_ones))


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_compact_every_format(fmt):
    g = gen_from(5)
    hd = head_dims_for(fmt, (64, 128))[0]
    lens = [100, 33, 0, 64]
    c = build_cache(fmt, lens, 2, hd, 16, g)
    check_compact_cuda(c, random_keep(lens, 2, g, keep_frac=0.4))
    # keeping every token in place changes no byte
    c = build_cache(fmt, lens, 2, hd, 32, g)
    keep = torch.full((4, 2, 100), -1, dtype=torch.int32)
    for b, n in enumerate(lens):
        keep[b, :, :n] = torch.arange(n, dtype=torch.int32)
    pool = dev_copy(c.pool)
    ops.compact(pool, dev(c.block_tables), dev(keep), fmt)
    assert torch.equal(pool.cpu(), c.pool)


# ------------------------------------------------------------ CUDA graphs
def _decode_step_state(g, hot_lens, cold):
    """Device state of a two-tier decode step: a cold int4 cache (given), an
    fp16 hot pool prefilled with hot_lens tokens, scores, logits."""
    B, hkv, hd, bs = len(hot_lens), cold.num_kv_heads, cold.head_dim, cold.block_size
    per_seq = 4
    hot = kvcomp.allocate_pool(B * per_seq, bs, hkv, hd, "fp16", DEV)
    hot_bt = torch.arange(B * per_seq, dtype=torch.int32, device=DEV).view(B, per_seq)
    for b, n in enumerate(hot_lens):
        slots = hot_bt[b, torch.arange(n, device=DEV) // bs].long() * bs + torch.arange(n, device=DEV) % bs
        x = dev(heavy_tailed((n, hkv, hd), g, torch.float16))
        ops.quantize_write(x, x.flip(-1).contiguous(), hot, slots, "fp16")
    L = int(cold.seq_lens.max())
    return dict(hot=hot, hot_bt=hot_bt, hot_sl=torch.tensor(hot_lens, dtype=torch.int32, device=DEV),
                cold=dev(cold.pool), cold_bt=dev(cold.block_tables), cold_sl=dev(cold.seq_lens),
                logits=torch.zeros(B, 8 * hkv, L, device=DEV), scores=torch.zeros(B, hkv, L, device=DEV))


def _decode_step(st_, q, k_new, v_new, slots, scale):
    """Append one token per sequence to the hot tier, attend both tiers,
    merge, accumulate heavy-hitter scores over the cold tier."""
    ops.quantize_write(k_new, v_new, st_["hot"], slots, "fp16")
    oc, lc = ops.paged_decode_attention(q, st_["cold"], st_["cold_bt"], st_["cold_sl"], "int4", scale,
                                        st_["logits"])
    oh, lh = ops.paged_decode_attention(q, st_["hot"], st_["hot_bt"], st_["hot_sl"], "fp16", scale)
    out, lse = ops.merge_attention_states(oc, lc, oh, lh)
    ops.accumulate_scores(st_["logits"], lse, st_["cold_sl"], st_["scores"])
    return out, lse


def test_cuda_graph_decode_step():
    """quantize_write + paged_decode_attention (x2) + merge + accumulate_scores
    captured in one CUDA graph (validation on: it must be skipped while
    capturing, and no op may synchronize); replays with new data copied into
    the static inputs equal eager calls on a twin state."""
    g = gen_from(31)
    hkv, hd, bs, hot_lens = 2, 128, 16, [0, 3, 10]
    cold = build_cache("int4", [200, 37, 0], hkv, hd, bs, g)
    B, Hq, scale = len(hot_lens), 8 * hkv, hd ** -0.5
    graph_state = _decode_step_state(gen_from(1), hot_lens, cold)
    eager_state = _decode_step_state(gen_from(1), hot_lens, cold)
    assert torch.equal(graph_state["hot"], eager_state["hot"])
    q = torch.zeros(B, Hq, hd, dtype=torch.float16, device=DEV)
    k_new = torch.zeros(B, hkv, hd, dtype=torch.float16, device=DEV)
    v_new = torch.zeros_like(k_new)
    slots = torch.full((B,), -1, dtype=torch.int64, device=DEV)  # warm-up and capture write nothing

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _decode_step(graph_state, q, k_new, v_new, slots, scale)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_lse = _decode_step(graph_state, q, k_new, v_new, slots, scale)
    graph_state["scores"].zero_()  # undo the warm-up's accumulation
    torch.cuda.synchronize()

    lens = list(hot_lens)
    for step in range(4):
        new_q = dev(torch.randn(B, Hq, hd, generator=g).half())
        new_k = dev(heavy_tailed((B, hkv, hd), g, torch.float16))
        new_v = dev(heavy_tailed((B, hkv, hd), g, torch.float16))
        pos = torch.tensor(lens)
        new_slots = dev(graph_state["hot_bt"].cpu()[torch.arange(B), pos // bs].long() * bs + pos % bs)
        lens = [n + 1 for n in lens]
        new_sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
        for dst, src in ((q, new_q), (k_new, new_k), (v_new, new_v), (slots, new_slots),
                         (graph_state["hot_sl"], new_sl)):
            dst.copy_(src)
        graph.replay()
        eager_state["hot_sl"].copy_(new_sl)
        out, lse = _decode_step(eager_state, new_q, new_k, new_v, new_slots, scale)
        torch.cuda.synchronize()
        assert torch.equal(graph_state["hot"], eager_state["hot"]), f"step {step}: hot pools differ"
        # the same kernels on the same data (fp16 out: one rounding of slack)
        assert rel_err(static_out.float(), out.float()) <= 2 * dtype_eps(torch.float16), \
            f"step {step}: out differs from eager"
        assert torch.allclose(static_lse, lse, rtol=1e-5, atol=1e-5), f"step {step}: lse differs"
        assert torch.allclose(graph_state["scores"], eager_state["scores"], rtol=1e-5, atol=1e-7), \
            f"step {step}: scores differ"


# ------------------------------------------------------------ opcheck
def _opcheck_cases():
    from test_opcheck import _cases
    return {name: (op, tuple(dev(a) for a in args)) for name, (op, args) in _cases().items()}


@pytest.mark.parametrize("name", ["quantize_write", "seal_blocks", "paged_decode_attention",
                                  "paged_decode_attention_logits", "merge_attention_states",
                                  "accumulate_scores", "heavy_hitter_topk", "compact", "compact_per_token",
                                  "gather_dequant", "gather_dequant_fp16"])
def test_opcheck(name):
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, args)


# ------------------------------------------------------------ bad inputs
def _message(e: BaseException) -> str:
    """The error's text without a C++ backtrace, device names unified."""
    return str(e).split("\nException raised from")[0].replace("cuda:0", "cpu").strip()


def _expect_same_rejection(op, args, mutable=()):
    """op(*args) on the CPU raises; the same call on the GPU raises the same
    type (ValueError) with the same message and leaves mutable args alone."""
    with pytest.raises((ValueError, RuntimeError)) as cpu_exc:
        op(*args)
    cuda_args = [dev(a) for a in args]
    before = [cuda_args[i].clone() for i in mutable]
    with pytest.raises(Exception) as cuda_exc:
        op(*cuda_args)
    assert type(cuda_exc.value) is type(cpu_exc.value), \
        f"CUDA raised {type(cuda_exc.value).__name__}: {cuda_exc.value}; CPU {type(cpu_exc.value).__name__}"
    assert _message(cuda_exc.value) == _message(cpu_exc.value)
    for i, b in zip(mutable, before):
        assert torch.equal(cuda_args[i], b), "a rejected call modified its in-place argument"


def _rejection_cases():
    import test_bad_inputs as T
    cases = {}
    for name, spec in T._qw_cases().items():
        pool, k, v, slots = T._qw_base()
        args = (spec.get("key", lambda x: x)(k), spec.get("value", lambda x: x)(v), pool,
                spec.get("slots", lambda x: x)(slots), spec.get("fmt", "int8"))
        cases[f"quantize_write-{name}"] = (ops.quantize_write, args, (2,))
    for name, (mods, _) in T.SEAL_CASES.items():
        hot, src, cold, dst = T._seal_base("int4c")
        args = (hot, mods.get("src", lambda x: x)(src), cold, mods.get("dst", lambda x: x)(dst),
                mods.get("hot_fmt", "fp16"), mods.get("cold_fmt", "int4c"))
        cases[f"seal_blocks-{name}"] = (ops.seal_blocks, args, (0, 2))
    for name, (mods, _) in T.ATTN_CASES.items():
        c, q = T._attn_base()
        q = mods.get("q", lambda q, c: q)(q, c)
        args = (q, mods.get("pool", lambda c: c.pool)(c), mods.get("bt", lambda c: c.block_tables)(c),
                mods.get("sl", lambda c: c.seq_lens)(c), mods.get("fmt", "int4"), mods.get("scale", 0.125))
        cases[f"paged_decode_attention-{name}"] = (ops.paged_decode_attention, args, ())
    for name, (mods, _) in T.COMPACT_CASES.items():
        c, keep = T._compact_base("int4")
        args = (c.pool, mods.get("bt", lambda c: c.block_tables)(c), mods.get("keep", lambda k, c: k)(keep, c),
                mods.get("fmt", "int4"))
        cases[f"compact-{name}"] = (ops.compact, args, (0,))
    g = gen_from(4)
    s = torch.randn(2, 2, 20, generator=g)
    sl = torch.tensor([20, 7], dtype=torch.int32)
    for i, args in enumerate([(s, sl, 0), (s.double(), sl, 4), (s, torch.tensor([21, 7], dtype=torch.int32), 4),
                              (s, torch.tensor([20, -1], dtype=torch.int32), 4), (s, sl[:1], 4)]):
        cases[f"heavy_hitter_topk-{i}"] = (ops.heavy_hitter_topk, args, ())
    logits, lse = torch.randn(2, 8, 20, generator=g), torch.randn(2, 8, generator=g) + 4
    for i, args in enumerate([(logits.half(), lse, sl, torch.zeros(2, 2, 20)),
                              (logits, lse[:, :4], sl, torch.zeros(2, 2, 20)),
                              (logits, lse, torch.tensor([21, 7], dtype=torch.int32), torch.zeros(2, 2, 20)),
                              (logits, lse, sl, torch.zeros(2, 3, 20)),
                              (logits, lse, sl, torch.zeros(2, 2, 10))]):
        cases[f"accumulate_scores-{i}"] = (ops.accumulate_scores, args, (3,))
    oa, la = torch.randn(2, 4, 64, generator=g), torch.randn(2, 4, generator=g)
    for i, args in enumerate([(oa.int(), la, oa.int(), la), (oa, la, oa[:, :3], la), (oa, la.double(), oa, la),
                              (oa, la, oa.half(), la)]):
        cases[f"merge_attention_states-{i}"] = (ops.merge_attention_states, args, ())
    c, _ = T._attn_base()
    for i, (bt, lens) in enumerate([(c.block_tables, torch.tensor([20, 9999], dtype=torch.int32)),
                                    (T._bt_with(c, 0, 1, 2**30), c.seq_lens),
                                    (T._bt_with(c, 0, 0, -1), c.seq_lens)]):
        cases[f"gather_dequant-{i}"] = (ops.gather_dequant, (c.pool, bt, lens, "int4", torch.float32), ())
    return cases


_REJECTIONS = _rejection_cases()


@pytest.mark.parametrize("name", sorted(_REJECTIONS))
def test_rejects_like_cpu(name):
    """With validation on (the default), bad inputs raise on the GPU what they
    raise on the CPU: NaN/Inf, out-of-range ids and lengths included."""
    op, args, mutable = _REJECTIONS[name]
    _expect_same_rejection(op, args, mutable)


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8_e4m3", "fp16", "bf16"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", ACT_DTYPES)
def test_quantize_write_rejects_non_finite(fmt, bad, dtype):
    import test_bad_inputs as T
    pool, k, v, slots = T._qw_base(fmt)
    k, v = k.to(dtype), v.to(dtype)
    v[1, 1, 7] = bad
    _expect_same_rejection(ops.quantize_write, (k, v, pool, slots, fmt), (2,))


def _mixed_device_cases():
    """(op, args built with one argument left on the CPU, that argument's name)."""
    g = gen_from(8)
    c = build_cache("int4", [20, 7], 2, 64, 16, g)
    kivi = build_cache("kivi2", [40, 16], 2, 64, 16, g)
    k, v = heavy_tailed((3, 2, 64), g), heavy_tailed((3, 2, 64), g)
    slots = torch.tensor([3, 40, 0])
    q = torch.randn(2, 8, 64, generator=g)
    logits, lse = torch.randn(2, 8, 20, generator=g), torch.randn(2, 8, generator=g) + 4
    o = torch.randn(2, 8, 64, generator=g)
    scores = torch.zeros(2, 2, 20)
    ids = torch.tensor([0, 1], dtype=torch.int32)
    keep = torch.tensor([[[0, 3], [1, 2]], [[2, 4], [-1, 6]]], dtype=torch.int32)
    cold = kvcomp.allocate_pool(3, 16, 2, 64, "int4c")
    table = [
        (ops.quantize_write, [k, v, c.pool, slots, "int4"], ["key", "value", "slot_mapping"]),
        (ops.seal_blocks, [kivi.hot_pool, ids, cold, ids, "fp16", "int4c"], ["src_blocks", "cold_pool", "dst_blocks"]),
        (ops.paged_decode_attention, [q, c.pool, c.block_tables, c.seq_lens, "int4", 0.125, torch.zeros(2, 8, 20)],
         ["query", "block_tables", "seq_lens", "logits_out"]),
        (ops.merge_attention_states, [o, lse, o, lse], ["lse_a", "out_b", "lse_b"]),
        (ops.accumulate_scores, [logits, lse, c.seq_lens, scores], ["lse", "seq_lens", "scores"]),
        (ops.heavy_hitter_topk, [scores, c.seq_lens, 3], ["seq_lens"]),
        (ops.compact, [c.pool, c.block_tables, keep, "int4"], ["block_tables", "keep"]),
        (ops.gather_dequant, [c.pool, c.block_tables, c.seq_lens, "int4", torch.float32],
         ["block_tables", "seq_lens"]),
    ]
    names = {ops.quantize_write: ["key", "value", "pool", "slot_mapping"],
             ops.seal_blocks: ["hot_pool", "src_blocks", "cold_pool", "dst_blocks"],
             ops.paged_decode_attention: ["query", "pool", "block_tables", "seq_lens", "format", "scale",
                                          "logits_out"],
             ops.merge_attention_states: ["out_a", "lse_a", "out_b", "lse_b"],
             ops.accumulate_scores: ["logits", "lse", "seq_lens", "scores"],
             ops.heavy_hitter_topk: ["scores", "seq_lens", "k"],
             ops.compact: ["pool", "block_tables", "keep"],
             ops.gather_dequant: ["pool", "block_tables", "seq_lens"]}
    cases = {}
    for op, args, on_cpu in table:
        for arg in on_cpu:
            i = names[op].index(arg)
            mixed = [a if j == i else dev(a) for j, a in enumerate(args)]
            cases[f"{op.__name__}-{arg}"] = (op, mixed, arg)
    return cases


_MIXED = _mixed_device_cases()


@pytest.mark.parametrize("name", sorted(_MIXED))
def test_mixed_devices_rejected(name):
    """An argument left on the CPU beside CUDA tensors raises ValueError naming it."""
    op, args, arg = _MIXED[name]
    with pytest.raises(ValueError, match=arg):
        op(*args)


_GUARD_SCRIPT = textwrap.dedent('''
    import torch, kvcomp
    from kvcomp import ops
    ops.set_cuda_validation(False)
    G = 1 << 16  # guard bytes on each side of the pool

    def guarded(nb, bs, hkv, hd, fmt):
        """A pool inside a buffer of random bytes; returns (buffer, pool, copy of the buffer)."""
        shape = kvcomp.allocate_pool(nb, bs, hkv, hd, fmt).shape
        n = shape[0] * shape[1] * shape[2]
        buf = torch.randint(0, 256, (n + 2 * G,), dtype=torch.uint8, device="cuda")
        return buf, buf[G:G + n].view(shape), buf.clone()

    def check(buf, copy, what):
        torch.cuda.synchronize()
        assert torch.equal(buf[:G], copy[:G]) and torch.equal(buf[-G:], copy[-G:]), what + ": wrote outside the pool"

    bad_ids = [4, 5, 1000, 2**30, 2**31 - 1, -2]
    k, v = torch.randn(2, 3, 2, 64, device="cuda").unbind(0)
    for fmt in ("fp16", "int8", "int4", "fp8_e5m2/int2"):
        buf, pool, copy = guarded(4, 16, 2, 64, fmt)
        for bad in (64, 65, 4 * 16 * 1000, 2**40, 2**62):
            ops.quantize_write(k, v, pool, torch.tensor([5, bad, 17], device="cuda"), fmt)
        check(buf, copy, "quantize_write " + fmt)
    hot = kvcomp.allocate_pool(4, 16, 2, 64, "fp16", "cuda")
    ops.quantize_write(torch.randn(64, 2, 64, device="cuda"), torch.randn(64, 2, 64, device="cuda"), hot,
                       torch.arange(64, device="cuda"), "fp16")
    for fmt in ("int4c", "kivi2", "int8"):
        buf, pool, copy = guarded(4, 16, 2, 64, fmt)
        for bad in bad_ids:
            ids = torch.tensor([0, bad], dtype=torch.int32, device="cuda")
            ops.seal_blocks(hot, torch.tensor([1, 2], dtype=torch.int32, device="cuda"), pool, ids, "fp16", fmt)
            ops.seal_blocks(hot, ids, pool, torch.tensor([1, 2], dtype=torch.int32, device="cuda"), "fp16", fmt)
        check(buf, copy, "seal_blocks " + fmt)
    for fmt in ("int4", "kivi2"):
        buf, pool, copy = guarded(4, 16, 2, 64, fmt)
        keep = torch.tensor([[[0, 20, 40, -1], [3, 17, 33, 47]]], dtype=torch.int32, device="cuda")
        for bad in bad_ids:
            bt = torch.tensor([[0, bad, 2, 3]], dtype=torch.int32, device="cuda")
            ops.compact(pool, bt, keep, fmt)
            sl = torch.tensor([48], dtype=torch.int32, device="cuda")
            q = torch.randn(1, 8, 64, device="cuda")
            ops.paged_decode_attention(q, pool, bt, sl, fmt, 0.125, torch.zeros(1, 8, 64, device="cuda"))
            ops.gather_dequant(pool, bt, sl, fmt, torch.float32)
            too_long = torch.tensor([10**6], dtype=torch.int32, device="cuda")
            ops.paged_decode_attention(q, pool, bt, too_long, fmt, 0.125)
        check(buf, copy, "compact/decode/gather " + fmt)
    scores = torch.rand(1, 2, 64, device="cuda")
    ops.heavy_hitter_topk(scores, torch.tensor([10**6], dtype=torch.int32, device="cuda"), 8)
    ops.accumulate_scores(torch.randn(1, 8, 64, device="cuda"), torch.zeros(1, 8, device="cuda"),
                          torch.tensor([10**6], dtype=torch.int32, device="cuda"), scores)
    torch.cuda.synchronize()
    print("OK")
''')


def test_validation_off_never_writes_outside_the_pool():
    """set_cuda_validation(False): out-of-range slots, block ids and lengths
    are skipped in the kernels; guard bytes around the pool stay as they were
    and no kernel faults (run in a subprocess: a fault kills the CUDA context)."""
    assert hasattr(ops, "set_cuda_validation"), "kvcomp.ops.set_cuda_validation is missing"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(kvcomp.__file__)), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", _GUARD_SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and "OK" in r.stdout, f"exit code {r.returncode}: {r.stderr[-3000:]}"


def test_set_cuda_validation_returns_previous():
    prev = ops.set_cuda_validation(False)
    try:
        assert prev is True
        assert ops.set_cuda_validation(False) is False
    finally:
        ops.set_cuda_validation(True)


# ------------------------------------------------ sanitizer smoke (-k smoke)
# Small, fast calls of every op on the paths that matter (multi-split decode,
# long top-k rows, per-channel seal/compact), for compute-sanitizer's memcheck
# and racecheck (bench/device_check.sh sanitize), which slow kernels 10-100x.
def test_smoke_write_and_seal():
    g = gen_from(51)
    for fmt in ("fp16", "fp8_e4m3", "int8", "int4", "int2:g64"):
        pool0 = random_bytes(kvcomp.allocate_pool(8, 16, 2, 128, fmt).shape, g)
        slots = torch.randperm(128, generator=g)[:100]
        slots[::9] = -1
        k, v = heavy_tailed((100, 2, 128), g, torch.float16), heavy_tailed((100, 2, 128), g, torch.float16)
        _check_quantize_write(fmt, k, v, slots, pool0, fmt)
    c = dict(hot="fp16", hd=128, bs=32, hkv=2, hot_blocks=6, cold_blocks=6, n=5, dtype=torch.float32, mag=1.0)
    hot, src, dst = _hot_pool(c, g)
    for cold in ("kivi2", "int8c", "int4"):
        cold0 = random_bytes(kvcomp.allocate_pool(6, 32, 2, 128, cold).shape, g)
        _check_seal(hot, src, dst, cold0, "fp16", cold, cold)


@pytest.mark.parametrize("fmt", ["fp16", "int4", "kivi2", "fp8_e5m2/int4c"])
def test_smoke_decode(fmt):
    g = gen_from(52)
    c = build_cache(fmt, [3000, 17, 0, 64], 2, 128, 16, g)
    q = torch.randn(4, 8, 128, generator=g).half()
    check_attention_cuda(c, q, 128 ** -0.5, reference_decoder=False)


def test_smoke_merge_scores_topk_gather_compact():
    g = gen_from(53)
    oa, la, ob, lb = _states((4, 8, 128), torch.float16, g, 10.0)
    la[0] = -math.inf
    _check_merge(dev(oa), dev(la), dev(ob), dev(lb))
    logits = torch.randn(2, 8, 300, generator=g)
    sl = torch.tensor([300, 120], dtype=torch.int32)
    mask = torch.arange(300)[None, :] < sl.long()[:, None]
    lse = torch.logsumexp(logits.double().masked_fill(~mask[:, None], -math.inf), -1).float()
    scores = torch.zeros(2, 2, 300, device=DEV)
    ops.accumulate_scores(dev(logits), dev(lse), dev(sl), scores)
    assert torch.allclose(scores.sum(-1).cpu(), torch.full((2, 2), 4.0), rtol=1e-5)
    s = torch.randn(2, 2, 40000, generator=g)
    check_topk(s, torch.tensor([40000, 999], dtype=torch.int32), 1024, exact_reference=False)
    c = build_cache("kivi2", [100, 33], 2, 64, 16, g)
    K, V = ops.gather_dequant(*cuda_cache(c), "kivi2", torch.float16)
    RK, _ = ref_gather(c.pool, c.block_tables, c.seq_lens, "kivi2")
    assert_within_dtype_ulps(K.cpu(), RK, torch.float16, "gather")
    check_compact_cuda(c, random_keep([100, 33], 2, g, keep_frac=0.4))

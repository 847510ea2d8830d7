"""Fuzzing every op of torch.ops.kvcomp with valid and invalid arguments.

Hypothesis draws a case per example: a valid base call (format, geometry,
lengths, seed) plus up to three mutations (dtypes, shapes, strides, meta
tensors, format strings, ids and lengths at and beyond their bounds, k > len,
NaN/Inf, aliasing). tests/fuzz_worker.py runs it in a long-lived subprocess
and checks it: a clean exception or the reference result, no byte written
outside the written tensors (guard bytes), inputs unchanged, nothing written
when the op raises. A crash or a hang of the worker fails the example (the
worker is restarted for the next one).

Knobs (environment):
  KVCOMP_FUZZ_EXAMPLES  examples per op (default 40); derandomized, so CI
                        runs the same cases every time and a failure there
                        reproduces locally.
  KVCOMP_FUZZ_SECONDS   if set, a time budget for all ops together: rounds
                        of fresh random examples until it is spent (`make
                        fuzz`); a failing example is saved in .hypothesis/
                        and replayed first next time.
  KVCOMP_FUZZ_TIMEOUT   seconds one example may take (default 60).
  KVCOMP_FUZZ_REPORT    file the summary is appended to.
"""
from __future__ import annotations

import collections
import os
import subprocess
import sys
import time

import pytest
from hypothesis import given, strategies as st

import fuzz_worker
from fuzz_pipe import Worker, WorkerDied, fuzz_settings, print_summary, run_rounds
from helpers import ACT_DTYPES, ALL_FORMATS, HOT_FORMATS, TOKEN_FORMATS, head_dims_for

EXAMPLES = int(os.environ.get("KVCOMP_FUZZ_EXAMPLES", "40"))
SECONDS = float(os.environ.get("KVCOMP_FUZZ_SECONDS", "0"))
TIMEOUT = float(os.environ.get("KVCOMP_FUZZ_TIMEOUT", "60"))
OPS = sorted(fuzz_worker.OPS_TABLE)
DTYPE_NAMES = [str(d).split(".")[1] for d in ACT_DTYPES]


# ------------------------------------------------------------------ worker
@pytest.fixture(scope="module")
def worker():
    w = Worker(fuzz_worker.__file__, TIMEOUT)
    yield w
    w.stop()


STATS = collections.defaultdict(collections.Counter)


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    """Prints (and with KVCOMP_FUZZ_REPORT appends) what ran, per op."""
    start = time.monotonic()
    yield
    lines = [f"kvcomp fuzz: {sum(sum(s.values()) for s in STATS.values())} examples in "
             f"{time.monotonic() - start:.0f} s "
             f"({'random, ' + str(SECONDS) + ' s budget' if SECONDS else 'derandomized, ' + str(EXAMPLES) + ' per op'})"]
    for op in OPS:
        s = STATS[op]
        detail = ", ".join(f"{k} {v}" for k, v in sorted(s.items()))
        lines.append(f"  {op:24s} {sum(s.values()):6d}  ({detail})")
    print_summary(request, "\n".join(lines))


# ------------------------------------------------------------------ cases
def _mutations(op):
    return st.lists(st.tuples(st.sampled_from(fuzz_worker.MUTATIONS[op]), st.integers(0, 255)), max_size=3)


def _geometry(draw, formats, dims=(32, 64, 128), block_sizes=(16, 32)):
    fmt = draw(st.sampled_from(formats))
    return dict(fmt=fmt, hd=draw(st.sampled_from(head_dims_for(fmt, dims))),
                bs=draw(st.sampled_from(block_sizes)), hkv=draw(st.sampled_from([1, 2, 3])))


def _lens(draw, longest=80, min_size=1):
    return draw(st.lists(st.one_of(st.sampled_from([0, 1, 15, 16, 17, 32]), st.integers(0, longest)),
                         min_size=min_size, max_size=3))


@st.composite
def cases(draw, op):
    c = dict(op=op, seed=draw(st.integers(0, 2**32 - 1)), muts=draw(_mutations(op)))
    if op == "quantize_write":
        c.update(_geometry(draw, TOKEN_FORMATS, dims=(16, 32, 64, 128), block_sizes=(16, 32, 64)))
        c["num_blocks"] = draw(st.integers(1, 4))
        c["n"] = draw(st.integers(0, min(40, c["num_blocks"] * c["bs"])))
        c["dtype"] = draw(st.sampled_from(DTYPE_NAMES))
        c["mag"] = draw(st.sampled_from([1e-2, 1.0, 30.0]))
    elif op == "seal_blocks":
        c.update(_geometry(draw, ALL_FORMATS))
        c["hot_fmt"] = draw(st.sampled_from(HOT_FORMATS))
        c["hot_blocks"], c["cold_blocks"] = draw(st.integers(1, 4)), draw(st.integers(1, 5))
        c["n"] = draw(st.integers(0, min(c["hot_blocks"], c["cold_blocks"])))
        c["mag"] = draw(st.sampled_from([1e-2, 1.0, 30.0]))
    elif op in ("paged_decode_attention", "gather_dequant", "compact"):
        c.update(_geometry(draw, ALL_FORMATS))
        c["hkv"] = min(c["hkv"], 2)
        c["seq_lens"] = _lens(draw)
        c["dtype"] = draw(st.sampled_from(DTYPE_NAMES))
        c["group"] = draw(st.sampled_from([1, 2, 4]))
        c["with_logits"] = draw(st.booleans())
        c["extra"] = draw(st.integers(0, 3))
        c["frac"] = draw(st.sampled_from([0.1, 0.5, 0.95]))
    elif op == "merge_attention_states":
        c["shape"] = draw(st.sampled_from([(3, 4, 64), (1, 1, 128), (2, 8, 32), (5, 16), (2, 3, 2, 32), (7,)]))
        c["dtype"] = draw(st.sampled_from(DTYPE_NAMES))
        c["spread"] = draw(st.sampled_from([0.0, 1.0, 10.0, 100.0]))
        c["inf_frac"] = draw(st.sampled_from([0.0, 0.3]))
    elif op == "accumulate_scores":
        c["hkv"], c["group"] = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2, 4]))
        c["Ls"] = draw(st.integers(1, 64))
        c["Ll"] = max(1, c["Ls"] + draw(st.integers(-3, 5)))  # logits longer or shorter than scores
        c["lens"] = draw(st.lists(st.integers(0, min(c["Ls"], c["Ll"])), min_size=1, max_size=3))
        c["spread"] = draw(st.sampled_from([1.0, 10.0, 50.0]))
    elif op == "heavy_hitter_topk":
        c["heads"], c["L"] = draw(st.integers(1, 3)), draw(st.integers(1, 80))
        c["lens"] = draw(st.lists(st.integers(0, c["L"]), min_size=1, max_size=3))
        c["k"] = draw(st.integers(1, c["L"] + 3))
        c["ties"] = draw(st.booleans())
    return c


# ------------------------------------------------------------------ the test
def run_example(worker, case):
    try:
        reply = worker.run(case)
    except WorkerDied as e:
        STATS[case["op"]]["crash"] += 1
        raise AssertionError(f"{e}\ncase: {case!r}") from None
    if "fail" in reply:
        STATS[case["op"]]["fail"] += 1
        raise AssertionError(f"{reply['fail']}\ncase: {case!r}")
    STATS[case["op"]][reply["expect"] + (" ok" if reply["outcome"] == "ok" else " raised")] += 1


@pytest.mark.parametrize("op", OPS)
def test_fuzz(op, worker):
    """Reproduce a failure outside pytest: python tests/fuzz_worker.py "<case>"."""
    @fuzz_settings(SECONDS / len(OPS), EXAMPLES)
    @given(case=cases(op))
    def fuzz(case):
        run_example(worker, case)

    run_rounds(fuzz, SECONDS / len(OPS))


# ------------------------------------------------------- regressions found
# Each snippet must raise ValueError matching its pattern. They run in one
# subprocess: before the fixes the first two crashed the process.
REGRESSIONS = {
    # head_dim 0 read as "unknown": the kernel read 64 floats per row of an
    # empty key (segfault); fixed in pool_arg (csrc/ops/common.cpp).
    "quantize_write_head_dim_0": (
        "pool = kvcomp.allocate_pool(4, 16, 2, 64, 'int8')\n"
        "k = torch.empty(3, 2, 0)\n"
        "ops.quantize_write(k, k, pool, torch.arange(3), 'int8')", "head_dim"),
    "paged_decode_attention_head_dim_0": (
        "pool = kvcomp.allocate_pool(4, 16, 2, 64, 'int8')\n"
        "ops.paged_decode_attention(torch.empty(1, 2, 0), pool, torch.zeros(1, 1, dtype=torch.int32),\n"
        "                           torch.tensor([16], dtype=torch.int32), 'int8', 1.0)", "head_dim"),
    # a head_dim past int truncated to the pool's (2**32 + 64 -> 64)
    "quantize_write_head_dim_2_32": (
        "pool = kvcomp.allocate_pool(4, 16, 2, 64, 'int8')\n"
        "k = torch.zeros(1).expand(0, 2, 2**32 + 64)\n"
        "ops.quantize_write(k, k, pool, torch.empty(0, dtype=torch.long), 'int8')", "head_dim"),
    "paged_decode_attention_head_dim_2_32": (
        "pool = kvcomp.allocate_pool(4, 16, 2, 64, 'int8')\n"
        "ops.paged_decode_attention(torch.zeros(1).expand(0, 2, 2**32 + 64), pool,\n"
        "    torch.zeros(0, 1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), 'int8', 1.0)", "head_dim"),
    # a cold format that does not suit the hot pool's head_dim: the error did
    # not name cold_format
    "seal_blocks_cold_format_head_dim": (
        "hot = kvcomp.allocate_pool(1, 16, 1, 32, 'fp16')\n"
        "ids = torch.zeros(0, dtype=torch.int32)\n"
        "ops.seal_blocks(hot, ids, torch.zeros(1, 1, 1024, dtype=torch.uint8), ids, 'fp16', 'int4:g128')",
        "cold_format"),
}

_REGRESSION_SCRIPT = """
import re, sys, torch, kvcomp
from kvcomp import ops
for name, (code, pattern) in CASES.items():
    try:
        exec(code)
        print(name, "no error", flush=True)
    except ValueError as e:
        print(name, "ok" if re.search(pattern, str(e)) else "wrong message: " + str(e), flush=True)
"""


def test_regressions_found_by_fuzzing():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    script = f"CASES = {REGRESSIONS!r}\n" + _REGRESSION_SCRIPT
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    results = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    for name in REGRESSIONS:
        assert results.get(name) == "ok", \
            f"{name}: {results.get(name, f'process died (exit code {r.returncode})')}\n{r.stderr[-2000:]}"

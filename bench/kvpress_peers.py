"""NVIDIA kvpress's presses as peers of ``kvcomp-bench accuracy``, run in an
environment of their own (kvpress 0.5.5 pins transformers < 5.3): reads a
prompt file (``kvcomp.accuracy.prompts``, token ids) and writes an answers
file (``kvcomp.accuracy.peer-answers``). Imports no kvcomp.

For each peer (no press, and each kvpress press at the file's
compression_ratio, the fraction of tokens removed) it measures:

- pass-key answers: the greedy token ids of every case in every mode.
  "first": the press compresses the forward of the whole prompt (question
  included); "later": it compresses the forward of the document alone, then,
  press off, the separator is fed one token at a time and the question as
  one forward. Decoding (press off) stops after an eos token or max_new.
- prefill_seconds: wall seconds of the pressed forwards (KVzip's
  reconstruction passes, run as its press closes, included), summed over all
  cases and modes.
- nll: per perplexity text, press on for the forward of ids[:prefix], then a
  teacher-forced decode (press off) giving -log p(token) (float64) of each
  token prefix..n-1.

kvpress prunes the cache, so its length is no longer the number of tokens
seen: every forward gets explicit position ids (the true positions), as
kvpress's own pipeline does.

usage: python bench/kvpress_peers.py PROMPTS.json ANSWERS.json
           [--presses snapkv,streaming_llm,kvzip,expected_attention] [--threads N]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from importlib.metadata import version

import kvpress
import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache

PRESSES = {
    "snapkv": lambda ratio: kvpress.SnapKVPress(compression_ratio=ratio, window_size=64, kernel_size=5),
    "streaming_llm": lambda ratio: kvpress.StreamingLLMPress(compression_ratio=ratio, n_sink=4),
    "kvzip": lambda ratio: kvpress.KVzipPress(compression_ratio=ratio),
    "expected_attention": lambda ratio: kvpress.ExpectedAttentionPress(compression_ratio=ratio),
}

NOTE = ("kvpress presses prune the DynamicCache of the prefilled context per layer (and mask per head for "
        "head-wise presses); memory: SnapKV, StreamingLLM and ExpectedAttention (ScorerPress) gather the kept "
        "tokens of each head into new tensors that replace the layer's keys and values, so the pruned entries are "
        "freed, after a full-length prefill; KVzip frees nothing: the cache keeps every token and "
        "attention_patch.py overwrites the evicted keys in place with a fake key at each later forward (in its "
        "words, 'does not reduce peak memory'). ScorerPress compresses only in the forward into an empty cache "
        "(is_prefilling); KVzip scores by extra reconstruction forwards as its context closes, never later")


def forward(model, cache, ids: list[int], pos: int) -> tuple[torch.Tensor, int]:
    """Feeds ids at true positions pos.. through the cache: the last
    position's logits [vocab] and the position after them."""
    positions = torch.arange(pos, pos + len(ids)).unsqueeze(0)
    out = model(input_ids=torch.tensor([ids]), past_key_values=cache, position_ids=positions, logits_to_keep=1)
    return out.logits[0, -1], pos + len(ids)


def pressed_prefill(model, press, ids: list[int]) -> tuple[DynamicCache, torch.Tensor, float]:
    """One forward of ids into a fresh cache, press on (none: uncompressed):
    the cache, the last logits and the wall seconds of the pressed block."""
    cache = DynamicCache()
    start = time.perf_counter()
    with press(model) if press is not None else contextlib.nullcontext():
        logits, _ = forward(model, cache, ids, 0)
    return cache, logits, time.perf_counter() - start


def greedy(model, cache, logits: torch.Tensor, pos: int, max_new: int, eos: set[int]) -> list[int]:
    """Greedy tokens from logits on, one single-token forward each, through
    the first eos token or max_new tokens."""
    tokens = [int(logits.argmax())]
    while tokens[-1] not in eos and len(tokens) < max_new:
        logits, pos = forward(model, cache, tokens[-1:], pos)
        tokens.append(int(logits.argmax()))
    return tokens


def answer(model, press, prompts: dict, case: dict, mode: str, eos: set[int]) -> tuple[list[int], float]:
    """The greedy answer to one case in one mode, and its pressed seconds."""
    ids, q = case["ids"], case["question_start"]
    if mode == "first":
        cache, logits, seconds = pressed_prefill(model, press, ids)
        pos = len(ids)
    elif mode == "later":
        cache, _, seconds = pressed_prefill(model, press, ids[:q])
        pos = q
        for t in prompts["separator_ids"]:
            _, pos = forward(model, cache, [t], pos)
        logits, pos = forward(model, cache, ids[q:], pos)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return greedy(model, cache, logits, pos, prompts["max_new"], eos), seconds


def nll(model, press, ids: list[int], prefix: int) -> list[float]:
    """Per-token NLL of ids[prefix:], teacher-forced after a pressed prefill
    of ids[:prefix]."""
    cache, logits, _ = pressed_prefill(model, press, ids[:prefix])
    out, pos = [], prefix
    for t in range(prefix, len(ids)):
        out.append(-float(torch.log_softmax(logits.double(), -1)[ids[t]]))
        if t + 1 < len(ids):
            logits, pos = forward(model, cache, [ids[t]], pos)
    return out


def run_peer(model, press, prompts: dict, eos: set[int]) -> dict:
    """One peer's answers, prefill seconds and NLLs; an exception it raises
    becomes its "error"."""
    peer = {"press": None if press is None else repr(press), "answers": None, "prefill_seconds": None,
            "nll": None, "error": None}
    try:
        answers, seconds = {mode: [] for mode in prompts["modes"]}, 0.0
        for case in prompts["cases"]:
            for mode in prompts["modes"]:
                tokens, s = answer(model, press, prompts, case, mode, eos)
                answers[mode].append(tokens)
                seconds += s
        ppl = prompts["ppl"]
        peer.update(answers=answers, prefill_seconds=seconds,
                    nll=None if ppl is None else [nll(model, press, ids, ppl["prefix"]) for ids in ppl["ids"]])
    except Exception as e:  # a press that cannot run here is reported, and the others still run
        peer.update(answers=None, prefill_seconds=None, nll=None, error=f"{type(e).__name__}: {e}")
    return peer


def write_atomic(path: str, body: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(body, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prompts")
    p.add_argument("answers")
    p.add_argument("--presses", default=",".join(PRESSES), help=f"comma-separated, of {', '.join(PRESSES)}")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    names = [n for n in args.presses.split(",") if n]
    unknown = [n for n in names if n not in PRESSES]
    if unknown:
        p.error(f"unknown press(es) {', '.join(unknown)}; known: {', '.join(PRESSES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    with open(args.prompts, encoding="utf-8") as f:
        prompts = json.load(f)
    if prompts.get("kind") != "kvcomp.accuracy.prompts" or prompts.get("version") != 1:
        p.error(f"{args.prompts}: not a kvcomp prompt file (version 1)")

    # sdpa: KVzip refuses eager attention; the other presses compute the attention they need themselves.
    transformers.utils.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(prompts["model"], dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    ratio = prompts["compression_ratio"]
    peers = {}
    with torch.inference_mode():
        for name, press in [("uncompressed", None), *((f"kvpress:{n}", PRESSES[n](ratio)) for n in names)]:
            started = time.perf_counter()
            peers[name] = peer = run_peer(model, press, prompts, eos)
            status = f"error: {peer['error']}" if peer["error"] else f"prefill {peer['prefill_seconds']:.2f} s"
            print(f"{name}: {status} ({time.perf_counter() - started:.1f} s in all)", file=sys.stderr)
    write_atomic(args.answers, {
        "kind": "kvcomp.accuracy.peer-answers", "version": 1, "prompts_digest": prompts.get("digest"),
        "torch": torch.__version__, "transformers": transformers.__version__, "kvpress": version("kvpress"),
        "threads": torch.get_num_threads(), "compression_ratio": ratio, "note": NOTE, "peers": peers,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())

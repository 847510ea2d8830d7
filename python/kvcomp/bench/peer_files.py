"""Peers that cannot share kvcomp's environment (kvpress pins an older
transformers) run on the same prompts from a file: ``kvcomp-bench accuracy
--prompts-out`` writes the run's pass-key prompts and perplexity windows as
token ids, ``make peers`` (``bench/kvpress_peers.py`` in ``.venv-peers``)
answers them, and ``--peer-answers`` merges those answers into the report,
scored against this run's uncompressed answers."""
from __future__ import annotations

import hashlib
import json

import torch

PROMPTS_KIND, ANSWERS_KIND = "kvcomp.accuracy.prompts", "kvcomp.accuracy.peer-answers"


def prompts(model_path: str, cases, ppl_ids, prefix: int, max_new: int, modes, separator_ids,
            keep: float) -> dict:
    """The prompt file: every case's ids and question start, the perplexity
    windows, and the share of tokens a peer removes (1 - ``keep``, the
    fraction of fp16's bytes the compared presets hold)."""
    body = {
        "kind": PROMPTS_KIND, "version": 1, "model": model_path, "max_new": max_new, "modes": list(modes),
        "separator_ids": list(separator_ids), "compression_ratio": round(1.0 - keep, 6),
        "cases": [{"ids": c.ids[0].tolist(), "question_start": c.question_start} for _, c in cases],
        "ppl": {"prefix": prefix, "ids": [ids[0].tolist() for ids in ppl_ids]} if ppl_ids else None,
    }
    body["digest"] = digest(body)
    return body


def digest(body: dict) -> str:
    """SHA-256 of what a peer answers (cases, perplexity windows, settings)."""
    keys = ("model", "max_new", "modes", "separator_ids", "compression_ratio", "cases", "ppl")
    return hashlib.sha256(json.dumps({k: body[k] for k in keys}, sort_keys=True).encode()).hexdigest()


def load_answers(path: str, expected: dict) -> dict:
    """The peers of an answers file written for exactly ``expected`` (a
    :func:`prompts` body): a ValueError if it answers other prompts."""
    with open(path, encoding="utf-8") as f:
        answers = json.load(f)
    if answers.get("kind") != ANSWERS_KIND or answers.get("version") != 1:
        raise ValueError(f"{path}: not a kvcomp peer-answers file (version 1)")
    if answers.get("prompts_digest") != expected["digest"]:
        raise ValueError(f"{path} answers other prompts than this run's (digest {answers.get('prompts_digest')!r}, "
                         f"this run {expected['digest']!r}): run with the same arguments and seed as --prompts-out")
    return answers


def merge(answers: dict, needle_cases: list, tokenizer, answer_of, modes) -> tuple[dict, dict]:
    """Adds every peer's answers to the run's needle rows (``correct`` and
    ``same_as_uncompressed`` like kvcomp's own), and returns each peer's
    prefill seconds and per-token NLL [n] (float64, None without perplexity)."""
    seconds, nll = {}, {}
    for name, peer in answers["peers"].items():
        if peer.get("error"):
            print(f"peer {name}: {peer['error']}")
            continue
        label = name if name.startswith("kvpress:") else f"kvpress-env:{name}"
        for i, row in enumerate(needle_cases):
            row["answers"][label] = {}
            for mode in modes:
                text = tokenizer.decode(peer["answers"][mode][i], skip_special_tokens=True)
                ref = row["answers"]["uncompressed"][mode]["text"]
                row["answers"][label][mode] = {"text": text, "correct": answer_of(text) == row["key"],
                                               "same_as_uncompressed": text == ref}
        seconds[label] = peer["prefill_seconds"]
        nll[label] = None if peer.get("nll") is None else torch.tensor(sum(peer["nll"], []), dtype=torch.float64)
    return seconds, nll

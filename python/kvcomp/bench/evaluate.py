"""The measurements behind ``kvcomp-bench accuracy``, for one causal LM and
one cache factory (a fresh cache per run): pass-key retrieval by greedy
decoding, and a teacher-forced decode giving perplexity, next-token top-1
and each layer's attention output. Prompts are prefilled in chunks, so later
chunks and every decode step read the compressed cache: compression acts on
the answer, not only on the tokens after it."""
from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..integrations.hf import cache_kwarg

# The classic pass-key task (Mohtashami & Jaggi, 2023).
INTRO = ("There is an important pass key hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about the pass key.\n\n")
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"
# Question-later mode: what comes between the cached document and the question,
# fed one token at a time as decode steps (decode-time eviction acts on it).
SEPARATOR = "\n\n(End of the document. A question about it follows.)"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@dataclass
class NeedleCase:
    length: int
    depth: float
    key: str
    ids: torch.Tensor  # [1, length]
    question_start: int  # ids[:, question_start:] is the question


class Filler:
    """Filler tokens: the repeated classic sentences, or windows of a text."""

    def __init__(self, tokenizer, text: Optional[str]):
        self.tokens = encode(tokenizer, text if text is not None else FILLER)
        self.repeat = text is None

    def take(self, n: int, rng: random.Random) -> list[int]:
        if self.repeat:
            return (self.tokens * (n // len(self.tokens) + 1))[:n]
        if n > len(self.tokens):
            raise ValueError(f"--text holds {len(self.tokens)} tokens, fewer than the {n} a prompt needs")
        start = rng.randrange(len(self.tokens) - n + 1)
        return self.tokens[start:start + n]


def needle_case(tokenizer, filler: Filler, length: int, depth: float, rng: random.Random) -> NeedleCase:
    """A prompt of exactly ``length`` tokens with a 5-digit key at ``depth``
    (0 = right after the instructions, 1 = right before the question)."""
    key = str(rng.randrange(10000, 100000))
    intro = tokenizer(INTRO).input_ids  # with the model's special tokens, if any
    needle = encode(tokenizer, NEEDLE.format(key=key))
    question = encode(tokenizer, QUESTION)
    n_fill = length - len(intro) - len(needle) - len(question)
    if n_fill < 0:
        raise ValueError(f"length {length} is too short for the pass-key prompt "
                         f"(needs > {length - n_fill} tokens)")
    fill = filler.take(n_fill, rng)
    at = round(depth * n_fill)
    ids = intro + fill[:at] + needle + fill[at:] + question
    return NeedleCase(length, depth, key, torch.tensor([ids]), len(ids) - len(question))


def answer_of(text: str) -> Optional[str]:
    """The first number in the model's answer."""
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


# What a reconstruction-scored cache (Policy.scorer="reconstruct") asks the
# model before it repeats the context (KVCompCache.compress), as KVzip does.
REPEAT = "\n\nRepeat the previous context exactly.\n"


@torch.inference_mode()
def prefill(model, ids: torch.Tensor, cache, chunk: int, tokenizer=None) -> torch.Tensor:
    """Feeds ids [1, n] through the cache in chunks, then lets a KVCompCache
    score and evict what awaits it (``compress``: a scorer's extra pass is
    part of the prefill's cost); the last logits [vocab]."""
    for s in range(0, ids.shape[1], chunk):
        out = model(input_ids=ids[:, s:s + chunk], **cache_kwarg(model, cache), use_cache=True, logits_to_keep=1)
    if hasattr(cache, "compress"):
        prompt = None if tokenizer is None else torch.tensor([encode(tokenizer, REPEAT)])
        cache.compress(model, ids, prompt_ids=prompt)
    return out.logits[0, -1].float()


@torch.inference_mode()
def greedy(model, ids: torch.Tensor, cache, chunk: int, max_new: int, tokenizer=None) -> tuple[list[int], float]:
    """The greedy answer to a prompt, and the seconds its prefill took."""
    start = time.perf_counter()
    logits = prefill(model, ids, cache, chunk, tokenizer)
    seconds = time.perf_counter() - start
    return _decode(model, logits, cache, max_new), seconds


@torch.inference_mode()
def greedy_later(model, tokenizer, case: NeedleCase, cache, chunk: int, max_new: int) -> tuple[list[int], float]:
    """The question asked after the document: the document is prefilled
    alone, the separator fed as single-token decode steps, then the question
    as a new chunk that reads only the cache, then the greedy answer. Returns
    the answer and the seconds of the document's prefill."""
    start = time.perf_counter()
    prefill(model, case.ids[:, :case.question_start], cache, chunk, tokenizer)
    seconds = time.perf_counter() - start
    for t in encode(tokenizer, SEPARATOR):
        model(input_ids=torch.tensor([[t]]), **cache_kwarg(model, cache), use_cache=True, logits_to_keep=1)
    logits = prefill(model, case.ids[:, case.question_start:], cache, chunk, tokenizer)
    return _decode(model, logits, cache, max_new), seconds


def _decode(model, logits: torch.Tensor, cache, max_new: int) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    tokens: list[int] = []
    for _ in range(max_new):
        tokens.append(int(logits.argmax()))
        if tokens[-1] in eos or len(tokens) == max_new:
            break
        logits = model(input_ids=torch.tensor([[tokens[-1]]]), **cache_kwarg(model, cache),
                       use_cache=True).logits[0, -1].float()
    return tokens


@dataclass
class TeacherForced:
    nll: torch.Tensor  # [n] float64: -log p(token) of each scored token
    top1: torch.Tensor  # [n] int64: argmax of the logits that predicted it
    attn: torch.Tensor  # [n - 1, layers, hidden]: each layer's attention output at each decode step
    log_probs: Optional[torch.Tensor] = None  # [n, vocab] float64, when asked for (keep_log_probs)


@torch.inference_mode()
def teacher_forced(model, ids: torch.Tensor, cache, prefix: int, chunk: int,
                   progress: Optional[Callable[[], None]] = None, tokenizer=None,
                   keep_log_probs: bool = False) -> TeacherForced:
    """Prefills ids[:, :prefix] and decodes the rest one token at a time,
    always feeding the true token; scores tokens prefix..n-1 (with
    ``keep_log_probs``, also returns each step's whole distribution)."""
    captured: list[torch.Tensor] = []
    hooks = [layer.self_attn.register_forward_hook(lambda m, args, out: captured.append(out[0][0, -1].float()))
             for layer in _decoder_layers(model)]
    try:
        logits = prefill(model, ids[:, :prefix], cache, chunk, tokenizer)
        captured.clear()
        nll, top1, rows = [], [], []
        for t in range(prefix, ids.shape[1]):
            log_probs = torch.log_softmax(logits.double(), -1)
            nll.append(-log_probs[ids[0, t]])
            if keep_log_probs:
                rows.append(log_probs)
            top1.append(logits.argmax())
            if t + 1 < ids.shape[1]:
                logits = model(input_ids=ids[:, t:t + 1], **cache_kwarg(model, cache), use_cache=True).logits[0, -1].float()
            if progress:
                progress()
    finally:
        for h in hooks:
            h.remove()
    layers = len(hooks)
    attn = torch.stack(captured).view(-1, layers, captured[0].shape[-1]) if captured else torch.empty(0)
    return TeacherForced(torch.stack(nll), torch.stack(top1), attn, torch.stack(rows) if rows else None)


def fidelity(run: TeacherForced, ref: TeacherForced) -> dict:
    """Mean NLL and perplexity (each also as a ratio to the reference's),
    next-token top-1 agreement and attention-output relative error (mean over
    decode steps, per layer) against the reference run. A perplexity ratio r
    is an NLL ratio of 1 + ln(r) / NLL: ppl x1.03 is NLL x1.01 at NLL 3."""
    rel = (run.attn - ref.attn).norm(dim=-1) / ref.attn.norm(dim=-1).clamp_min(1e-30)
    per_layer = rel.mean(0)
    return {
        **nll_figures(run.nll, ref.nll),
        "top1_agreement": float((run.top1 == ref.top1).double().mean()),
        "attn_rel_err": float(per_layer.mean()),
        "attn_rel_err_per_layer": [float(x) for x in per_layer],
    }


def nll_figures(nll: torch.Tensor, ref: torch.Tensor) -> dict:
    """Mean NLL and perplexity of per-token NLLs, each also as a ratio to the reference's."""
    return {"nll": float(nll.mean()), "nll_ratio": float(nll.mean() / ref.mean()),
            "perplexity": float(nll.mean().exp()), "perplexity_ratio": float((nll.mean() - ref.mean()).exp())}


def _decoder_layers(model) -> list:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(l, "self_attn") for l in layers):
        raise ValueError(f"{type(model).__name__} has no model.layers[i].self_attn to observe")
    return list(layers)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without the model's special tokens."""
    return tokenizer(text, add_special_tokens=False).input_ids

"""Per-layer precision from measured sensitivity: mixed precision by layer.

A model's layers differ widely in what a compressed cache costs them. On
SmolLM2-135M, one layer alone at 2 bits raises the NLL by 8%, another by
0.01%. The costs add up across layers: the single-layer increases sum to
0.321, and all layers at once give 0.332. So :func:`measure` runs the model
once per layer with only that layer at the cheapest candidate. It then runs
once per candidate with every layer at it, which gives that candidate's
scale against the probe. :meth:`Calibration.allocate` then picks each
layer's candidate so that the summed estimated cost is smallest within
a bits budget, solved exactly as a multiple-choice knapsack.

The cost is the KL divergence of the next-token distributions from the
uncompressed cache's, teacher-forced over the calibration text's last
tokens: it is never negative, so it ranks layers even where a text's NLL
moves by noise (an NLL increase is the KL in expectation over text the
model predicts well).

The result is a list of one :class:`kvcomp.Policy` per layer, for
``KVCompCache(policy=...)``. It is tied to the model it was measured on;
calibrate on text like the text it will serve.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .. import policies
from ..policy import Policy

_STEP = 0.01  # the knapsack's unit of bits per element: finer than any two candidates differ


@dataclass(frozen=True)
class Calibration:
    """Per-layer costs of a model's candidates, measured by :func:`measure`.

    - ``candidates``: name -> Policy; ``bits``: name -> bits per element
      (all-in, per layer) at ``seq_len`` tokens.
    - ``probe``: the candidate every layer was measured at alone;
      ``layer_cost[i]``: the mean KL (nats per scored token) with only layer
      ``i`` at it.
    - ``scale``: name -> that candidate's KL with every layer at it, over
      the sum of ``layer_cost``. Layer ``i`` at candidate ``c`` is
      estimated to cost ``layer_cost[i] * scale[c]``.
    - ``seconds``: time the measurement took.
    """

    candidates: dict
    bits: dict
    probe: str
    layer_cost: list
    scale: dict
    seq_len: int
    seconds: float

    def estimate(self, choice: list[str]) -> float:
        """The estimated KL (nats per token) of one candidate name per layer."""
        return float(sum(c * self.scale[n] for c, n in zip(self.layer_cost, choice, strict=True)))

    def choose(self, bits: float) -> list[str]:
        """One candidate name per layer: the smallest estimated cost whose
        mean bits per element is at most ``bits``."""
        names = list(self.candidates)
        units = [int(np.ceil(self.bits[n] / _STEP - 1e-9)) for n in names]  # up: never over budget
        cap = int(np.floor(bits * len(self.layer_cost) / _STEP + 1e-6))
        if min(units) * len(self.layer_cost) > cap:
            raise ValueError(f"bits: {bits} is below the cheapest candidate "
                             f"({min(self.bits.values()):.3f} bits per element)")
        inf = np.inf
        best = np.full(cap + 1, inf)
        best[0] = 0.0
        picks = []  # per layer: the candidate index that reached each spent total
        for cost in self.layer_cost:
            nxt, pick = np.full(cap + 1, inf), np.full(cap + 1, -1)
            for j, (n, u) in enumerate(zip(names, units)):
                if u > cap:
                    continue
                trial = np.full(cap + 1, inf)
                trial[u:] = best[:cap + 1 - u] + cost * self.scale[n]
                better = trial < nxt
                nxt[better], pick[better] = trial[better], j
            best = nxt
            picks.append(pick)
        spent = int(np.argmin(best))
        choice = []
        for pick in reversed(picks):
            j = int(pick[spent])
            choice.append(names[j])
            spent -= units[j]
        return choice[::-1]

    def allocate(self, bits: float) -> list[Policy]:
        """One Policy per layer within ``bits`` per element (see :meth:`choose`)."""
        return [self.candidates[n] for n in self.choose(bits)]

    def save(self, path) -> None:
        """Write this calibration as JSON, to allocate from later without measuring again."""
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path) -> "Calibration":
        """A calibration written by :meth:`save`."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        data["candidates"] = {n: Policy(**p) for n, p in data["candidates"].items()}
        return cls(**data)


def default_candidates() -> dict:
    """The rotated NF presets at 2, 3 and 4 bits, and K at 3 bits with V at
    2 (2.75 bits), each with 0 to 128 full-precision recent tokens: a layer
    may buy precision with bits or with recency, whichever costs it less.
    Measured on SmolLM2 with every layer at one candidate: 2 bits cost NLL
    x1.33 with no recent tokens, x1.13 with 16, x1.05 with 32 and x1.03 with
    128; at 32 recent tokens K3/V2 costs a third of 2 bits' KL and 1.8x
    3 bits', halfway in bits (K4/V2, at 3 bits' bytes, costs more than 3
    bits, so it is not a candidate)."""
    formats = {"int2": policies.int2().cold_format, "k3v2": "nf3:g64:h/nf2:g64:h",
               "int3": policies.int3().cold_format, "int4": policies.int4().cold_format}
    return {f"{name}@{hot}": Policy(cold_format=fmt, hot_window=hot, name=f"{name}@{hot}")
            for name, fmt in formats.items() for hot in (0, 16, 32, 64, 128)}


@torch.inference_mode()
def measure(model, texts: list[torch.Tensor], prefix: int, candidates: Optional[dict] = None,
            probe: Optional[str] = None, seq_len: int = 2048, chunk: int = 512,
            progress: Optional[Callable[[str], None]] = None) -> Calibration:
    """Measure each layer's cost of the ``probe`` candidate (default: the
    fewest bits) and each candidate's scale, teacher-forced over ``texts``
    (token ids ``[1, n]``; the predictions after ``prefix`` are scored, read
    through the cache). ``seq_len``: the length bits are counted at."""
    from transformers import DynamicCache

    from ..bench.evaluate import teacher_forced
    from .hf import KVCompCache

    def log_probs(ids, cache):
        return teacher_forced(model, ids, cache, prefix, chunk, keep_log_probs=True).log_probs

    started = time.perf_counter()
    cfg = model.config.get_text_config(decoder=True)
    layers = cfg.num_hidden_layers
    kv, hd = cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    candidates = default_candidates() if candidates is None else dict(candidates)
    if not candidates:
        raise ValueError("candidates: none given")
    for ids in texts:
        if ids.dim() != 2 or ids.shape[0] != 1 or not 0 < prefix < ids.shape[1]:
            raise ValueError(f"texts: each must be [1, n] token ids with n > prefix ({prefix}), "
                             f"got {tuple(ids.shape)}")
    fp16 = 2 * 2 * kv * hd
    bits = {n: 16 * p.bytes_per_token(1, kv, hd, seq_len, torch.float16) / fp16 for n, p in candidates.items()}
    probe = probe or min(bits, key=bits.get)
    if probe not in candidates:
        raise ValueError(f"probe: {probe!r} is not one of the candidates {sorted(candidates)}")

    refs = [log_probs(ids, DynamicCache(config=model.config)) for ids in texts]
    full = policies.full()

    def kl(per_layer: list[Policy], what: str) -> float:
        if progress:
            progress(what)
        runs = [log_probs(ids, KVCompCache(policy=per_layer, config=model.config)) for ids in texts]
        return float(torch.cat([(r.exp() * (r - q)).sum(-1) for r, q in zip(refs, runs)]).mean().clamp_min(0))

    layer_cost = [kl([candidates[probe] if j == i else full for j in range(layers)], f"layer {i}")
                  for i in range(layers)]
    total = sum(layer_cost)
    if total <= 0:
        raise ValueError(f"probe {probe!r} changes no layer's predictions on these texts: nothing to allocate")
    scale = {n: kl([p] * layers, n) / total for n, p in candidates.items()}
    return Calibration(candidates, bits, probe, layer_cost, scale, seq_len, time.perf_counter() - started)


"""Scorers: how an evicting policy (``eviction="h2o"``) ranks the tokens it
may drop.

Storage is :class:`kvcomp.PagedKVCache`'s job: it keeps one score per held
token and KV head and, at an eviction point, keeps the cold tokens with the
highest scores (sinks always). A scorer decides what those scores are, from
the attention weights of a prompt chunk's queries over the tokens they see
(computed by the Hugging Face integration under every attention
implementation). Decode steps always add their attention weight (H2O's
rule), whichever scorer scored the prompt.

A new scorer is one small class here: which of a chunk's queries count
(:meth:`Scorer.queries`), how their weights combine (:attr:`Scorer.reduce`),
whether they add to or replace the scores, and when the cache may evict.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from . import ops


@dataclass(frozen=True)
class Scorer:
    """``pool``: a token's score becomes the largest over ``pool``
    neighbouring positions (odd; 1 = none), since a fact spans several tokens."""

    pool: int = 1
    name: ClassVar[str] = ""
    reduce: ClassVar[str] = "sum"  # over the counted queries and the query heads of a KV head: "sum" or "max"
    replace: ClassVar[bool] = False  # a chunk's weights replace the scores (else they add to them)
    evict_after_chunk: ClassVar[bool] = True  # evict once a prompt chunk is scored (else: later, see below)
    needs_pass: ClassVar[bool] = False  # scores come from an extra pass (KVCompCache.compress)

    def queries(self, n: int) -> slice:
        """The chunk's queries (of ``n``) whose attention counts."""
        return slice(None)

    def weights(self, probs: torch.Tensor, kv_heads: int) -> torch.Tensor:
        """probs [batch, heads, queries, cols] -> [batch, kv_heads, cols]."""
        b, h, q, n = probs.shape
        grouped = probs.reshape(b, kv_heads, h // kv_heads * q, n)
        return grouped.sum(2) if self.reduce == "sum" else grouped.amax(2)

    def combine(self, a: Optional[torch.Tensor], b: torch.Tensor) -> torch.Tensor:
        """Two blocks of queries' :meth:`weights`, as one."""
        if a is None:
            return b
        return a + b if self.reduce == "sum" else torch.maximum(a, b)

    def keep(self, scores: torch.Tensor, pos: torch.Tensor, sinks: int, k: int) -> torch.Tensor:
        """Slots [kv_heads, k] (ascending, on the CPU) of a tier to keep: the k
        highest scores [kv_heads, n] per KV head (ties to the older slot),
        positions below ``sinks`` always."""
        scores = scores.masked_fill(pos.to(scores.device) < sinks, float("inf"))
        lens = torch.tensor([scores.shape[1]], dtype=torch.int32, device=scores.device)
        return ops.heavy_hitter_topk(scores[None], lens, k)[0].long().cpu()

    def pooled(self, by_position: torch.Tensor) -> torch.Tensor:
        """by_position [kv_heads, seq_len], max-pooled over ``pool`` neighbours."""
        if self.pool == 1:
            return by_position
        return torch.nn.functional.max_pool1d(by_position[None], self.pool, 1, self.pool // 2)[0]


@dataclass(frozen=True)
class CumulativeAttention(Scorer):
    """H2O (Zhang et al., 2023): a token's score is the attention it received
    from every query so far, prompt and decode; the cache evicts after each
    prompt chunk. Favours early tokens (they were seen by more queries)."""

    name: ClassVar[str] = "cumulative"


@dataclass(frozen=True)
class ObservationWindow(Scorer):
    """SnapKV (Li et al., 2024): the attention of the prompt's last ``window``
    queries (summed), pooled; the cache evicts at the first decode step, once
    the whole prompt is in. The end of a prompt (its question) picks what its
    answer needs; a question asked later has no say."""

    window: int = 32
    pool: int = 15
    name: ClassVar[str] = "window"
    replace: ClassVar[bool] = True
    evict_after_chunk: ClassVar[bool] = False

    def queries(self, n: int) -> slice:
        return slice(max(0, n - self.window), None)


@dataclass(frozen=True)
class Reconstruction(Scorer):
    """KVzip-style, query-agnostic (Kim et al., 2025): the model is asked to
    repeat the context (one extra prefill of it, not stored: ``KVCompCache.
    compress``), and a token's score is the largest attention any repeating
    query (and query head of its KV head) gives it: what the model needs to
    reproduce the context, whatever is asked later. The cache evicts once
    that pass is done; a decode step before it raises. With one equal budget
    per KV head it ranks poorly (README, "Scorers"): KVzip ranks across
    heads."""

    name: ClassVar[str] = "reconstruct"
    reduce: ClassVar[str] = "max"
    replace: ClassVar[bool] = True
    evict_after_chunk: ClassVar[bool] = False
    needs_pass: ClassVar[bool] = True


SCORERS = {c.name: c for c in (CumulativeAttention, ObservationWindow, Reconstruction)}

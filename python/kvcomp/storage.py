"""Storage under PagedKVCache: the block allocator of a pool, a tier's
slots (positions and scores), and the capacity rules of a policy. What to
keep is decided elsewhere (:mod:`kvcomp.scorers`, ``Policy``)."""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from .formats import KVFormat
from .policy import Policy


class CacheFullError(RuntimeError):
    """No free blocks for an append; the cache is left as it was."""

    def __init__(self, tier: str, tokens_needed: int, tokens_free: int):
        self.tier, self.tokens_needed, self.tokens_free = tier, tokens_needed, tokens_free
        super().__init__(f"the {tier} pool is full: this append needs {tokens_needed} more token slots "
                         f"but {tokens_free} are free (raise max_tokens/max_seqs, free or forget sequences)")


class Allocator:
    """Free list of one pool's blocks; the pool grows as blocks are taken, by
    a quarter of its size at least (amortized: a block is copied ~5 times in
    all, never once per step), up to ``cap`` blocks (None: no cap), so a
    cache holds what its sequences use, not what they might. Freed blocks are
    zeroed at once (``wipe="on_free"``) or when handed out again
    (``"on_reuse"``, the ``dirty`` ones); either way no byte of a freed
    sequence reaches another."""

    GROWTH = 1.25

    def __init__(self, make: Callable[[int], torch.Tensor], cap: Optional[int], wipe: str):
        self.make, self.cap, self.wipe = make, cap, wipe
        self.pool = make(0)
        self.free_ids: list[int] = []  # pop() hands out the lowest free ids first
        self.dirty: set[int] = set()  # free blocks not zeroed yet

    @property
    def available(self) -> int:
        """Blocks a take() can still hand out (free, or the pool can grow by)."""
        return math.inf if self.cap is None else len(self.free_ids) + self.cap - self.pool.shape[0]

    def take(self, n: int) -> list[int]:
        assert n <= self.available
        if n > len(self.free_ids):
            self._grow(n - len(self.free_ids))
        ids = [self.free_ids.pop() for _ in range(n)]
        self._zero(self.dirty.intersection(ids))
        self.dirty.difference_update(ids)
        return ids

    def _grow(self, more: int) -> None:
        old = self.pool.shape[0]
        new = max(old + more, math.ceil(old * self.GROWTH))
        new = new if self.cap is None else min(new, self.cap)
        pool = self.make(new)  # zeroed
        pool[:old] = self.pool
        self.pool = pool
        self.free_ids[:0] = range(new - 1, old - 1, -1)  # after the free ids already there

    def give_back(self, ids: Sequence[int]) -> None:
        if self.wipe == "on_free":
            self._zero(ids)
        else:
            self.dirty.update(ids)
        self.free_ids.extend(reversed(ids))

    def scrub(self) -> None:
        """Zeroes every free block not zeroed yet."""
        self._zero(self.dirty)
        self.dirty.clear()

    def _zero(self, ids) -> None:
        if ids:
            self.pool[torch.tensor(sorted(ids), dtype=torch.long, device=self.pool.device)] = 0

    @property
    def used(self) -> int:
        return self.pool.shape[0] - len(self.free_ids)


class Tier:
    """One tier of one sequence in one layer."""

    def __init__(self, heads: int, scores_device: Optional[torch.device]):
        self.blocks: list[int] = []
        self.pos = torch.empty(heads, 0, dtype=torch.long)
        self.scores = None if scores_device is None else torch.zeros(heads, 0, device=scores_device)

    @property
    def len(self) -> int:
        return self.pos.shape[1]

    def add(self, pos: torch.Tensor, scores: Optional[torch.Tensor] = None) -> None:
        """Appends slots for positions pos [heads, n] (and their scores)."""
        self.pos = torch.cat([self.pos, pos], 1)
        if self.scores is not None:
            extra = scores if scores is not None else torch.zeros(pos.shape, device=self.scores.device)
            self.scores = torch.cat([self.scores, extra], 1)

    def select(self, idx: torch.Tensor) -> None:
        """Keeps slots idx [heads, k] (what compact did to the pool)."""
        self.pos = torch.gather(self.pos, 1, idx)
        if self.scores is not None:
            self.scores = torch.gather(self.scores, 1, idx.to(self.scores.device))


class LayerState:
    def __init__(self, heads: int, scores_device):
        self.seen = 0  # tokens appended to this layer
        self.hot = Tier(heads, scores_device)
        self.cold = Tier(heads, scores_device)


def storable_max(formats, head_dim: int) -> tuple[float, float]:
    """The largest |x| of K and V that every one of ``formats`` stores
    (format.h storable_max): what an append accepts, since hot values are
    sealed into the cold tier later."""
    limits = [KVFormat.parse(f).storable_max(head_dim) for f in formats]
    return tuple(min(l[i] for l in limits) for i in (0, 1))


def check_cap(max_tokens) -> None:
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens <= 0):
        raise ValueError(f"max_tokens must be a positive int or None (no cap), got {max_tokens!r}")


def tier_capacity(policy: Policy) -> dict:
    """Most tokens one sequence's tier holds in one layer (None: as many as
    the pool has): a tiered policy's hot tier holds ``hot_window`` rounded up
    to blocks, plus one block; the streaming ring ``sinks + window -
    hot_window``; a policy without a cold tier (or hot tier) holds none there."""
    p, bs = policy, policy.block_size
    if p.hot_window is None:
        return {"hot": None, "cold": 0}
    ring = p.sinks + p.window - p.hot_window if p.eviction == "streaming" else None
    return {"hot": 0 if p._direct() else (-(-p.hot_window // bs) + 1) * bs, "cold": ring}


def pool_blocks(policy: Policy, max_tokens: Optional[int], max_seqs: int) -> dict:
    """The most blocks per layer the hot and cold pools grow to (None: no
    cap): ``max_tokens`` caps the cold pool (the hot pool without a cold
    tier), ``max_seqs`` hot tiers the hot pool of a tiered policy."""
    per_tokens = None if max_tokens is None else -(-max_tokens // policy.block_size)
    hot_cap = tier_capacity(policy)["hot"]
    if hot_cap is None:
        return {"hot": per_tokens, "cold": 0}
    return {"hot": max_seqs * hot_cap // policy.block_size, "cold": per_tokens}

"""PagedKVCache: hot and cold paged pools per layer, a block allocator, and
the per-sequence bookkeeping that turns a :class:`kvcomp.Policy` into op calls.

Per layer and sequence the cache keeps two tiers (CONTRACT.md §1): the hot
tier (newest tokens, raw fp16/bf16/fp32) and the cold tier (compressed). A
tier is a list of blocks whose first ``len`` slots hold tokens; ``pos[h, i]``
is the sequence position of slot i for KV head h (heads differ only after H2O
eviction). Attention is order-free, so slots need not be in position order:
the streaming ring overwrites its oldest slots in place.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch

from . import ops
from .formats import KVFormat, allocate_pool
from .policy import Policy
from .storage import Allocator, CacheFullError, LayerState, Tier, check_cap, pool_blocks, storable_max, tier_capacity


class PagedKVCache:
    """The KV cache of many sequences, stored per ``policy`` (CONTRACT.md §4).

    Pools start empty and grow in blocks as sequences grow (amortized, see
    ``Allocator``): a short prompt costs what it holds. ``max_tokens`` caps
    the cold pool of each layer (or the hot pool under ``full()``; None: no
    cap); ``max_seqs`` caps the hot pools of tiered policies (each sequence
    holds at most ``hot_window`` rounded up to blocks, plus one). Past a cap,
    an append raises :class:`CacheFullError`. ``dtype`` is the activations'
    dtype; the hot tier stores it exactly (``fp32`` for float32) unless the
    policy names ``hot_format``.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, policy: Optional[Policy] = None,
                 max_tokens: Optional[int] = 65536, dtype: torch.dtype = torch.float16,
                 device: "torch.device | str" = "cpu", *, max_seqs: int = 16):
        from . import policies
        self.policy = policy if policy is not None else policies.full()
        if not isinstance(self.policy, Policy):
            raise TypeError(f"policy must be a kvcomp.Policy, got {type(self.policy).__name__}")
        for name, v in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("max_seqs", max_seqs)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        check_cap(max_tokens)
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
        p, bs = self.policy, self.policy.block_size
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.max_tokens, self.max_seqs = max_tokens, max_seqs
        self.hot_format = p.resolved_hot_format(dtype)
        self.cold_format = p.cold_format
        KVFormat.parse(self.cold_format).tile_bytes(head_dim, bs)  # ValueError: head_dim unsupported
        self._storable_max = storable_max((self.hot_format, self.cold_format), head_dim)
        self._direct = p._direct()
        # A long append may write straight to the cold tier (_write_sealed_directly).
        self._direct_seal = p.hot_window is not None and p.eviction != "streaming" and \
            self.hot_format == p.replace(hot_format=None).resolved_hot_format(dtype)
        self._per_channel = KVFormat.parse(self.cold_format).per_channel
        self._has_hot = not self._direct
        self._has_cold = p.hot_window is not None
        tiers = tier_capacity(p)
        self._hot_cap, self._ring_cap = (tiers["hot"], tiers["cold"]) if self._has_cold else (None, None)
        caps = pool_blocks(p, max_tokens, max_seqs)
        allocator = lambda tier, fmt: Allocator(
            lambda n: allocate_pool(n, bs, num_kv_heads, head_dim, fmt, self.device), caps[tier], p.wipe)
        self._hot_alloc = [allocator("hot", self.hot_format) for _ in range(num_layers)]
        self._cold_alloc = [allocator("cold", self.cold_format) for _ in range(num_layers)]
        self._scores_device = self.device if p.eviction == "h2o" else None
        self._seqs: dict = {}

    @property
    def hot_pools(self) -> list[torch.Tensor]:
        """Each layer's hot pool (it grows: read it again after an append)."""
        return [a.pool for a in self._hot_alloc]

    @property
    def cold_pools(self) -> list[torch.Tensor]:
        """Each layer's cold pool (it grows: read it again after an append)."""
        return [a.pool for a in self._cold_alloc]

    # ------------------------------------------------------------ sequences
    def add_sequence(self, seq_id) -> None:
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already exists")
        self._seqs[seq_id] = [LayerState(self.num_kv_heads, self._scores_device) for _ in range(self.num_layers)]

    def has_sequence(self, seq_id) -> bool:
        return seq_id in self._seqs

    @property
    def sequences(self) -> list:
        return list(self._seqs)

    def seq_len(self, seq_id, layer: int = 0) -> int:
        """Tokens appended to ``seq_id`` in ``layer`` (held or not)."""
        return self._state(seq_id, layer).seen

    def held(self, seq_id, layer: int = 0) -> int:
        st = self._state(seq_id, layer)
        return st.hot.len + st.cold.len

    def positions(self, seq_id, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence positions held by the hot and cold tiers ([kv_heads, n] each)."""
        st = self._state(seq_id, layer)
        return st.hot.pos.clone(), st.cold.pos.clone()

    def fork(self, src_id, dst_id) -> None:
        """A new sequence ``dst_id`` holding a copy of ``src_id`` (every layer
        and tier: blocks, positions, scores), as beam search and parallel
        sampling need. The blocks are copied, not shared."""
        layers = self._seqs[self._known(src_id)]
        if dst_id in self._seqs:
            raise ValueError(f"sequence {dst_id!r} already exists")
        need = {(name, l): len(getattr(st, name).blocks) for l, st in enumerate(layers) for name in ("hot", "cold")}
        for (name, l), n in need.items():  # check first: a failed fork changes nothing
            alloc = self._alloc(name, l)
            if n > alloc.available:
                raise CacheFullError(name, n * self.policy.block_size, alloc.available * self.policy.block_size)
        copies = []
        for l, st in enumerate(layers):
            new = LayerState(self.num_kv_heads, self._scores_device)
            new.seen = st.seen
            for name in ("hot", "cold"):
                src, dst = getattr(st, name), getattr(new, name)
                alloc = self._alloc(name, l)
                dst.blocks = alloc.take(len(src.blocks))
                if src.blocks:
                    ids = lambda b: torch.tensor(b, dtype=torch.long, device=alloc.pool.device)
                    alloc.pool[ids(dst.blocks)] = alloc.pool[ids(src.blocks)]
                dst.pos = src.pos.clone()
                dst.scores = None if src.scores is None else src.scores.clone()
            copies.append(new)
        self._seqs[dst_id] = copies

    def truncate(self, seq_id, length: int) -> None:
        """Rolls ``seq_id`` back to its first ``length`` tokens in every layer
        (speculative and assisted decoding): positions from ``length`` on are
        erased as :meth:`forget` does, and the next append continues at
        ``length``."""
        self._known(seq_id)
        if not isinstance(length, int) or length < 0:
            raise ValueError(f"length must be an int >= 0, got {length!r}")
        self.forget(seq_id, length, max(st.seen for st in self._seqs[seq_id]))
        for st in self._seqs[seq_id]:
            st.seen = min(st.seen, length)

    def rename(self, seq_id, new_id) -> None:
        """Gives sequence ``seq_id`` the id ``new_id`` (it moves to the end of
        :attr:`sequences`)."""
        self._known(seq_id)
        if new_id in self._seqs:
            raise ValueError(f"sequence {new_id!r} already exists")
        self._seqs[new_id] = self._seqs.pop(seq_id)

    def free(self, seq_id) -> None:
        """Returns every block of ``seq_id`` (zeroed per ``policy.wipe``) and
        forgets the sequence."""
        layers = self._seqs.pop(self._known(seq_id))
        for l, st in enumerate(layers):
            self._hot_alloc[l].give_back(st.hot.blocks)
            self._cold_alloc[l].give_back(st.cold.blocks)

    # --------------------------------------------------------------- append
    def append(self, layer: int, seq_ids: Sequence, key: torch.Tensor, value: torch.Tensor, *,
               evict: bool = True) -> None:
        """Appends ``key``/``value`` [len(seq_ids), new_tokens, kv_heads, head_dim]
        (post-RoPE) to each sequence's cache in ``layer``. ``evict=False``
        defers H2O's eviction to an :meth:`evict` call, for callers that score
        a prompt chunk's own attention (:meth:`add_scores`) first: a chunk's
        tokens enter with no score and would otherwise be the first to go."""
        states = self._states(layer, seq_ids)
        n = key.shape[1] if isinstance(key, torch.Tensor) and key.dim() == 4 else -1
        want = (len(states), n, self.num_kv_heads, self.head_dim)
        for name, t in (("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
                raise ValueError(f"{name} must be [len(seq_ids), new_tokens, {self.num_kv_heads}, "
                                 f"{self.head_dim}], got {tuple(getattr(t, 'shape', ()))}")
        if n == 0:
            return
        self._check_storable(key, "key")
        self._check_storable(value, "value")
        key, value = key.to(self.device), value.to(self.device)
        self._reserve(layer, states, n)
        before = [st.seen for st in states]
        if not self._has_cold:
            self._write_hot(layer, states, key, value)
        elif self._direct:
            self._write_cold(layer, states, key, value, [self._fresh(st, n) for st in states])
        else:
            t = self._write_sealed_directly(layer, states, key, value)
            while t < n:
                m = min(n - t, self._hot_cap - max(st.hot.len for st in states))
                self._write_hot(layer, states, key[:, t:t + m], value[:, t:t + m])
                self._seal(layer, states)
                t += m
        if self.policy.eviction == "h2o" and evict:
            for st, seen in zip(states, before):
                budget = self.policy.cold_budget(st.seen)
                if self.policy.evicts_during(seen, st.seen) and st.cold.len > budget:
                    self._evict(layer, st, budget)

    def evict(self, layer: int, seq_ids: Sequence) -> None:
        """H2O: evicts each sequence's cold tier down to its budget now (after
        ``append(..., evict=False)``); a no-op for other policies."""
        states = self._states(layer, seq_ids)
        if self.policy.eviction != "h2o":
            return
        for st in states:
            budget = self.policy.cold_budget(st.seen)
            if st.cold.len > budget:
                self._evict(layer, st, budget)

    def _check_storable(self, t: torch.Tensor, name: str) -> None:
        """The ops reject these too, but only after the bookkeeping moved on:
        checked first so a rejected append changes nothing."""
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        lo, hi = (float(x) for x in torch.aminmax(t))  # one pass; NaN propagates into both
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{name} holds NaN or Inf; the cache never stores them")
        top = self._storable_max[name == "value"]
        if max(-lo, hi) > top:
            raise ValueError(f"{name} holds values beyond +-{top:g}, the largest its tiers' formats store "
                             f"(fp16 storage below 65520, fp16 scales 65504, rotated formats 65504/sqrt(head_dim))")

    def _fresh(self, st: LayerState, n: int) -> torch.Tensor:
        """Positions [kv_heads, n] of the next n tokens of a sequence."""
        pos = torch.arange(st.seen, st.seen + n).expand(self.num_kv_heads, n)
        st.seen += n
        return pos

    def _reserve(self, layer: int, states, n: int) -> None:
        """Raises CacheFullError, before any write, if the append cannot fit."""
        p, bs = self.policy, self.policy.block_size
        hot_need = cold_need = 0
        for st in states:
            if not self._has_cold:
                hot_need += -(-(st.hot.len + n) // bs) - len(st.hot.blocks)
                continue
            total = st.hot.len + n
            sealed = p.sealed(total)  # the hot tier starts on a block boundary
            if not self._direct:
                hot_need += max(0, -(-min(total, self._hot_cap) // bs) - len(st.hot.blocks))
            cold_len = st.cold.len + sealed
            if p.eviction == "streaming":
                cold_len = min(cold_len, self._ring_cap)
            cold_need += max(0, -(-cold_len // bs) - len(st.cold.blocks))
        for tier, need, alloc in (("hot", hot_need, self._hot_alloc[layer]),
                                  ("cold", cold_need, self._cold_alloc[layer])):
            if need > alloc.available:
                raise CacheFullError(tier, need * bs, alloc.available * bs)

    def _slots(self, blocks: list[int], slots: torch.Tensor) -> torch.Tensor:
        """Pool slots of tier slots (int64)."""
        bs = self.policy.block_size
        return torch.tensor(blocks, dtype=torch.long)[slots // bs] * bs + slots % bs

    def _next_slots(self, blocks: list[int], start: int, n: int) -> torch.Tensor:
        """Pool slots of tier slots start..start+n-1; a decode step's one slot
        without a tensor op per term."""
        if n > 1:
            return self._slots(blocks, torch.arange(start, start + n))
        bs = self.policy.block_size
        return torch.tensor([blocks[start // bs] * bs + start % bs], dtype=torch.long)

    @staticmethod
    def _grow(tier: Tier, alloc: Allocator, length: int, bs: int) -> None:
        need = -(-length // bs) - len(tier.blocks)
        if need > 0:
            tier.blocks += alloc.take(need)

    def _write(self, pool, fmt, key, value, slots: list[torch.Tensor]) -> None:
        flat = lambda x: x.reshape(-1, self.num_kv_heads, self.head_dim)
        slots = slots[0] if len(slots) == 1 else torch.cat(slots)
        ops.quantize_write(flat(key), flat(value), pool, slots.to(self.device), fmt)

    def _write_hot(self, layer: int, states, key, value, pos: Optional[list] = None) -> None:
        n, slots = key.shape[1], []
        for i, st in enumerate(states):
            self._grow(st.hot, self._hot_alloc[layer], st.hot.len + n, self.policy.block_size)
            slots.append(self._next_slots(st.hot.blocks, st.hot.len, n))
            st.hot.add(self._fresh(st, n) if pos is None else pos[i][0], None if pos is None else pos[i][1])
        self._write(self.hot_pools[layer], self.hot_format, key, value, slots)

    def _write_cold(self, layer: int, states, key, value, pos: list, scores: Optional[list] = None) -> None:
        """Token-wise writes into the cold tier: appended, or (streaming) into
        the ring's free slots and then over its oldest non-sink tokens."""
        bs, slots = self.policy.block_size, []
        for i, st in enumerate(states):
            cold, n = st.cold, key.shape[1]
            if self.policy.eviction != "streaming" or cold.len + n <= self._ring_cap:
                self._grow(cold, self._cold_alloc[layer], cold.len + n, bs)
                slots.append(self._next_slots(cold.blocks, cold.len, n))
                cold.add(pos[i], None if scores is None else scores[i])
                continue
            slots.append(self._ring_slots(layer, cold, pos[i]))
        self._write(self.cold_pools[layer], self.cold_format, key, value, slots)

    def _ring_slots(self, layer: int, cold: Tier, new_pos: torch.Tensor) -> torch.Tensor:
        """Streaming: slots for new tokens (pool slot, or -1 when a newer token
        of the same write takes its place). Keeps the sinks and the newest."""
        cap, sinks, n = self._ring_cap, self.policy.sinks, new_pos.shape[1]
        self._grow(cold, self._cold_alloc[layer], cap, self.policy.block_size)
        old = cold.pos[0]
        cand = torch.cat([old, new_pos[0]])
        is_sink = cand < sinks
        recent = torch.where(is_sink, torch.full_like(cand, -1), cand)
        n_recent = cap - int(is_sink.sum())
        keep = is_sink.clone()
        keep[torch.topk(recent, n_recent).indices] = True
        free_slots = torch.cat([torch.arange(cold.len, cap), torch.nonzero(~keep[:cold.len]).flatten()])
        new_kept = torch.nonzero(keep[cold.len:]).flatten()
        target = torch.full((n,), -1, dtype=torch.long)
        target[new_kept] = free_slots[:len(new_kept)]
        # Tier bookkeeping: the ring is full after this write.
        full_pos = torch.empty(cap, dtype=torch.long)
        full_pos[:cold.len] = old
        full_pos[target[new_kept]] = new_pos[0][new_kept]
        cold.pos = full_pos.expand(self.num_kv_heads, cap).clone()
        slots = torch.full((n,), -1, dtype=torch.long)
        slots[new_kept] = self._slots(cold.blocks, target[new_kept])
        return slots

    def _write_sealed_directly(self, layer: int, states, key, value) -> int:
        """A long append to a tiered cache: the tokens the hot tier would only
        pass on to the cold tier (``Policy.sealed`` of the whole append) are
        quantized straight into it, instead of a write and a seal per hot
        tier's worth (a 4k prompt: 50 of each per layer): the hot tier's full
        blocks are sealed, its partial last block is read back (exactly: the
        hot tier is raw) and quantized with the new tokens that complete it.
        The same codes, since quantize_write and seal_blocks share the encoder
        and the hot tier holds the input exactly; so only for an exact hot
        tier and sequences with equal hot tiers (and, for per-channel cold
        formats, block-aligned cold tiers: :meth:`_seal_staged`).
        Returns the new tokens written (0: none; the caller's usual path)."""
        p, bs, n = self.policy, self.policy.block_size, key.shape[1]
        hot = {st.hot.len for st in states}
        widened = key.dtype == value.dtype and (key.dtype == self.dtype or self.hot_format == "fp32")
        if not self._direct_seal or not widened or len(hot) != 1:  # else the hot tier would round the input
            return 0
        if self._per_channel and any(st.cold.len % bs for st in states):
            return 0
        hot = hot.pop()
        direct = p.sealed(hot + n) - hot  # new tokens that end in the cold tier
        if direct <= 0:
            return 0
        self._seal(layer, states, hot // bs)
        r = hot % bs
        ks, vs, pos, scores = [], [], [], []
        for st in states:
            k, v = self._read_blocks(self.hot_pools[layer], self.hot_format, st.hot.blocks[:1], r)
            ks.append(k)
            vs.append(v)
            fresh = self._fresh(st, direct)
            pos.append(torch.cat([st.hot.pos, fresh], 1))
            if st.hot.scores is not None:
                scores.append(torch.cat([st.hot.scores, torch.zeros(fresh.shape, device=st.hot.scores.device)], 1))
            self._empty(st.hot, self._hot_alloc[layer])  # the partial block, now read
        dev = lambda t: t.to(self.device, self.dtype)  # the hot tier's format is the dtype's: exact
        k = torch.cat([dev(torch.stack(ks)), dev(key[:, :direct])], 1)
        v = torch.cat([dev(torch.stack(vs)), dev(value[:, :direct])], 1)
        if self._per_channel:
            self._seal_staged(layer, states, k, v, pos, scores or None)
        else:
            self._write_cold(layer, states, k, v, pos, scores or None)
        return direct

    def _seal_staged(self, layer: int, states, key, value, pos: list, scores: Optional[list]) -> None:
        """Per-channel cold formats quantize whole blocks (a block's scales
        span its tokens), so tokens [len(states), whole blocks, ...] are
        staged in a scratch pool of the hot format (exact) and sealed from it
        in one call: the codes a write and a seal per block would leave."""
        bs, n = self.policy.block_size, key.shape[1]
        blocks = n // bs
        hot_pool = self.hot_pools[layer]
        scratch = torch.zeros((len(states) * blocks, *hot_pool.shape[1:]), dtype=hot_pool.dtype, device=self.device)
        slots = torch.arange(len(states) * n, device=self.device)
        self._write(scratch, self.hot_format, key, value, [slots])
        moves = [(st, blocks, pos[i], None if scores is None else scores[i]) for i, st in enumerate(states)]
        self._seal_into_cold(layer, scratch, list(range(len(states) * blocks)), moves)

    def _seal_into_cold(self, layer: int, pool, src: list[int], moves: list) -> None:
        """One seal_blocks call from blocks ``src`` of a hot-format ``pool``
        into new cold blocks: each move (state, blocks, positions, scores)
        takes its sequence's next ``blocks`` of them, in order."""
        dst = []
        for st, m, pos, scores in moves:
            new = self._cold_alloc[layer].take(m)
            dst += new
            st.cold.blocks += new
            st.cold.add(pos, scores)
        as_ids = lambda ids: torch.tensor(ids, dtype=torch.int32, device=self.device)
        ops.seal_blocks(pool, as_ids(src), self.cold_pools[layer], as_ids(dst), self.hot_format, self.cold_format)

    def _seal(self, layer: int, states, blocks: Optional[int] = None) -> None:
        """Moves each sequence's oldest full hot blocks to the cold tier while
        the hot tier holds more than hot_window (or exactly ``blocks`` of
        them): one seal_blocks call (or, for the streaming ring, dequantize +
        quantize_write)."""
        p, bs = self.policy, self.policy.block_size
        count = (lambda st: p.sealed(st.hot.len) // bs) if blocks is None else (lambda st: blocks)
        moves = [(st, count(st)) for st in states if count(st)]
        if not moves:
            return
        if p.eviction == "streaming":
            for st, m in moves:
                k, v = self._read_blocks(self.hot_pools[layer], self.hot_format, st.hot.blocks[:m])
                pos = st.hot.pos[:, :m * bs]
                self._drop_hot_front(layer, st, m)
                self._write_cold(layer, [st], k[None], v[None], [pos])
            return
        src = [b for st, m in moves for b in st.hot.blocks[:m]]
        self._seal_into_cold(layer, self.hot_pools[layer], src, [
            (st, m, st.hot.pos[:, :m * bs], None if st.hot.scores is None else st.hot.scores[:, :m * bs])
            for st, m in moves])
        for st, m in moves:
            self._drop_hot_front(layer, st, m)

    def _drop_hot_front(self, layer: int, st: LayerState, m: int) -> None:
        bs = self.policy.block_size
        self._hot_alloc[layer].give_back(st.hot.blocks[:m])
        st.hot.blocks = st.hot.blocks[m:]
        keep = torch.arange(m * bs, st.hot.len).expand(self.num_kv_heads, -1)
        st.hot.select(keep)

    def _read_blocks(self, pool, fmt, blocks: list[int], length: Optional[int] = None):
        """Dequantized tokens of a block list: (key, value) [n, kv_heads, head_dim]."""
        n = len(blocks) * self.policy.block_size if length is None else length
        bt = torch.tensor([blocks or [0]], dtype=torch.int32, device=self.device)
        k, v = ops.gather_dequant(pool, bt, torch.tensor([n], dtype=torch.int32, device=self.device), fmt,
                                  torch.float32)
        return k[0].transpose(0, 1), v[0].transpose(0, 1)

    # -------------------------------------------------------------- evict
    def _evict(self, layer: int, st: LayerState, k: int) -> None:
        """Keeps the k cold tokens per KV head that the policy's scorer picks
        (:meth:`kvcomp.scorers.Scorer.keep`); frees the blocks left empty (all
        of them for k = 0: a fractional budget of a short sequence, no sinks)."""
        cold = st.cold
        if k == 0:
            self._empty(cold, self._cold_alloc[layer])
            return
        keep = self.policy.scoring.keep(cold.scores, cold.pos, self.policy.sinks, k)
        self._compact(layer, cold, keep, self.cold_pools[layer], self.cold_format, self._cold_alloc[layer])

    def _compact(self, layer: int, tier: Tier, keep: torch.Tensor, pool, fmt, alloc) -> None:
        """Moves slots keep [kv_heads, k] (ascending) to 0..k-1, zeroes what is
        left of the old slots and frees the blocks past k."""
        bs, k = self.policy.block_size, keep.shape[1]
        bt = torch.tensor([tier.blocks or [0]], dtype=torch.int32, device=self.device)
        ops.compact(pool, bt, keep[None].to(torch.int32).to(self.device), fmt)
        tier.select(keep)
        used = -(-k // bs)
        alloc.give_back(tier.blocks[used:])
        tier.blocks = tier.blocks[:used]
        if k % bs:
            self._wipe_rows(pool, fmt, tier.blocks[-1], k % bs)

    def _wipe_rows(self, pool, fmt: str, block: int, first: int) -> None:
        """Zeroes the codes and per-token scales of rows first.. of a block."""
        f, bs = KVFormat.parse(fmt), self.policy.block_size
        lay = f.layout(self.head_dim, bs)
        for side, sf in (("k", f.k), ("v", f.v)):
            s = lay[side]
            pool[block, :, s["offset"] + first * s["row_bytes"]:s["offset"] + bs * s["row_bytes"]] = 0
            if not sf.per_channel and s["meta_bytes"]:
                per = s["meta_bytes"] // bs
                pool[block, :, s["meta_offset"] + first * per:s["meta_offset"] + bs * per] = 0

    # -------------------------------------------------------------- attend
    def attend(self, layer: int, seq_ids: Sequence, query: torch.Tensor, scale: Optional[float] = None,
               return_lse: bool = False, softcap: float = 0.0):
        """Decode attention of one query per sequence, ``query`` [len(seq_ids),
        num_heads, head_dim], over both tiers (merged exactly). Updates the
        heavy-hitter scores under H2O. Returns [len(seq_ids), num_heads, head_dim]
        (and with ``return_lse`` the fp32 log-sum-exp [len(seq_ids), num_heads]
        of the scaled logits, e.g. to fold in attention sinks). ``softcap`` > 0
        soft-caps the logits first (Gemma 2)."""
        states = self._states(layer, seq_ids)
        if not isinstance(query, torch.Tensor) or query.dim() != 3 or query.shape[0] != len(states) \
                or query.shape[2] != self.head_dim or query.shape[1] % self.num_kv_heads:
            raise ValueError(f"query must be [len(seq_ids)={len(states)}, num_heads (a multiple of "
                             f"{self.num_kv_heads}), {self.head_dim}], got {tuple(getattr(query, 'shape', ()))}")
        scale = self.head_dim ** -0.5 if scale is None else float(scale)
        q = query.to(self.device, torch.float32)
        h2o = self.policy.eviction == "h2o"
        parts = []
        for has, name, pool, fmt in ((self._has_hot, "hot", self.hot_pools[layer], self.hot_format),
                                     (self._has_cold, "cold", self.cold_pools[layer], self.cold_format)):
            if not has:
                continue
            tiers = [getattr(st, name) for st in states]
            bt, lens = self._tables(tiers)
            logits = torch.empty(len(states), q.shape[1], max(1, int(lens.max())), device=self.device) if h2o \
                else None
            out, lse = ops.paged_decode_attention(q, pool, bt, lens, fmt, scale, logits, softcap)
            parts.append((out, lse, tiers, lens, logits))
        out, lse = parts[0][0], parts[0][1]
        for o, l, *_ in parts[1:]:
            out, lse = ops.merge_attention_states(out, lse, o, l)
        if h2o:
            for _, _, tiers, lens, logits in parts:
                self._accumulate(tiers, lens, logits, lse)
        return (out.to(query.dtype), lse) if return_lse else out.to(query.dtype)

    def _tables(self, tiers: list[Tier]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(1, max(len(t.blocks) for t in tiers))  # one tensor from lists: this runs every decode step
        bt = torch.tensor([t.blocks + [0] * (width - len(t.blocks)) for t in tiers], dtype=torch.int32)
        lens = torch.tensor([t.len for t in tiers], dtype=torch.int32)
        return bt.to(self.device), lens.to(self.device)

    def _accumulate(self, tiers, lens, logits, lse) -> None:
        width = logits.shape[2]
        scores = torch.zeros(len(tiers), self.num_kv_heads, width, device=self.device)
        for i, t in enumerate(tiers):
            scores[i, :, :t.len] = t.scores
        ops.accumulate_scores(logits, lse, lens, scores)
        for i, t in enumerate(tiers):
            t.scores = scores[i, :, :t.len].clone()

    def add_scores(self, layer: int, seq_id, by_position: torch.Tensor, *, replace: bool = False) -> None:
        """Adds attention weight computed outside :meth:`attend` (e.g. by a
        prompt chunk's own attention) to the heavy-hitter scores of H2O:
        ``by_position`` [kv_heads, seq_len] holds each position's weight;
        held tokens receive theirs, evicted ones are ignored. ``replace``
        sets the scores to it instead (``Policy.observe``)."""
        st = self._state(seq_id, layer)
        if self.policy.eviction != "h2o":
            raise ValueError(f"add_scores needs an eviction='h2o' policy, not {self.policy.eviction!r}")
        if tuple(by_position.shape) != (self.num_kv_heads, st.seen):
            raise ValueError(f"by_position must be [{self.num_kv_heads}, {st.seen}] (kv_heads, seq_len), "
                             f"got {tuple(by_position.shape)}")
        w = by_position.to(self._scores_device, torch.float32)
        for t in (st.hot, st.cold):
            got = torch.gather(w, 1, t.pos.to(w.device))
            t.scores = got if replace else t.scores + got

    # -------------------------------------------------------------- forget
    def forget(self, seq_id, start: int, end: int) -> None:
        """Erases positions [start, end) of ``seq_id`` for good, in every layer
        and tier: the tokens stop attending and their bytes (codes, scales,
        scores) are overwritten. After H2O eviction KV heads may hold different
        positions; heads left with more tokens than others also drop their
        lowest-scoring extras, since all heads of a sequence share one length.
        Under ``wipe="on_reuse"`` the free blocks not zeroed yet are zeroed
        too: they may hold stale copies of the span (a hot block after its
        seal, an evicted block)."""
        self._known(seq_id)
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
            raise ValueError(f"forget needs 0 <= start <= end, got start={start!r}, end={end!r}")
        for layer, st in enumerate(self._seqs[seq_id]):
            for name in ("hot", "cold"):
                tier = getattr(st, name)
                hit = (tier.pos >= start) & (tier.pos < end)
                if tier.len == 0 or not bool(hit.any()):
                    continue
                keep = self._survivors(tier, ~hit)
                alloc = self._alloc(name, layer)
                fmt = self.hot_format if name == "hot" else self.cold_format
                self._compact(layer, tier, keep, alloc.pool, fmt, alloc)
            self._requeue_cold_tail(layer, st)
        for alloc in self._hot_alloc + self._cold_alloc:
            alloc.scrub()

    @staticmethod
    def _survivors(tier: Tier, alive: torch.Tensor) -> torch.Tensor:
        """Ascending slots [kv_heads, k] to keep: the alive ones, trimmed to the
        smallest count over heads by score (then recency)."""
        k = int(alive.sum(1).min())
        rank = tier.pos.double() if tier.scores is None else tier.scores.double().cpu() * 1e12 + tier.pos.double()
        rank = torch.where(alive, rank, torch.full_like(rank, -math.inf))
        return torch.topk(rank, k, dim=1).indices.sort(dim=1).values

    def _requeue_cold_tail(self, layer: int, st: LayerState) -> None:
        """Sealed cold tiers grow by whole blocks; after a forget leaves a
        partial last block, its tokens go back to the hot tier."""
        bs, cold = self.policy.block_size, st.cold
        if self._direct or self.policy.eviction == "streaming" or cold.len % bs == 0:
            return
        first = cold.len // bs * bs
        k, v = self._read_blocks(self.cold_pools[layer], self.cold_format, cold.blocks, cold.len)
        idx = torch.arange(first, cold.len).expand(self.num_kv_heads, -1)
        pos = torch.gather(cold.pos, 1, idx)
        scores = None if cold.scores is None else cold.scores[:, first:]
        self._compact(layer, cold, torch.arange(first).expand(self.num_kv_heads, -1),
                      self.cold_pools[layer], self.cold_format, self._cold_alloc[layer])
        self._write_hot(layer, [st], k[first:][None], v[first:][None], [(pos, scores)])
        self._seal(layer, [st])  # back within hot_window (or under one block)

    # --------------------------------------------------------------- stats
    def stats(self) -> dict:
        """Exact occupancy: tokens held (per layer, summed over sequences),
        pool bytes in use (all layers, both tiers, whole blocks) and bytes per
        held token."""
        hot = sum(st[0].hot.len for st in self._seqs.values())
        cold = sum(st[0].cold.len for st in self._seqs.values())
        bs = self.policy.block_size
        tile = lambda fmt: self.num_kv_heads * KVFormat.parse(fmt).tile_bytes(self.head_dim, bs)
        hot_tile, cold_tile = tile(self.hot_format), tile(self.cold_format)
        hot_blocks = sum(a.used for a in self._hot_alloc)
        cold_blocks = sum(a.used for a in self._cold_alloc)
        used = hot_blocks * hot_tile + cold_blocks * cold_tile
        tokens = hot + cold
        return {
            "sequences": len(self._seqs), "tokens": tokens, "hot_tokens": hot, "cold_tokens": cold,
            "seen_tokens": sum(st[0].seen for st in self._seqs.values()),
            "bytes": used, "bytes_per_token": used / tokens if tokens else 0.0,
            "hot_blocks": hot_blocks, "cold_blocks": cold_blocks, "block_size": bs,
            "capacity_bytes": sum(p.numel() for p in self.hot_pools + self.cold_pools),
            "policy": self.policy.name, "hot_format": self.hot_format, "cold_format": self.cold_format,
        }

    # ----------------------------------------------------------- save/load
    def save(self, path, seq_ids: Optional[Sequence] = None, *, key: Optional[bytes] = None,
             encrypt_key: Optional[bytes] = None) -> None:
        """Writes the cache, or only ``seq_ids`` (str or int ids), to a ``.kvc``
        file: the blocks in use as they are, atomically (docs/format.md).
        ``key`` (bytes, at least 16) signs the file with an HMAC-SHA256, so a
        change by anyone without the key is rejected on load; ``encrypt_key``
        (32 bytes) encrypts the blocks, positions, scores and layout with
        AES-256-GCM (needs the ``cryptography`` package)."""
        from .kvc_file import save_cache
        save_cache(self, path, seq_ids, key=key, encrypt_key=encrypt_key)

    @classmethod
    def load(cls, path, device: "torch.device | str" = "cpu", *, num_layers: Optional[int] = None,
             num_kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
             dtype: Optional[torch.dtype] = None, key: Optional[bytes] = None,
             encrypt_key: Optional[bytes] = None) -> "PagedKVCache":
        """A new cache on ``device`` from a ``.kvc`` file, once every field and
        value in it validated (docs/format.md, "Validation on load").
        Raises :class:`kvcomp.KVCFileError` for a file that is not one, is
        truncated, corrupted or of another format version, holds anything the
        cache itself would never store, has (when given) another
        ``num_layers``/``num_kv_heads``/``head_dim``/``dtype``. The new pools
        hold just the stored blocks (they grow from there, up to the saved
        caps ``max_tokens``/``max_seqs``). A file saved with ``key`` or
        ``encrypt_key`` loads only with the same; with ``key`` an unsigned
        file is rejected, with ``encrypt_key`` an unencrypted one. The
        timings of the load are in the new cache's ``load_report``."""
        from .kvc_file import load_cache
        return load_cache(path, device, dict(num_layers=num_layers, num_kv_heads=num_kv_heads,
                                             head_dim=head_dim, dtype=dtype), key=key, encrypt_key=encrypt_key)

    # ------------------------------------------------------------- helpers
    def _alloc(self, tier: str, layer: int) -> Allocator:
        return (self._hot_alloc if tier == "hot" else self._cold_alloc)[layer]

    def _empty(self, tier: Tier, alloc: Allocator) -> None:
        """Gives back every block of ``tier``, which then holds nothing."""
        alloc.give_back(tier.blocks)
        tier.blocks = []
        tier.select(torch.empty(self.num_kv_heads, 0, dtype=torch.long))

    def _known(self, seq_id):
        if seq_id not in self._seqs:
            raise KeyError(f"unknown sequence {seq_id!r} (add_sequence first)")
        return seq_id

    def _state(self, seq_id, layer: int) -> LayerState:
        return self._states(layer, [seq_id])[0]

    def _states(self, layer: int, seq_ids: Iterable) -> list[LayerState]:
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer!r}")
        seq_ids = list(seq_ids)
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"seq_ids has duplicates: {seq_ids}")
        return [self._seqs[self._known(s)][layer] for s in seq_ids]

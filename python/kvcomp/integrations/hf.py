"""Hugging Face transformers integration (install ``kvcomp[hf]``).

``KVCompCache`` is a transformers ``Cache`` backed by one
:class:`kvcomp.PagedKVCache` per layer; importing this module also registers
``attn_implementation="kvcomp"``. Every transformers-specific line of kvcomp
lives here: the cache API changes between releases (tested: 5.x).

- Prompt chunks (more than one query token) run the model's SDPA over the
  dequantized cache before the chunk plus the chunk's own full-precision K/V.
- Decode steps with ``"kvcomp"`` attention attend straight on the compressed
  pages (both tiers, merged), feeding H2O's scores; nothing is expanded.
- Under ``"kvcomp"``, padded prompt positions are erased from the cache after
  the prompt (``forget``), so decode needs no mask. Under ``"eager"``/``"sdpa"``
  each step gets the dequantized held tokens back in position order and the
  model's own mask; exact for policies without eviction.

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="kvcomp")
    out = model.generate(ids, past_key_values=KVCompCache(policy=kvcomp.policies.int4()))
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import time
from typing import Callable, Optional

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .. import ops
from ..cache import PagedKVCache
from ..storage import check_cap
from ..policy import Policy
from ..scorers import CumulativeAttention, Scorer

__all__ = ["BlindEvictionError", "KVCompCache", "kvcomp_attention"]


class BlindEvictionError(ValueError):
    """An eviction policy that needs attention scores met an attention
    implementation that computes none (transformers' eager or sdpa)."""


class _Tagged:
    """What ``update`` hands the attention function beside K/V (as a tensor
    attribute, since transformers passes only tensors along)."""

    def __init__(self, layer: "KVCompLayer", held: torch.Tensor, new_tokens: int, positions: Optional[list],
                 first: int, reconstruct: bool = False, evict_due: bool = False):
        self.layer, self.held, self.new_tokens = layer, held, new_tokens
        self.positions = positions  # per row: [kv_heads, held] positions of the dequantized columns
        self.first = first  # the position of the chunk's first token
        self.reconstruct = reconstruct  # a KVCompCache.compress pass: the chunk is not stored
        self.evict_due = evict_due  # a decode step passed an eviction point: evict once scored


def _stored_policy(policy: Policy, sliding_window: Optional[int], dtype: torch.dtype) -> Policy:
    """The policy a layer's PagedKVCache stores under: the user's, or for a
    sliding-window layer the ring of its window."""
    return policy if sliding_window is None else policy.sliding(sliding_window, dtype)


class KVCompLayer(CacheLayerMixin):
    """One model layer: a single-layer PagedKVCache whose sequences are the
    batch rows 0..batch-1. A sliding-window layer (``sliding_window``) holds
    a ring of its window (:meth:`kvcomp.Policy.sliding`)."""

    is_compileable = False

    def __init__(self, owner: "KVCompCache", policy: Policy, sliding_window: Optional[int] = None):
        super().__init__()
        self.owner, self.policy, self.sliding_window = owner, policy, sliding_window
        self.is_sliding = sliding_window is not None
        self.is_croppable = not self.is_sliding  # a ring forgets what a rollback would need
        self.cache: Optional[PagedKVCache] = None
        self.native = False  # set once "kvcomp" attention has run: decode skips the dequantized copy
        self.pending_evict = False  # a prompt chunk is held whole until its scorer lets the cache evict
        self.compressed = False  # KVCompCache.compress scored this layer's context (Scorer.needs_pass)
        self.reconstructing = False  # inside a compress pass: chunks are attended, not stored
        self.awaiting_scores = False  # an evicting layer handed out K/V that no attention has scored yet

    def stored_policy(self, dtype: torch.dtype) -> Policy:
        """The policy of this layer's PagedKVCache."""
        return _stored_policy(self.policy, self.sliding_window, dtype)

    # transformers' layer API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        o = self.owner
        cap = None if o.max_tokens is None else o.max_tokens * b
        self.cache = PagedKVCache(1, h, d, self.stored_policy(key_states.dtype), max_tokens=cap,
                                  dtype=key_states.dtype, device=key_states.device, max_seqs=max(b, 1))
        for i in range(b):
            self.cache.add_sequence(i)
        self.batch_size = b
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, _, q, _ = key_states.shape
        rows, first = list(range(b)), self.get_seq_length()
        scorer = self.cache.policy.scoring
        if self.awaiting_scores:
            raise BlindEvictionError(
                f"policy {self.cache.policy.name!r} evicts by attention scores, and the model's attention "
                "computed none: kvcomp scores under attn_implementation \"kvcomp\", \"sdpa\" and \"eager\" "
                "(after import kvcomp.integrations.hf); load the model with one of them, or call "
                "model.set_attn_implementation(\"kvcomp\"). Nothing was evicted.")
        decode_native = self.native and q == 1 and not self.reconstructing
        held = self.held_counts()
        prev = None if decode_native else self.dequantized()
        if self.reconstructing:  # attended, never stored; the scorer reads the weights
            self.awaiting_scores = scorer is not None and scorer.needs_pass
            tag = _Tagged(self, held, q, prev[2], first, reconstruct=True)
            return self._handed(key_states, value_states, prev, tag)
        due = False
        if scorer is not None:
            if self.pending_evict and q == 1:
                if scorer.needs_pass and not self.compressed:
                    raise BlindEvictionError(
                        f"policy {self.cache.policy.name!r} scores a context by reconstructing it (scorer="
                        f"'reconstruct'), an extra pass that needs the model: call cache.compress(model, "
                        f"input_ids) after the prefill, before decoding. Nothing was evicted.")
                self.cache.evict(0, rows)
                self.pending_evict = False
            self.pending_evict = self.pending_evict or q > 1
            self.awaiting_scores = True
            due = q == 1 and self.cache.policy.evicts_during(first, first + q)
        # Native decode evicts on append, as PagedKVCache.attend scores next; other
        # paths evict once the attention scored the step (_score_and_evict).
        self.cache.append(0, rows, key_states.transpose(1, 2), value_states.transpose(1, 2),
                          evict=decode_native)
        tag = _Tagged(self, held, q, None if prev is None else prev[2], first, evict_due=due and not decode_native)
        return self._handed(key_states, value_states, prev, tag)

    @staticmethod
    def _handed(key_states, value_states, prev, tag: _Tagged):
        """What update returns: the chunk alone (native decode) or after the
        dequantized held tokens, tagged."""
        if prev is None:
            k, v = key_states, value_states
        else:
            k = torch.cat([prev[0].to(key_states.dtype), key_states], 2)
            v = torch.cat([prev[1].to(value_states.dtype), value_states], 2)
        k._kvcomp = tag
        return k, v

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if not self.is_initialized:
            return query_length, 0
        held = int(self.held_counts().max())
        return held + query_length, self.get_seq_length() - held

    def get_seq_length(self) -> int:
        return self.cache.seq_len(0) if self.is_initialized else 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.cache, self.is_initialized = None, False
        self.native = self.pending_evict = self.compressed = self.reconstructing = self.awaiting_scores = False

    def crop(self, tokens_to_remove: int) -> None:
        """Assisted decoding: drops the newest ``-tokens_to_remove`` tokens
        (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        if self.is_sliding:
            raise NotImplementedError("a sliding-window layer's ring cannot roll back (crop)")
        length = max(0, self.get_seq_length() + tokens_to_remove)
        for i in range(self.batch_size):
            self.cache.truncate(i, length)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i becomes a copy of row beam_idx[i] (copied blocks)."""
        if not self.is_initialized:
            return
        order = [int(i) for i in beam_idx.tolist()]
        if len(order) != self.batch_size or not all(0 <= i < self.batch_size for i in order):
            raise ValueError(f"beam_idx must be {self.batch_size} rows in [0, {self.batch_size}), got {order}")
        if order == list(range(self.batch_size)):
            return
        c = self.cache
        for i, src in enumerate(order):
            c.fork(src, ("beam", i))
        for i in range(self.batch_size):
            c.free(i)
        for i in range(self.batch_size):
            c.rename(("beam", i), i)

    def offload(self):
        pass

    def prefetch(self):
        pass

    # kvcomp helpers
    def held_counts(self) -> torch.Tensor:
        return torch.tensor([self.cache.held(i) for i in range(self.batch_size)])

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Held tokens of every row, dequantized, in position order and
        right-aligned: ([batch, kv_heads, max_held, head_dim] K, V; fp32),
        and per row the sorted positions [kv_heads, held] of those columns."""
        c, b = self.cache, self.batch_size
        n = int(self.held_counts().max()) if b else 0
        h, d = c.num_kv_heads, c.head_dim
        K = torch.zeros(b, h, n, d, device=c.device)
        V = torch.zeros_like(K)
        positions = [torch.empty(h, 0, dtype=torch.long) for _ in range(b)]
        for i in range(b):
            parts, pos = [], []
            for tier, pool, fmt in (("hot", c.hot_pools[0], c.hot_format), ("cold", c.cold_pools[0], c.cold_format)):
                t = getattr(c._seqs[i][0], tier)
                if t.len:
                    parts.append(c._read_blocks(pool, fmt, t.blocks, t.len))
                    pos.append(t.pos)
            if not parts:
                continue
            k = torch.cat([p[0] for p in parts]).transpose(0, 1)  # [h, held, d]
            v = torch.cat([p[1] for p in parts]).transpose(0, 1)
            positions[i], order = torch.cat(pos, 1).sort(1)
            order = order.to(c.device)
            m = k.shape[1]
            K[i, :, n - m:] = torch.gather(k, 1, order[..., None].expand(-1, -1, d))
            V[i, :, n - m:] = torch.gather(v, 1, order[..., None].expand(-1, -1, d))
        return K, V, positions

    def restore(self, cache: PagedKVCache, native: bool, pending_evict: bool, compressed: bool) -> None:
        """Takes over a loaded single-layer cache whose sequences are rows 0..batch-1."""
        self.cache, self.native, self.pending_evict, self.compressed = cache, native, pending_evict, compressed
        self.batch_size = len(cache.sequences)
        self.dtype, self.device = cache.dtype, cache.device
        self.is_initialized = True


class KVCompCache(Cache):
    """A transformers ``Cache`` storing K/V per a :class:`kvcomp.Policy`.

    ``policy``: one Policy for every layer, a list of one per layer, or a
    function ``(layer_idx, layer_type) -> Policy`` (layer_type as in
    ``config.layer_types``: "full_attention", "sliding_attention").
    ``config`` (the model's config) tells each layer's kind, as
    ``DynamicCache(config=...)`` does: sliding-window layers hold a ring of
    their window (:meth:`kvcomp.Policy.sliding`), in constant memory; layers of
    other kinds (linear attention, Mamba, chunked attention) stay in
    transformers' own layer classes, untouched. Without ``config`` every
    layer is a full-attention one, and the ``"kvcomp"`` attention refuses a
    sliding-window layer rather than attend past its window.

    Its pools grow with the sequences (a short prompt costs what it holds).
    ``max_tokens``: an optional cap on the cold tier per sequence and layer
    (the hot tier under ``full()``); exceeding it raises
    :class:`kvcomp.CacheFullError`. None (default): no cap, like DynamicCache.
    """

    def __init__(self, policy=None, max_tokens: Optional[int] = None, config=None):
        from .. import policies
        check_cap(max_tokens)
        self.max_tokens = max_tokens
        policy = policies.full() if policy is None else policy
        self._policies = policy if isinstance(policy, (list, tuple)) else None
        self._policy_fn = policy if callable(policy) and not isinstance(policy, Policy) else None
        # one Policy for all layers (None when they differ)
        self.policy = policy if isinstance(policy, Policy) else None
        if self.policy is None and self._policies is None and self._policy_fn is None:
            raise TypeError(f"policy must be a kvcomp.Policy, a list of them or a function (layer_idx, "
                            f"layer_type) -> Policy, got {type(policy).__name__}")
        if config is None:
            super().__init__(layer_class_to_replicate=lambda: self._layer(len(self.layers), "full_attention", {}))
            return
        from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, get_layer_types_and_kwargs
        types, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
        if self._policies is not None and len(self._policies) != len(types):
            raise ValueError(f"policy: a list of {len(self._policies)} policies for a model of {len(types)} layers")
        layers = [self._layer(i, t, kw) if t in ("full_attention", "sliding_attention")
                  else DYNAMIC_LAYER_TYPE_MAPPING[t](**kw) for i, (t, kw) in enumerate(zip(types, kwargs))]
        super().__init__(layers=layers)

    def policy_of(self, layer_idx: int, layer_type: str = "full_attention") -> Policy:
        """The policy the user gave layer ``layer_idx``."""
        if self.policy is not None:
            return self.policy
        if self._policies is not None:
            if layer_idx >= len(self._policies):
                raise ValueError(f"policy: a list of {len(self._policies)} policies, but the model has a layer "
                                 f"{layer_idx}")
            p = self._policies[layer_idx]
        else:
            p = self._policy_fn(layer_idx, layer_type)
        if not isinstance(p, Policy):
            raise TypeError(f"policy for layer {layer_idx} must be a kvcomp.Policy, got {type(p).__name__}")
        return p

    def _layer(self, i: int, layer_type: str, kwargs: dict) -> KVCompLayer:
        window = kwargs.get("sliding_window") if layer_type == "sliding_attention" else None
        return KVCompLayer(self, self.policy_of(i, layer_type), window)

    def stats(self) -> dict:
        """Sum of every layer's :meth:`kvcomp.PagedKVCache.stats` (tokens per layer)."""
        parts = [l.cache.stats() for l in self.layers if getattr(l, "cache", None) is not None]
        if not parts:
            return {"tokens": 0, "bytes": 0, "bytes_per_token": 0.0, "layers": 0}
        tokens, used = parts[0]["tokens"], sum(p["bytes"] for p in parts)
        return {"tokens": tokens, "bytes": used, "bytes_per_token": used / tokens if tokens else 0.0,
                "layers": len(parts), "hot_tokens": parts[0]["hot_tokens"], "cold_tokens": parts[0]["cold_tokens"],
                "seen_tokens": parts[0]["seen_tokens"] // max(parts[0]["sequences"], 1)}

    @torch.no_grad()
    def compress(self, model, input_ids: torch.Tensor, *, prompt_ids: Optional[torch.Tensor] = None) -> dict:
        """Evicts now every layer whose prompt is held whole awaiting its
        scores (``Policy.scorer`` "window" or "reconstruct"), so a document
        is compact before its question, a save or decoding. For
        "reconstruct" it first runs one extra pass of ``prompt_ids`` +
        ``input_ids`` (the context just prefilled, [batch, n], unpadded; the
        prompt asks the model to repeat it, e.g. "Repeat the previous context
        exactly."), attended and scored but not stored; layers of other
        kinds (linear attention) are restored after it. Returns the pass's
        ``seconds`` and ``tokens`` (0 without a pass)."""
        pending = [l for l in self.layers if isinstance(l, KVCompLayer) and l.pending_evict]
        start, tokens = time.perf_counter(), 0
        if any(l.cache.policy.scoring.needs_pass for l in pending):
            ids = input_ids if prompt_ids is None else torch.cat([prompt_ids.to(input_ids.device), input_ids], 1)
            kept = {i: copy.deepcopy(l) for i, l in enumerate(self.layers) if not isinstance(l, KVCompLayer)}
            for l in pending:
                l.reconstructing = True
            try:
                model(input_ids=ids, **cache_kwarg(model, self), use_cache=True, logits_to_keep=1)
            finally:
                for l in pending:
                    l.reconstructing = False
                for i, l in kept.items():
                    self.layers[i] = l
            tokens = ids.shape[1]
        for l in pending:
            if l.awaiting_scores:
                l.awaiting_scores = False
                raise BlindEvictionError("the compress pass ran under an attention implementation that computes no "
                                         "scores: use \"kvcomp\", \"sdpa\" or \"eager\". Nothing was evicted.")
            l.cache.evict(0, list(range(l.batch_size)))
            l.pending_evict = False
            l.compressed = l.compressed or l.cache.policy.scoring.needs_pass
        return {"seconds": time.perf_counter() - start if tokens else 0.0, "tokens": tokens}

    def save(self, path, *, key: Optional[bytes] = None, encrypt_key: Optional[bytes] = None) -> None:
        """Writes every layer's cache, the policy, ``max_tokens`` and each
        layer's batch size and flags to one ``.kvc`` file, atomically
        (docs/format.md). :meth:`load` continues where this left off.
        ``key``/``encrypt_key``: as :meth:`kvcomp.PagedKVCache.save`."""
        from ..kvc_file import cache_entry, write
        layers, tensors = [], {}
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, KVCompLayer):
                raise ValueError(f"layer {i} is a {type(layer).__name__}, kept in transformers' own cache: a .kvc "
                                 f"file holds attention layers only")
            entry = None
            if layer.is_initialized:
                entry, t = cache_entry(layer.cache, prefix=f"layers.{i}.")
                tensors.update(t)
            layers.append({"policy": dataclasses.asdict(layer.policy), "sliding_window": layer.sliding_window,
                           "batch_size": layer.batch_size if layer.is_initialized else 0, "native": layer.native,
                           "pending_evict": layer.pending_evict, "compressed": layer.compressed, "cache": entry})
        body = {"policy": None if self.policy is None else dataclasses.asdict(self.policy),
                "max_tokens": self.max_tokens, "layers": layers}
        write(path, "hf.KVCompCache", body, tensors, key=key, encrypt_key=encrypt_key)

    @classmethod
    def load(cls, path, device: "torch.device | str" = "cpu", config=None, *, key: Optional[bytes] = None,
             encrypt_key: Optional[bytes] = None) -> "KVCompCache":
        """A KVCompCache on ``device`` from a file :meth:`save` wrote, once all
        of it validated. With the model's ``config``, its layer count, KV
        heads and head_dim must match the file's. ``key``/``encrypt_key``: as
        :meth:`kvcomp.PagedKVCache.load`. :class:`kvcomp.KVCFileError` for
        any file that does not validate."""
        from .. import kvc_file
        from ..kvc_validate import MAX_LAYERS, Invalid, check_cache, check_policy, field, integer
        report = {}
        header, tensors = kvc_file.read(path, "hf.KVCompCache", key, encrypt_key, report)
        t0 = time.perf_counter()
        plans, names = [], set()
        with kvc_file.malformed(path):
            common = field(header, "policy", "")
            common = None if common is None else check_policy(common)
            per_seq = field(header, "max_tokens", "")
            if per_seq is not None:
                integer(per_seq, "max_tokens", 1)
            entries = field(header, "layers", "")
            if not isinstance(entries, list) or len(entries) > MAX_LAYERS:
                raise Invalid("layers", f"must be a list of at most {MAX_LAYERS} layers")
            expect = {"num_layers": 1}
            if config is not None:
                cfg = config.get_text_config()
                if len(entries) != cfg.num_hidden_layers:
                    raise Invalid("layers", f"the cache has {len(entries)} layers, the model "
                                            f"{cfg.num_hidden_layers}")
                heads = cfg.num_attention_heads
                expect.update(num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                              head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
            for i, e in enumerate(entries):
                where = f"layers[{i}]"
                if not isinstance(e, dict):
                    raise Invalid(where, f"must be a JSON object, got {type(e).__name__}")
                mine = field(e, "policy", where) if common is None or "policy" in e else None  # version 1: none
                policy = common if mine is None else check_policy(mine, f"{where}.policy")
                if common is not None and policy != common:
                    raise Invalid(f"{where}.policy", "differs from the cache's policy")
                window = e.get("sliding_window")
                if window is not None:
                    integer(window, f"{where}.sliding_window", 1, 1 << 30)
                b = integer(field(e, "batch_size", where), f"{where}.batch_size", 0, 1 << 20)
                flags = [field(e, k, where) for k in ("native", "pending_evict")] + [e.get("compressed", False)]
                if any(type(f) is not bool for f in flags):
                    raise Invalid(where, f"native, pending_evict and compressed must be true or false, got {flags}")
                if (field(e, "cache", where) is None) != (b == 0):
                    raise Invalid(f"{where}.cache", "must be null exactly when batch_size is 0")
                plan = None
                if b:
                    plan = check_cache(e["cache"], tensors, f"layers.{i}.", expect)
                    cap = None if per_seq is None else per_seq * b
                    if plan.policy != _stored_policy(policy, window, plan.dtype) or \
                            [s for s, _ in plan.sequences] != list(range(b)) or plan.max_tokens != cap:
                        raise Invalid(f"{where}.cache", f"must hold the batch rows 0..{b - 1} under the "
                                                        f"layer's policy and the cache's max_tokens")
                    names |= plan.names
                plans.append((policy, window, plan, flags))
        kvc_file.unused_tensors(tensors, names, path)
        t1 = time.perf_counter()
        out = cls(policy=common or [policy for policy, *_ in plans], max_tokens=per_seq)
        for policy, window, plan, flags in plans:
            layer = KVCompLayer(out, policy, window)
            if plan is not None:
                layer.restore(kvc_file.build(plan, device), *flags)
            out.layers.append(layer)
        out.load_report = kvc_file.finish_report(report, t1 - t0, time.perf_counter() - t1)
        return out


def cache_kwarg(model, cache) -> dict:
    """The cache as a forward/generate keyword: ``cache`` where the model takes
    it (transformers >= 5.24 deprecates ``past_key_values`` for it), else
    ``past_key_values``."""
    return {_cache_keyword(type(model)): cache}


@functools.lru_cache(maxsize=None)
def _cache_keyword(model_class) -> str:
    # once per model class, not per decode step
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def kvcomp_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                     dropout: float = 0.0, **kwargs):
    """``attn_implementation="kvcomp"``: decode on the compressed pages."""
    tag = getattr(key, "_kvcomp", None)
    if tag is None:  # not a KVCompCache (e.g. no cache at all): plain SDPA over what we were given
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    layer: KVCompLayer = tag.layer
    window = kwargs.get("sliding_window")
    if window is not None and window != layer.sliding_window:
        raise ValueError(f"this attention layer has a sliding window of {window} tokens, its KVCompCache layer "
                         f"{'none' if layer.sliding_window is None else layer.sliding_window}: build the cache "
                         f"with the model's config, KVCompCache(policy, config=model.config)")
    sinks = kwargs.pop("s_aux", None)  # gpt-oss: a learned logit per head that takes a share of the softmax
    softcap = kwargs.pop("softcap", None)  # Gemma 2: logits soft-capped to softcap * tanh(x / softcap)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    b, _, q, _ = query.shape
    if tag.positions is None:  # native decode: attend scores as it goes
        out, lse = layer.cache.attend(0, list(range(b)), query[:, :, 0], scale, return_lse=True,
                                      softcap=softcap or 0.0)
        layer.awaiting_scores = False
        if sinks is not None:
            out = _with_sinks(out, lse, sinks)
        return out[:, None], None
    # A first chunk with no padding (and no window inside it) is plain causal:
    # SDPA's is_causal path, not an explicit mask (its slower kernel). The
    # model passes no mask for it; then a mask (q x q per layer, 1.4 s over
    # a 4k prompt's 30 layers) is built only if a scorer or the fp32 path reads it.
    first_chunk = key.shape[2] == q
    causal = first_chunk and attention_mask is None and (window is None or q <= window)
    needs_mask = not causal or softcap or sinks is not None or _chunk_scorer(layer, tag) is not None
    mask = _prefill_mask(tag, attention_mask, key.shape[2], q, query.device) if needs_mask else None
    causal = causal or first_chunk and bool(torch.equal(mask[:, 0], _tril(q, query.device).expand(b, q, q)))
    probs = None
    if softcap:  # SDPA cannot soft-cap: the weights in fp32 (sinks folded in), which the scorer reads too
        probs = _softmax(_masked_logits(query, key, mask, scale, softcap), sinks).nan_to_num_(0.0)
        out = _grouped(probs, value).to(query.dtype).transpose(1, 2)
    else:
        out, _ = sdpa_attention_forward(module, query, key, value, None if causal else mask, dropout=dropout,
                                        scaling=scale, is_causal=causal, **kwargs)
        if sinks is not None:  # out is [b, q, heads, d]; the softmax's normalizer from the logits themselves
            lse = _masked_logits(query, key, mask, scale).logsumexp(-1)  # [b, heads, q]
            out = _with_sinks(out.transpose(1, 2), lse, sinks[None, :, None]).transpose(1, 2)
    _score_and_evict(tag, query, key, mask, scale, probs=probs, softcap=softcap, sinks=sinks)
    if not tag.reconstruct and attention_mask is not None:  # without a mask no chunk token is padding
        _forget_padding(layer, mask[:, 0, -1, -q:], q)
    layer.native = True
    return out, None


def _masked_logits(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor, scale: float,
                   softcap: Optional[float] = None) -> torch.Tensor:
    """fp32 ``scale * q.k`` [batch, heads, q, kv] of every query head against
    its KV head's keys (soft-capped as Gemma 2 does), -inf where ``mask``
    hides the key."""
    b, heads, q, d = query.shape
    kv = key.shape[1]  # query heads grouped by KV head, so K is not copied per query head
    logits = (query.float().reshape(b, kv, heads // kv * q, d) @ key.float().transpose(-1, -2))
    logits = logits.view(b, heads, q, -1).mul_(scale)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.masked_fill(~mask, float("-inf"))


def _with_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Attention with a sink logit s per head in the softmax, from attention
    without it: out * e^lse / (e^lse + e^s) = out * sigmoid(lse - s)."""
    return (out.float() * torch.sigmoid(lse - sinks.float())[..., None]).to(out.dtype)


def _tril(n: int, device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def _prefill_mask(tag: _Tagged, attention_mask, kv_len: int, q: int, device) -> torch.Tensor:
    """[batch, 1, q, kv_len] bool: every held token (right-aligned before the
    chunk) is visible, in a sliding-window layer only those within the
    window of each query; within the chunk, the model's mask (causal +
    padding, and its window)."""
    b, prev = tag.held.shape[0], kv_len - q
    mask = torch.zeros(b, 1, q, kv_len, dtype=torch.bool, device=device)
    cols = torch.arange(prev, device=device)
    mask[..., :prev] = (cols >= prev - tag.held.to(device)[:, None])[:, None, None, :]
    window = tag.layer.sliding_window
    if window is not None:
        for i in range(b):
            pos = tag.positions[i][0].to(device)  # a ring: every KV head holds the same positions
            queries = torch.arange(tag.first, tag.first + q, device=device)
            mask[i, 0, :, prev - pos.numel():prev] &= queries[:, None] - pos[None, :] < window
    if attention_mask is None:
        chunk = _tril(q, device)
    else:
        am = attention_mask[..., -q:]
        chunk = am if am.dtype == torch.bool else am == 0
    mask[..., prev:] = chunk
    return mask


def _score_and_evict(tag: _Tagged, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor, scale: float,
                     probs: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
                     sinks: Optional[torch.Tensor] = None) -> None:
    """After an attention call over dequantized held tokens + a chunk (any
    implementation): gives the held tokens (and the chunk's own) the scores
    their policy's scorer (:mod:`kvcomp.scorers`) reads from the chunk's
    attention weights, then evicts where the scorer allows. Columns of
    ``key`` are the held tokens (positions in ``tag.positions``), then the
    chunk. ``probs``: the attention weights when the attention computed them
    (eager, a soft-capped prefill); else they are recomputed from ``mask``."""
    layer = tag.layer
    layer.awaiting_scores = False
    scorer = _chunk_scorer(layer, tag)
    if scorer is None:
        return
    c, q = layer.cache, query.shape[2]
    b, heads, kv_heads, kv_len = query.shape[0], query.shape[1], key.shape[1], key.shape[2]
    prev = kv_len - q
    first, last, _ = scorer.queries(q).indices(q)
    weight = None
    step = max(1, (1 << 22) // (heads * kv_len))  # queries per block: ~16 MiB of fp32 weights
    for s in range(first, last, step):
        block = slice(s, min(s + step, last))
        p = probs[:, :, block] if probs is not None else \
            _softmax(_masked_logits(query[:, :, block], key, mask[:, :, block], scale, softcap), sinks)
        weight = scorer.combine(weight, scorer.weights(p.float().nan_to_num(0.0), kv_heads))
    for i in range(b):
        seen = c.seq_len(i)
        by_pos = torch.zeros(kv_heads, seen, device=c.device)
        held_pos = tag.positions[i].to(c.device)
        m = held_pos.shape[1]
        by_pos.scatter_(1, held_pos, weight[i, :, prev - m:prev].to(c.device))
        if not tag.reconstruct:
            by_pos[:, tag.first:] = weight[i, :, prev:].to(c.device)
        c.add_scores(0, i, scorer.pooled(by_pos), replace=scorer.replace)
    rows = list(range(b))
    if q == 1 and tag.evict_due:
        c.evict(0, rows)
    elif q > 1 and scorer.evict_after_chunk and not tag.reconstruct:
        c.evict(0, rows)
        layer.pending_evict = False


_DECODE = CumulativeAttention()  # every decode step adds its attention (H2O), whatever scored the prompt


def _chunk_scorer(layer: KVCompLayer, tag: _Tagged) -> Optional[Scorer]:
    """The scorer of this attention call: the policy's for a prompt chunk or
    a compress pass, H2O's for a decode step and for chunks after a
    compress; None when nothing is scored."""
    scorer = layer.cache.policy.scoring
    if scorer is None:
        return None
    if tag.reconstruct:
        return scorer if scorer.needs_pass else None
    if tag.new_tokens == 1:
        return _DECODE
    if scorer.needs_pass:  # the compress pass scores the context; chunks after it score as H2O
        return _DECODE if layer.compressed else None
    return scorer


def _grouped(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """probs [b, heads, q, kv] @ V [b, kv_heads, kv, d] with query heads grouped
    by KV head (V is not copied per query head): [b, heads, q, d], fp32."""
    b, heads, q, n = probs.shape
    kv = value.shape[1]
    return (probs.reshape(b, kv, heads // kv * q, n) @ value.float()).view(b, heads, q, -1)


def _softmax(logits: torch.Tensor, sinks: Optional[torch.Tensor]) -> torch.Tensor:
    """Attention weights; with gpt-oss's sink logit per head in the denominator."""
    if sinks is None:
        return logits.softmax(-1)
    lse = torch.logaddexp(logits.logsumexp(-1, keepdim=True), sinks.float()[None, :, None, None])
    return (logits - lse).exp()


def _forget_padding(layer: KVCompLayer, last_row: torch.Tensor, q: int) -> None:
    """Erases chunk positions the last query may not see (padding) from the
    cache, so decode steps attend without a mask."""
    first = layer.cache.seq_len(0) - q
    for i in range(last_row.shape[0]):
        hidden = torch.nonzero(~last_row[i]).flatten().tolist()
        for j in _runs(hidden):
            layer.cache.forget(i, first + j[0], first + j[1])


def _runs(xs: list[int]) -> list[tuple[int, int]]:
    """[start, end) runs of consecutive ints."""
    out = []
    for x in xs:
        if out and out[-1][1] == x:
            out[-1] = (out[-1][0], x + 1)
        else:
            out.append((x, x + 1))
    return out


def _scoring(attention: Callable) -> Callable:
    """``attention`` (transformers' sdpa, or a model's own eager function),
    unchanged, then scoring for a KVCompCache layer whose policy evicts, so
    eviction never runs blind under the implementations users load."""

    @functools.wraps(attention)
    def scored(module, query, key, value, attention_mask, *args, **kwargs):
        out, weights = attention(module, query, key, value, attention_mask, *args, **kwargs)
        tag = getattr(key, "_kvcomp", None)
        if tag is not None and tag.layer.cache.policy.scoring is not None:
            q = query.shape[2]
            mask = _prefill_mask(tag, attention_mask, key.shape[2], q, query.device)
            if attention_mask is not None and tag.first == 0 and \
                    not torch.equal(mask[:, 0, :, -q:], _tril(q, query.device).expand(query.shape[0], q, q)):
                raise ValueError(f"policy {tag.layer.cache.policy.name!r} evicts, and this batch is padded: "
                                 f"under {attention.__name__} the model's mask would no longer match the held "
                                 f"tokens; use attn_implementation=\"kvcomp\", which erases padding")
            scaling = kwargs.get("scaling", args[0] if args else None)
            _score_and_evict(tag, query, key, mask, scaling if scaling is not None else query.shape[-1] ** -0.5,
                             probs=weights, softcap=kwargs.get("softcap"), sinks=kwargs.get("s_aux"))
        return out, weights

    return scored


_get_interface = AttentionInterface.get_interface
_scored: dict = {}


def _get_scoring_interface(self, attn_implementation: str, default: Callable) -> Callable:
    """AttentionInterface.get_interface, with eager and sdpa wrapped by
    :func:`_scoring` (a model's eager function is its own ``default``, so it
    cannot be registered once for all)."""
    fn = _get_interface(self, attn_implementation, default)
    if attn_implementation in ("eager", "sdpa"):
        return _scored.setdefault(fn, _scoring(fn))
    return fn


AttentionInterface.get_interface = _get_scoring_interface
AttentionInterface.register("kvcomp", kvcomp_attention)
AttentionMaskInterface.register("kvcomp", sdpa_mask)

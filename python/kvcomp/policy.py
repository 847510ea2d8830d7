"""Cache policies: which format the cold tier uses, how many recent tokens stay
in full precision, and which tokens are evicted (CONTRACT.md §4).

A :class:`Policy` is plain data, validated on construction. ``kvcomp.policies``
holds the presets. :meth:`Policy.plan` says how many tokens each tier holds
after ``n`` tokens of one sequence, the same rule :class:`kvcomp.PagedKVCache`
follows, so :meth:`Policy.bytes_per_token` plans capacity before allocating.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from .formats import KVFormat
from .scorers import SCORERS, Scorer

EVICTIONS = (None, "h2o", "streaming")
BLOCK_SIZES = (16, 32, 64, 128)
HOT_FORMATS = ("fp16", "bf16", "fp32")
WIPES = ("on_free", "on_reuse")
_PER_TOKEN = {"int8c": "int8", "int4c": "int4", "int2c": "int2"}  # per-channel kinds' per-token kinds


@dataclass(frozen=True)
class Policy:
    """How a :class:`kvcomp.PagedKVCache` stores one sequence.

    - ``cold_format``: format spec of the compressed (cold) tier.
    - ``hot_window``: newest tokens kept in full precision (the hot tier);
      ``None`` keeps every token hot (no cold tier: an uncompressed cache).
      When the hot tier holds more, its oldest full blocks are sealed into the
      cold tier. ``0`` with a per-token cold format writes straight to the cold
      tier.
    - ``sinks``: first tokens of a sequence that eviction never removes.
    - ``eviction``: ``None``; ``"h2o"`` (keep the ``budget`` cold tokens with
      the highest cumulative attention, plus sinks); ``"streaming"`` (keep the
      sinks and the newest ``window`` tokens; constant memory).
    - ``budget``: h2o's cold tokens kept per sequence: an int, or a fraction of
      the sequence's length (float in (0, 1]). Rounded down to whole blocks.
    - ``window``: streaming's recent tokens (hot tier included).
    - ``block_size``: tokens per block (16, 32, 64 or 128).
    - ``hot_format``: ``"fp16"``, ``"bf16"`` or ``"fp32"``; ``None`` follows
      the cache's dtype.
    - ``evict_every``: h2o evicts every this many appended tokens; ``None``
      evicts as soon as a seal takes the cold tier over its budget.
    - ``observe``: h2o only. ``None`` scores a prompt as H2O does (every
      prompt token's attention counts) and evicts after each prefill chunk.
      An int scores a prompt by the attention of its last ``observe`` tokens
      only (max-pooled over neighbouring positions) and evicts once the whole
      prompt is in, at the first decode step, as SnapKV does: the end of a
      prompt (the question) picks what its answer needs, so a fact hidden
      early survives. The whole prompt is held until then. Used by the Hugging
      Face integration; other callers score with ``PagedKVCache.add_scores``.
      The same as ``scorer="window"``.
    - ``scorer``: h2o only: how a prompt is scored (``kvcomp.scorers``).
      ``"cumulative"`` (H2O, the default without ``observe``), ``"window"``
      (SnapKV: the last ``observe`` tokens, 32 unless set) or
      ``"reconstruct"`` (KVzip-style and query-agnostic: one extra pass
      asking the model to repeat the context, ``KVCompCache.compress``; for a
      document cached before its question).
    - ``pool``: h2o's scores are max-pooled over this many neighbouring
      positions (odd); ``None`` takes the scorer's default (:attr:`scoring`).
    - ``wipe``: when blocks given back (by ``free``, eviction, sealing, the
      streaming ring) are zeroed: ``"on_free"`` at once, so no freed byte
      stays in memory; ``"on_reuse"`` only when handed out again, so freeing
      is cheaper but freed data lingers in free blocks until then. Either way
      no sequence ever sees another's bytes, and ``forget`` erases at once.
    """

    cold_format: str = "int4"
    hot_window: Optional[int] = 64
    sinks: int = 0
    eviction: Optional[str] = None
    budget: Union[int, float, None] = None
    block_size: int = 16
    window: Optional[int] = None
    hot_format: Optional[str] = None
    evict_every: Optional[int] = None
    observe: Optional[int] = None
    wipe: str = "on_free"
    name: str = "custom"
    scorer: Optional[str] = None
    pool: Optional[int] = None

    def __post_init__(self):
        try:
            fmt = KVFormat.parse(self.cold_format)
        except (ValueError, TypeError) as e:
            raise ValueError(f"cold_format: {str(e).removeprefix('format: ')}") from None
        object.__setattr__(self, "cold_format", fmt.name)
        _check(self.block_size in BLOCK_SIZES, f"block_size must be one of {BLOCK_SIZES}, got {self.block_size!r}")
        _check(self.hot_format is None or self.hot_format in HOT_FORMATS,
               f"hot_format must be one of {HOT_FORMATS} or None, got {self.hot_format!r}")
        _check(self.hot_window is None or (_is_int(self.hot_window) and self.hot_window >= 0),
               f"hot_window must be None or an int >= 0, got {self.hot_window!r}")
        _check(_is_int(self.sinks) and self.sinks >= 0, f"sinks must be an int >= 0, got {self.sinks!r}")
        _check(self.eviction in EVICTIONS, f"eviction must be one of {EVICTIONS}, got {self.eviction!r}")
        _check(self.evict_every is None or (_is_int(self.evict_every) and self.evict_every > 0),
               f"evict_every must be None or an int > 0, got {self.evict_every!r}")
        _check(self.observe is None or (_is_int(self.observe) and self.observe > 0),
               f"observe must be None or an int > 0, got {self.observe!r}")
        _check(self.wipe in WIPES, f"wipe must be one of {WIPES}, got {self.wipe!r}")
        if self.eviction is not None:
            _check(self.hot_window is not None,
                   f"eviction={self.eviction!r} needs a cold tier: hot_window must not be None")
        if self.eviction == "h2o":
            self._check_budget()
            self._check_scorer()
        else:
            _check(self.budget is None, f"budget applies to eviction='h2o' only, got budget={self.budget!r}")
            _check(self.evict_every is None, "evict_every applies to eviction='h2o' only")
            _check(self.observe is None, f"observe applies to eviction='h2o' only, got observe={self.observe!r}")
            _check(self.scorer is None, f"scorer applies to eviction='h2o' only, got scorer={self.scorer!r}")
            _check(self.pool is None, f"pool applies to eviction='h2o' only, got pool={self.pool!r}")
        if self.eviction == "streaming":
            self._check_streaming(fmt)
        else:
            _check(self.window is None, f"window applies to eviction='streaming' only, got window={self.window!r}")

    def _check_scorer(self):
        _check(self.scorer is None or self.scorer in SCORERS,
               f"scorer must be one of {tuple(SCORERS)} or None, got {self.scorer!r}")
        _check(self.observe is None or self.scorer in (None, "window"),
               f"observe is the window of scorer='window', not of scorer={self.scorer!r}")
        _check(self.pool is None or (_is_int(self.pool) and self.pool > 0 and self.pool % 2),
               f"pool must be None or an odd int > 0, got {self.pool!r}")

    def _check_budget(self):
        b = self.budget
        _check(b is not None, "eviction='h2o' needs a budget (cold tokens kept: an int or a fraction)")
        if isinstance(b, float):
            _check(0.0 < b <= 1.0, f"a fractional budget must be in (0, 1], got {b!r}")
        else:
            _check(_is_int(b) and b > 0, f"budget must be an int > 0 or a float in (0, 1], got {b!r}")
            _check(b >= self.sinks, f"budget ({b}) must keep at least the {self.sinks} sinks")

    def _check_streaming(self, fmt: KVFormat):
        w, bs = self.window, self.block_size
        _check(_is_int(w) and w > 0, f"eviction='streaming' needs window, an int > 0, got {w!r}")
        _check(not fmt.per_channel,
               f"eviction='streaming' rewrites single tokens: cold_format {fmt.name!r} is per-channel")
        _check(self.hot_window % bs == 0,
               f"with streaming, hot_window ({self.hot_window}) must be a multiple of block_size ({bs})")
        _check(self.hot_window < w, f"hot_window ({self.hot_window}) must be smaller than window ({w})")

    # ------------------------------------------------------------ planning
    @functools.cached_property
    def scoring(self) -> Optional[Scorer]:
        """The :class:`kvcomp.scorers.Scorer` of an h2o policy (None otherwise)."""
        if self.eviction != "h2o":
            return None
        name = self.scorer or ("window" if self.observe is not None else "cumulative")
        kw = {} if self.pool is None else {"pool": self.pool}
        if name == "window" and self.observe is not None:
            kw["window"] = self.observe
        return SCORERS[name](**kw)

    @property
    def format(self) -> KVFormat:
        return KVFormat.parse(self.cold_format)

    def resolved_hot_format(self, dtype=None) -> str:
        """The hot tier's format: ``hot_format``, else the one holding ``dtype`` exactly."""
        if self.hot_format is not None:
            return self.hot_format
        import torch
        return {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, "fp16")

    def cold_budget(self, seq_len: int) -> Optional[int]:
        """h2o: cold tokens kept for a sequence of ``seq_len`` tokens (whole blocks)."""
        if self.eviction != "h2o":
            return None
        return int(self._budget(int(seq_len), max))

    def _budget(self, seq_len, maximum):
        """cold_budget's rule, for an int (``maximum=max``, the cache's hot
        path: no numpy per call) or a numpy array (``np.maximum``, planning)."""
        b, bs = self.budget, self.block_size
        tokens = b * seq_len // 1 if isinstance(b, float) else b  # floor, exact below 2**53
        return maximum(tokens // bs * bs, -(-self.sinks // bs) * bs)

    def plan(self, seq_len: int) -> tuple[int, int]:
        """(hot, cold) tokens one sequence holds after ``seq_len`` tokens were
        appended one at a time (decode), by the rules PagedKVCache follows."""
        n = int(seq_len)
        if self.hot_window is None:
            return n, 0
        sealed = self.sealed(n)
        if self.eviction == "streaming":
            return n - sealed, min(sealed, self.sinks + self.window - self.hot_window)
        if self.eviction == "h2o":
            return n - sealed, self._h2o_cold(n)
        return n - sealed, sealed

    def sealed(self, n: int) -> int:
        """Tokens a hot tier of ``n`` tokens (from a block boundary) moves to the
        cold tier: its oldest full blocks, while it holds more than hot_window.
        Also the tokens sealed after ``n`` appended tokens. PagedKVCache follows
        this rule."""
        return self._sealed(int(n), max, min)

    def _sealed(self, n, maximum, minimum):
        """sealed's rule, for an int (``max``, ``min``) or a numpy array
        (``np.maximum``, ``np.minimum``). With n <= hot_window the first term
        is <= 0: nothing is sealed."""
        if self._direct():
            return n
        bs, w = self.block_size, self.hot_window
        return maximum(0, minimum(-(-(n - w) // bs), n // bs)) * bs

    def _h2o_cold(self, n: int) -> int:
        """The cold tier after n decode steps: cold_t = cold_{t-1} + (sealed_t
        - sealed_{t-1}), then min(cold_t, budget_t) at each eviction point t
        (:meth:`evicts_at`). Unrolled: min(sealed_n, min over eviction points
        s <= n of budget_s + sealed_n - sealed_s), in one vectorized pass."""
        step = self.evict_every or 1
        t = np.arange(step, n + 1, step, dtype=np.int64)
        sealed_n = self.sealed(n)
        if len(t) == 0:
            return sealed_n
        slack = self._budget(t, np.maximum) - self._sealed(t, np.maximum, np.minimum)
        return int(min(sealed_n, slack.min() + sealed_n))

    def evicts_at(self, t: int) -> bool:
        """h2o may evict after the t-th token (every evict_every tokens, or always)."""
        return t % (self.evict_every or 1) == 0

    def evicts_during(self, before: int, after: int) -> bool:
        """An append taking a sequence from ``before`` to ``after`` tokens passes
        an eviction point."""
        return self.evict_every is None or after // self.evict_every > before // self.evict_every

    def _direct(self) -> bool:
        """Tokens go straight to the cold tier (no hot copy)."""
        return self.hot_window == 0 and not self.format.per_channel

    def bytes_per_token(self, num_layers: int, num_kv_heads: int, head_dim: int, seq_len: int,
                        dtype=None, *, layer_types=None, sliding_window: Optional[int] = None) -> float:
        """Expected pool bytes per token of context for a sequence of ``seq_len``
        tokens: both tiers, whole blocks, eviction included, all layers and KV
        heads. ``full()`` on Llama-3-8B in fp16 gives exactly 131072.
        ``layer_types`` (a hybrid model's ``config.layer_types``, one per
        layer): "sliding_attention" layers store :meth:`sliding` rings of
        ``sliding_window`` tokens, "full_attention" layers this policy, and
        other kinds (linear attention, Mamba: kept in transformers' own
        cache) nothing."""
        if layer_types is not None:
            if len(layer_types) != num_layers:
                raise ValueError(f"layer_types has {len(layer_types)} entries for {num_layers} layers")
            full = sum(t == "full_attention" for t in layer_types)
            sliding = sum(t == "sliding_attention" for t in layer_types)
            if sliding and not (_is_int(sliding_window) and sliding_window > 0):
                raise ValueError(f"sliding_attention layers need sliding_window, an int > 0, got {sliding_window!r}")
            total = full * self.bytes_per_token(1, num_kv_heads, head_dim, seq_len, dtype)
            if sliding:
                total += sliding * self.sliding(sliding_window, dtype).bytes_per_token(1, num_kv_heads, head_dim,
                                                                                        seq_len, dtype)
            return total
        hot, cold = self.plan(seq_len)
        bs = self.block_size
        hot_tile = KVFormat.parse(self.resolved_hot_format(dtype)).tile_bytes(head_dim, bs)
        cold_tile = self.format.tile_bytes(head_dim, bs)
        per_layer_head = -(-hot // bs) * hot_tile + -(-cold // bs) * cold_tile
        return num_layers * num_kv_heads * per_layer_head / max(int(seq_len), 1)

    def sliding(self, window: int, dtype=None) -> "Policy":
        """What a sliding-window attention layer (of ``window`` tokens) stores
        under this policy: a ring of exactly its ``window`` newest tokens
        (StreamingLLM's ring without sinks: constant memory), written straight
        into the ring in this policy's cold format (per-channel sides, which
        the ring cannot rewrite token by token, in their per-token kind);
        exact (``dtype``'s format) under ``full()``. No hot tier: a hot tier
        shrinks by up to a block when it seals, so a ring behind it would
        hold less than the window. Eviction inside a window has nothing to
        choose."""
        if self.hot_window is None:
            fmt = self.resolved_hot_format(dtype)
        else:
            f = self.format
            fmt = "/".join(_PER_TOKEN.get(side.spec, side.spec) for side in (f.k, f.v))
        return Policy(cold_format=fmt, hot_window=0, eviction="streaming", sinks=0, window=window,
                      block_size=self.block_size, hot_format=self.hot_format, wipe=self.wipe,
                      name=f"{self.name}/sliding-{window}")

    def replace(self, **changes) -> "Policy":
        return dataclasses.replace(self, **changes)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)

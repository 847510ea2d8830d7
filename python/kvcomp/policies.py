"""Preset policies (CONTRACT.md §4). Each takes keyword overrides of any
:class:`kvcomp.Policy` field, e.g. ``int4(hot_window=128, block_size=32)``."""
from __future__ import annotations

from .policy import Policy


def _make(name: str, defaults: dict, overrides: dict) -> Policy:
    return Policy(**{**defaults, **overrides, "name": overrides.get("name", name)})


def full(**kw) -> Policy:
    """No compression: every token stays in the hot tier, in the cache's dtype."""
    return _make("full", dict(cold_format="fp16", hot_window=None), kw)


def fp8(**kw) -> Policy:
    """FP8 E4M3 with a per-token scale, written on arrival."""
    return _make("fp8", dict(cold_format="fp8_e4m3", hot_window=0), kw)


def int8(**kw) -> Policy:
    """Symmetric INT8 with a per-token scale, written on arrival."""
    return _make("int8", dict(cold_format="int8", hot_window=0), kw)


def int4(**kw) -> Policy:
    """4-bit, rotated: ``nf4:h`` (a randomized Hadamard rotation, then NF4's
    Lloyd-Max levels with one fp16 scale per 32 channels: 4.5 bits per
    element), the newest 64 tokens in full precision. Rotated NF4 measured
    below plain int4 (5 bits, scale and zero) in error and perplexity on the
    three texts tried (README, "Accuracy at 2-4 bits"); groups of 32 keep
    every head_dim that int4 serves."""
    return _make("int4", dict(cold_format="nf4:h", hot_window=64), kw)


def int3(**kw) -> Policy:
    """3-bit, rotated: ``nf3:g64:h`` (3.25 bits per element; at 3 bits a
    32-group's scale would cost 14% of the bytes), the newest 64 tokens in
    full precision. Needs head_dim a multiple of 64."""
    return _make("int3", dict(cold_format="nf3:g64:h", hot_window=64), kw)


def int2(**kw) -> Policy:
    """2-bit, rotated: ``nf2:g64:h`` (2.25 bits per element), the newest 128
    tokens in full precision: at 2 bits the recent window buys more per byte
    than a third bit does (README, "Accuracy at 2-4 bits"). Needs head_dim
    a multiple of 64."""
    return _make("int2", dict(cold_format="nf2:g64:h", hot_window=128), kw)


def kivi2(**kw) -> Policy:
    """KIVI: 2-bit K per channel (over 32-token blocks), 2-bit V per token, the
    newest 128 tokens in full precision."""
    return _make("kivi2", dict(cold_format="kivi2", hot_window=128, block_size=32), kw)


def streaming_llm(sinks: int = 4, window: int = 1020, **kw) -> Policy:
    """StreamingLLM: the first ``sinks`` tokens and the newest ``window``;
    constant memory however long the stream."""
    return _make("streaming_llm", dict(cold_format="fp16", hot_window=0, sinks=sinks, window=window,
                                       eviction="streaming"), kw)


def h2o(budget=0.2, **kw) -> Policy:
    """H2O: heavy hitters (highest cumulative attention, ``budget`` of the
    sequence) plus a recent full-precision window of 64 and 4 sinks."""
    return _make("h2o", dict(cold_format="fp16", hot_window=64, sinks=4, eviction="h2o", budget=budget), kw)


def combined(budget=0.22, **kw) -> Policy:
    """Quantization + eviction + tiering, the fewest bytes per token that
    still retrieve: an int8 cold tier, H2O keeping ``budget`` of the tokens
    chosen by the prompt's last 32 tokens (``observe``, SnapKV-style, so the
    question picks what its answer needs), 4 sinks, the newest 16 tokens in
    full precision. 0.118-0.124 of fp16's bytes per token at head_dim 64
    from 1k tokens on. (KIVI-2 under cumulative H2O, the first combined,
    lost most pass-keys; int8 kept more of the model's answers than fp8 at
    the same bytes: bench/results/.)"""
    return _make("combined", dict(cold_format="int8", hot_window=16, sinks=4, eviction="h2o", budget=budget,
                                  observe=32), kw)


PRESETS = {f.__name__: f for f in (full, fp8, int8, int4, int3, int2, kivi2, streaming_llm, h2o, combined)}

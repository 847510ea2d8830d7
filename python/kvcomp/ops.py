"""Typed wrappers of ``torch.ops.kvcomp.*`` and their fake (meta) kernels.

See CONTRACT.md §3 for the meaning of each op; the C++ side lives in
csrc/ops/<op>.cpp (checks + CPU binding) and csrc/cpu/<op>.cpp (kernel).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _native

_ops = torch.ops.kvcomp


def quantize_write(key: torch.Tensor, value: torch.Tensor, pool: torch.Tensor,
                   slot_mapping: torch.Tensor, format: str) -> None:
    """Quantize ``key``/``value`` [num_tokens, num_kv_heads, head_dim] into ``pool``
    at ``slot_mapping`` (int64; a negative slot skips the token)."""
    _ops.quantize_write(key, value, pool, slot_mapping, str(format))


def seal_blocks(hot_pool: torch.Tensor, src_blocks: torch.Tensor, cold_pool: torch.Tensor,
                dst_blocks: torch.Tensor, hot_format: str, cold_format: str) -> None:
    """Quantize whole hot blocks ``src_blocks`` into cold blocks ``dst_blocks``."""
    _ops.seal_blocks(hot_pool, src_blocks, cold_pool, dst_blocks, str(hot_format), str(cold_format))


def paged_decode_attention(query: torch.Tensor, pool: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, format: str, scale: float,
                           logits_out: Optional[torch.Tensor] = None,
                           softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query per sequence over its paged, compressed cache.
    Returns ``(out, lse)``; fills ``logits_out`` with ``scale * q.k`` if given.
    ``softcap`` > 0 caps each logit to ``softcap * tanh(logit / softcap)``
    first (Gemma 2); ``logits_out`` then holds the capped logits."""
    return _ops.paged_decode_attention(query, pool, block_tables, seq_lens, str(format), float(scale),
                                       logits_out, float(softcap))


def merge_attention_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                           lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax merge of two partial attentions."""
    return _ops.merge_attention_states(out_a, lse_a, out_b, lse_b)


def accumulate_scores(logits: torch.Tensor, lse: torch.Tensor, seq_lens: torch.Tensor,
                      scores: torch.Tensor) -> None:
    """``scores[b, kvh, t] += sum over the group's heads of exp(logits - lse)``."""
    _ops.accumulate_scores(logits, lse, seq_lens, scores)


def heavy_hitter_topk(scores: torch.Tensor, seq_lens: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending positions of the k largest scores of each row (ties to the lower
    position, -1 tail when the row is shorter than k)."""
    return _ops.heavy_hitter_topk(scores, seq_lens, int(k))


def compact(pool: torch.Tensor, block_tables: torch.Tensor, keep: torch.Tensor, format: str) -> None:
    """Move the tokens at ``keep[b, h, :]`` to positions 0..k-1 of each sequence."""
    _ops.compact(pool, block_tables, keep, str(format))


def gather_dequant(pool: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                   format: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``[batch, num_kv_heads, max_len, head_dim]`` K and V, zero past seq_len."""
    return _ops.gather_dequant(pool, block_tables, seq_lens, str(format), dtype)


def set_cuda_validation(enabled: bool) -> bool:
    """Turn the CUDA ops' data checks on or off; returns the previous setting.

    On (the default), CUDA ops check ids, lengths and NaN/Inf like the CPU ops,
    reading data on the host (a sync per call; skipped while a CUDA graph is
    being captured). Off, bad ids are skipped silently (never out of bounds)."""
    return _native.set_cuda_validation(bool(enabled))


# ---------------------------------------------------------------- fake kernels
@torch.library.register_fake("kvcomp::quantize_write")
def _(key, value, pool, slot_mapping, format):
    return None


@torch.library.register_fake("kvcomp::seal_blocks")
def _(hot_pool, src_blocks, cold_pool, dst_blocks, hot_format, cold_format):
    return None


@torch.library.register_fake("kvcomp::paged_decode_attention")
def _(query, pool, block_tables, seq_lens, format, scale, logits_out=None, softcap=0.0):
    out = query.new_empty(query.shape)
    lse = query.new_empty(query.shape[:2], dtype=torch.float32)
    return out, lse


@torch.library.register_fake("kvcomp::merge_attention_states")
def _(out_a, lse_a, out_b, lse_b):
    return torch.empty_like(out_a), torch.empty_like(lse_a)


@torch.library.register_fake("kvcomp::accumulate_scores")
def _(logits, lse, seq_lens, scores):
    return None


@torch.library.register_fake("kvcomp::heavy_hitter_topk")
def _(scores, seq_lens, k):
    return scores.new_empty((scores.shape[0], scores.shape[1], k), dtype=torch.int32)


@torch.library.register_fake("kvcomp::compact")
def _(pool, block_tables, keep, format):
    return None


@torch.library.register_fake("kvcomp::gather_dequant")
def _(pool, block_tables, seq_lens, format, dtype):
    head_dim, _block_size = _native.infer_geometry(format, pool.shape[2], 0)
    max_len = torch.library.get_ctx().new_dynamic_size()
    shape = (block_tables.shape[0], pool.shape[1], max_len, head_dim)
    return pool.new_empty(shape, dtype=dtype), pool.new_empty(shape, dtype=dtype)

"""torch.library.opcheck on every op (schema, fake/meta kernels, autograd
registration, AOT dispatch) with small valid inputs. Repeated calls on these
inputs are well defined (opcheck runs each op several times)."""
import pytest
import torch

import kvcomp
from helpers import build_cache, gen_from, heavy_tailed

_ops = torch.ops.kvcomp


def _cases():
    g = gen_from(0)
    c = build_cache("int4", [20, 7], 2, 64, 16, g)
    cc = build_cache("kivi2", [40, 16], 2, 64, 16, g)
    k = heavy_tailed((5, 2, 64), g)
    v = heavy_tailed((5, 2, 64), g)
    slots = torch.tensor([3, -1, 17, 40, 0])
    q = torch.randn(2, 8, 64, generator=g)
    hot = cc.hot_pool
    cold = kvcomp.allocate_pool(3, 16, 2, 64, "int4c")
    logits = torch.zeros(2, 8, 20)
    out_a, lse_a = torch.randn(2, 8, 64, generator=g), torch.randn(2, 8, generator=g)
    out_b, lse_b = torch.randn(2, 8, 64, generator=g), torch.randn(2, 8, generator=g)
    keep = torch.tensor([[[0, 3, 5, -1], [1, -1, 2, 19]], [[2, 4, -1, -1], [-1, -1, -1, 6]]],
                        dtype=torch.int32)
    ids = torch.tensor([0, 2], dtype=torch.int32)
    return {
        "quantize_write": (_ops.quantize_write, (k, v, c.pool.clone(), slots, "int4")),
        "seal_blocks": (_ops.seal_blocks, (hot, ids, cold, torch.tensor([2, 1], dtype=torch.int32),
                                           "fp16", "int4c")),
        "paged_decode_attention": (_ops.paged_decode_attention,
                                   (q, c.pool, c.block_tables, c.seq_lens, "int4", 0.125)),
        "paged_decode_attention_logits": (_ops.paged_decode_attention,
                                          (q, c.pool, c.block_tables, c.seq_lens, "int4", 0.125, logits)),
        "paged_decode_attention_logits_softcap": (_ops.paged_decode_attention,
                                                  (q, c.pool, c.block_tables, c.seq_lens, "int4", 0.125,
                                                   logits.clone(), 2.5)),
        "merge_attention_states": (_ops.merge_attention_states, (out_a, lse_a, out_b, lse_b)),
        "accumulate_scores": (_ops.accumulate_scores,
                              (torch.randn(2, 8, 20, generator=g), torch.randn(2, 8, generator=g) + 5,
                               c.seq_lens, torch.zeros(2, 2, 20))),
        "heavy_hitter_topk": (_ops.heavy_hitter_topk, (torch.randn(2, 2, 20, generator=g), c.seq_lens, 5)),
        "compact": (_ops.compact, (cc.pool.clone(), cc.block_tables, keep, "kivi2")),
        "compact_per_token": (_ops.compact, (c.pool.clone(), c.block_tables, keep, "int4")),
        "gather_dequant": (_ops.gather_dequant, (c.pool, c.block_tables, c.seq_lens, "int4", torch.float32)),
        "gather_dequant_fp16": (_ops.gather_dequant, (cc.pool, cc.block_tables, cc.seq_lens, "kivi2",
                                                      torch.float16)),
    }


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_opcheck(name):
    op, args = CASES[name]
    torch.library.opcheck(op, args)


def test_every_op_is_checked():
    names = {n.split("_logits")[0].split("_per_token")[0].split("_fp16")[0] for n in CASES}
    assert names == {"quantize_write", "seal_blocks", "paged_decode_attention",
                     "merge_attention_states", "accumulate_scores", "heavy_hitter_topk",
                     "compact", "gather_dequant"}

"""Greedy generation through kvcomp's compressed KV cache, one run per preset.

    python examples/hf_generate.py                       # tiny random Llama, no download
    python examples/hf_generate.py --model PATH          # any local transformers causal LM
    python examples/hf_generate.py --policies int4,kivi2 --new-tokens 64

Prints, per preset, the cache's bytes per token (all layers, both tiers, as
stored) against a dense cache in the model's dtype, and the decode speed.
"""
from __future__ import annotations

import argparse
import time

import torch

import kvcomp
from kvcomp.bench.evaluate import cache_arg
from kvcomp.integrations.hf import KVCompCache


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192)
    return LlamaForCausalLM(cfg), None


def local_model(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="local transformers model folder (default: a tiny random Llama)")
    ap.add_argument("--policies", default=",".join(kvcomp.policies.PRESETS),
                    help="comma-separated presets (default: all)")
    ap.add_argument("--prompt", default="The quick brown fox jumps over the lazy dog. " * 40)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()

    model, tok = local_model(args.model) if args.model else tiny_model()
    model.eval().set_attn_implementation("kvcomp")
    if tok is not None:
        ids = tok(args.prompt, return_tensors="pt").input_ids
    else:
        ids = torch.randint(3, model.config.vocab_size, (1, 600), generator=torch.Generator().manual_seed(1))
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = next(model.parameters()).dtype
    dense = 2 * dtype.itemsize * head_dim * cfg.num_key_value_heads * cfg.num_hidden_layers
    print(f"prompt {ids.shape[1]} tokens, {args.new_tokens} new; dense {dtype} cache = {dense} B/token")
    print(f"{'policy':<14}{'B/token':>10}{'vs dense':>10}{'tok/s':>9}  text")
    for name in args.policies.split(","):
        policy = kvcomp.policies.PRESETS[name.strip()]()
        cache = KVCompCache(policy=policy)
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=False, pad_token_id=0, **cache_arg(model, cache))
        dt = time.perf_counter() - t
        s = cache.stats()
        per_token = s["bytes"] / s["tokens"]
        new = out[0, ids.shape[1]:]
        text = tok.decode(new) if tok is not None else " ".join(map(str, new[:8].tolist())) + " ..."
        print(f"{name:<14}{per_token:>10.0f}{dense / per_token:>9.2f}x{args.new_tokens / dt:>9.1f}  {text[:60]!r}")


if __name__ == "__main__":
    main()

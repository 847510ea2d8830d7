"""Bytes a KVCompCache holds on hybrid models at long context, measured by
running them: tiny random configs of three families (Gemma 3: five sliding
layers of a 512-token window to one full layer; LFM2: short-conv layers and
full attention; Qwen3-Next: linear attention and full attention), prefilled
in chunks, then one decode step (where a policy that scores the prompt evicts),
to --tokens tokens through each preset ("kvcomp" attention) and
through DynamicCache(config=) (sdpa) on the same ids. Counted per layer kind:
attention layers (ours: the pool blocks in use, and the pools allocated;
DynamicCache: its K/V tensors) and the recurrent states both caches keep in
transformers' own layers. The bar's figures: DynamicCache's bytes on the
full-attention layers over ours, against the policy's ratio there (fp16
bytes per token over the preset's, Policy.bytes_per_token at --tokens, so
eviction counts), and DynamicCache's total over ours (> 1).

    .venv/bin/python bench/hybrid_bytes.py [--tokens 32768] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import transformers as T
from transformers import DynamicCache

from kvcomp import policies
from kvcomp.bench.report import print_table, write_json
from kvcomp.bench.timing import git_commit
from kvcomp.integrations.hf import KVCompCache, cache_kwarg

HD = 64  # a head_dim every format (rotations included) supports


def families(tokens: int) -> dict:
    common = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=tokens + 64)
    return {
        "gemma3": (T.Gemma3TextConfig(**common, head_dim=HD, num_hidden_layers=6, sliding_window=512,
                                      layer_types=["sliding_attention"] * 5 + ["full_attention"]),
                   T.Gemma3ForCausalLM),
        "lfm2": (T.Lfm2Config(**common, num_hidden_layers=4, layer_types=["conv", "full_attention"] * 2),
                 T.Lfm2ForCausalLM),
        "qwen3-next": (T.Qwen3NextConfig(**common, head_dim=HD, num_hidden_layers=4,
                                         layer_types=["linear_attention", "full_attention"] * 2, num_experts=2,
                                         num_experts_per_tok=1, moe_intermediate_size=64,
                                         shared_expert_intermediate_size=64, linear_num_value_heads=2,
                                         linear_num_key_heads=2, linear_key_head_dim=32, linear_value_head_dim=32),
                       T.Qwen3NextForCausalLM),
    }


def tensor_bytes(obj) -> int:
    """Bytes of the tensors an object holds as attributes, and in lists and
    dicts of them (transformers' linear-attention layers keep dicts of states)."""
    def walk(v) -> int:
        if isinstance(v, torch.Tensor):
            return v.numel() * v.element_size()
        if isinstance(v, dict):
            v = list(v.values())
        return sum(walk(x) for x in v) if isinstance(v, (list, tuple)) else 0
    return walk(list(vars(obj).values()))


def held(cache, ours: bool, layer_types: list[str]) -> dict:
    """Attention bytes per layer kind (ours: in use, and pools allocated) and
    the recurrent-state bytes of the other layers."""
    out = {"full_bytes": 0, "sliding_bytes": 0, "allocated_bytes": 0, "recurrent_bytes": 0}
    for layer, kind in zip(cache.layers, layer_types):
        if kind not in ("full_attention", "sliding_attention"):
            out["recurrent_bytes"] += tensor_bytes(layer)
            continue
        if ours:
            used = layer.cache.stats()["bytes"]
            out["allocated_bytes"] += sum(p.numel() for p in layer.cache.hot_pools + layer.cache.cold_pools)
        else:
            used = tensor_bytes(layer)
            out["allocated_bytes"] += used
        out["full_bytes" if kind == "full_attention" else "sliding_bytes"] += used
    out["attention_bytes"] = out["full_bytes"] + out["sliding_bytes"]
    return out


def run_one(model, ids, make, attn: str, chunk: int) -> tuple[dict, float]:
    model.set_attn_implementation(attn)
    cache = make()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, ids.shape[1] - 1, chunk):  # the prompt, then its last token as a decode step
            model(input_ids=ids[:, s:min(s + chunk, ids.shape[1] - 1)], use_cache=True, logits_to_keep=1,
                  **cache_kwarg(model, cache))
        model(input_ids=ids[:, -1:], use_cache=True, **cache_kwarg(model, cache))  # eviction acts here
    return held(cache, isinstance(cache, KVCompCache), model.config.layer_types), time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--presets", default="int8,int4,int3,kivi2,combined")
    p.add_argument("--families", default="gemma3,lfm2,qwen3-next")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    for name in args.families.split(","):
        config, cls = families(args.tokens)[name]
        model = cls(config).to(torch.bfloat16).eval()
        ids = torch.randint(0, config.vocab_size, (1, args.tokens))
        dc, secs = run_one(model, ids, lambda: DynamicCache(config=config), "sdpa", args.chunk)
        rows.append({"family": name, "cache": "DynamicCache", **dc, "seconds": secs})
        for preset in args.presets.split(","):
            policy = policies.PRESETS[preset]()
            ours, secs = run_one(model, ids, lambda: KVCompCache(policy=policy, config=config), "kvcomp", args.chunk)
            # The policy's own ratio on a full-attention layer (eviction included), fp16 over it.
            fmt_ratio = policies.full().bytes_per_token(1, 2, HD, args.tokens, torch.float16) / \
                policy.bytes_per_token(1, 2, HD, args.tokens, torch.bfloat16)
            full_x = dc["full_bytes"] / ours["full_bytes"]
            total_x = (dc["attention_bytes"] + dc["recurrent_bytes"]) / (ours["attention_bytes"] + ours["recurrent_bytes"])
            rows.append({"family": name, "cache": preset, **ours, "seconds": secs, "full_x": full_x,
                         "total_x": total_x, "format_ratio": fmt_ratio,
                         "meets": full_x >= fmt_ratio * 0.999 and total_x > 1})
        print(f"{name} done", flush=True)
    mib = lambda b: f"{b / 2**20:.2f}"
    opt = lambda f: lambda x: "" if x is None else f.format(x)
    cols = [("family", "family", "{}"), ("cache", "cache", "{}"), ("full MiB", "full_bytes", mib),
            ("sliding MiB", "sliding_bytes", mib), ("pools MiB", "allocated_bytes", mib),
            ("recurrent MiB", "recurrent_bytes", mib), ("DC full /", "full_x", opt("{:.2f}")),
            ("policy ratio", "format_ratio", opt("{:.2f}")), ("DC all /", "total_x", opt("{:.2f}")),
            ("meets", "meets", opt("{}")), ("s", "seconds", "{:.0f}")]
    for r in rows:
        for k in ("full_x", "total_x", "format_ratio", "meets"):
            r.setdefault(k, None)
    print_table(f"hybrid models at {args.tokens} tokens (bf16 models, tiny random configs)", cols, rows, plain=True)
    if args.json:
        write_json(args.json, {"tokens": args.tokens, "rows": rows, "commit": git_commit(),
                               "torch": torch.__version__, "transformers": T.__version__})
    return 0 if all(r["meets"] is not False for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

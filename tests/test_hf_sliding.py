"""Sliding-window and hybrid models through transformers (tiny random
configs built here, no downloads): KVCompCache(config=...) gives each
sliding layer a ring of exactly its window, so full() reproduces
DynamicCache's logits past the window, memory stays constant on sliding
layers, and per-layer policies apply."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

from kvcomp import Policy, policies as P  # noqa: E402
from kvcomp.integrations.hf import KVCompCache, KVCompLayer  # noqa: E402

W = 16        # sliding window
PROMPT = 40
STEPS = 70    # decode steps: PROMPT + STEPS - W = 94 tokens past the window
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, max_position_embeddings=512)


def family(name: str):
    """(config, model class, attention implementation of the reference)."""
    T = transformers
    mixed = ["sliding_attention", "full_attention", "sliding_attention"]
    if name == "mistral":  # every layer slides
        return T.MistralConfig(**COMMON, sliding_window=W), T.MistralForCausalLM, "sdpa"
    if name == "qwen2":    # use_sliding_window from max_window_layers on
        return T.Qwen2Config(**COMMON, sliding_window=W, use_sliding_window=True, max_window_layers=1), \
            T.Qwen2ForCausalLM, "sdpa"
    if name == "qwen3":    # as qwen2, with q/k norms
        return T.Qwen3Config(**COMMON, sliding_window=W, use_sliding_window=True, max_window_layers=1), \
            T.Qwen3ForCausalLM, "sdpa"
    if name == "gemma3":
        return T.Gemma3TextConfig(**COMMON, sliding_window=W, layer_types=mixed), T.Gemma3ForCausalLM, "sdpa"
    if name == "cohere2":
        return T.Cohere2Config(**COMMON, sliding_window=W, layer_types=mixed), T.Cohere2ForCausalLM, "sdpa"
    if name == "gemma2":   # logit soft-capping: eager attention only
        return T.Gemma2Config(**COMMON, sliding_window=W, layer_types=mixed, attn_logit_softcapping=0.5,
                               query_pre_attn_scalar=1), \
            T.Gemma2ForCausalLM, "eager"  # scale 1 and a cap of 0.5: the cap bends the logits
    if name == "gpt-oss":  # attention sinks (s_aux): eager attention only
        return T.GptOssConfig(**COMMON, sliding_window=W, layer_types=mixed, num_local_experts=2,
                              num_experts_per_tok=1), T.GptOssForCausalLM, "eager"
    raise KeyError(name)


def model_of(name: str, seed: int = 0):
    cfg, cls, attn = family(name)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    return cls(cfg).eval(), cfg, attn


def decode(model, cache, attn: str, ids, tokens: list) -> tuple[torch.Tensor, list]:
    """Logits of the prompt's last token and of each decode step, teacher-forced
    with ``tokens`` (extended greedily where it is short), and the sliding
    layers' held token counts after each step."""
    model.set_attn_implementation(attn)
    logits, held = [], []
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
        for i in range(STEPS):
            if len(tokens) <= i:
                tokens.append(out.logits[:, -1:].argmax(-1))
            out = model(tokens[i], past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1])
            held.append([l.cache.held(0) for l in cache.layers if isinstance(l, KVCompLayer) and l.is_sliding])
    return torch.stack(logits), held


def rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).norm(dim=-1) / b.norm(dim=-1)


@pytest.mark.parametrize("name", ["mistral", "qwen2", "qwen3", "gemma2", "gemma3", "cohere2", "gpt-oss"])
def test_full_matches_dynamic_cache_past_the_window(name):
    model, cfg, attn = model_of(name)
    ids = torch.randint(0, 128, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    tokens = []
    ref, _ = decode(model, DynamicCache(config=cfg), attn, ids, tokens)
    cache = KVCompCache(policy=P.full(), config=cfg)
    got, held = decode(model, cache, "kvcomp", ids, tokens)
    assert cache.is_sliding == DynamicCache(config=cfg).is_sliding and any(cache.is_sliding)
    assert rel(got, ref).max() <= 1e-5
    assert all(h == [W] * len(h) for h in held)  # the ring: exactly the window, every step


@pytest.mark.parametrize("name", ["gemma2", "gpt-oss"])
def test_eager_attention_over_the_ring_matches_too(name):
    """Gemma 2 (soft-capped logits) and gpt-oss (attention sinks) also run
    their own eager attention over the dequantized ring with their sliding
    mask."""
    model, cfg, attn = model_of(name)
    ids = torch.randint(0, 128, (1, PROMPT), generator=torch.Generator().manual_seed(2))
    tokens = []
    ref, _ = decode(model, DynamicCache(config=cfg), attn, ids, tokens)
    got, held = decode(model, KVCompCache(policy=P.full(), config=cfg), "eager", ids, tokens)
    assert rel(got, ref).max() <= 1e-5 and held[-1] == [W, W]


def test_compressed_sliding_layers_hold_constant_bytes_and_do_not_drift():
    model, cfg, attn = model_of("gemma3")
    ids = torch.randint(0, 128, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    tokens = []
    ref, _ = decode(model, DynamicCache(config=cfg), attn, ids, tokens)
    cache = KVCompCache(policy=P.int8(), config=cfg)
    got, held = decode(model, cache, "kvcomp", ids, tokens)
    sliding = [l.cache.stats()["bytes"] for l in cache.layers if l.is_sliding]
    full = [l.cache.stats()["tokens"] for l in cache.layers if not l.is_sliding]
    assert full == [PROMPT + STEPS] and all(h == [W, W] for h in held)
    assert sliding == [W * 2 * 1 * 2 * (32 + 2)] * 2  # W tokens x 2 KV heads x K,V x (32 codes + fp16 scale)
    err = rel(got, ref)
    assert err.max() < 0.02 and err[-10:].mean() < 3 * err[:10].mean() + 1e-3  # int8-sized, and flat


def test_without_config_the_kvcomp_attention_refuses_a_sliding_layer():
    model, cfg, _ = model_of("mistral")
    model.set_attn_implementation("kvcomp")
    with pytest.raises(ValueError, match=r"sliding window of 16 tokens.*config=model.config"):
        with torch.no_grad():
            model(torch.randint(0, 128, (1, 8)), past_key_values=KVCompCache(policy=P.int8()), use_cache=True)


def test_sliding_policy():
    assert P.full().sliding(512, torch.float32).cold_format == "fp32"
    kivi = P.kivi2().sliding(512, torch.float16)
    assert (kivi.cold_format, kivi.hot_window, kivi.eviction, kivi.window, kivi.sinks) == \
        ("int2", 0, "streaming", 512, 0)
    assert P.combined().sliding(100, torch.float16).eviction == "streaming"


def test_per_layer_policies():
    model, cfg, _ = model_of("gemma3")
    seen = []

    def choose(i, layer_type):
        seen.append((i, layer_type))
        return P.int8() if layer_type == "sliding_attention" else P.int4(hot_window=16)
    cache = KVCompCache(policy=choose, config=cfg)
    assert seen == [(0, "sliding_attention"), (1, "full_attention"), (2, "sliding_attention")]
    model.set_attn_implementation("kvcomp")
    with torch.no_grad():
        model(torch.randint(0, 128, (1, 30)), past_key_values=cache, use_cache=True)
    assert [l.cache.policy.cold_format for l in cache.layers] == ["int8", "nf4:h", "int8"]
    listed = KVCompCache(policy=[P.int8(), P.full(), P.int4()], config=cfg)
    assert [l.policy.name for l in listed.layers] == ["int8", "full", "int4"] and listed.policy is None
    with pytest.raises(ValueError, match="a list of 2 policies for a model of 3 layers"):
        KVCompCache(policy=[P.int8(), P.full()], config=cfg)
    with pytest.raises(TypeError, match="policy for layer 0 must be a kvcomp.Policy"):
        KVCompCache(policy=lambda i, t: "int8", config=cfg)


def test_save_and_load_keep_windows_and_per_layer_policies(tmp_path):
    model, cfg, attn = model_of("cohere2")
    ids = torch.randint(0, 128, (1, PROMPT), generator=torch.Generator().manual_seed(4))
    cache = KVCompCache(policy=[P.int8(), P.full(), Policy(cold_format="int8", hot_window=16)], config=cfg)
    model.set_attn_implementation("kvcomp")
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    cache.save(tmp_path / "c.kvc")
    back = KVCompCache.load(tmp_path / "c.kvc", config=cfg)
    assert [l.sliding_window for l in back.layers] == [W, None, W] and back.is_sliding == cache.is_sliding
    assert [l.policy for l in back.layers] == [l.policy for l in cache.layers]
    step = torch.randint(0, 128, (1, 1))
    with torch.no_grad():
        a = model(step, past_key_values=cache, use_cache=True).logits
        b = model(step, past_key_values=back, use_cache=True).logits
    assert torch.equal(a, b)


def hybrid(name: str):
    """Tiny random configs of two hybrid families: LFM2 (short-conv layers) and
    Qwen3-Next (gated-delta-rule linear attention, MoE); transformers' torch
    fallbacks run their recurrent layers."""
    T = transformers
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)
    if name == "lfm2":
        return T.Lfm2Config(**common, layer_types=["conv", "full_attention"] * 2), T.Lfm2ForCausalLM
    return T.Qwen3NextConfig(**common, head_dim=32, layer_types=["linear_attention", "full_attention"] * 2,
                             num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
                             shared_expert_intermediate_size=32, linear_num_value_heads=2, linear_num_key_heads=2,
                             linear_key_head_dim=16, linear_value_head_dim=16), T.Qwen3NextForCausalLM


@pytest.mark.parametrize("name", ["lfm2", "qwen3-next"])
def test_hybrid_models_keep_their_recurrent_layers_and_compress_attention(name):
    """Recurrent layers stay in transformers' own cache layers (their state
    is not a KV cache); attention layers become kvcomp's. full() matches
    DynamicCache; int8 stays within its quantization error."""
    cfg, cls = hybrid(name)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = cls(cfg).eval()
    ids = torch.randint(0, 128, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    tokens = []
    ref, _ = decode(model, DynamicCache(config=cfg), "sdpa", ids, tokens)
    for policy, bound in ((P.full(), 1e-5), (P.int8(), 2e-2)):
        cache = KVCompCache(policy=policy, config=cfg)
        got, _ = decode(model, cache, "kvcomp", ids, tokens)
        kinds = [type(l).__name__ for l in cache.layers]
        assert kinds == ["LinearAttentionLayer", "KVCompLayer"] * 2, kinds
        assert rel(got, ref).max() <= bound
        assert cache.stats()["tokens"] == PROMPT + STEPS and cache.stats()["layers"] == 2


@pytest.mark.parametrize("name", ["lfm2", "qwen3-next"])
def test_hybrid_beam_search_and_assisted_decoding_match_dynamic_cache(name):
    """Beam search (our layers fork rows, transformers' recurrent layers
    reorder their own state) and assisted decoding (crop) give DynamicCache's
    tokens under full(). transformers before 5.25 refuses assisted decoding
    for stateful models such as Qwen3-Next, whatever the cache; 5.25 runs it."""
    cfg, cls = hybrid(name)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = cls(cfg).eval()
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(3))

    def run(cache, implementation, **kw):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            return model.generate(input_ids=ids, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                                  pad_token_id=0, past_key_values=cache, **kw)
    beams = dict(num_beams=3, num_return_sequences=3)
    assert torch.equal(run(KVCompCache(policy=P.full(), config=cfg), "kvcomp", **beams),
                       run(DynamicCache(config=cfg), "sdpa", **beams))
    try:
        assisted = run(DynamicCache(config=cfg), "sdpa", assistant_model=model)
    except ValueError as e:  # transformers before 5.25 refuses it for stateful models, whatever the cache
        assert name == "qwen3-next" and "stateful" in str(e)
        return
    assert torch.equal(run(KVCompCache(policy=P.full(), config=cfg), "kvcomp", assistant_model=model), assisted)

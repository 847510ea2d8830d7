"""``kvcomp-bench memory``: KV-cache bytes per token of every format and
policy preset for a model geometry, and the longest context (batch 1) and
the largest batch (at --seq-len) that fit beside the weights.

Formats: exact, from KVFormat.bytes_per_token (all layers and KV heads, K+V,
scales and padding), whole blocks of --block-size. Presets
(kvcomp.policies): Policy.bytes_per_token at --seq-len, the pool one
sequence of that length holds (both tiers, whole blocks, eviction included;
fp16 hot tier), each at its preset's block size."""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import kvcomp
from kvcomp.policies import PRESETS

from .ops_bench import positive_int
from .report import print_table, write_json
from .workload import ALL_FORMATS


@dataclass(frozen=True)
class Model:
    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    params: float  # parameter count, for the weights' footprint
    layer_types: Optional[tuple] = None  # hybrid models: config.layer_types (None: every layer full attention)
    sliding_window: Optional[int] = None

    def counts(self) -> tuple[int, int]:
        """(full-attention, sliding-window) layers; other kinds hold no KV here."""
        if self.layer_types is None:
            return self.num_layers, 0
        return (sum(t == "full_attention" for t in self.layer_types),
                sum(t == "sliding_attention" for t in self.layer_types))


# Published geometries and parameter counts.
MODELS = {
    "llama-3-8b": Model("llama-3-8b", 32, 8, 128, 8.03e9),
    "llama-3-70b": Model("llama-3-70b", 80, 8, 128, 70.6e9),
    "mistral-7b": Model("mistral-7b", 32, 8, 128, 7.24e9),
    "qwen2.5-7b": Model("qwen2.5-7b", 28, 4, 128, 7.62e9),
}
_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def add_arguments(p) -> None:
    p.add_argument("--model", required=True,
                   help=f"{', '.join(MODELS)}, or a HF config.json (or the folder holding it)")
    p.add_argument("--block-size", type=int, choices=[16, 32, 64, 128], default=16,
                   help="block size of the formats' rows (default 16; presets keep their own)")
    p.add_argument("--gpu-memory", default="80GB", type=parse_size,
                   help="memory for weights + cache: 80GB (=80e9 B), 80GiB, or bytes (default 80GB)")
    p.add_argument("--weight-bytes", type=float, default=2.0,
                   help="bytes per weight parameter (default 2: fp16/bf16)")
    p.add_argument("--formats", help=f"comma-separated specs (default: {','.join(ALL_FORMATS)})")
    p.add_argument("--seq-len", type=positive_int, default=32768,
                   help="tokens per sequence for the presets' bytes per token and the max batch "
                        "(default 32768)")
    p.add_argument("--json", metavar="PATH", help="write all numbers to PATH")


def parse_size(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 80GB, 141GB, 80GiB)")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def load_model(spec: str) -> Model:
    """A built-in name, or a config.json; raises ValueError saying what is wrong."""
    if spec.lower() in MODELS:
        return MODELS[spec.lower()]
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"unknown model {spec!r}: choose one of {', '.join(MODELS)}, "
                         f"or give the path of a config.json")
    try:
        cfg = json.loads(path.read_text())
        cfg = cfg.get("text_config", cfg)  # multimodal configs nest the LM
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read model geometry from {path}: {type(e).__name__}: {e}") from None
    types, window = _layer_types(path, cfg, layers)
    return Model(str(path), layers, kv_heads, head_dim, estimate_params(cfg, head_dim, kv_heads), types, window)


def _layer_types(path: Path, cfg: dict, layers: int) -> tuple[Optional[tuple], Optional[int]]:
    """Each layer's kind and the sliding window, as transformers reads them
    (``DynamicCache(config=...)``'s rule: layer_types, or sliding_window,
    use_sliding_window/max_window_layers per family); from the JSON alone
    (layer_types, else sliding_window on every layer) where transformers is
    not installed or does not know the config's model_type."""
    try:
        from transformers import AutoConfig
        from transformers.cache_utils import get_layer_types_and_kwargs
        types, kwargs = get_layer_types_and_kwargs(AutoConfig.from_pretrained(path.parent).get_text_config(
            decoder=True))
        windows = {kw["sliding_window"] for t, kw in zip(types, kwargs) if t == "sliding_attention"}
    except (ImportError, OSError, ValueError, KeyError):
        types = cfg.get("layer_types") or (["sliding_attention"] * layers if cfg.get("sliding_window") else None)
        windows = {cfg.get("sliding_window")} if types and "sliding_attention" in types else set()
    if types is None or set(types) == {"full_attention"}:
        return None, None
    if len(windows) > 1:
        raise ValueError(f"{path}: sliding layers with different windows {sorted(windows)} are not supported")
    return tuple(types), next(iter(windows), None)


def estimate_params(cfg: dict, head_dim: int, kv_heads: int) -> float:
    """Dense decoder: embeddings (+ untied LM head), per layer Q/K/V/O,
    a gated MLP (3 matrices) and two norms."""
    hidden, layers = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    inter = int(cfg.get("intermediate_size") or 4 * hidden)
    vocab = int(cfg.get("vocab_size") or 0)
    attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    per_layer = attn + 3 * hidden * inter + 2 * hidden
    embed = vocab * hidden * (1 if cfg.get("tie_word_embeddings", False) else 2)
    return float(layers * per_layer + embed + hidden)


def run(args) -> int:
    try:
        model = load_model(args.model)
        specs = ALL_FORMATS if not args.formats else [s.strip() for s in args.formats.split(",") if s.strip()]
        fmts = [_parse_format(s, model, args.block_size) for s in specs]
    except ValueError as e:
        print(f"kvcomp-bench memory: error: {e}", file=sys.stderr)
        return 2
    weights = model.params * args.weight_bytes
    free = max(0.0, args.gpu_memory - weights)
    if not free:
        print(f"kvcomp-bench memory: note: the weights ({weights / 1e9:.1f} GB) do not fit in "
              f"--gpu-memory ({args.gpu_memory / 1e9:.1f} GB); nothing else fits", file=sys.stderr)
    seq_len, bs = args.seq_len, args.block_size
    fp16_seq = _format_seq_bytes(model, kvcomp.KVFormat.parse("fp16"), bs, seq_len)
    formats = [_format_row(spec, fmt, model, bs, seq_len, free, fp16_seq) for spec, fmt in zip(specs, fmts)]
    policies = [_policy_row(make(), model, seq_len, free, fp16_seq) for make in PRESETS.values()]
    result = {"model": asdict(model), "block_size": bs, "seq_len": seq_len, "hot_format": "fp16",
              "gpu_memory_bytes": args.gpu_memory, "weight_bytes": weights, "cache_bytes_available": free,
              "formats": formats, "policies": policies}
    _print(result, model, args)
    if args.json:
        write_json(args.json, result)
    return 0


def _parse_format(spec: str, model: Model, block_size: int):
    try:
        fmt = kvcomp.KVFormat.parse(spec)
        fmt.tile_bytes(model.head_dim, block_size)  # does it fit this geometry?
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"--formats: bad format {spec!r}: {e}") from None
    return fmt


def _format_seq_bytes(model: Model, fmt, block_size: int, seq_len: int) -> int:
    """Pool bytes of one sequence: whole blocks, all layers and KV heads
    (the sum Policy.bytes_per_token makes, so full() matches fp16 exactly);
    a sliding layer holds at most its window."""
    full, sliding = model.counts()
    blocks = lambda n: -(-n // block_size)
    held = full * blocks(seq_len) + sliding * blocks(min(seq_len, model.sliding_window or 0))
    return model.num_kv_heads * held * fmt.tile_bytes(model.head_dim, block_size)


def _format_row(spec, fmt, model: Model, bs: int, seq_len: int, free: float, fp16_seq: int) -> dict:
    seq = _format_seq_bytes(model, fmt, bs, seq_len)
    footprint = lambda n: _format_seq_bytes(model, fmt, bs, n)
    full, _ = model.counts()
    return {"spec": spec, "format": fmt.name, "block_size": bs,
            "bytes_per_token": full * model.num_kv_heads * fmt.bytes_per_token(model.head_dim, bs),
            "bytes_per_token_at_seq_len": seq / seq_len, "compression_vs_fp16": fp16_seq / seq,
            "max_context": largest_fitting(footprint, free, bs, int(free / max(seq / seq_len, 1e-9))) if full
            else None, "max_batch": int(free // seq)}


def _policy_row(policy, model: Model, seq_len: int, free: float, fp16_seq: int) -> dict:
    def footprint(n: int) -> int:  # pool bytes of one sequence of n tokens
        return round(policy.bytes_per_token(model.num_layers, model.num_kv_heads, model.head_dim, n,
                                            layer_types=model.layer_types, sliding_window=model.sliding_window) * n)

    seq = footprint(seq_len)
    row = {"policy": policy.name, "cold_format": policy.cold_format, "hot_window": policy.hot_window,
           "eviction": policy.eviction, "block_size": policy.block_size,
           "bytes_per_token_at_seq_len": seq / seq_len, "compression_vs_fp16": fp16_seq / seq,
           "max_batch": int(free // seq), "max_context": None, "note": None}
    end = _saturation(policy)
    if end is not None and model.sliding_window:
        end = max(end, model.sliding_window + policy.block_size)
    if model.counts()[0] == 0:  # only sliding layers: constant past the window
        end = model.sliding_window + policy.block_size
    if end is not None:
        # Past `end` tokens the footprint only cycles with this period (the hot
        # tier's partial block; h2o's eviction points): its peak is what must fit.
        period = math.lcm(policy.block_size, policy.evict_every or 1)
        peak = max(footprint(n) for n in range(end, end + period))
        if peak <= free:
            row["note"] = (f"constant memory: at most {peak / 1e6:.1f} MB per sequence past {end} tokens; "
                           f"any context fits")
            return row
    # A secant through (seq_len, seq) and a first guess: footprints grow near
    # linearly, so the search starts within a block or two and needs few
    # footprint calls (h2o's simulates every token: seconds at millions).
    g0 = int(free * seq_len / seq)
    f0 = footprint(g0)
    guess = g0 + int((free - f0) * (g0 - seq_len) / (f0 - seq)) if f0 != seq else g0
    row["max_context"] = largest_fitting(footprint, free, policy.block_size, guess)
    return row


def _saturation(policy) -> int | None:
    """A length past which a bounded policy's footprint stops growing
    (StreamingLLM; H2O with a token budget), or None if it grows with the
    sequence."""
    if policy.eviction == "streaming":
        return policy.sinks + policy.window + policy.block_size
    if policy.eviction == "h2o" and not isinstance(policy.budget, float):
        return policy.budget + policy.hot_window + (policy.evict_every or 0) + 2 * policy.block_size
    return None


def largest_fitting(footprint: Callable[[int], int], free: float, step: int, guess: int) -> int:
    """The largest multiple of ``step`` whose ``footprint`` fits in ``free``
    (``footprint`` non-decreasing, and exceeding ``free`` somewhere):
    galloping from ``guess``, then bisection, so a good guess costs few calls."""
    def fits(n: int) -> bool:
        return footprint(n) <= free

    if not fits(step):
        return 0
    n = max(step, guess // step * step)
    if fits(n):
        lo, hi, d = n, None, step
        while hi is None:
            if fits(lo + d):
                lo, d = lo + d, 2 * d
            else:
                hi = lo + d
    else:
        lo, hi, d = step, n, step
        while hi - d > lo:
            if fits(hi - d):
                lo = hi - d
                break
            hi, d = hi - d, 2 * d
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _num(x: float) -> str:
    """Exact integers as such, else one decimal."""
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.1f}"


def _print(result: dict, model: Model, args) -> None:
    seq_len, free = result["seq_len"], result["cache_bytes_available"]
    at = f"@ {seq_len // 1024}k" if seq_len % 1024 == 0 else f"@ {seq_len}"
    full, sliding = model.counts()
    kinds = f"{model.num_layers} layers" if model.layer_types is None else \
        (f"{model.num_layers} layers ({full} full attention, {sliding} sliding over {model.sliding_window} tokens"
         + (f", {model.num_layers - full - sliding} of other kinds" if full + sliding < model.num_layers else "")
         + ")")
    where = (f"{model.name}: {kinds} x {model.num_kv_heads} KV heads x head_dim "
             f"{model.head_dim}; {args.gpu_memory / 1e9:.1f} GB - {result['weight_bytes'] / 1e9:.1f} GB "
             f"weights = {free / 1e9:.1f} GB for the cache")
    rows = [dict(r, label=r["spec"] if r["spec"] == r["format"] else f"{r['spec']} ({r['format']})")
            for r in result["formats"]]
    print_table(f"{where}; formats, block {result['block_size']}",
                [("format", "label", "{}"), ("B/token", "bytes_per_token", "{}"),
                 ("KiB/token", "bytes_per_token", lambda b: f"{b / 1024:.1f}"),
                 ("x vs fp16", "compression_vs_fp16", "{:.2f}"),
                 ("max context (batch 1)", "max_context", "{:,}"), (f"max batch {at}", "max_batch", "{:,}")],
                rows, args.plain)
    rows = [dict(r, hot="all" if r["hot_window"] is None else r["hot_window"],
                 context="unbounded" if r["note"] else r["max_context"]) for r in result["policies"]]
    print_table(f"policy presets (kvcomp.policies) at {seq_len} tokens per sequence, fp16 hot tier",
                [("preset", "policy", "{}"), ("cold", "cold_format", "{}"), ("hot", "hot", "{}"),
                 ("eviction", "eviction", "{}"), ("block", "block_size", "{}"),
                 (f"B/token {at}", "bytes_per_token_at_seq_len", _num),
                 ("x vs fp16", "compression_vs_fp16", "{:.2f}"),
                 ("max context (batch 1)", "context", lambda c: c if isinstance(c, str) else f"{c:,}"),
                 (f"max batch {at}", "max_batch", "{:,}")], rows, args.plain)
    for r in result["policies"]:
        if r["note"]:
            print(f"{r['policy']}: {r['note']}")

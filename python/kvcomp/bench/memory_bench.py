"""``kvcomp-bench memory``: KV-cache bytes per token of each format for a
model geometry, and how many tokens fit next to the weights."""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import kvcomp

from .report import print_table, write_json
from .workload import ALL_FORMATS


@dataclass(frozen=True)
class Model:
    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    params: float  # parameter count, for the weights' footprint


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
    p.add_argument("--block-size", type=int, choices=[16, 32, 64, 128], default=16)
    p.add_argument("--gpu-memory", default="80GB", type=parse_size,
                   help="memory for weights + cache: 80GB (=80e9 B), 80GiB, or bytes (default 80GB)")
    p.add_argument("--weight-bytes", type=float, default=2.0,
                   help="bytes per weight parameter (default 2: fp16/bf16)")
    p.add_argument("--formats", help=f"comma-separated specs (default: {','.join(ALL_FORMATS)})")
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
    return Model(str(path), layers, kv_heads, head_dim, estimate_params(cfg, head_dim, kv_heads))


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
              f"--gpu-memory ({args.gpu_memory / 1e9:.1f} GB); max tokens are 0", file=sys.stderr)
    fp16 = _bytes_per_token(model, kvcomp.KVFormat.parse("fp16"), args.block_size)
    rows = []
    for spec, fmt in zip(specs, fmts):
        bpt = _bytes_per_token(model, fmt, args.block_size)
        # Caches grow in whole blocks (all layers and KV heads at once).
        blocks = int(free // (bpt * args.block_size))
        rows.append({"spec": spec, "format": fmt.name, "bytes_per_token": bpt, "compression_vs_fp16": fp16 / bpt,
                     "max_tokens": blocks * args.block_size})
    result = {"model": asdict(model), "block_size": args.block_size, "gpu_memory_bytes": args.gpu_memory,
              "weight_bytes": weights, "cache_bytes_available": free, "formats": rows}
    title = (f"{model.name}: {model.num_layers} layers x {model.num_kv_heads} KV heads x head_dim "
             f"{model.head_dim}, block {args.block_size}; {args.gpu_memory / 1e9:.1f} GB - "
             f"{weights / 1e9:.1f} GB weights = {free / 1e9:.1f} GB for the cache")
    table_rows = [dict(r, label=r["spec"] if r["spec"] == r["format"] else f"{r['spec']} ({r['format']})")
                  for r in rows]
    print_table(title, [("format", "label", "{}"), ("B/token", "bytes_per_token", "{}"),
                        ("KiB/token", "bytes_per_token", lambda b: f"{b / 1024:.1f}"),
                        ("x vs fp16", "compression_vs_fp16", "{:.2f}"),
                        ("max tokens", "max_tokens", "{:,}")], table_rows, getattr(args, "plain", False))
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


def _bytes_per_token(model: Model, fmt, block_size: int) -> int:
    """All layers and KV heads, K plus V, scales and padding included."""
    return model.num_layers * model.num_kv_heads * fmt.bytes_per_token(model.head_dim, block_size)

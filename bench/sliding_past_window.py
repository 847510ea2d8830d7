"""The issue's sliding-window bar at full length: on each family of
tests/test_hf_sliding.py (tiny random configs, its window of 16 tokens),
full() through attn_implementation="kvcomp" against DynamicCache's logits
--past tokens past the window (the test runs 94), and the ring's size at
every step. Reuses the test's configs and decode loop (one source of truth).

    .venv/bin/python bench/sliding_past_window.py [--past 2000] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import test_hf_sliding as t  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from kvcomp import policies as P  # noqa: E402
from kvcomp.bench.timing import git_commit  # noqa: E402
from kvcomp.integrations.hf import KVCompCache  # noqa: E402

FAMILIES = ["mistral", "qwen2", "qwen3", "gemma2", "gemma3", "cohere2", "gpt-oss"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--past", type=int, default=2000, help="tokens past the window (default 2000)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    t.STEPS = t.W + args.past - t.PROMPT + 1
    t.COMMON["max_position_embeddings"] = t.PROMPT + t.STEPS + 64
    rows = []
    for name in FAMILIES:
        t0 = time.perf_counter()
        model, cfg, attn = t.model_of(name)
        ids = torch.randint(0, 128, (1, t.PROMPT), generator=torch.Generator().manual_seed(1))
        tokens = []
        ref, _ = t.decode(model, DynamicCache(config=cfg), attn, ids, tokens)
        got, held = t.decode(model, KVCompCache(policy=P.full(), config=cfg), "kvcomp", ids, tokens)
        err = float(t.rel(got, ref).max())
        ring = all(h == [t.W] * len(h) for h in held)
        rows.append({"family": name, "reference_attention": attn, "tokens_past_window": t.PROMPT + t.STEPS - t.W,
                     "max_rel_logit_error": err, "ring_is_window_every_step": ring,
                     "meets": err <= 1e-5 and ring, "seconds": time.perf_counter() - t0})
        print(f"{name:8s} {rows[-1]['tokens_past_window']} past the window: max rel {err:.2e}, ring exact {ring}",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "commit": git_commit(), "torch": torch.__version__,
                       "transformers": __import__("transformers").__version__}, f, indent=1)
    return 0 if all(r["meets"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

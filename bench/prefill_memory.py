"""Resident memory one prefill adds, per cache: SmolLM2-135M (fp32), one
prompt of --tokens tokens of a text, each cache in a fresh process.

    PYTHONPATH=python .venv/bin/python bench/prefill_memory.py --json out.json

RSS is read after gc and malloc_trim(0) (freed heap memory back to the OS),
before and after the prefill, so it counts what stays live: the cache, and
what the allocator keeps around it. Also the peak RSS over the start, and the
bytes the cache holds and its pools have allocated."""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

CACHES = ["dynamic", "full", "int8", "int4", "int3", "kivi2", "combined"]


def one(which: str, tokens: int, text: str) -> dict:
    import torch
    from transformers import DynamicCache
    from kvcomp import policies
    from kvcomp.bench import models
    from kvcomp.bench.generate_bench import live_rss
    from kvcomp.integrations.hf import KVCompCache
    model, tok = models.load(models.resolve("smollm2-135m"))
    ids = tok(open(text).read(), return_tensors="pt").input_ids[:, :tokens]
    with torch.no_grad():  # warm up kernels and allocator
        model(ids[:, :16], past_key_values=DynamicCache(config=model.config))
    base = live_rss()
    cache = DynamicCache(config=model.config) if which == "dynamic" else \
        KVCompCache(policy=getattr(policies, which)(), config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    added = live_rss() - base
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    if which == "dynamic":
        held = pools = sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers)
    else:
        held = cache.stats()["bytes"]
        pools = sum(l.cache.stats()["capacity_bytes"] for l in cache.layers)
    mib = 2.0 ** 20
    return {"cache": which, "tokens": int(ids.shape[1]), "rss_added_mib": added / mib, "peak_over_start_mib": peak / mib,
            "held_mib": held / mib, "pools_mib": pools / mib}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--text", default=os.path.join(os.path.dirname(__file__), "../../shared/data/frankenstein-84.txt"))
    p.add_argument("--caches", default=",".join(CACHES))
    p.add_argument("--json")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.tokens, a.text)))
        return 0
    rows = []
    for which in a.caches.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", which, "--tokens", str(a.tokens), "--text", a.text],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{which:10s} rss +{r['rss_added_mib']:7.1f} MiB  peak +{r['peak_over_start_mib']:7.1f} MiB  "
              f"held {r['held_mib']:6.1f} MiB  pools {r['pools_mib']:6.1f} MiB")
    if a.json:
        import torch
        from kvcomp.bench.timing import git_commit
        with open(a.json, "w") as f:
            json.dump({"model": "smollm2-135m", "dtype": "float32", "text": os.path.basename(a.text),
                       "torch": torch.__version__, "commit": git_commit(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Plots of kvcomp-bench results (``--plot``). matplotlib is imported only
when a plot is asked for, on the Agg backend (files only, no display)."""
from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot``; ValueError naming the fix if matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_ops(result: dict, path: str) -> str:
    """Decode time vs context per format from an ``ops`` result (default run
    or ``--sweep``), log-log, one panel per batch; the dense baselines
    (``baselines``, and ``sdpa`` of a sweep) dashed. Writes ``path``, returns it."""
    plt = pyplot()
    decode = result["decode"]
    bases = result.get("baselines", []) + result.get("sdpa", [])
    batches = sorted({r["batch"] for r in decode})
    contexts = sorted({r["context"] for r in decode})
    fig, axes = plt.subplots(1, len(batches), figsize=(6.5 * len(batches), 4.8), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for label, rows in _series(decode, batch, "spec"):
            ax.plot([r["context"] for r in rows], [r["ms"] for r in rows], marker="o", label=label)
        for label, rows in _series(bases, batch, "name"):
            ax.plot([r["context"] for r in rows], [r["ms"] for r in rows], linestyle="--", marker="x",
                    label=f"{label} (dense)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [f"{c // 1024}k" if c % 1024 == 0 else str(c) for c in contexts])
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens per sequence)")
        ax.set_ylabel("ms per decode call (median)")
        ax.set_title(f"batch {batch}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    c = result["config"]
    fig.suptitle(f"paged_decode_attention on {result['device']}\n{c['num_heads']} query / "
                 f"{c['num_kv_heads']} KV heads, head_dim {c['head_dim']}, block {c['block_size']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _series(rows: list[dict], batch: int, key: str) -> list[tuple[str, list[dict]]]:
    """(label, rows sorted by context) per distinct ``row[key]`` at ``batch``, in first-seen order."""
    rows = [r for r in rows if r["batch"] == batch]
    labels = dict.fromkeys(r[key] for r in rows)
    return [(label, sorted((r for r in rows if r[key] == label), key=lambda r: r["context"]))
            for label in labels]

"""``kvcomp-bench accuracy --plot``: the trade-off users choose from (bytes
per token vs pass-key accuracy per policy) and each policy's pass-key grid."""
from __future__ import annotations

from pathlib import Path

from .plots import pyplot


def plot_accuracy(result: dict, path: str) -> list[str]:
    """Writes ``path`` (Pareto scatter at the longest length) and
    ``<stem>-needle.png`` beside it (accuracy per length x depth); returns both."""
    plt = pyplot()
    longest = str(result["lengths"][-1])
    pols = result["policies"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in pols:
        x, y = p["fraction_of_fp16"][longest], p["needle_accuracy"]
        ax.scatter(x, y, s=40)
        ax.annotate(p["policy"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"KV-cache bytes per token at {longest} tokens, fraction of fp16 (log)")
    ax.set_ylabel("pass-key accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.axvline(1 / 8, color="grey", ls=":", lw=1)
    ax.set_title(f"{result['model_name']}: memory vs retrieval ({len(result['needle_cases'])} prompts each)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

    heat = str(Path(path).with_name(Path(path).stem + "-needle.png"))
    cols = min(3, len(pols))
    rows = -(-len(pols) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols + 1, 2.8 * rows), squeeze=False,
                             layout="constrained")
    for ax, p in zip(axes.flat, pols):
        im = ax.imshow(p["needle_grid"], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_title(f"{p['policy']} ({p['needle_accuracy']:.2f})", fontsize=9)
        ax.set_xticks(range(len(result["depths"])), [f"{d:g}" for d in result["depths"]], fontsize=7)
        ax.set_yticks(range(len(result["lengths"])), [str(L) for L in result["lengths"]], fontsize=7)
        ax.set_xlabel("depth", fontsize=8)
        if ax in axes[:, 0]:
            ax.set_ylabel("tokens", fontsize=8)
    for ax in list(axes.flat)[len(pols):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.6, label="accuracy")
    fig.savefig(heat, dpi=120)
    plt.close(fig)
    return [path, heat]

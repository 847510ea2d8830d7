"""``kvcomp-bench accuracy --plot``: the trade-off users choose from (bits
per element vs pass-key answers kept and perplexity, per policy and peer)
and each policy's pass-key grid."""
from __future__ import annotations

from pathlib import Path

from .plots import pyplot

MARKERS = {"first": "o", "later": "s"}


def plot_accuracy(result: dict, path: str) -> list[str]:
    """Writes ``path`` (Pareto scatters at 2048 tokens, or the longest) and
    ``<stem>-needle.png`` beside it (accuracy per length x depth, per mode);
    returns both."""
    from .accuracy import report_length
    plt = pyplot()
    at = report_length(result)
    pols = result["policies"]
    panels = 2 if result["perplexity_text"] else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.8), squeeze=False)
    ax = axes[0, 0]
    points = 0
    for mode in result["modes"]:
        for p in pols:
            y = p["needle"][mode]["kept"]
            if y is None:  # the uncompressed cache answered none: nothing to keep
                continue
            points += 1
            x = p["bits_per_element"][at]
            ax.scatter(x, y, s=36, marker=MARKERS[mode], color="C0" if mode == "first" else "C3")
            ax.annotate(p["policy"], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    for mode in result["modes"]:
        ax.scatter([], [], marker=MARKERS[mode], color="C0" if mode == "first" else "C3",
                   label=f"question {'with' if mode == 'first' else 'after'} the document")
    ax.legend(fontsize=8, loc="lower right")
    if points:
        ax.set_xscale("log", base=2)
    else:
        ax.text(0.5, 0.5, "the uncompressed cache answered no prompt", ha="center", transform=ax.transAxes)
    ax.set_xlabel(f"bits per element, all-in, at {at} tokens (log)")
    ax.set_ylabel("pass-key answers kept (of the uncompressed cache's)")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    if panels == 2:
        ax = axes[0, 1]
        for p in (p for p in pols if p.get("nll_ratio") is not None):
            x, y = p["bits_per_element"][at], p["nll_ratio"]
            ax.scatter(x, y, s=36, color="C2")
            ax.annotate(p["policy"], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"bits per element, all-in, at {at} tokens (log)")
        ax.set_ylabel("mean NLL ratio to the uncompressed cache (log)")
        for level, style in ((1.0, "-"), (1.01, ":"), (1.03, ":")):
            ax.axhline(level, color="grey", lw=1, ls=style)
        ax.grid(alpha=0.3)
    n = len(result["needle_cases"])
    fig.suptitle(f"{result['model_name']} ({result['device']}, commit {result['commit']}): {n} prompts per mode",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

    heat = str(Path(path).with_name(Path(path).stem + "-needle.png"))
    modes = result["modes"]
    cols = min(3, len(pols))
    rows = -(-len(pols) // cols) * len(modes)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols + 1, 2.8 * rows), squeeze=False,
                             layout="constrained")
    cells = [(p, m) for m in modes for p in pols]
    for ax, (p, mode) in zip(axes.flat, cells):
        im = ax.imshow(p["needle"][mode]["grid"], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_title(f"{p['policy']}, {mode} ({p['needle'][mode]['accuracy']:.2f})", fontsize=9)
        ax.set_xticks(range(len(result["depths"])), [f"{d:g}" for d in result["depths"]], fontsize=7)
        ax.set_yticks(range(len(result["lengths"])), [str(L) for L in result["lengths"]], fontsize=7)
        ax.set_xlabel("depth", fontsize=8)
        if ax in axes[:, 0]:
            ax.set_ylabel("tokens", fontsize=8)
    for ax in list(axes.flat)[len(cells):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.6, label="accuracy")
    fig.savefig(heat, dpi=120)
    plt.close(fig)
    return [path, heat]

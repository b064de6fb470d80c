"""PNG plots shared by ``lynx eval --sweep`` and ``lynx demo`` (``pip install 'lynx-moe[plot]'``).

- ``distinct_per_layer``: distinct experts per MoE layer and decode step, one bar per policy;
- ``quality_vs_saved``: quality change against the share of distinct experts saved, one point
  per policy setting, with 95 % intervals: perplexity change, and accuracy change over all
  task items (each task's change as a small mark beside it).

Both take the result dicts of ``lynx_moe.quality.evaluate`` and write with the Agg backend
(no display needed). matplotlib is imported on first use.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["require", "distinct_per_layer", "quality_vs_saved"]


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'lynx-moe[plot]'") from None
    return plt


def require() -> None:
    """Raise ImportError naming the extra now, rather than after a long run, if matplotlib is missing."""
    _pyplot()


def distinct_per_layer(results: list[dict], path: Path, title: str = "") -> Path:
    """Grouped bars: x = MoE layer, one bar per policy (native first)."""
    plt = _pyplot()
    n_layers = max(len(r["routing"]["distinct_per_layer"]) for r in results)
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * n_layers + 2) + 3, 4.2))
    for i, r in enumerate(results):
        vals = r["routing"]["distinct_per_layer"]
        xs = [layer + (i - (len(results) - 1) / 2) * width for layer in range(len(vals))]
        ax.bar(xs, vals, width=width, label=f"{r['policy']} ({r['routing']['distinct']:.1f})")
    ax.set_xticks(range(n_layers), [str(layer) for layer in range(n_layers)])
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("distinct experts per decode step")
    ax.set_title(title or "Distinct experts per layer and decode step (legend: mean)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _point(ax, x: float, ci: dict, label: str, color=None, marker="o"):
    err = [[ci["value"] - ci["lo"]], [ci["hi"] - ci["value"]]]
    h = ax.errorbar([x], [ci["value"]], yerr=err, fmt=marker, capsize=3, color=color)
    ax.annotate(label, (x, ci["value"]), fontsize=6, xytext=(4, 3), textcoords="offset points")
    return h


def _labels(results: list[dict]) -> dict[str, str]:
    """Point labels: the policy spec, without the policy name when every point shares it."""
    names = {r["policy"].partition(":")[0] for r in results}
    if len(names) == 1:
        return {r["policy"]: r["policy"].partition(":")[2] or r["policy"] for r in results}
    return {r["policy"]: r["policy"] for r in results}


def quality_vs_saved(results: list[dict], path: Path, title: str = "") -> Path:
    """Perplexity change (and accuracy change per task, when there are tasks) against the
    share of distinct experts saved; one point per policy setting, bars are 95 % intervals."""
    plt = _pyplot()
    pols = [r for r in results if r["policy"] != "native"]
    label = _labels(pols)
    tasks = sorted(results[0].get("tasks", {}))
    panels = (["ppl"] if "perplexity" in results[0] else []) + (["acc"] if tasks else [])
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6.2 * max(1, len(panels)), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        ax.axhline(0, color="grey", lw=0.8)
        for r in pols:
            x = 100 * r["routing"]["saved"]
            if panel == "ppl":
                _point(ax, x, r["perplexity"]["delta_pct"], label[r["policy"]], color="C0")
                continue
            # Each task's change as a small mark; the pooled change (all items) with its interval.
            for j, t in enumerate(tasks):
                ax.plot([x], [r["tasks"][t]["delta_points"]["value"]], "osD^v<>p"[j % 8], color=f"C{j + 1}",
                        alpha=0.6, markersize=4)
            if "tasks_pooled" in r:
                _point(ax, x, r["tasks_pooled"]["delta_points"], label[r["policy"]], color="black")
        ax.set_xlabel("distinct experts saved per decode step (%)")
        if panel == "ppl":
            ax.set_ylabel("perplexity change (%)  [worse ->]")
            ax.set_title("Perplexity vs experts saved", fontsize=10)
        else:
            ax.set_ylabel("accuracy change (points)")
            ax.set_title("Accuracy vs experts saved (black: all task items, 95 % CI)", fontsize=10)
            for j, t in enumerate(tasks):
                ax.plot([], [], "osD^v<>p"[j % 8], color=f"C{j + 1}", alpha=0.6, label=t)
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)

"""Every PNG the commands write (``pip install 'lynx-moe[plot]'``).

- ``distinct_per_layer``: distinct experts per MoE layer and decode step, one bar per policy;
- ``quality_vs_saved``: quality change against the share of distinct experts saved, one point
  per policy setting, with 95 % intervals: perplexity change, and accuracy change over all
  task items (each task's change as a small mark beside it);
- ``profile_plots``: ``lynx profile``'s distinct experts over batch sizes and expert load.

The first two take the result dicts of ``measure.quality.evaluate``. All write with the Agg
backend (no display needed); matplotlib is imported on first use.
"""

from __future__ import annotations

import math
from pathlib import Path

__all__ = ["require", "distinct_per_layer", "quality_vs_saved", "profile_plots", "frontier_plot"]


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


def _point(ax, x: float, ci: dict, label: str | None, color, marker: str):
    """One policy's point with its 95 % interval; its colour and marker name it in the legend
    (text labels beside the points overlap when two policies save about as much)."""
    err = [[ci["value"] - ci["lo"]], [ci["hi"] - ci["value"]]]
    return ax.errorbar([x], [ci["value"]], yerr=err, fmt=marker, capsize=3, color=color, label=label)


def _labels(results: list[dict]) -> dict[str, str]:
    """Point labels: the policy spec, without the policy name when every point shares it."""
    names = {r["policy"].partition(":")[0] for r in results}
    if len(names) == 1:
        return {r["policy"]: r["policy"].partition(":")[2] or r["policy"] for r in results}
    return {r["policy"]: r["policy"] for r in results}


def quality_vs_saved(results: list[dict], path: Path, title: str = "") -> Path:
    """Perplexity change (and accuracy change, when there are tasks) against the share of
    distinct experts saved; one point per policy setting (colour and marker in the legend),
    bars are 95 % intervals. On the accuracy panel the point is all task items pooled; each
    task's own change is a small grey mark (its shape in the second legend)."""
    plt = _pyplot()
    pols = [r for r in results if r["policy"] != "native"]
    label = _labels(pols)
    style = {r["policy"]: (f"C{i % 10}", "osD^v<>ph*"[i % 10]) for i, r in enumerate(pols)}
    tasks = sorted(results[0].get("tasks_pooled", {}).get("tasks", results[0].get("tasks", {})))
    panels = (["ppl"] if "perplexity" in results[0] else []) + (["acc"] if tasks and "tasks_pooled" in results[0]
                                                                  else [])
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(5.6 * n + 2.6, 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        ax.axhline(0, color="grey", lw=0.8)
        for r in pols:
            x = 100 * r["routing"]["saved"]
            color, marker = style[r["policy"]]
            ci = r["perplexity"]["delta_pct"] if panel == "ppl" else r["tasks_pooled"]["delta_points"]
            _point(ax, x, ci, label[r["policy"]], color, marker)
            if panel == "acc":
                for j, t in enumerate(tasks):
                    ax.plot([x], [r["tasks"][t]["delta_points"]["value"]], "+x1234"[j % 6], color="grey",
                            alpha=0.7, markersize=5)
        ax.set_xlabel("distinct experts saved per decode step (%)")
        if panel == "ppl":
            ax.set_ylabel("perplexity change (%)  [worse ->]")
            ax.set_title("Perplexity vs experts saved", fontsize=10)
        else:
            ax.set_ylabel("accuracy change (points)")
            ax.set_title("Accuracy (all task items pooled) vs experts saved", fontsize=10)
            marks = [ax.plot([], [], "+x1234"[j % 6], color="grey", linestyle="none")[0] for j in range(len(tasks))]
            fig.legend(marks, tasks, fontsize=7, loc="lower right", title="each task", title_fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles[:len(pols)], labels[:len(pols)], fontsize=7, loc="upper right", title="policy",
               title_fontsize=8, bbox_to_anchor=(1.0, 0.9))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.6 / (5.6 * n + 2.6), 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def profile_plots(stats: dict, batch_sizes: list[int], out: Path) -> list[Path]:
    """``distinct_experts.png`` (per layer over batch sizes, with the offline policy counts) and
    ``expert_load.png`` (each layer's experts by load) of a ``measure.profile`` result."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for ly in stats["layers"]:
        m = [ly["batch"][str(B)]["distinct"]["mean"] for B in batch_sizes]
        s = [ly["batch"][str(B)]["distinct"]["std"] for B in batch_sizes]
        line = ax.errorbar(batch_sizes, m, yerr=s, marker="o", capsize=3, label=f"layer {ly['layer']}")
        for p, style in zip(sorted(ly["batch"][str(batch_sizes[0])].get("policy_distinct", {})), ("--", ":", "-.")):
            pm = [ly["batch"][str(B)]["policy_distinct"][p]["mean"] for B in batch_sizes]
            ax.plot(batch_sizes, pm, style, color=line[0].get_color(), alpha=0.7,
                    label=f"{p} (offline; same colour per layer)" if ly["layer"] == 0 else None)
    ax.axhline(stats["num_experts"], color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(batch_sizes, [str(B) for B in batch_sizes])
    ax.set_xlabel("batch size (decode rows per step)")
    ax.set_ylabel("distinct experts per step")
    ax.set_title("Distinct experts per layer and step (mean ± std)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "distinct_experts.png", dpi=120)
    plt.close(fig)

    n = len(stats["layers"])
    cols = min(4, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False)
    for ax, ly in zip(axes.flat, stats["layers"]):
        share = sorted(ly["expert_share"], reverse=True)
        ax.bar(range(len(share)), share, width=1.0)
        ax.axhline(1 / stats["num_experts"], color="red", lw=0.8)
        ax.set_title(f"layer {ly['layer']}", fontsize=9)
        ax.set_xlabel("experts, by load", fontsize=8)
        ax.set_ylabel("share of assignments", fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("Expert load over all decode steps (red: uniform)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "expert_load.png", dpi=120)
    plt.close(fig)
    return [out / "distinct_experts.png", out / "expert_load.png"]


def frontier_plot(rows: list[dict], path: Path, title: str = "") -> Path:
    """One panel per batch size: perplexity change against distinct experts saved, one line
    per policy family through its settings (bars: 95 % intervals)."""
    plt = _pyplot()
    batches = sorted({r["batch"] for r in rows})
    families = sorted({r["family"] for r in rows} - {"native"})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.6 * len(batches) + 1.8, 4.2), squeeze=False, sharey=True)
    for ax, B in zip(axes[0], batches):
        ax.axhline(0, color="grey", lw=0.8)
        for i, fam in enumerate(families):
            pts = sorted((r for r in rows if r["batch"] == B and r["family"] == fam), key=lambda r: r["saved"])
            x = [100 * r["saved"] for r in pts]
            y = [r["ppl_delta_pct"] for r in pts]
            err = [[r["ppl_delta_pct"] - r["lo"] for r in pts], [r["hi"] - r["ppl_delta_pct"] for r in pts]]
            ax.errorbar(x, y, yerr=err, fmt="-" + "osD^v<>ph*"[i % 10], capsize=2, color=f"C{i % 10}",
                        label=fam, markersize=4, lw=1)
        native = next((r for r in rows if r["batch"] == B and r["family"] == "native"), None)
        ax.set_title(f"batch {B}" + (f" (native {native['distinct_native']:.1f} experts)" if native else ""),
                     fontsize=9)
        ax.set_xlabel("distinct experts saved per decode step (%)")
    axes[0][0].set_ylabel("perplexity change (%)  [worse ->]")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="upper right", title="policy", title_fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 1.8 / (4.6 * len(batches) + 1.8), 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cost_model_fit(fit: list[dict], path: Path, title: str = "") -> Path:
    """Measured against predicted ms per decode step (``lynx bench --calibrate``'s ``fit`` rows),
    one colour per batch size; on the diagonal the model is exact."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    top = max(max(f["ms"], f["predicted_ms"]) for f in fit) * 1.08
    ax.plot([0, top], [0, top], color="grey", lw=0.8, ls="--")
    for i, B in enumerate(sorted({f["batch"] for f in fit})):
        pts = [f for f in fit if f["batch"] == B]
        ax.scatter([f["predicted_ms"] for f in pts], [f["ms"] for f in pts], color=f"C{i % 10}", s=22,
                   label=f"batch {B}")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("predicted ms per decode step")
    ax.set_ylabel("measured ms per decode step")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

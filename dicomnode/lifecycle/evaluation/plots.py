"""PNG plots: the ROC curve and the reliability diagram of one label.

Figures are built with ``matplotlib.figure.Figure`` (Agg canvas) rather than pyplot, so nothing global
(the pyplot backend, open-figure registry) is touched and the code is safe in threads and servers.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dicomnode.lifecycle.evaluation.metrics import LabelMetrics


def _new_figure() -> Figure:
    fig = Figure(figsize=(5.0, 5.0), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def roc_legend(metrics: LabelMetrics) -> str:
    """``'AUROC 0.91 (95% CI 0.80–0.98), n=120'``."""
    if metrics.auroc is None:
        return f"AUROC undefined, n={metrics.n}"
    ci = f" (95% CI {metrics.auroc_ci.low:.2f}–{metrics.auroc_ci.high:.2f})" if metrics.auroc_ci else ""
    return f"AUROC {metrics.auroc:.2f}{ci}, n={metrics.n}"


def plot_roc(metrics: LabelMetrics, path: str | Path) -> Path:
    """ROC curve with AUROC and its CI in the legend and the operating point marked."""
    fig = _new_figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    if metrics.roc_fpr:
        ax.plot(metrics.roc_fpr, metrics.roc_tpr, color="C0", linewidth=2, label=roc_legend(metrics))
    else:
        ax.plot([], [], color="C0", label=roc_legend(metrics))
    if metrics.sensitivity is not None and metrics.specificity is not None:
        ax.plot(
            [1 - metrics.specificity],
            [metrics.sensitivity],
            marker="o",
            color="C3",
            linestyle="none",
            label=f"threshold {metrics.threshold:.2f}: sens {metrics.sensitivity:.2f}, "
            f"spec {metrics.specificity:.2f}",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("1 − specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(f"ROC: {metrics.label}")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_aspect("equal")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png")
    return out


def plot_reliability(metrics: LabelMetrics, path: str | Path) -> Path:
    """Reliability diagram: observed fraction of positives against mean probability per bin."""
    fig = _new_figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    filled = [b for b in metrics.reliability if b.count]
    width = (metrics.reliability[0].high - metrics.reliability[0].low) if metrics.reliability else 0.1
    ax.bar(
        [b.low for b in filled],
        [b.observed_fraction or 0.0 for b in filled],
        width=width,
        align="edge",
        alpha=0.35,
        edgecolor="C0",
        label="observed fraction per bin",
    )
    ax.plot(
        [b.mean_probability or 0.0 for b in filled],
        [b.observed_fraction or 0.0 for b in filled],
        marker="o",
        color="C0",
    )
    for b in filled:
        ax.annotate(
            f"n={b.count}", (b.low + width / 2, (b.observed_fraction or 0.0) + 0.02), ha="center", fontsize=7
        )
    ece = "undefined" if metrics.ece is None else f"{metrics.ece:.3f}"
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed fraction positive")
    ax.set_title(f"Calibration: {metrics.label} (ECE {ece})")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_aspect("equal")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png")
    return out

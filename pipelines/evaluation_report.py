"""The evaluation report: summary.md and its PNG plots (metrics per model at k, metric vs k) from gold.metrics
rows, stored by `pipelines.core.reports` in ops.reports."""

from __future__ import annotations

import io
from typing import Any, cast

from pipelines.baselines import REPLAY_EXTRA_MODELS, cutoffs
from pipelines.core import metrics, reports
from pipelines.core.config import ShelfConfig
from pipelines.core.runs import RunContext
from pipelines.core.schemas import MODEL


def _png(fig: Any) -> bytes:
    """A matplotlib figure as PNG bytes (closed afterwards)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


Values = dict[tuple[str, str, int], float]  # (model, metric, k) -> value


def report_files(
    rows: list[dict[str, object]], config: ShelfConfig, ctx: RunContext, sizes: dict[str, float]
) -> dict[str, bytes]:
    """The report from the gold.metrics rows: summary.md and PNG plots (metrics per model at k, metric vs k)."""
    present = {str(r[MODEL]) for r in rows}
    models = [m for m in (*config.evaluate.models, *REPLAY_EXTRA_MODELS) if m in present]
    value = {
        (str(r[MODEL]), str(r[metrics.METRIC]), cast(int, r[metrics.K])): cast(float, r[metrics.METRIC_VALUE])
        for r in rows
    }
    return {
        reports.SUMMARY: _summary(value, models, config, ctx, sizes).encode("utf-8"),
        "metrics_at_k.png": _plot_at_k(value, models, config, ctx),
        "metric_vs_k.png": _plot_vs_k(value, models, config),
    }


def _pyplot() -> Any:  # matplotlib.pyplot, imported (and set to Agg) only when a report is drawn
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_at_k(value: Values, models: list[str], config: ShelfConfig, ctx: RunContext) -> bytes:
    """Small multiples: one panel per metric, each on its own scale (novelty is about 5, precision about 0.05)."""
    plt, k = _pyplot(), config.evaluate.k
    names = [*metrics.PER_USER_METRICS, *metrics.CATALOG_METRICS]
    columns = 4
    rows = -(-len(names) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False)
    colours = [f"C{i}" for i in range(len(models))]
    for ax, metric in zip(axes.flat, names, strict=False):
        ax.barh(models, [value.get((model, metric, k), 0.0) for model in models], color=colours)
        ax.invert_yaxis()  # the first model (published) on top
        ax.set_title(metric, fontsize=10)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    fig.suptitle(f"metrics at k={k} ({config.evaluate.protocol} split, run {ctx.run_id})")
    fig.tight_layout()
    return _png(fig)


def _plot_vs_k(value: Values, models: list[str], config: ShelfConfig) -> bytes:
    plt = _pyplot()
    ks = cutoffs(config.evaluate)
    shown = ("precision", "recall", "ndcg", "map")
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.5))
    for ax, metric in zip(axes, shown, strict=True):
        for model in models:
            ax.plot(ks, [value.get((model, metric, kk), 0.0) for kk in ks], marker="o", label=model)
        ax.set_title(f"{metric} vs k")
        ax.set_xlabel("k")
    axes[0].legend()
    fig.tight_layout()
    return _png(fig)


def _summary(value: Values, models: list[str], config: ShelfConfig, ctx: RunContext, sizes: dict[str, float]) -> str:
    k = config.evaluate.k
    names = [*metrics.PER_USER_METRICS, *metrics.CATALOG_METRICS]
    header = "| model | " + " | ".join(names) + " |"
    lines = [
        f"# shelf evaluation, run {ctx.run_id}",
        "",
        f"- as of: {ctx.as_of.isoformat()}",
        f"- protocol: {config.evaluate.protocol}, k = {k}, seen items removed, cold users not scored",
        *[f"- {name}: {int(v)}" for name, v in sizes.items()],
        "",
        f"## Metrics at k = {k}",
        "",
        header,
        "|" + "---|" * (len(names) + 1),
        *[
            f"| {model} | " + " | ".join(f"{value.get((model, m, k), 0.0):.4f}" for m in names) + " |"
            for model in models
        ],
        "",
        "MAP divides by min(k, relevant); MAP_rel divides by the number of relevant items.",
        "Novelty is the mean -log2(share of training users who had the item) of recommended items; diversity "
        "is the mean (1 - cosine) of item pairs within a list, with the run's ALS item factors when the run "
        "trained them, else co-occurrence cosine on the training split.",
        "",
        "![metrics at k](metrics_at_k.png)",
        "",
        "![metric vs k](metric_vs_k.png)",
        "",
    ]
    return "\n".join(lines)

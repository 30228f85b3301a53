"""Figures of a pipeline run, drawn with matplotlib (Agg) from the records of ``spielbench.aggregate``.

Every function writes one PNG and returns its path. When the data a figure needs is absent (no
benchmark results, no SpIEL run, ...), it writes a figure that says so instead of failing, so the
pipeline's declared outputs always exist and a reader sees why a plot is empty.

``analysis/figures.ipynb`` calls these functions on ``results/`` (``aggregate.load_results_dir``); the
pipeline's ``figures`` rule executes that notebook.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from spielbench.aggregate import (  # noqa: E402
    FIGURE_FILES, HELDOUT, RunRecord, method_label, pick_setting, pool_scores, settings_of, task_label,
)
from spielbench.methods import is_quantized, method_color, table_order  # noqa: E402
from spielbench.records import BenchmarkPoint  # noqa: E402

DPI = 120


def _style(method: str) -> str:
    return "--" if is_quantized(method) else "-"


def _save(fig, path: str | Path) -> Path:
    """Save ``fig`` to ``path`` (parent folders created) atomically, and close it."""
    from spielbench.fsio import atomic_write

    path = Path(path)
    try:
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def note_figure(path: str | Path, title: str, message: str) -> Path:
    """A figure holding only ``title`` and ``message``: written where the data for a plot is absent."""
    fig, ax = plt.subplots(figsize=(7, 2.5))
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, fontsize=10, transform=ax.transAxes)
    return _save(fig, path)


def _method_sort(method: str):
    return (is_quantized(method), *table_order(method))


def sweep_points(records: list[RunRecord], metric: str) -> dict[str, list[tuple[int, float, float | None]]]:
    """Per method, the points ``(trainable_params, value, stderr)`` of one metric, sorted by budget.

    Seeds of one setting are pooled (``aggregate.pool_scores``); when one method has several settings at
    the same budget (e.g. learning rates), the one with the lowest held-out loss is plotted.
    """
    out: dict[str, list[tuple[int, float, float | None]]] = {}
    runs = [r for r in records if r.target != "base" and r.trainable_params]
    by_budget: dict[tuple[str, int], list[list[RunRecord]]] = {}
    for g in settings_of(runs).values():
        by_budget.setdefault((g[0].method, g[0].trainable_params), []).append(g)
    for (method, n), groups in by_budget.items():
        g = pick_setting(groups)
        p = pool_scores([r.score(metric) for r in g])
        if p is not None:
            out.setdefault(method, []).append((n, p.value, p.stderr))
    for pts in out.values():
        pts.sort()
    return dict(sorted(out.items(), key=lambda kv: _method_sort(kv[0])))


def _metrics_of(records: list[RunRecord], tasks: list[str] | None) -> list[str]:
    if tasks is None:
        tasks = []
        for r in records:
            for t, s in r.scores.items():
                if s.value is not None and t not in tasks:
                    tasks.append(t)
    return list(tasks) + [HELDOUT]


def plot_budget_sweep(records: list[RunRecord], path: str | Path, tasks: list[str] | None = None) -> Path:
    """Accuracy per task and held-out loss vs trainable parameters (log x), one line per method.

    Error bars: ± one standard error (pooled over seeds). The base model is a dotted black line. Methods
    with one budget (full FT, (IA)3) are single points; 4-bit methods are dashed. Methods are shifted by a
    few percent along x so that matched budgets do not hide each other.
    """
    metrics = _metrics_of(records, tasks)
    if not any(r.target != "base" and r.trainable_params for r in records):
        return note_figure(path, "Accuracy and held-out loss vs trainable parameters",
                           "No training run with a trainable-parameter count was found.")
    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False)
    base = next((r for r in records if r.target == "base"), None)
    for ax, metric in zip(axes.flat, metrics):
        pct = metric != HELDOUT
        scale = 100.0 if pct else 1.0
        sweeps = sweep_points(records, metric)
        for i, (method, pts) in enumerate(sweeps.items()):
            # a small multiplicative offset per method keeps equal budgets (matched ranks) readable
            shift = 10 ** (0.025 * (i - (len(sweeps) - 1) / 2))
            xs = [p[0] * shift for p in pts]
            ys = [p[1] * scale for p in pts]
            es = [(p[2] or 0.0) * scale for p in pts]
            ax.errorbar(xs, ys, yerr=es, marker="o", ms=4, capsize=2, color=method_color(method), ls=_style(method),
                        label=method_label(method))
        bs = base.score(metric) if base else None
        if bs is not None and bs.value is not None:
            ax.axhline(bs.value * scale, color="black", ls=":", lw=1, label="Base model")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("held-out loss (nats/token)" if not pct else f"{task_label(metric)} (%)")
        ax.set_title("Held-out loss (lower is better)" if not pct else task_label(metric))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in list(axes.flat)[1:len(metrics)]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8,
               bbox_to_anchor=(0.5, -0.02 - 0.03 * math.ceil(len(labels) / 6)))
    fig.suptitle("Accuracy and held-out loss vs trainable parameters (± 1 s.e.)")
    fig.tight_layout()
    return _save(fig, path)


def plot_efficiency_runs(records: list[RunRecord], path: str | Path) -> Path:
    """Bars per training run: mean step time [s], peak memory [GiB] and trainable-state bytes [MiB]."""
    runs = [r for r in records if r.target != "base" and r.step_time_mean_s is not None]
    if not runs:
        return note_figure(path, "Training cost per run", "No training run recorded step times.")
    runs.sort(key=lambda r: (_method_sort(r.method), r.trainable_params or 0, r.target))
    names = [r.target for r in runs]
    colors = [method_color(r.method) for r in runs]
    panels = [("mean step time (s)", [r.step_time_mean_s for r in runs]),
              (f"peak memory (GiB, {runs[0].peak_memory_kind or 'n/a'})",
               [(r.peak_memory_bytes or 0) / 2**30 for r in runs]),
              ("trainable + grad + optimizer state (MiB, log)",
               [r.state_bytes / 2**20 if r.state_bytes else float("nan") for r in runs])]
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.35 * len(runs) + 1.8), sharey=True)
    for ax, (title, vals) in zip(axes, panels):
        ax.barh(range(len(runs)), vals, color=colors)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(runs)), names, fontsize=8)
    axes[0].invert_yaxis()
    axes[2].set_xscale("log")
    fig.suptitle("Training cost per run (this pipeline's runs)")
    fig.tight_layout()
    return _save(fig, path)


def _bench_size_x(benchmarks: list[BenchmarkPoint]) -> tuple[dict[str, float], bool]:
    """x position of each model size: its parameter count when every size has one, else its rank order."""
    sizes = list(dict.fromkeys(b.size for b in benchmarks))
    params = {b.size: float(b.n_params_model) for b in benchmarks if b.n_params_model}
    if len(params) == len(sizes):
        return params, True
    return {s: float(i) for i, s in enumerate(sizes)}, False


def plot_benchmark_scaling(benchmarks: list[BenchmarkPoint], path: str | Path) -> Path:
    """Peak memory [GiB] and mean step time [s] vs model size, one line per method (benchmark results).

    Points that did not complete (status "oom", "unsupported", ...) are marked with a cross on the x axis.
    """
    if not benchmarks:
        return note_figure(path, "Peak memory and step time vs model size",
                           "No efficiency benchmark results (results/benchmark/*.json) yet:\n"
                           "run the pipeline's benchmark rule to fill this figure.")
    xpos, numeric = _bench_size_x(benchmarks)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    methods = sorted({b.method for b in benchmarks}, key=_method_sort)
    kinds = sorted({b.peak_memory_kind for b in benchmarks if b.peak_memory_kind})
    for method in methods:
        pts = sorted(((xpos[b.size], b) for b in benchmarks if b.method == method), key=lambda p: p[0])
        bad = [x for x, b in pts if not b.ok]
        for ax, values in ((axes[0], [(x, b.peak_memory_bytes / 2**30) for x, b in pts
                                      if b.ok and b.peak_memory_bytes is not None]),
                           (axes[1], [(x, b.step_time_mean_s) for x, b in pts
                                      if b.ok and b.step_time_mean_s is not None])):
            if values:
                ax.plot([v[0] for v in values], [v[1] for v in values], marker="o", color=method_color(method),
                        ls=_style(method), label=method_label(method))
            if bad:
                ax.scatter(bad, [0] * len(bad), marker="x", color=method_color(method), zorder=3)
    for ax, ylabel in zip(axes, (f"peak memory (GiB, {', '.join(kinds) or 'n/a'})", "mean step time (s)")):
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if numeric:
            ax.set_xscale("log")
            ax.set_xlabel("model parameters")
        else:
            ax.set_xticks(list(xpos.values()), list(xpos))
            ax.set_xlabel("model size")
    axes[0].legend(fontsize=8)
    fig.suptitle("Efficiency benchmark: peak memory and step time vs model size (× = did not complete)")
    fig.tight_layout()
    return _save(fig, path)


def plot_loss_curves(records: list[RunRecord], path: str | Path) -> Path:
    """Training loss per optimizer step: one panel per method, one line per run."""
    runs = [r for r in records if r.loss_curve]
    if not runs:
        return note_figure(path, "Training loss curves", "No run recorded a loss curve.")
    methods = sorted({r.method for r in runs}, key=_method_sort)
    ncols = min(4, len(methods))
    nrows = math.ceil(len(methods) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3 * nrows), squeeze=False, sharey=True)
    for ax, method in zip(axes.flat, methods):
        mine = sorted((r for r in runs if r.method == method), key=lambda r: (r.trainable_params or 0, r.target))
        cmap = plt.get_cmap("viridis")
        for i, r in enumerate(mine):
            steps, losses = zip(*r.loss_curve)
            ax.plot(steps, losses, lw=1.2, color=cmap(i / max(1, len(mine) - 1) * 0.85), label=r.target)
        ax.set_title(method_label(method), fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("training loss (nats/token)")
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    fig.suptitle("Training loss curves")
    fig.tight_layout()
    return _save(fig, path)


def plot_spiel_dynamics(records: list[RunRecord], path: str | Path) -> Path:
    """SpIEL index dynamics per reselection: share of indices replaced, and overlap with the initial set.

    Left: replaced indices ÷ active indices at each reselection step (docs/METHOD.md §3; with the linear
    policy the first reselection replaces up to all of them). Right: fraction of the current index set
    that was in the initial one. One line per SpIEL run.
    """
    runs = [r for r in records if r.reselections]
    if not runs:
        return note_figure(path, "SpIEL dynamics", "No run recorded reselections (no SpIEL-AG/-MA run, or the "
                           "runs were too short for a reselection).")
    runs.sort(key=lambda r: (_method_sort(r.method), r.trainable_params or 0, r.target))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    markers = "osD^v<>p*h"
    for i, r in enumerate(runs):
        ev = r.reselections
        kw = dict(color=method_color(r.method), ls=_style(r.method), marker=markers[i % len(markers)], ms=4,
                  label=r.target)
        share = [(e.step, e.share_replaced) for e in ev if e.share_replaced is not None]
        if share:
            axes[0].plot(*zip(*share), **kw)
        over = [(0, 1.0)] + [(e.step, e.overlap_initial) for e in ev if e.overlap_initial is not None]
        if len(over) > 1:
            axes[1].plot(*zip(*over), **kw)
    axes[0].set_ylabel("indices replaced ÷ active indices")
    axes[0].set_title("Share of indices replaced at each reselection")
    axes[1].set_ylabel("overlap with the initial index set")
    axes[1].set_title("Overlap of the index set with the initial one")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle("SpIEL dynamics")
    fig.tight_layout()
    return _save(fig, path)


def draw_all(records: list[RunRecord], benchmarks: list[BenchmarkPoint], out_dir: str | Path,
             tasks: list[str] | None = None) -> list[Path]:
    """Write every figure of :data:`FIGURE_FILES` (``aggregate.FIGURE_FILES``) into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    return [
        plot_budget_sweep(records, out / "budget_sweep.png", tasks),
        plot_efficiency_runs(records, out / "efficiency_runs.png"),
        plot_benchmark_scaling(benchmarks, out / "scaling_vs_model_size.png"),
        plot_loss_curves(records, out / "loss_curves.png"),
        plot_spiel_dynamics(records, out / "spiel_dynamics.png"),
    ]

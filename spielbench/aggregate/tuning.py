"""The learning-rate selection's outputs in ``results/tuning/``: ``chosen_lr.json`` (the input of the
final runs), the table of every grid point with the chosen value and an edge flag
(``lr_grid.{md,csv}``), and the figure of validation loss against learning rate per target
(``lr_grid.png``). The selection itself is :func:`spielbench.tuning.choose_all`.
"""
from __future__ import annotations

import json
from pathlib import Path

from spielbench.fsio import write_text_atomic
from spielbench.methods import method_label

#: The files :func:`write_tuning_results` writes, relative to its output folder.
TUNING_FILES = ("chosen_lr.json", "lr_grid.md", "lr_grid.csv", "lr_grid.png")

_EDGE_TEXT = {None: "", "low": "**at the low edge**", "high": "**at the high edge**"}


def _target_label(entry: dict) -> str:
    label = method_label(entry["method"])
    return label if entry.get("rank") is None else f"{label} r={entry['rank']}"


def _loss_text(point: dict) -> str:
    if point["validation_loss"] is None:
        return point["status"].upper()
    return f"{point['validation_loss']:.4f}"


def grid_markdown(chosen: dict) -> str:
    """The markdown table: one row per target, every grid point's validation loss, the choice, the edge flag."""
    targets = chosen["targets"]
    n = max((len(t["grid"]) for t in targets.values()), default=0)
    lines = ["# Learning-rate selection", "",
             "Every target (method at a rank) is trained once per grid point with the same budget and scored on the "
             "validation split of the mixture (disjoint from the training data and from the held-out split of the "
             "verdicts): validation loss in nats/token, lower is better. The chosen learning rate (in bold) is the "
             "lowest validation loss; a choice at either end of its grid is flagged (the grid should then be "
             "widened). DIVERGED: non-finite training loss (never chosen).", "",
             "| target | " + " | ".join(f"point {i + 1}" for i in range(n)) + " | chosen | validation loss | edge |",
             "|---|" + "---|" * n + "---|---|---|"]
    for entry in targets.values():
        cells = []
        for p in entry["grid"]:
            text = f"{p['learning_rate']:.3g}: {_loss_text(p)}"
            cells.append(f"**{text}**" if p["learning_rate"] == entry["learning_rate"] else text)
        cells += [""] * (n - len(cells))
        lines.append(f"| {_target_label(entry)} | " + " | ".join(cells) +
                     f" | {entry['learning_rate']:.3g} | {entry['validation_loss']:.4f} | {_EDGE_TEXT[entry['at_edge']]} |")
    edges = [t for t in targets.values() if t["at_edge"]]
    lines += ["", f"{len(edges)} of {len(targets)} chosen values at a grid edge" + (
        ": " + ", ".join(_target_label(t) for t in edges) + "." if edges else ".")]
    return "\n".join(lines) + "\n"


def grid_csv(chosen: dict) -> str:
    """The CSV table: one row per grid point (target, method, rank, learning rate, loss, status, chosen, edge)."""
    import pandas as pd

    rows = []
    for target, entry in chosen["targets"].items():
        for p in entry["grid"]:
            is_chosen = p["learning_rate"] == entry["learning_rate"]
            rows.append({"target": target, "method": entry["method"], "rank": entry["rank"],
                         "learning_rate": p["learning_rate"], "validation_loss": p["validation_loss"],
                         "status": p["status"], "chosen": is_chosen,
                         "at_edge": (entry["at_edge"] or "") if is_chosen else ""})
    return pd.DataFrame(rows, columns=["target", "method", "rank", "learning_rate", "validation_loss", "status",
                                       "chosen", "at_edge"]).to_csv(index=False)


def plot_grid(chosen: dict, path: str | Path) -> Path:
    """Validation loss vs learning rate (log scale), one line per target, the choice circled, diverged points as ×."""
    from spielbench.figures import _save, _style, plt
    from spielbench.methods import method_color

    fig, ax = plt.subplots(figsize=(7, 4.5))
    finite = [p["validation_loss"] for t in chosen["targets"].values() for p in t["grid"]
              if p["validation_loss"] is not None]
    top = max(finite) if finite else 1.0
    for entry in chosen["targets"].values():
        pts = [(p["learning_rate"], p["validation_loss"]) for p in entry["grid"] if p["validation_loss"] is not None]
        color = method_color(entry["method"])
        if pts:
            ax.plot(*zip(*pts), _style(entry["method"]), marker="o", color=color, label=_target_label(entry))
        bad = [p["learning_rate"] for p in entry["grid"] if p["validation_loss"] is None]
        if bad:
            ax.plot(bad, [top] * len(bad), "x", color=color, markersize=9)
        ax.plot([entry["learning_rate"]], [entry["validation_loss"]], "o", markersize=12, markerfacecolor="none",
                markeredgecolor=color)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Learning-rate selection (circled: chosen; ×: diverged)")
    ax.grid(True, alpha=0.3)
    if chosen["targets"]:
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def write_chosen(scores: list[dict], out_dir: str | Path) -> Path:
    """Choose every target's learning rate from its grid points' scores; write ``chosen_lr.json`` only.

    The final runs read this file alone, and its rule reads only the scores, so that a change to the
    table or figure code never rewrites it (a rewrite would retrain every tuned final run).

    Raises:
        spielbench.tuning.TuningError: a target whose every grid point diverged (nothing is written).
    """
    from spielbench.tuning import choose_all

    return _write_chosen_json(choose_all(scores), out_dir)


def _write_chosen_json(chosen: dict, out_dir: str | Path) -> Path:
    path = Path(out_dir) / TUNING_FILES[0]
    write_text_atomic(path, json.dumps(chosen, indent=2) + "\n")
    return path


def write_grid_report(chosen: dict, out_dir: str | Path) -> list[Path]:
    """Write ``lr_grid.{md,csv,png}`` from a ``chosen_lr.json`` mapping (every grid point is in it)."""
    out = Path(out_dir)
    paths = [out / name for name in TUNING_FILES[1:]]
    write_text_atomic(paths[0], grid_markdown(chosen))
    write_text_atomic(paths[1], grid_csv(chosen))
    plot_grid(chosen, paths[2])
    return paths


def write_tuning_results(scores: list[dict], out_dir: str | Path) -> list[Path]:
    """Every file of :data:`TUNING_FILES`: the choice (:func:`write_chosen`) and its table and figure
    (:func:`write_grid_report`), from one selection.

    Raises:
        spielbench.tuning.TuningError: a target whose every grid point diverged (nothing is written).
    """
    from spielbench.tuning import choose_all

    chosen = choose_all(scores)  # raises before anything is written
    report = write_grid_report(chosen, out_dir)
    return [_write_chosen_json(chosen, out_dir), *report]

"""Learning-rate selection: the same procedure and budget for every method (docs/METHOD.md §8).

For every tuned target (a method at a rank, e.g. ``lora-r16``; ``full`` without a rank) the config
gives a grid of learning rates (``tuning.grids``: method -> list, the same number of points for every
method) and one budget (``tuning.max_steps`` steps per point, the final run's other settings). Each
grid point is a short training run scored on the mixture's *validation* split (disjoint from the
training data and from the held-out split of the final verdicts): the held-out loss the training
harness measures after training, on ``tuning.validation_examples`` validation examples. The chosen
learning rate of a target is the grid point with the lowest validation loss
(:func:`select_learning_rate`); a point that diverged (non-finite training loss) or failed scores
+inf and is never chosen; a choice at either end of the grid is flagged. The final runs of a target
that give no explicit learning rate train at the chosen value (:func:`apply_chosen`), read from
``results/tuning/chosen_lr.json`` by the run-config rule.

Files:
    ``<runs_dir>/tune/<point id>/score.json`` (:func:`train_point`)::

        {"format": "spielbench-tune-point/1", "point": id, "target": "lora-r16", "method", "rank",
         "learning_rate", "status": "ok" | "diverged", "validation_loss": float | null (nats/token),
         "validation_examples": int | null, "steps": int | null, "wall_time_s": float, "detail": str}

    ``results/tuning/chosen_lr.json`` (:func:`choose_all`)::

        {"format": "spielbench-chosen-lr/1", "targets": {target: {"method", "rank", "learning_rate",
         "at_edge": null | "low" | "high", "validation_loss", "grid": [{"learning_rate",
         "validation_loss", "status"}]}}}

Command line (the tune rules): ``python -m spielbench.tuning point RUN_YAML --output-dir DIR --score
FILE`` trains one grid point in this process and writes its score; ``python -m spielbench.tuning
select SCORE... --out-dir DIR`` writes ``chosen_lr.json``; ``python -m spielbench.tuning report
CHOSEN_JSON --out-dir DIR`` the table and the figure from it (:mod:`spielbench.aggregate.tuning`).
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from spielbench.errors import InputError, exit_status

POINT_FORMAT = "spielbench-tune-point/1"
CHOSEN_FORMAT = "spielbench-chosen-lr/1"
#: Keys of a run entry that tuning replaces in a grid point's run config.
_POINT_OVERRIDES = ("learning_rate", "max_steps", "heldout_data", "heldout_examples", "heldout_before", "save_steps",
                    "run_id")


class TuningError(ValueError):
    """A tuning config or result that cannot work; the message names the config key or the target."""


def target_of(method: str, rank: int | None) -> str:
    """The tuned target's name: ``<method>-r<rank>``, or ``<method>`` for methods without a rank."""
    return method if rank is None else f"{method}-r{rank}"


def _lr_tag(lr: float) -> str:
    return f"{lr:.6g}"


def check_grids(grids: dict[str, list[float]]) -> int:
    """Check that every method's grid has the same number of distinct, positive, increasing points.

    Returns:
        The number of points per grid.

    Raises:
        TuningError: naming ``tuning.grids.<method>``.
    """
    sizes = {}
    for method, grid in grids.items():
        key = f"tuning.grids.{method}"
        if not isinstance(grid, list) or len(grid) < 3:
            raise TuningError(f"{key}: expected a list of at least 3 learning rates (so that an edge can be told "
                              f"from an interior minimum), got {grid!r}")
        if any(not isinstance(x, (int, float)) or isinstance(x, bool) or not x > 0 for x in grid):
            raise TuningError(f"{key}: every learning rate must be a positive number, got {grid!r}")
        if list(grid) != sorted(set(grid)):
            raise TuningError(f"{key}: the learning rates must be distinct and increasing, got {grid!r}")
        sizes[method] = len(grid)
    if len(set(sizes.values())) > 1:
        raise TuningError(f"tuning.grids: every method gets the same number of grid points (the same tuning budget); "
                          f"got {sizes}")
    return next(iter(sizes.values()), 0)


def tuned_targets(runs: dict[str, dict], grids: dict[str, list[float]]) -> dict[str, dict]:
    """The targets to tune: every run whose resolved config has no ``learning_rate`` (neither its entry
    nor ``training`` gives one) and whose method has a grid.

    Args:
        runs: run id -> resolved run config, in config order (runs without ``learning_rate`` are tuned).
        grids: ``tuning.grids``.

    Returns:
        target -> the resolved config of its first run (the template of its grid points), in run order.

    Raises:
        TuningError: a run without a learning rate whose method has no grid.
    """
    out: dict[str, dict] = {}
    for rid, run in runs.items():
        if run.get("learning_rate") is not None:
            continue
        if run["method"] not in grids:
            raise TuningError(f"runs: {rid!r} has no learning_rate (neither in its entry nor in training) and "
                              f"tuning.grids has no grid for method {run['method']!r}")
        out.setdefault(target_of(run["method"], run.get("rank")), run)
    return out


def grid_points(targets: dict[str, dict], grids: dict[str, list[float]], *, max_steps: int,
                validation_file: str, validation_examples: int | None) -> dict[str, dict]:
    """The run config of every grid point: the target's run with the tuning budget and one learning rate.

    Each point trains ``max_steps`` steps (the SpIEL schedule as configured for the final run), at its
    learning rate, with the target's seed, and measures its held-out loss on ``validation_file``
    (the first ``validation_examples`` examples). Point ids: ``<target>-lr<learning rate>``.
    """
    points: dict[str, dict] = {}
    for target, run in targets.items():
        for lr in grids[run["method"]]:
            pid = f"{target}-lr{_lr_tag(lr)}"
            cfg = copy.deepcopy(run)
            cfg.update(learning_rate=float(lr), max_steps=int(max_steps), heldout_data=validation_file,
                       heldout_examples=validation_examples, heldout_before=False,
                       save_steps=max(int(max_steps), 1), run_id=pid)
            cfg["_tune"] = {"target": target, "learning_rate": float(lr)}
            points[pid] = cfg
    return points


@dataclass(frozen=True)
class Selection:
    """The chosen learning rate of one target.

    Attributes:
        learning_rate: the grid point with the lowest validation loss.
        validation_loss: its validation loss [nats/token].
        at_edge: "low" / "high" when the choice is the smallest / largest grid point, else None.
    """

    learning_rate: float
    validation_loss: float
    at_edge: str | None


def select_learning_rate(points: Iterable[tuple[float, float | None]], target: str = "") -> Selection:
    """Choose among ``(learning_rate, validation_loss)`` grid points (None or non-finite: diverged/failed).

    The lowest finite validation loss wins (ties: the smaller learning rate). The choice is flagged
    at the edge when it is the smallest or largest learning rate of the grid.

    Raises:
        TuningError: no point, or no point with a finite validation loss (names ``target``).
    """
    pts = sorted((float(lr), loss) for lr, loss in points)
    if not pts:
        raise TuningError(f"{target}: no grid point")
    finite = [(loss, lr) for lr, loss in pts if loss is not None and math.isfinite(loss)]
    if not finite:
        raise TuningError(f"{target}: every grid point diverged or failed ({[lr for lr, _ in pts]}); "
                          "lower the learning rates of its grid")
    loss, lr = min(finite)
    edge = "low" if lr == pts[0][0] else "high" if lr == pts[-1][0] else None
    return Selection(lr, loss, edge)


def choose_all(scores: list[dict]) -> dict[str, Any]:
    """``chosen_lr.json``'s content from every grid point's score (module docstring)."""
    by_target: dict[str, list[dict]] = {}
    for s in scores:
        by_target.setdefault(s["target"], []).append(s)
    out = {}
    for target, pts in by_target.items():
        pts = sorted(pts, key=lambda s: s["learning_rate"])
        sel = select_learning_rate([(s["learning_rate"], s["validation_loss"]) for s in pts], target)
        out[target] = {"method": pts[0]["method"], "rank": pts[0]["rank"], "learning_rate": sel.learning_rate,
                       "at_edge": sel.at_edge, "validation_loss": sel.validation_loss,
                       "grid": [{"learning_rate": s["learning_rate"], "validation_loss": s["validation_loss"],
                                 "status": s["status"]} for s in pts]}
    return {"format": CHOSEN_FORMAT, "targets": out}


def apply_chosen(run: dict, chosen: dict[str, Any], tuned: bool) -> dict:
    """The final run's config with its target's chosen learning rate (unchanged when ``tuned`` is False).

    Raises:
        TuningError: a tuned run whose target is not in ``chosen`` (``chosen_lr.json`` is stale).
    """
    if not tuned:
        return run
    target = target_of(run["method"], run.get("rank"))
    try:
        lr = chosen["targets"][target]["learning_rate"]
    except KeyError:
        raise TuningError(f"chosen_lr.json has no learning rate for {target!r}; rerun the tune stage") from None
    return {**run, "learning_rate": float(lr)}


def train_point(run_yaml: str | Path, output_dir: str | Path, score_path: str | Path) -> dict:
    """Train one grid point in this process and write its score (module docstring) atomically.

    A non-finite training loss is recorded as ``status: "diverged"`` (not an error: the point is
    then never chosen); bad input raises :class:`InputError` and writes nothing.
    """
    import yaml

    from spielbench.fsio import write_text_atomic
    from spielbench.runconfig import RunConfig
    from spielbench.train import NonFiniteLossError, prepare_run, run_training

    raw = yaml.safe_load(Path(run_yaml).read_text(encoding="utf-8")) or {}
    tune = raw.pop("_tune", None)
    if not isinstance(tune, dict):
        raise InputError(f"{run_yaml}: not a tuning grid point (no _tune entry)")
    cfg = RunConfig.from_mapping(raw, source=str(run_yaml))
    prep = prepare_run(cfg, output_dir, restart_if_changed=True)
    t0 = time.perf_counter()
    score = {"format": POINT_FORMAT, "point": cfg.run_id, "target": tune["target"], "method": cfg.method,
             "rank": cfg.rank, "learning_rate": float(tune["learning_rate"])}
    try:
        metrics = run_training(prep, progress=False)
    except NonFiniteLossError as exc:
        score.update(status="diverged", validation_loss=None, validation_examples=None, steps=None, detail=str(exc))
    else:
        loss = metrics.get("heldout_loss")
        ok = isinstance(loss, (int, float)) and math.isfinite(loss)
        score.update(status="ok" if ok else "diverged", validation_loss=float(loss) if ok else None,
                     validation_examples=len(prep.heldout_dataset) if prep.heldout_dataset is not None else None,
                     steps=metrics.get("steps"), detail="" if ok else "non-finite validation loss")
    score["wall_time_s"] = round(time.perf_counter() - t0, 3)
    write_text_atomic(Path(score_path), json.dumps(score, indent=2) + "\n")
    return score


def read_scores(paths: Iterable[str | Path]) -> list[dict]:
    """Read grid-point score files. Raises InputError naming a file that is missing or not a score."""
    out = []
    for p in paths:
        try:
            s = json.loads(Path(p).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{p}: cannot read a tuning score ({exc})") from None
        if not isinstance(s, dict) or s.get("format") != POINT_FORMAT:
            raise InputError(f"{p}: not a tuning score (format {POINT_FORMAT!r} expected)")
        out.append(s)
    return out


def read_chosen(path: str | Path) -> dict:
    """Read ``chosen_lr.json``. Raises InputError naming the file when it is missing or not one."""
    try:
        chosen = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read the chosen learning rates ({exc})") from None
    if not isinstance(chosen, dict) or not isinstance(chosen.get("targets"), dict):
        raise InputError(f"{path}: not a chosen_lr.json (no 'targets' mapping)")
    return chosen


def main(argv: list[str] | None = None) -> int:
    """Command line (module docstring). Exit status 0 ok, 2 bad input or no usable grid point."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m spielbench.tuning", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("point", help="train one grid point and write its validation score")
    p.add_argument("run_yaml")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--score", required=True)
    s = sub.add_parser("select", help="choose the learning rates from the grid points' scores; write chosen_lr.json")
    s.add_argument("scores", nargs="+")
    s.add_argument("--out-dir", required=True)
    r = sub.add_parser("report", help="write the table and the figure of every grid point from chosen_lr.json")
    r.add_argument("chosen")
    r.add_argument("--out-dir", required=True)
    args = ap.parse_args(argv)
    return exit_status(lambda: _run(args))


def _run(args) -> int:
    """The body of :func:`main` for parsed ``args``; a TuningError becomes an InputError (exit status 2)."""
    try:
        if args.cmd == "point":
            score = train_point(args.run_yaml, args.output_dir, args.score)
            print(f"{score['point']}: {score['status']}, validation loss {score['validation_loss']}")
        elif args.cmd == "select":
            from spielbench.aggregate.tuning import write_chosen

            print(write_chosen(read_scores(args.scores), args.out_dir))
        else:
            from spielbench.aggregate.tuning import write_grid_report

            for path in write_grid_report(read_chosen(args.chosen), args.out_dir):
                print(path)
    except TuningError as exc:
        raise InputError(str(exc)) from None
    return 0


if __name__ == "__main__":
    # run as the imported module, not as __main__: spielbench.aggregate.tuning raises the TuningError of
    # spielbench.tuning, which a second copy of this module (__main__) would not catch
    from spielbench import tuning

    raise SystemExit(tuning.main())

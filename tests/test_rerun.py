"""Reruns cost only what changed: rerun triggers, user splits keyed by the data file, logs under logs_dir,
and results/runs/ tracked by git."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from spielbench.pipeline import resolve_pipeline, user_split_key
from spielbench.tuning import POINT_FORMAT, grid_points

REPO = Path(__file__).resolve().parents[1]
SMOKE = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())


def _snakemake(cwd: Path, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _workflow_copy(tmp_path: Path) -> Path:
    """A copy of the workflow (Snakefile, rules, scripts, profiles, config) sharing this checkout's resources."""
    root = tmp_path / "wf"
    root.mkdir()
    for name in ("Snakefile", "workflow", "profiles", "config", "scripts"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / name)
    (root / "resources").symlink_to((REPO / "resources").resolve())
    return root


def _alpaca(path: Path, n: int, tag: str) -> Path:
    path.write_text(json.dumps([{"instruction": f"{tag} question {i}", "input": "", "output": f"answer {i}"}
                                for i in range(n)]))
    return path


def test_a_code_edit_reruns_nothing_and_a_changed_parameter_reruns_only_its_run(tmp_path):
    root = _workflow_copy(tmp_path)
    cfg = dict(SMOKE, runs_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "results"),
               logs_dir=str(tmp_path / "logs"))
    # every run with its own learning rate: no tune stage in front of the run configs here
    cfg["runs"] = [dict(r, learning_rate=r.get("learning_rate", 1.0e-3)) for r in cfg["runs"]]
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    targets = [str(tmp_path / "runs" / rid / "run.yaml") for rid in ("lora-r2", "spiel-ag-r2")]
    first = _snakemake(root, "--cores", "1", *targets, "--configfile", str(cfg_path))
    assert first.returncode == 0, first.stderr[-3000:]

    # edit the code of the rule that wrote them (its `run:` block)
    rules = root / "workflow" / "rules" / "train.smk"
    text = rules.read_text()
    assert "write_yaml_atomic(output[0], params.run)" in text
    rules.write_text(text.replace("write_yaml_atomic(output[0], params.run)",
                                  "write_yaml_atomic(output[0], dict(params.run))"))
    again = _snakemake(root, "-n", *targets, "--configfile", str(cfg_path))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout[-3000:]

    # a changed parameter of one run reruns that run's config only
    cfg["runs"] = [dict(r, learning_rate=2.0e-3) if r["method"] == "lora" else r for r in cfg["runs"]]
    cfg_path.write_text(yaml.safe_dump(cfg))
    changed = _snakemake(root, "-n", *targets, "--configfile", str(cfg_path))
    out = changed.stdout
    assert "wildcards: run=lora-r2" in out and "wildcards: run=spiel-ag-r2" not in out, out[-3000:]


def test_user_splits_are_keyed_by_the_data_file(tmp_path):
    a, b = _alpaca(tmp_path / "a.json", 20, "a"), _alpaca(tmp_path / "b.json", 20, "b")

    def files(path):
        pipe = resolve_pipeline(dict(SMOKE, data={"name": "user", "train": str(path)}))
        return pipe.train_file, pipe.heldout_file

    train_a, heldout_a = files(a)
    train_b, _ = files(b)
    assert train_a != train_b and Path(train_a).parent != Path(train_b).parent
    assert Path(train_a).parent.name == user_split_key(str(a)) and len(user_split_key(str(a))) == 16
    assert Path(heldout_a).parent == Path(train_a).parent
    assert files(a) == (train_a, heldout_a)                       # stable
    _alpaca(a, 21, "a")                                           # new content: a new split
    assert files(a)[0] != train_a


def test_asset_logs_go_under_logs_dir(tmp_path):
    cfg = dict(SMOKE, logs_dir=str(tmp_path / "my logs"))
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    res = _snakemake(REPO, "-n", "--forcerun", "assets_mixture", "assets_eval_data", "--configfile", str(cfg_path))
    assert res.returncode == 0, res.stderr[-3000:]
    logs = [line.split("log:", 1)[1].strip() for line in res.stdout.splitlines() if line.strip().startswith("log:")]
    assert any("mixture.log" in line for line in logs) and any("eval_data.log" in line for line in logs), logs
    for line in logs:
        for path in line.split(", "):
            assert path.split(" (")[0].startswith(str(tmp_path / "my logs")), line


def test_results_runs_are_not_ignored_by_git():
    for path in ("results/runs/index.json", "results/runs/lora-r8/metrics.json", "results/runs/base/eval.json"):
        res = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO)
        assert res.returncode == 1, f"{path} is ignored by .gitignore"
    assert subprocess.run(["git", "check-ignore", "-q", "runs/lora-r8/metrics.json"], cwd=REPO).returncode == 0


def test_the_tuning_table_reruns_without_retraining_and_a_new_choice_retrains(tmp_path):
    """chosen_lr.json hangs on the grid points' scores only: redoing the table/figure (as a code change of
    spielbench/aggregate/tuning.py does) touches no final run; redoing the choice reruns the tuned runs."""
    root = _workflow_copy(tmp_path)
    runs, results = tmp_path / "runs", tmp_path / "results"
    cfg = dict(SMOKE, runs_dir=str(runs), results_dir=str(results), logs_dir=str(tmp_path / "logs"))
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    pipe = resolve_pipeline(cfg)
    tuned = sorted(pipe.tuned)
    assert tuned, "config/smoke.yaml tunes one target"
    # stand-in grid points: their configs and scores, instead of training them
    pids = grid_points(pipe.tune_targets, SMOKE["tuning"]["grids"], max_steps=2, validation_file="v",
                       validation_examples=None)
    lrs = sorted(p["_tune"]["learning_rate"] for p in pids.values())
    for pid, point in pids.items():
        (runs / "tune" / pid).mkdir(parents=True)
        (runs / "tune" / pid / "run.yaml").write_text(yaml.safe_dump(point))
        lr = point["_tune"]["learning_rate"]
        (runs / "tune" / pid / "score.json").write_text(json.dumps({
            "format": POINT_FORMAT, "point": pid, "target": point["_tune"]["target"], "method": "lora", "rank": 2,
            "learning_rate": lr, "status": "ok", "validation_loss": 2.0 + abs(lrs.index(lr) - 1),
            "validation_examples": 4, "steps": 2, "wall_time_s": 1.0, "detail": ""}))
    run_yamls = [str(runs / rid / "run.yaml") for rid in tuned]
    grid_md = str(results / "tuning" / "lr_grid.md")
    second = _snakemake(root, "--cores", "1", *run_yamls, grid_md, "--configfile", str(cfg_path))
    assert second.returncode == 0, second.stderr[-3000:]
    chosen = json.loads((results / "tuning" / "chosen_lr.json").read_text())
    middle = lrs[1]
    assert yaml.safe_load(Path(run_yamls[0]).read_text())["learning_rate"] == middle
    assert [t["learning_rate"] for t in chosen["targets"].values()] == [middle]

    report = _snakemake(root, "-n", *run_yamls, grid_md, "--configfile", str(cfg_path), "--forcerun", "tune_report")
    assert report.returncode == 0, report.stderr[-3000:]
    assert "rule tune_report:" in report.stdout and "rule run_config:" not in report.stdout, report.stdout[-3000:]
    choice = _snakemake(root, "-n", *run_yamls, "--configfile", str(cfg_path), "--forcerun", "tune_select")
    assert choice.returncode == 0, choice.stderr[-3000:]
    assert "rule run_config:" in choice.stdout, choice.stdout[-3000:]

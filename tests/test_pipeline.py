"""The Snakemake workflow: config validation at start, the dry run, and the smoke pipeline end to end."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def _snakemake(*args, timeout=900):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run(SNAKEMAKE + list(args), cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def _write_config(tmp_path, mutate):
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    mutate(cfg)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c: c["runs"][0].update(method="lorra"), "lorra"),
        (lambda c: c["runs"][0].update(rnak=3), "rnak"),
        (lambda c: c["training"].update(max_steps=0), "max_steps"),
        (lambda c: c["training"]["spiel"].update(initial_reselection_rate=1.5), "initial_reselection_rate"),
        (lambda c: c["data"].update(train="/nonexistent/alpaca.json"), "data.train"),
        (lambda c: c["model"].update(source="/nonexistent/model"), "model.source"),
        (lambda c: c["runs"].append(dict(c["runs"][0])), "second run"),
        (lambda c: c["runs"][0].pop("rank"), "needs a rank"),
    ],
    ids=["unknown-method", "unknown-key", "bad-steps", "bad-rate", "missing-data", "missing-model", "dup-run", "no-rank"],
)
def test_config_error_stops_at_start(tmp_path, mutate, expected):
    cfg = _write_config(tmp_path, mutate)
    res = _snakemake("-n", "--configfile", str(cfg), timeout=120)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert expected in out, out[-2000:]


def test_unrecognised_data_format_is_named(tmp_path):
    bad = tmp_path / "data.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n')
    cfg = _write_config(tmp_path, lambda c: c["data"].update(train=str(bad)))
    res = _snakemake("-n", "--configfile", str(cfg), timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "data.train" in out and "data.jsonl" in out, out[-2000:]


def test_dry_run_lists_every_stage():
    res = _snakemake("-n", timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    for rule in ("train", "evaluate"):
        assert rule in res.stdout


@pytest.mark.slow
def test_smoke_pipeline_end_to_end():
    """`snakemake --configfile config/smoke.yaml` runs every stage; rerunning does nothing; deleting one
    run's outputs reruns only that run and what depends on it."""
    smoke = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    runs_dir, results_dir = REPO / smoke["runs_dir"], REPO / smoke["results_dir"]
    for d in (runs_dir, results_dir):
        shutil.rmtree(d, ignore_errors=True)
    res = _snakemake("--cores", "2", "--configfile", "config/smoke.yaml", timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]

    import pandas as pd

    from spielbench.pipeline import run_id_for

    run_ids = [run_id_for(r) for r in smoke["runs"]]
    main = pd.read_csv(results_dir / "tables" / "main.csv")
    assert len(main) == len(run_ids) + 1  # one row per configured run, plus the base model
    assert (results_dir / "tables" / "main.md").read_text().count("\n") >= len(run_ids) + 2
    assert (results_dir / "claims.md").stat().st_size > 0
    for rid in run_ids:
        metrics = json.loads((runs_dir / rid / "metrics.json").read_text())
        assert metrics["steps"] == smoke["training"]["max_steps"]

    again = _snakemake("-n", "--configfile", "config/smoke.yaml", timeout=120)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr

    (runs_dir / run_ids[0] / "metrics.json").unlink()
    partial = _snakemake("-n", "--configfile", "config/smoke.yaml", timeout=120)
    out = partial.stdout
    assert f"runs-smoke/{run_ids[0]}/metrics.json" in out
    for rid in run_ids[1:]:
        assert f"wildcards: run={rid}\n" not in out

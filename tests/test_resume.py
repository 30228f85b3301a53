"""Stale Snakemake locks (scripts/stale_lock.py, run.sh) and a kill -9 mid-training that `./run.sh` resumes."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import stale_lock  # noqa: E402


def _fake_lock(workdir: Path) -> Path:
    lock = workdir / ".snakemake" / "locks" / "0.output.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(str(workdir / "runs" / "x" / "metrics.json") + "\n")
    return lock


def test_a_stale_lock_is_cleared_when_no_pipeline_process_uses_the_folder(tmp_path):
    lock = _fake_lock(tmp_path)
    message = stale_lock.clear(tmp_path, record_owner=4321)
    assert "cleared" in message and not lock.exists()
    host, pid = (tmp_path / ".snakemake" / stale_lock.OWNER_FILE).read_text().split()
    assert pid == "4321"
    assert stale_lock.clear(tmp_path) == "no lock"


def test_a_lock_is_kept_while_a_snakemake_process_works_in_the_folder(tmp_path):
    lock = _fake_lock(tmp_path)
    # a live process whose command line names snakemake, with this folder as working directory
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "/x/.venv/bin/snakemake"],
                              cwd=tmp_path)
    other = tmp_path.parent / f"{tmp_path.name}-other"
    other.mkdir()
    try:
        time.sleep(0.2)
        message = stale_lock.clear(tmp_path)
        assert message.startswith("lock kept") and str(holder.pid) in message and lock.exists()
        # the same process does not hold a lock of another folder
        other_lock = _fake_lock(other)
        assert "cleared" in stale_lock.clear(other) and not other_lock.exists()
    finally:
        holder.kill()
        holder.wait()
    assert "cleared" in stale_lock.clear(tmp_path) and not lock.exists()


def test_a_lock_is_kept_when_the_last_run_started_on_another_host(tmp_path):
    lock = _fake_lock(tmp_path)
    owner = tmp_path / ".snakemake" / stale_lock.OWNER_FILE
    owner.write_text("some-other-node 77\n")
    assert "some-other-node" in stale_lock.clear(tmp_path, record_owner=5) and lock.exists()
    # the other host stays on record after this host's start, so the next start here still keeps the lock
    assert owner.read_text().splitlines()[0] == "some-other-node 77" and len(owner.read_text().splitlines()) == 2
    assert "some-other-node" in stale_lock.clear(tmp_path) and lock.exists()
    lock.unlink()                                   # e.g. `snakemake --unlock`: the record starts afresh
    stale_lock.clear(tmp_path, record_owner=6)
    assert owner.read_text().split()[1] == "6" and len(owner.read_text().splitlines()) == 1


@pytest.mark.parametrize("argv, expected", [
    (["/venv/bin/python", "/venv/bin/snakemake", "--cores", "2"], True),
    (["python", "-m", "snakemake"], True),
    (["python", ".snakemake/scripts/tmpab.assets_fetch.py"], True),
    (["python", "-m", "spielbench.train", "runs/x/run.yaml"], True),
    (["bash"], False),
    (["python", "-m", "pytest", "tests/test_resume.py"], False),
])
def test_pipeline_processes_are_recognised(argv, expected):
    assert stale_lock.is_pipeline_command(argv) is expected


def _numbers(obj, prefix=""):
    """Every number of a JSON document, by its path; timings, sizes, paths and versions are left out."""
    skip = ("time", "_s", "seconds", "memory", "bytes", "per_s", "git", "packages", "device", "tokens_per")
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not any(s in k for s in skip):
                out.update(_numbers(v, f"{prefix}/{k}"))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(_numbers(v, f"{prefix}/{i}"))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix] = float(obj)
    return out


@pytest.mark.slow
def test_kill_9_mid_training_then_run_sh_resumes_with_the_outputs_of_an_uninterrupted_run(tmp_path):
    """Two SpIEL/LoRA smoke runs: uninterrupted, and killed (kill -9 of the whole process group) once the
    first checkpoint exists; `./run.sh` again finishes (the stale lock is cleared) with equal numbers."""
    smoke = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    smoke["runs"] = [r for r in smoke["runs"] if r["method"] in ("spiel-ag", "lora")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))

    def setup(name):
        cfg = dict(smoke, runs_dir=str(tmp_path / name / "runs"), results_dir=str(tmp_path / name / "results"),
                   logs_dir=str(tmp_path / name / "logs"))
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        runs = tmp_path / name / "runs"
        targets = [str(runs / rid / "eval.json") for rid in ("spiel-ag-r2", "lora-r2")]
        return ["bash", str(REPO / "run.sh"), "--cores", "2", *targets, "--configfile", str(path)], runs

    ref_cmd, ref_runs = setup("reference")
    ref = subprocess.run(ref_cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert ref.returncode == 0, (ref.stdout + ref.stderr)[-3000:]

    cmd, runs = setup("killed")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 600
    checkpoint = runs / "spiel-ag-r2" / "checkpoints" / "checkpoint-2"
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the pipeline ended before the first checkpoint: nothing was interrupted"
    assert not (runs / "spiel-ag-r2" / "metrics.json").exists()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list((REPO / ".snakemake" / "locks").glob("*.lock")), "kill -9 should leave Snakemake's lock behind"

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "cleared a stale lock" in again.stderr
    for rid in ("spiel-ag-r2", "lora-r2"):
        for name in ("metrics.json", "eval.json"):
            want = _numbers(json.loads((ref_runs / rid / name).read_text()))
            got = _numbers(json.loads((runs / rid / name).read_text()))
            assert got.keys() == want.keys(), (rid, name, set(got) ^ set(want))
            bad = {k: (got[k], want[k]) for k in want if not math.isclose(got[k], want[k], rel_tol=1e-5, abs_tol=1e-7)}
            assert not bad, (rid, name, bad)

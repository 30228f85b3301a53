"""Aggregation stage: tables, claims with verdicts, figures and the figures notebook, on synthetic run files.

The synthetic metrics.json files follow what ``spielbench.train.run_training`` writes, the eval.json files
what ``spielbench.evaluate`` writes; ``check_real_runs`` at the end re-reads real files when a pipeline
run has left them in ``runs/``.
"""
from __future__ import annotations

import csv
import json
import math
import random
import statistics
import zlib
from pathlib import Path

import pytest

from spielbench import aggregate as agg
from spielbench.errors import InputError

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------ fixtures

PER_RANK = 10_000          # trainable parameters per LoRA rank of the fake model
TOTAL = 1_000_000          # parameters of the fake model
STATE_PER_PARAM = {"lora": 16, "qlora": 16, "spiel-ag": 24, "qspiel-ag": 24, "spiel-ma": 12, "qspiel-ma": 12,
                   "spiel-static": 16, "shira": 16, "ia3": 16, "full": 16}


def fake_metrics(run_id: str, method: str, rank: int | None, *, steps: int = 40, step_time: float = 1.0,
                 peak_rss: int = 3 * 2**30, heldout: float = 2.5, seed: int = 42, reselections: int = 0,
                 gradient_checkpointing: bool = False) -> dict:
    """A metrics.json object shaped like ``spielbench.train.run_training``'s."""
    if method == "full":
        n = TOTAL
    elif method == "ia3":
        n = 500
    else:
        n = rank * PER_RANK
    opt = (STATE_PER_PARAM[method] - 8) * n
    history = [{"step": 2 + 8 * i, "rate": 1.0 if i == 0 else 0.2 * (1 - (2 + 8 * i) / steps),
                "num_requested": n, "num_replaced": n if i == 0 else int(n * 0.2 * (1 - (2 + 8 * i) / steps)),
                "replaced": {"model.layers.0.self_attn.q_proj": 1}, "num_active": n,
                "overlap_initial": 0.0 if i == 0 else 0.1 * i} for i in range(reselections) if 2 + 8 * i < steps]
    return {
        "run_id": run_id, "method": method, "family": method, "quantized": method.startswith("q"),
        "model": "resources/models/fake",
        "budget": {"rank": rank, "density": n / TOTAL, "trainable_params": n, "total_params": TOTAL,
                   "requested_density": None, "expected_trainable_params": n},
        "training": {"max_steps": steps, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                     "effective_batch_size": 8, "learning_rate": 1e-3, "weight_decay": 0.0, "warmup_ratio": 0.05,
                     "seed": seed, "gradient_checkpointing": gradient_checkpointing, "max_seq_length": 160,
                     "resumed_from_step": None},
        "steps": steps, "tokens_seen": steps * 1000, "label_tokens_seen": steps * 300,
        "train_time_s": steps * step_time,
        "step_time_mean_s": step_time, "step_time_p50_s": step_time * 0.98, "tokens_per_s": 1000 / step_time,
        "wall_time_s": steps * step_time + 5, "model_load_s": 1.0, "prepare_s": 0.5,
        "memory": {"peak_rss_bytes": peak_rss, "peak_rss_scope": "since_reset", "trainable_param_bytes": 4 * n,
                   "gradient_bytes": 4 * n, "optimizer_state_bytes": opt, "trainable_state_bytes": 8 * n + opt},
        "adapter_bytes": 8 * n,
        "loss_curve": [{"step": s, "loss": 3.0 - 0.01 * s} for s in range(1, steps + 1)],
        "heldout_loss_before": 3.0, "heldout_loss": heldout, "heldout_tokens": 3000,
        "selector_history": history or None,
        "packages": {"torch": "2.13.0"}, "git": {"commit": None, "dirty": None},
        "device": {"device": "cpu", "name": "x86_64", "torch_threads": 2},
    }


def fake_heldout(loss: float, stderr: float | None, n: int = 96, seed: int = 0) -> dict:
    """The ``heldout`` entry of eval.json; with ``stderr``, per-example lists whose ratio s.e. is about it."""
    out = {"loss": loss, "n_examples": n, "n_tokens": 30 * n, "file": "resources/data/mixture/heldout.jsonl",
           "max_seq_length": 160}
    if stderr is not None:
        # pairs of examples at mean ± dev, in a seeded random order: the ratio-estimator s.e. equals
        # `stderr` and two runs with different seeds are uncorrelated item by item
        rng = random.Random(seed)
        dev = stderr * 30 * n / math.sqrt(n * n / (n - 1))
        nll = []
        for _ in range(n // 2):
            sign = rng.choice((1, -1))
            nll += [loss * 30 + sign * dev, loss * 30 - sign * dev]
        out["example_nll"] = nll
        out["example_tokens"] = [30] * n
    return out


def fake_eval(target: str, scores: dict[str, tuple[float, float]], heldout: tuple[float, float] | None,
              n: int = 300, skipped: dict[str, str] | None = None) -> dict:
    """An eval.json object as ``spielbench.evaluate`` writes it (format spielbench-eval/1)."""
    tasks = {t: {"lm_eval_task": f"spiel_{t}", "metric": "acc", "value": v, "stderr": s, "n": n, "n_available": n,
                 "shots": 0, "metrics": {"acc": {"value": v, "stderr": s}}}
             for t, (v, s) in scores.items()}
    for t, why in (skipped or {}).items():
        tasks[t] = {"skipped": True, "note": why}
    return {"format": "spielbench-eval/1", "run_id": target, "method": None if target == "base" else "x",
            "base_model": "resources/models/fake", "prompt_format": "plain", "seed": 1234, "limit": n,
            "lm_eval_version": "0.4.13", "tasks": tasks, "notes": [],
            "heldout": None if heldout is None else fake_heldout(*heldout, seed=zlib.crc32(target.encode())),
            "seconds": {"load": 1.0, "evaluate": 2.0, "heldout": 0.5}}


def write_run(runs_dir: Path, target: str, metrics: dict | None, evaluation: dict) -> None:
    d = runs_dir / target
    d.mkdir(parents=True, exist_ok=True)
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
    (d / "eval.json").write_text(json.dumps(evaluation))


def run_cfg(method: str, rank: int | None = None, **kw) -> dict:
    """A resolved run config like ``spielbench.pipeline.resolve_pipeline`` returns (paths included)."""
    cfg = {"max_steps": 40, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
           "max_seq_length": 160, "warmup_ratio": 0.05, "weight_decay": 0.0, "seed": 42,
           "gradient_checkpointing": False, "save_steps": 10, "heldout_examples": 96,
           "method": method, "learning_rate": 1e-3, "spiel": {"reselection_steps": 8}}
    if rank is not None:
        cfg["rank"] = rank
    cfg.update(kw)
    rid = cfg.pop("id", None) or (method + (f"-r{rank}" if rank is not None else "")
                                  + (f"-s{kw['seed']}" if "seed" in kw else ""))
    cfg.update(run_id=rid, model="resources/models/fake", train_data="/abs/path/train.jsonl",
               heldout_data="resources/data/mixture/heldout.jsonl")
    return cfg


def fake_benchmark(size: str, method: str, model_params: int, step_time: float | None, peak_gib: float | None,
                   trainable: int, status: str = "ok", rank: int | None = 16) -> dict:
    """A benchmark JSON object as ``spielbench.benchmark`` writes it (its stable fields)."""
    ok = status == "ok"
    return {"size": size, "method": method, "status": status, "detail": None if ok else f"{status} (predicted)",
            "oom_kind": None if ok else "predicted", "step_time_mean_s": step_time if ok else None,
            "step_time_p50_s": step_time if ok else None, "tokens_per_s": 256 / step_time if ok else None,
            "peak_memory_bytes": int(peak_gib * 2**30) if ok else None,
            "peak_rss_bytes": int(peak_gib * 2**30) if ok else None, "cuda_max_allocated_bytes": None,
            "cuda_max_reserved_bytes": None, "trainable_params": trainable,
            "adapter_state_bytes": 16 * trainable if ok else None, "n_params_model": model_params, "device": "cpu",
            "batch_size": 2, "seq_len": 128, "steps": 3, "warmup_steps": 1, "rank": rank}


#: (size, model params, method, step time, peak GiB, trainable params) of the fixture's benchmark; "l"/full is OOM.
DEFAULT_BENCH = [(size, p, m, t * k, mem * k, n * k)
                 for size, p, k in (("s", 10**8, 1), ("l", 10**9, 3))
                 for m, t, mem, n in (("floor", 1.0, 2.0, 0), ("lora", 1.2, 2.1, 10**6), ("spiel-ag", 1.3, 2.2, 10**6),
                                      ("spiel-ma", 1.3, 2.15, 10**6), ("full", 2.0, 4.0, 10**8))]


#: (method, rank, accuracy on task_a, held-out loss, step time, peak RSS GiB) of the default fixture.
DEFAULT_RUNS = [
    ("lora", 4, 0.60, 2.60, 1.00, 3.00), ("lora", 16, 0.62, 2.55, 1.05, 3.05),
    ("spiel-ag", 4, 0.61, 2.50, 1.10, 3.02), ("spiel-ag", 16, 0.64, 2.45, 1.15, 3.10),
    ("spiel-ma", 16, 0.63, 2.50, 1.12, 3.04), ("spiel-static", 16, 0.62, 2.52, 1.10, 3.05),
    ("shira", 16, 0.61, 2.53, 1.30, 3.05), ("ia3", None, 0.58, 2.80, 0.95, 2.98), ("full", None, 0.63, 2.48, 1.6, 4.2),
    ("qlora", 16, 0.60, 2.62, 2.5, 1.5), ("qspiel-ag", 16, 0.61, 2.58, 2.6, 1.55),
    ("qspiel-ma", 16, 0.61, 2.60, 2.6, 1.5),
]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A fake finished pipeline: runs/<id>/{metrics,eval}.json for DEFAULT_RUNS + base, and the run table."""
    root = tmp_path_factory.mktemp("pipe")
    runs_dir = root / "runs"
    runs = {}
    skip = {"bbh": "no local BBH folder (evaluation.bbh_path)"}
    write_run(runs_dir, "base", None,
              fake_eval("base", {"task_a": (0.50, 0.029), "task_b": (0.55, 0.03)}, (3.0, 0.05), skipped=skip))
    for method, rank, acc, loss, st, rss in DEFAULT_RUNS:
        cfg = run_cfg(method, rank, **({"max_steps": 20} if method.startswith("q") else {}))
        rid = cfg["run_id"]
        runs[rid] = cfg
        spiel = method in ("spiel-ag", "spiel-ma", "qspiel-ag", "qspiel-ma")
        write_run(runs_dir, rid,
                  fake_metrics(rid, method, rank, steps=cfg["max_steps"], step_time=st, peak_rss=int(rss * 2**30),
                               heldout=loss, reselections=4 if spiel else 0),
                  fake_eval(rid, {"task_a": (acc, 0.028), "task_b": (acc - 0.02, 0.028)}, (loss, 0.01),
                            skipped={"bbh": "no local BBH folder (evaluation.bbh_path)"}))
    return root, runs_dir, runs


@pytest.fixture(scope="module")
def aggregated(pipeline_dir):
    root, runs_dir, runs = pipeline_dir
    results = root / "results"
    bench_dir = root / "benchmark"
    bench_dir.mkdir()
    for size, p, m, t, mem, n in DEFAULT_BENCH:
        status = "oom" if (size, m) == ("l", "full") else "ok"
        rank = 16 if m in ("lora", "spiel-ag", "spiel-ma") else None
        (bench_dir / f"{size}__{m}.json").write_text(json.dumps(fake_benchmark(size, m, p, t, mem, n, status, rank)))
    written = agg.aggregate(runs_dir, runs, results, "FakeLM-1M", "fake-mixture", tasks=["task_a", "task_b", "bbh"],
                            benchmark_files=sorted(bench_dir.glob("*.json")), root=root)
    return results, written, runs


# ------------------------------------------------------------------------------------------ tables


def test_main_table_has_one_row_per_run_plus_base_and_matches_inputs(aggregated, pipeline_dir):
    results, written, runs = aggregated
    with open(results / "tables" / "main.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["run"] for r in rows].count("base") == 1
    assert sorted(r["run"] for r in rows) == sorted(["base", *runs])
    assert rows[0]["run"] == "base" and rows[0]["trainable_params"] == "0"
    by_run = {r["run"]: r for r in rows}
    for method, rank, acc, loss, _, _ in DEFAULT_RUNS:
        rid = method + (f"-r{rank}" if rank else "")
        assert float(by_run[rid]["task_a"]) == pytest.approx(acc)
        assert float(by_run[rid]["task_a_stderr"]) == pytest.approx(0.028)
        assert float(by_run[rid]["heldout_loss"]) == pytest.approx(loss)
        assert int(by_run[rid]["trainable_params"]) == (TOTAL if method == "full" else 500 if method == "ia3"
                                                         else rank * PER_RANK)
    # paper order: base, LoRA, (IA)3, SpIEL-AG, SpIEL-MA, full FT, ablations, then 4-bit
    order = [r["method"] for r in rows]
    assert order == ["base", "lora", "lora", "ia3", "spiel-ag", "spiel-ag", "spiel-ma", "full", "spiel-static",
                     "shira", "qlora", "qspiel-ag", "qspiel-ma"]
    assert [r["rank"] for r in rows[1:3]] == ["4", "16"]


def test_main_markdown_shows_value_pm_stderr_in_percent_and_skip_note(aggregated):
    results, _, _ = aggregated
    md = (results / "tables" / "main.md").read_text()
    assert "## FakeLM-1M · fake-mixture" in md
    line = next(l for l in md.splitlines() if "| spiel-ag-r16 " in l)
    assert "64.0 ± 2.8" in line and "62.0 ± 2.8" in line and "2.450 ± 0.010" in line and "160,000" in line
    base = next(l for l in md.splitlines() if "| base " in l)
    assert "50.0 ± 2.9" in base and "3.000 ± 0.050" in base
    assert "BBH shows — (not evaluated): no local BBH folder (evaluation.bbh_path)" in md
    assert "Runs differ in their number of training steps" in md


def test_latex_table_is_escaped_and_complete(aggregated):
    results, _, runs = aggregated
    tex = (results / "tables" / "main.tex").read_text()
    assert "\\begin{tabular}" in tex and "\\bottomrule" in tex
    assert "64.0 $\\pm$ 2.8" in tex
    assert "task\\_a" in tex  # underscores escaped
    body = [l for l in tex.splitlines() if l.endswith("\\\\") and "multicolumn" not in l]
    assert len(body) == 1 + len(runs) + 1  # header + runs + base


def test_quantized_table_pairs_4bit_runs_with_fp32_at_same_rank(aggregated):
    results, _, _ = aggregated
    with open(results / "tables" / "quantized.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["run"] for r in rows] == ["lora-r16", "spiel-ag-r16", "spiel-ma-r16", "qlora-r16", "qspiel-ag-r16",
                                        "qspiel-ma-r16"]
    assert {r["steps"] for r in rows if r["method"].startswith("q")} == {"20"}
    assert float(rows[3]["peak_memory_bytes"]) == pytest.approx(int(1.5 * 2**30))
    md = (results / "tables" / "quantized.md").read_text()
    assert "differ in their number of training steps" in md


def test_efficiency_table_ratios_to_lora_same_rank(aggregated):
    results, _, runs = aggregated
    with open(results / "tables" / "efficiency.csv", newline="") as fh:
        all_rows = list(csv.DictReader(fh))
    rows = {r["run"]: r for r in all_rows if r["source"] == "run"}
    assert set(rows) == set(runs)
    bench = {(r["model"], r["method"]): r for r in all_rows if r["source"] == "benchmark"}
    assert len(bench) == len(DEFAULT_BENCH)
    assert float(bench[("s", "spiel-ag")]["step_time_vs_lora"]) == pytest.approx(1.3 / 1.2)
    assert float(bench[("l", "spiel-ag")]["peak_memory_vs_floor"]) == pytest.approx(2.2 / 2.0)
    assert bench[("l", "full")]["status"] == "oom" and bench[("l", "full")]["step_time_mean_s"] == ""
    assert float(rows["spiel-ag-r16"]["step_time_vs_lora"]) == pytest.approx(1.15 / 1.05)
    assert float(rows["spiel-ag-r4"]["step_time_vs_lora"]) == pytest.approx(1.10 / 1.00)
    # state bytes: 24 B/param (AG) vs 16 B/param (LoRA)
    assert float(rows["spiel-ag-r16"]["state_bytes_vs_lora"]) == pytest.approx(24 / 16)
    assert float(rows["qspiel-ag-r16"]["step_time_vs_lora"]) == pytest.approx(2.6 / 2.5)  # vs qLoRA
    assert rows["ia3"]["step_time_vs_lora"] == ""  # no rank: no LoRA reference
    md = (results / "tables" / "efficiency.md").read_text()
    assert "## benchmark · l" in md and "| OOM " in md


def test_raw_copies_and_index_have_no_absolute_paths(aggregated):
    results, written, runs = aggregated
    for t in ["base", *runs]:
        assert (results / "runs" / t / "eval.json").is_file()
    assert (results / "runs" / "lora-r16" / "metrics.json").is_file()
    index = json.loads((results / "runs" / "index.json").read_text())
    assert [e["target"] for e in index["targets"]][0] == "base"
    assert (results / "claims.md").stat().st_mode & 0o777 == 0o644  # readable, although written via mkstemp
    text = (results / "runs" / "index.json").read_text()
    assert "/abs/path" not in text and "train_data" not in text
    assert set(agg.output_paths(str(results))) <= {str(p) for p in written}


def test_load_results_dir_roundtrip(aggregated):
    results, _, runs = aggregated
    records, benchmarks = agg.load_results_dir(results)
    assert [r.target for r in records] == ["base", *runs]
    r = next(x for x in records if x.target == "spiel-ag-r16")
    assert r.trainable_params == 160_000 and r.rank == 16 and r.scores["task_a"].value == pytest.approx(0.64)
    assert len(r.reselections) == 4 and r.reselections[0].share_replaced == pytest.approx(1.0)
    assert len(benchmarks) == len(DEFAULT_BENCH)  # copied into results/benchmark/ too
    assert agg.results_tasks(results) == ["task_a", "task_b", "bbh"]


def test_combine_results_of_two_data_sets(aggregated, pipeline_dir, tmp_path):
    results, _, runs = aggregated
    _, runs_dir, _ = pipeline_dir
    other = tmp_path / "other"
    agg.aggregate(runs_dir, runs, other, "FakeLM-1M", "other-data", tasks=["task_a"], root=tmp_path)
    assert agg.main(["--from-results", str(results), str(other), "--out", str(tmp_path / "both")]) == 0
    md = (tmp_path / "both" / "tables" / "main.md").read_text()
    assert "## FakeLM-1M · fake-mixture" in md and "## FakeLM-1M · other-data" in md
    with open(tmp_path / "both" / "tables" / "main.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 2 * (len(runs) + 1)
    assert agg.main(["--from-results", str(results), str(results), "--out", str(tmp_path / "dup")]) == 2


def test_missing_and_malformed_inputs_name_the_file(tmp_path):
    runs = {"lora-r4": run_cfg("lora", 4)}
    write_run(tmp_path, "base", None, fake_eval("base", {"a": (0.5, 0.03)}, None))
    with pytest.raises(InputError, match=r"missing run outputs: .*lora-r4/metrics.json, .*lora-r4/eval.json: file "
                                         r"does not exist"):
        agg.load_records(tmp_path, runs, "m", "d")
    write_run(tmp_path, "lora-r4", fake_metrics("lora-r4", "lora", 4), fake_eval("x", {"a": (0.5, 0.03)}, None))
    (tmp_path / "lora-r4" / "eval.json").write_text('{"tasks": {"a": {"value": "high"}}}')
    with pytest.raises(InputError, match=r"lora-r4/eval.json: tasks.a.value: expected a number"):
        agg.load_records(tmp_path, runs, "m", "d")
    (tmp_path / "lora-r4" / "eval.json").write_text("{not json")
    with pytest.raises(InputError, match=r"eval.json: not valid JSON"):
        agg.load_records(tmp_path, runs, "m", "d")


def test_parse_score_real_entry_shapes():
    s = agg.parse_score({"lm_eval_task": "spiel_arc_easy", "metric": "acc", "value": 0.55, "stderr": 0.064,
                         "n": 60, "n_available": 2376}, "e.json: tasks.arc_easy")
    assert (s.value, s.stderr, s.n, s.metric, s.note) == (0.55, 0.064, 60, "acc", None)
    skipped = agg.parse_score({"skipped": True, "note": "no local BBH folder"}, "e.json: tasks.bbh")
    assert skipped.value is None and skipped.note == "no local BBH folder"
    # lm-eval's stderr of an all-wrong score is 0: replaced by the binomial s.e. at p = 0.5/n
    zero = agg.parse_score({"metric": "acc", "value": 0.0, "stderr": 0.0, "n": 4}, "e.json: tasks.x")
    assert zero.stderr == pytest.approx(math.sqrt(0.125 * 0.875 / 4))
    held = agg.parse_heldout({"loss": 2.5, "n_examples": 2, "n_tokens": 5, "example_nll": [2.0, 10.5],
                              "example_tokens": [1, 4]}, "e.json: heldout")
    assert held.value == 2.5 and held.stderr == pytest.approx(agg.ratio_stderr([2.0, 10.5], [1, 4]))
    assert agg.parse_heldout({"loss": 2.5, "n_examples": 2}, "e.json: heldout").stderr is None
    with pytest.raises(InputError, match="example_nll and example_tokens"):
        agg.parse_heldout({"loss": 2.5, "example_nll": [1.0]}, "e.json: heldout")


def test_fmt_score():
    assert agg.fmt_score(agg.Score(0.5372, 0.0291), percent=True) == "53.7 ± 2.9"
    assert agg.fmt_score(agg.Score(2.51432, 0.0312), percent=False) == "2.514 ± 0.031"
    assert agg.fmt_score(agg.Score(0.5), percent=True) == "50.0"
    assert agg.fmt_score(agg.Score(None, note="skipped"), percent=True) == "—"
    assert agg.fmt_score(None, percent=True) == "n/a"


# ------------------------------------------------------------------------------------------ claims


def _records(spec: list[tuple], base=(0.50, 0.03, 3.0, 0.05)) -> list[agg.RunRecord]:
    """Records from (method, rank, seed, acc, acc_se, loss, loss_se[, step_time]) on one task "t"."""
    recs = [agg.make_record("base", {}, "M", "D", None,
                            fake_eval("base", {"t": (base[0], base[1])}, (base[2], base[3])))]
    for method, rank, seed, acc, se, loss, lse, *rest in spec:
        cfg = run_cfg(method, rank, seed=seed)
        m = fake_metrics(cfg["run_id"], method, rank, seed=seed, step_time=rest[0] if rest else 1.0)
        recs.append(agg.make_record(cfg["run_id"], cfg, "M", "D", m,
                                    fake_eval(cfg["run_id"], {"t": (acc, se)}, (loss, lse))))
    return recs


def _claim(claims, key):
    return next(c for c in claims if c.key == key)


def test_claim_clear_win_is_superior():
    recs = _records([("spiel-ag", 16, 1, 0.70, 0.01, 2.40, 0.01), ("lora", 16, 1, 0.60, 0.01, 2.60, 0.01)])
    c = _claim(agg.evaluate_claims(recs), "ag-vs-lora")
    assert c.verdict == "superior"
    loss = next(x for x in c.comparisons if x.metric == agg.HELDOUT)
    assert loss.role == "primary" and loss.counted and loss.margin == 0.02 and loss.level == pytest.approx(0.95)
    assert loss.diff == pytest.approx(0.20)  # oriented: lower loss of A is positive
    # per-example held-out values: the bootstrap interval, close to the normal one of the two errors
    half = 1.959964 * math.hypot(0.01, 0.01)
    assert "bootstrap over 1+1 seeds and 96 paired items" in loss.detail
    assert loss.low == pytest.approx(0.20 - half, abs=0.2 * half) and loss.high == pytest.approx(0.20 + half, abs=0.2 * half)
    acc = next(x for x in c.comparisons if x.metric == "t")
    assert acc.role == "secondary" and not acc.counted and acc.margin == 0.01
    assert acc.diff == pytest.approx(0.10) and acc.outcome == "superior"


def test_claim_within_noise_is_inconclusive():
    recs = _records([("spiel-ag", 16, 1, 0.62, 0.03, 2.50, 0.05), ("lora", 16, 1, 0.60, 0.03, 2.52, 0.05)])
    c = _claim(agg.evaluate_claims(recs), "ag-vs-lora")
    assert c.verdict == "inconclusive" and "contains the margin" in c.reason


def test_claim_clear_loss_is_inferior_and_a_small_loss_non_inferior():
    recs = _records([("spiel-ag", 16, 1, 0.50, 0.01, 2.80, 0.01), ("lora", 16, 1, 0.60, 0.01, 2.60, 0.01)])
    assert _claim(agg.evaluate_claims(recs), "ag-vs-lora").verdict == "inferior"
    # worse by 0.005 nats, significantly so, but well inside the 0.02 margin
    recs = _records([("spiel-ag", 16, 1, 0.60, 0.01, 2.605, 0.001), ("lora", 16, 1, 0.60, 0.01, 2.60, 0.001)])
    c = _claim(agg.evaluate_claims(recs), "ag-vs-lora")
    loss = next(x for x in c.comparisons if x.metric == agg.HELDOUT)
    assert loss.high < 0 and loss.low > -0.02 and c.verdict == "non-inferior"
    # the same data with a margin declared tighter than the interval: inconclusive
    tight = _claim(agg.evaluate_claims(recs, margins={"heldout_loss": 0.006}), "ag-vs-lora")
    assert tight.verdict == "inconclusive"


def test_claim_decided_by_the_primary_metric_alone_and_not_measured():
    # better accuracy (secondary), clearly worse held-out loss (primary)
    recs = _records([("spiel-ag", 16, 1, 0.70, 0.01, 2.80, 0.01), ("lora", 16, 1, 0.60, 0.01, 2.60, 0.01)])
    c = _claim(agg.evaluate_claims(recs), "ag-vs-lora")
    assert c.verdict == "inferior"
    assert next(x for x in c.comparisons if x.metric == "t").outcome == "superior"
    # no LoRA at the same rank: nothing to compare
    recs = _records([("spiel-ag", 16, 1, 0.70, 0.01, 2.40, 0.01), ("lora", 4, 1, 0.60, 0.01, 2.60, 0.01)])
    c = _claim(agg.evaluate_claims(recs), "ag-vs-lora")
    assert c.verdict == agg.NOT_MEASURED and c.comparisons == []


def test_bonferroni_threshold_grows_with_comparisons():
    assert agg.z_critical(1) == pytest.approx(1.959964, abs=1e-5)
    assert agg.z_critical(4) == pytest.approx(2.497705, abs=1e-5)
    # d/s = 2.2: significant alone, not among 4 comparisons
    assert agg.stat_outcome(2.2, 1.0, agg.z_critical(1)) == "supports"
    assert agg.stat_outcome(2.2, 1.0, agg.z_critical(4)) == "undecided"
    assert agg.stat_outcome(-3.0, 1.0, agg.z_critical(4)) == "contradicts"
    assert agg.stat_outcome(3.0, None, 2.0) == "not counted"


def test_seeds_are_pooled_with_their_spread():
    recs = _records([("spiel-ag", 16, s, a, 0.01, 2.4, 0.01) for s, a in ((1, 0.70), (2, 0.66), (3, 0.74))]
                    + [("lora", 16, s, a, 0.01, 2.6, 0.01) for s, a in ((1, 0.60), (2, 0.61))])
    c = _claim(agg.evaluate_claims(recs), "ag-vs-lora")
    acc = next(x for x in c.comparisons if x.metric == "t")
    assert acc.a == pytest.approx(0.70) and acc.b == pytest.approx(0.605)
    se_a = math.sqrt(0.01 ** 2 + 0.04 ** 2 / 3)      # item se² + seed variance / k
    se_b = math.sqrt(0.01 ** 2 + 0.00005 / 2)
    half = 1.959964 * math.hypot(se_a, se_b)       # no per-item values: normal interval of the pooled errors
    assert acc.high - acc.low == pytest.approx(2 * half, abs=1e-5)
    assert "3 seeds" in acc.label and "(2 seeds)" in acc.label


def test_regrowth_claim_uses_static_mask_and_shira():
    recs = _records([("spiel-ag", 16, 1, 0.70, 0.01, 2.40, 0.005),
                     ("spiel-static", 16, 1, 0.60, 0.01, 2.60, 0.005), ("shira", 16, 1, 0.69, 0.01, 2.41, 0.005)])
    c = _claim(agg.evaluate_claims(recs), "regrowth")
    assert {x.label.split(" vs ")[1] for x in c.comparisons} == {"SpIEL static mask (ablation) r=16",
                                                                 "SHiRA (ablation) r=16"}
    primary = {x.label.split(" vs ")[1]: x for x in c.comparisons if x.role == "primary"}
    assert all(x.level == pytest.approx(0.975) for x in primary.values())  # Bonferroni over 2 comparisons
    assert primary["SpIEL static mask (ablation) r=16"].outcome == "superior"
    assert primary["SHiRA (ablation) r=16"].outcome == "non-inferior"
    assert c.verdict == "non-inferior"  # the weakest primary comparison decides


def test_runtime_and_memory_claims_follow_thresholds():
    recs = _records([("spiel-ag", 16, 1, 0.6, 0.01, 2.5, 0.01, 1.2), ("lora", 16, 1, 0.6, 0.01, 2.5, 0.01, 1.0),
                     ("spiel-ma", 16, 1, 0.6, 0.01, 2.5, 0.01, 1.6)])
    claims = agg.evaluate_claims(recs)
    rt = _claim(claims, "runtime")
    outcomes = {x.label.split(" ")[0]: x.outcome for x in rt.comparisons}
    assert outcomes == {"SpIEL-AG": "supports", "SpIEL-MA": "contradicts"}
    assert rt.verdict == agg.MIXED
    ma = _claim(claims, "ma-lighter")
    state = next(x for x in ma.comparisons if x.metric == "state bytes")
    assert state.diff == pytest.approx(12 / 24) and state.outcome == "supports"
    peak = next(x for x in ma.comparisons if x.metric.startswith("peak memory"))
    assert peak.outcome == "undecided"  # equal peak RSS in the fixture: within the 1% tie band
    assert ma.verdict == agg.REPRODUCED


def test_memory_scaling_from_runs_and_benchmark():
    recs = _records([("spiel-ag", 4, 1, 0.6, 0.01, 2.5, 0.01), ("spiel-ag", 16, 1, 0.6, 0.01, 2.5, 0.01)])
    alone = _claim(agg.evaluate_claims(recs), "memory-scaling")
    run_cmp = next(x for x in alone.comparisons if "budgets" in x.label)
    assert run_cmp.diff == pytest.approx(1.0) and run_cmp.outcome == "not counted"
    assert alone.verdict == agg.NOT_MEASURED and "needs the efficiency benchmark" in alone.notes[0]
    gib = 1.0
    bench = [agg.parse_benchmark(fake_benchmark(*args), "x.json") for args in (
        ("s", "floor", 10**8, 1.0, 2 * gib, 0, "ok", None), ("s", "spiel-ag", 10**8, 1.0, 2 * gib + 0.1, 10**6),
        ("l", "floor", 10**9, 1.0, 10 * gib, 0, "ok", None), ("l", "spiel-ag", 10**9, 1.0, 10 * gib + 0.33, 3 * 10**6))]
    c = _claim(agg.evaluate_claims(recs, bench), "memory-scaling")
    assert next(x for x in c.comparisons if "budgets" in x.label).outcome == "supports"
    b_cmp = next(x for x in c.comparisons if x.label.startswith("benchmark"))
    assert b_cmp.diff == pytest.approx(3.3, rel=1e-6) and b_cmp.outcome == "supports"  # ×3.3: near ×3 params
    assert c.verdict == agg.REPRODUCED
    # overhead growing like the model (×10) contradicts the claim
    bench[3] = agg.parse_benchmark(fake_benchmark("l", "spiel-ag", 10**9, 1.0, 11.0, 3 * 10**6), "x.json")
    c = _claim(agg.evaluate_claims(recs, bench), "memory-scaling")
    assert next(x for x in c.comparisons if x.label.startswith("benchmark")).outcome == "contradicts"
    assert c.verdict == agg.MIXED


def test_parse_benchmark_rejects_malformed():
    with pytest.raises(InputError, match=r"s__lora.json: status: expected a string"):
        agg.parse_benchmark({"size": "s", "method": "lora"}, "s__lora.json")
    with pytest.raises(InputError, match=r"s__lora.json: step_time_mean_s: expected a number"):
        agg.parse_benchmark({"size": "s", "method": "lora", "status": "ok", "step_time_mean_s": "1s"}, "s__lora.json")


def test_ratio_and_paired_stderr():
    # ratio estimator: y = (2, 4, 6), t = (1, 2, 2) -> L = 12/5; residuals (-0.4, -0.8, 1.2)
    expect = math.sqrt(3 / 2 * (0.16 + 0.64 + 1.44)) / 5
    assert agg.ratio_stderr([2.0, 4.0, 6.0], [1.0, 2.0, 2.0]) == pytest.approx(expect)
    assert agg.ratio_stderr([2.0], [1.0]) is None
    a = agg.Score(0.75, 0.2, 4, items=[1.0, 1.0, 0.0, 1.0], item_ids=[0, 1, 2, 3])
    b = agg.Score(0.50, 0.2, 4, items=[1.0, 0.0, 0.0, 1.0], item_ids=[0, 1, 2, 3])
    assert agg.paired_stderr(a, b) == pytest.approx(statistics.stdev([0, 1, 0, 0]) / 2)
    assert agg.paired_stderr(a, agg.Score(0.5, 0.2, 4, items=[1.0, 0.0, 0.0, 1.0], item_ids=[9, 1, 2, 3])) is None
    assert agg.paired_stderr(a, agg.Score(0.5, 0.2, 4)) is None


def test_heldout_without_noise_estimate_is_shown_not_counted():
    recs = _records([("spiel-ag", 16, 1, 0.62, 0.03, 2.40, None), ("lora", 16, 1, 0.60, 0.03, 2.60, None)])
    c = _claim(agg.evaluate_claims(recs), "ag-vs-lora")
    loss = next(x for x in c.comparisons if x.metric == agg.HELDOUT)
    assert loss.low is None and loss.outcome == "not counted"
    assert c.verdict == agg.NOT_MEASURED  # the accuracies are secondary: they never decide the claim


def test_quantized_and_checkpointing_claims():
    recs = _records([("qspiel-ag", 16, 1, 0.60, 0.01, 2.60, 0.01), ("qlora", 16, 1, 0.60, 0.01, 2.60, 0.01)])
    claims = agg.evaluate_claims(recs)
    q = _claim(claims, "4bit")
    counted = [x for x in q.comparisons if x.counted]
    assert all("vs base model" in x.label for x in counted) and q.verdict == agg.REPRODUCED
    assert any(not x.counted and "qLoRA" in x.label for x in q.comparisons)
    gc = _claim(claims, "checkpointing")
    assert gc.verdict == agg.NOT_MEASURED and "gradient_checkpointing: true" in gc.notes[0]


def test_claims_markdown_lists_every_claim_with_rules(aggregated):
    results, _, _ = aggregated
    md = (results / "claims.md").read_text()
    for title in ("SpIEL-AG performs at least as well as LoRA", "SpIEL-MA is lighter in memory",
                  "run time is comparable", "scales with the number of tuned parameters", "4-bit",
                  "activation checkpointing", "Regrowth"):
        assert title in md
    assert "How the verdicts are computed" in md
    assert md.count("**Verdict:") == 8
    # the fixture: AG r16 vs LoRA r16 is within noise on accuracy but 0.10 nats better (se 0.014) on loss
    assert "| SpIEL-AG r=16 vs LoRA r=16 | primary | held-out loss | 2.4500 | 2.5500 | +0.1000 |" in md
    assert "non-inferiority margin δ = 0.02 nats/token" in md


# ------------------------------------------------------------------------------------------ figures


def test_figure_data_and_note_figures(aggregated, tmp_path):
    from spielbench import figures

    results, _, _ = aggregated
    records, benchmarks = agg.load_results_dir(results)
    pts = figures.sweep_points(records, "task_a")
    assert pts["spiel-ag"] == [(40_000, pytest.approx(0.61), pytest.approx(0.028)),
                               (160_000, pytest.approx(0.64), pytest.approx(0.028))]
    assert list(pts)[:3] == ["lora", "ia3", "spiel-ag"]
    assert figures.sweep_points(records, agg.HELDOUT)["full"] == [(TOTAL, pytest.approx(2.48), pytest.approx(0.01))]
    xs, numeric = figures._bench_size_x(benchmarks)
    assert numeric and xs == {"l": 1e9, "s": 1e8}
    for path in (figures.plot_benchmark_scaling([], tmp_path / "a.png"),
                 figures.plot_spiel_dynamics([r for r in records if not r.reselections], tmp_path / "b.png")):
        assert path.stat().st_size > 1000


# ------------------------------------------------------------------------------------------ notebook


def test_figures_notebook_executes_on_fixture_results(aggregated, tmp_path):
    """The real analysis/figures.ipynb, executed in a kernel on the fixture's results folder."""
    from spielbench.notebook import execute_notebook

    results, _, _ = aggregated
    out = tmp_path / "executed.ipynb"
    fig_dir = tmp_path / "figs"
    execute_notebook(REPO / "analysis" / "figures.ipynb", out,
                     {"results_dir": str(results), "figures_dir": str(fig_dir)}, cwd=REPO, timeout=120)
    for name in agg.FIGURE_FILES:  # every figure has data in the fixture (benchmark included): none is a note
        assert (fig_dir / name).stat().st_size > 20_000, name
    import nbformat

    nb = nbformat.read(out, as_version=4)
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]


def test_failing_notebook_leaves_destination_untouched(tmp_path):
    import nbformat

    from spielbench.notebook import NotebookExecutionError, execute_notebook

    src = tmp_path / "bad.ipynb"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("raise ValueError('boom')")]
    nbformat.write(nb, src)
    dest = tmp_path / "out.ipynb"
    dest.write_text("previous")
    with pytest.raises(NotebookExecutionError, match="cell 1 failed.*boom") as info:
        execute_notebook(src, dest, timeout=60)
    assert dest.read_text() == "previous" and info.value.failed_copy.is_file()
    with pytest.raises(InputError, match="does not exist"):
        execute_notebook(tmp_path / "missing.ipynb", dest)


# ------------------------------------------------------------------------------------------ rules


@pytest.mark.slow
def test_aggregate_rules_run_under_snakemake(tmp_path):
    """workflow/rules/{aggregate,report}.smk on a fake finished pipeline: run, rerun is a no-op, report."""
    import subprocess
    import sys

    import yaml

    runs_cfg, runs_dir = [], tmp_path / "runs"
    write_run(runs_dir, "base", None, fake_eval("base", {"arc_easy": (0.5, 0.065)}, (3.0, 0.05)))
    for method, rank, acc, loss, st, rss in DEFAULT_RUNS[:5]:
        runs_cfg.append({"method": method, "rank": rank, "learning_rate": 1e-3})
        rid = f"{method}-r{rank}"
        write_run(runs_dir, rid, fake_metrics(rid, method, rank, step_time=st, peak_rss=int(rss * 2**30), heldout=loss,
                                              reselections=4 if method.startswith("spiel") else 0),
                  fake_eval(rid, {"arc_easy": (acc, 0.063)}, (loss, 0.01)))
    config = {"model": {"source": "smollm2", "name": "SmolLM2-135M-Instruct"},
              "data": {"name": "olmo-mixture", "train": "mixture", "heldout": None},
              "training": {"max_steps": 40}, "runs": runs_cfg, "evaluation": {"tasks": ["arc_easy"]}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "analysis").mkdir()
    (tmp_path / "analysis" / "figures.ipynb").write_bytes((REPO / "analysis" / "figures.ipynb").read_bytes())
    rules = REPO / "workflow" / "rules"
    (tmp_path / "Snakefile").write_text(
        'configfile: "config.yaml"\n'
        + "".join(f'include: "{rules / name}"\n' for name in ("common.smk", "aggregate.smk", "report.smk"))
        + "rule all:\n    input: AGGREGATE_OUTPUTS, REPORT_OUTPUTS\n")

    def smk(*args):
        return subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)

    done = smk()
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "results" / "tables" / "main.csv", newline="") as fh:
        assert [r["run"] for r in csv.DictReader(fh)] == ["base", "lora-r4", "lora-r16", "spiel-ag-r4", "spiel-ag-r16",
                                                          "spiel-ma-r16"]
    for name in agg.FIGURE_FILES:
        assert (tmp_path / "results" / "figures" / name).stat().st_size > 1000
    assert "Verdict:" in (tmp_path / "results" / "report" / "claims.html").read_text()
    for log in ("aggregate", "figures", "report_pages"):
        assert (tmp_path / "logs" / "aggregate" / f"{log}.log").is_file()
    again = smk("-n")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    report = smk("--report", "report.html")
    assert report.returncode == 0, report.stderr[-3000:]
    assert (tmp_path / "report.html").stat().st_size > 100_000


# ------------------------------------------------------------------------------------------ real runs


def test_real_run_files_parse_when_present():
    """When a pipeline run has left runs/*/metrics.json here, every one of them parses."""
    found = sorted(REPO.glob("runs*/*/metrics.json"))
    evals = sorted(REPO.glob("runs*/*/eval.json"))
    if not found and not evals:
        pytest.skip("no runs*/*/metrics.json or eval.json in this checkout")
    for p in found:
        rec = agg.make_record(p.parent.name, {}, "m", "d", agg.read_json(p), None, f"{p.parent}/")
        assert rec.steps and rec.steps > 0 and rec.trainable_params and rec.step_time_mean_s, p
        assert rec.state_bytes and rec.peak_memory_bytes and len(rec.loss_curve) == rec.steps, p
    for p in evals:
        rec = agg.make_record("base" if p.parent.name == "base" else p.parent.name, {"method": "x"}, "m", "d", None,
                              agg.read_json(p), f"{p.parent}/")
        assert rec.scores and all(s.value is not None or s.note for s in rec.scores.values()), p

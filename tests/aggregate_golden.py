"""Golden outputs of the aggregation: regenerate every table, claim, raw copy and figure input from frozen run
JSONs and compare them byte for byte with the files committed under ``tests/data/aggregate/<case>/golden/``.

Each case folder holds ``case.json`` (the resolved run table, model/data names, tasks), ``runs/<target>/
{metrics,eval}.json`` and ``benchmark/*.json``. The golden files were written by the aggregation as it was
before it became a package (single-module ``spielbench/aggregate.py``); they change only when an output is
meant to change, with ``python tests/aggregate_golden.py --write`` (run from the repository root).

Figures are compared through the data they are drawn from (``figure_data.json``: every record's values (:data:`RECORD_FIELDS`),
every benchmark point's values (:data:`BENCH_FIELDS`), the budget-sweep points of every metric, the benchmark's
x positions), because PNG bytes carry matplotlib's version and rendering details.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "aggregate"
CASES = ("synthetic", "smoke")
#: the attributes of a run record (``spielbench.aggregate.RunRecord``) that tables, claims and figures read
RECORD_FIELDS = (
    "target", "method", "model_name", "data_name", "config", "rank", "density", "seed", "learning_rate",
    "gradient_checkpointing", "trainable_params", "steps", "tokens_seen", "wall_time_s", "step_time_mean_s",
    "step_time_p50_s", "tokens_per_s", "device", "peak_memory_bytes", "peak_memory_kind", "state_bytes",
    "adapter_bytes", "loss_curve", "reselections", "scores", "heldout",
)
#: figure_data.json name -> attribute of a benchmark point (``spielbench.records.BenchmarkPoint``)
BENCH_FIELDS = {
    "size": "size", "method": "method", "status": "status", "detail": "detail", "rank": "rank",
    "trainable_params": "trainable_params", "model_params": "n_params_model", "step_time_mean_s": "step_time_mean_s",
    "step_time_p50_s": "step_time_p50_s", "tokens_per_s": "tokens_per_s", "peak_memory_bytes": "peak_memory_bytes",
    "peak_memory_kind": "peak_memory_kind", "state_bytes": "adapter_state_bytes",
}


def _figure_data(results: Path, tasks: list[str]) -> str:
    from spielbench import aggregate as agg
    from spielbench import figures

    records, benchmarks = agg.load_results_dir(results)

    def plain(rec) -> dict:
        d = {name: getattr(rec, name) for name in RECORD_FIELDS}
        return json.loads(json.dumps(d, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o)
                                     else str(o)))

    def point(b) -> dict:  # the benchmark values the figures and tables use, under the golden file's names
        return {name: getattr(b, attr) for name, attr in BENCH_FIELDS.items()} | {"file": Path(b.source).name}

    metrics = figures._metrics_of(records, tasks)
    out = {
        "records": [plain(r) for r in records],
        "benchmarks": [point(b) for b in benchmarks],
        "sweep_points": {m: figures.sweep_points(records, m) for m in metrics},
        "bench_size_x": figures._bench_size_x(benchmarks),
    }
    return json.dumps(out, indent=1, sort_keys=True) + "\n"


def render(case: str, out: Path, data: Path = DATA) -> None:
    """Aggregate case ``data/case`` into ``out`` (results/, combined/, figure_data.json, written.txt)."""
    from spielbench import aggregate as agg

    src = data / case
    spec = json.loads((src / "case.json").read_text())
    results = out / "results"
    written = agg.aggregate(src / "runs", spec["runs"], results, spec["model_name"], spec["data_name"],
                            tasks=spec["tasks"], benchmark_files=sorted((src / "benchmark").glob("*.json")), root=src)
    (out / "written.txt").write_text("".join(f"{Path(p).relative_to(out)}\n" for p in written))
    if agg.main(["--from-results", str(results), "--out", str(out / "combined")]) != 0:
        raise RuntimeError(f"{case}: --from-results failed")
    (out / "figure_data.json").write_text(_figure_data(results, spec["tasks"]))


def files_under(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under ``root``."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_synthetic_inputs() -> None:
    """Case ``synthetic``: the run files of ``tests/test_aggregate.py``'s ``pipeline_dir``/``aggregated`` fixtures."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import test_aggregate as ta

    dst = DATA / "synthetic"
    shutil.rmtree(dst / "runs", ignore_errors=True)
    shutil.rmtree(dst / "benchmark", ignore_errors=True)
    skip = {"bbh": "no local BBH folder (evaluation.bbh_path)"}
    ta.write_run(dst / "runs", "base", None,
                 ta.fake_eval("base", {"task_a": (0.50, 0.029), "task_b": (0.55, 0.03)}, (3.0, 0.05), skipped=skip))
    runs = {}
    for method, rank, acc, loss, st, rss in ta.DEFAULT_RUNS:
        cfg = ta.run_cfg(method, rank, **({"max_steps": 20} if method.startswith("q") else {}))
        runs[cfg["run_id"]] = cfg
        spiel = method in ("spiel-ag", "spiel-ma", "qspiel-ag", "qspiel-ma")
        ta.write_run(dst / "runs", cfg["run_id"],
                     ta.fake_metrics(cfg["run_id"], method, rank, steps=cfg["max_steps"], step_time=st,
                                     peak_rss=int(rss * 2**30), heldout=loss, reselections=4 if spiel else 0),
                     ta.fake_eval(cfg["run_id"], {"task_a": (acc, 0.028), "task_b": (acc - 0.02, 0.028)}, (loss, 0.01),
                                  skipped=skip))
    (dst / "benchmark").mkdir(parents=True)
    for size, p, m, t, mem, n in ta.DEFAULT_BENCH:
        status = "oom" if (size, m) == ("l", "full") else "ok"
        rank = 16 if m in ("lora", "spiel-ag", "spiel-ma") else None
        (dst / "benchmark" / f"{size}__{m}.json").write_text(
            json.dumps(ta.fake_benchmark(size, m, p, t, mem, n, status, rank)))
    spec = {"model_name": "FakeLM-1M", "data_name": "fake-mixture", "tasks": ["task_a", "task_b", "bbh"], "runs": runs}
    (dst / "case.json").write_text(json.dumps(spec, indent=1) + "\n")


def main() -> int:
    """``--write [CASE ...]``: regenerate the golden folders of the cases (an intended output change);
    ``--write-inputs``: rewrite the ``synthetic`` case's inputs from the test fixtures' generators."""
    if sys.argv[1:] == ["--write-inputs"]:
        write_synthetic_inputs()
        return 0
    if sys.argv[1:2] != ["--write"] or not set(sys.argv[2:]) <= set(CASES):
        print(f"usage: python tests/aggregate_golden.py --write [{' '.join(CASES)}] | --write-inputs", file=sys.stderr)
        return 2
    for case in sys.argv[2:] or CASES:
        golden = DATA / case / "golden"
        shutil.rmtree(golden, ignore_errors=True)
        golden.mkdir(parents=True)
        render(case, golden)
        print(f"{case}: {len(files_under(golden))} golden files")
    return 0


if __name__ == "__main__":
    sys.exit(main())

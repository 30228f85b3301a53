"""The prepared GPU device check (issue 12): CUDA tests, dΔ paths per layer shape, and step time and peak
memory of every method on Llama-2-7B shapes, written as JSON and a markdown table to one folder.

Run on a GPU machine, from the repository root, in one call:

    python benchmarks/cuda_check.py --out results/benchmark/cuda

It needs only torch, transformers and peft on the machine. What else the suite needs and the machine may
lack (bitsandbytes for the 4-bit rows, safetensors, pinned packages) travels as wheels in the git-ignored
folder ``wheels/``: fill it on a machine with network access, for the GPU machine's Python and platform,

    pip download --only-binary=:all: --python-version 3.11 --platform manylinux_2_24_x86_64 \\
        -d wheels bitsandbytes safetensors pytest

and the check installs them with ``pip install --no-index --find-links wheels ...`` before anything else
(only packages that do not import; ``--wheels DIR`` names another folder). Missing bitsandbytes leaves the
4-bit rows ``unsupported``, not the check failed.

What it does, in order (each section recorded even when a later one fails):

1. ``pytest tests/test_cuda_spiel.py`` in a child process under ``--tests-timeout-s`` (150 s) (the device
   tests; the CUDA parameters must pass, not skip);
2. both dΔ paths (:mod:`spiel.delta_grad`: SDDMM and dense GEMM + gather) on each distinct projection
   shape of the size at LoRA r64's per-matrix budget ``64·(in+out)`` and ``batch·seq`` tokens, bf16
   operands, with and without SpIEL-AG's extra candidate positions; times by CUDA events (median of
   ``--micro-reps``), and the choice the ``"auto"`` rule makes;
3. step time and peak memory (``spielbench.benchmark.run_one``: one fresh process per point, random
   weights, bf16, 1×2048 tokens, SpIEL selection steps in their natural proportion by the benchmark's
   schedule weighting, CUDA-event step times, ``max_memory_allocated``) for floor, LoRA r64 (dropout 0.1
   and 0), SpIEL-AG and SpIEL-MA at LoRA r64's budget, the reference-style layer, qLoRA, qSpIEL-AG and
   full fine-tuning (recorded ``oom`` where the estimate does not fit), without and then with gradient
   checkpointing.

Time budget (8 minutes on one H200, bare machine): installing a few wheels ~15 s; the tests ~60 s (about
60 small cases, CUDA and cuBLAS initialisation, bitsandbytes' first kernels); the dΔ table ~15 s (3
distinct shapes × 2 variants × 2 paths × (1 + reps) calls of at most ~10 ms, plus building the inputs);
each step point ~20 s (about 8 s of imports in its fresh process, 5–10 s to build and fill 6.7 B random
bf16 weights or quantise them to NF4, one warm-up and one entry step, then 6 timed steps for AG, 3 for the
others, of ~0.3–1 s at 2048 tokens), 18 points ≈ 360 s. Sum ≈ 450 s. Each point runs under
``min(--point-timeout-s, time left)`` (default 90 s) with the time left counted to ``--budget-s``
(default 465 s after the start), and no point starts with less than ``--min-point-s`` (30 s) left: those
points are recorded ``skipped`` with the reason, the most telling first (the order above, full
fine-tuning last in each group). Writing the outputs takes a second, so the check ends inside 8 minutes
(480 s) whatever a point does.

``--dry-run``: the same sections on CPU with tiny shapes (size ``tiny``, 1×16 tokens, rank 2, bf16
autocast), a subset of the tests (``-k "cpu and merge_unmerge"``), the checkpointed group for one method
per way of building a model, and the step points run in this process (``spielbench.benchmark.run_worker``,
the code each fresh worker process runs) instead of one process each; it finishes in seconds and is what
``tests/test_benchmark.py`` runs.

Outputs in ``--out``: ``cuda_check.json`` (every section: test counts and output tail, the dΔ rows and
decisions, each point's full benchmark record, the ratio rows), ``cuda_check.md`` (the tables), and
``steps/{plain,checkpointed}/<size>__<method>.json`` (the benchmark records, as the pipeline writes them).
Exit status 0 when the tests passed and no point ended in ``error``/``timeout``, else 1.
"""
from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import spielbench.benchmark as B  # noqa: E402
from spielbench.benchmark.runner import summary_line  # noqa: E402
from spielbench.benchmark.worker import base_record, display_path  # noqa: E402
from spiel import delta_grad as dg  # noqa: E402
from spiel.layer import random_indices  # noqa: E402
from spielbench.fsio import write_json_atomic, write_text_atomic  # noqa: E402

METHODS = ("floor", "lora", "lora-dropout0", "spiel-ag", "spiel-ma", "spiel-reference", "qlora", "qspiel-ag", "full")
WHEEL_PACKAGES = ("bitsandbytes", "safetensors", "pytest")


def install_wheels(folder: Path) -> dict:
    """``pip install --no-index --find-links folder`` of the packages in :data:`WHEEL_PACKAGES` that do not
    import; a no-op without the folder. Returns what was tried and pip's exit status."""
    missing = [name for name in WHEEL_PACKAGES if importlib.util.find_spec(name) is None]
    shown = display_path(str(folder))
    if not missing or not folder.is_dir():
        return {"folder": shown, "missing": missing, "installed": [], "rc": None}
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(folder), *missing]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return {"folder": shown, "missing": missing, "installed": missing if proc.returncode == 0 else [],
            "rc": proc.returncode, "tail": (proc.stdout + proc.stderr)[-2000:]}


def run_tests(dry_run: bool, out: Path, timeout_s: float) -> dict:
    """pytest on tests/test_cuda_spiel.py in a child process (a crash in a CUDA kernel cannot take the check
    down; ``timeout_s`` bounds it); counts by outcome from its JUnit XML, the CUDA cases skipped, the tail."""
    xml = out / "pytest.xml"
    args = ["tests/test_cuda_spiel.py", "-q", "-rfEs", "-p", "no:cacheprovider"]
    if dry_run:
        args += ["-k", "cpu and merge_unmerge"]
    cmd = [sys.executable, "-m", "pytest", *args, f"--junitxml={xml}"]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
        rc, tail = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, tail = "timeout", f"pytest exceeded {timeout_s:.0f} s\n" + str(exc.stdout or "")
    counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    cuda_skipped = 0
    if xml.is_file():
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
            outcome = {"failure": "failed"}.get(outcome, outcome)
            counts[outcome] += 1
            cuda_skipped += outcome == "skipped" and "cuda" in case.get("name", "").partition("[")[2]
        xml.unlink()
    return {"args": args, "rc": rc, "counts": counts, "cuda_skipped": cuda_skipped,
            "tail": (tail if isinstance(tail, str) else "")[-3000:].replace(str(REPO), ".")}


def _median_time(device: torch.device, run, reps: int) -> float:
    run()  # warm-up (CSR pattern, cuSPARSE/cuBLAS handles)
    return statistics.median(dg._time_once(device, run) for _ in range(reps))


def delta_grad_table(size: B.ModelSize, device: torch.device, rank: int, tokens: int, reps: int) -> list[dict]:
    """Both dΔ paths per distinct projection shape (bf16 operands, fp32 accumulation), with and without
    extra candidate positions (k more, as in a SpIEL-AG phase), plus the ``"auto"`` rule's choice."""
    rows = []
    shapes = sorted({(o, i) for _, i, o in size.linear_shapes()})
    gen = torch.Generator().manual_seed(0)
    for out_features, in_features in shapes:
        k = min(rank * (in_features + out_features), out_features * in_features)
        indices = random_indices(out_features * in_features, k, gen).to(device=device, dtype=torch.int32)
        g = torch.randn(tokens, out_features, generator=gen).to(device=device, dtype=torch.bfloat16)
        x = torch.randn(tokens, in_features, generator=gen).to(device=device, dtype=torch.bfloat16)
        extra = torch.randint(0, out_features * in_features, (k,), generator=gen).to(device=device,
                                                                                      dtype=indices.dtype)
        shape = (out_features, in_features)
        for variant, sets in (("eta", (indices,)), ("eta+candidates", (indices, extra))):
            pattern = dg.csr_pattern(shape, *sets)
            sampled = _median_time(device, lambda: dg.sampled_grad(pattern, shape, g.float(), x.float()), reps)
            dense = _median_time(device, lambda: dg.dense_grad(g, x, torch.float32, *sets), reps)
            dg.clear_decisions()
            dg.delta_grad("auto", lambda: pattern, g, x, torch.float32, shape, *sets)
            auto = dg.choose_path("auto", device, g.dtype, shape, sum(int(s.numel()) for s in sets), tokens,
                                  len(sets) > 1)
            rows.append({"out_features": out_features, "in_features": in_features, "k": k, "tokens": tokens,
                         "variant": variant, "sampled_ms": sampled * 1e3, "dense_ms": dense * 1e3,
                         "faster": "sampled" if sampled < dense else "dense", "auto_choice": auto})
        del g, x
    dg.clear_decisions()
    return rows


DRY_RUN_CHECKPOINTED = ("floor", "lora", "spiel-ag", "qspiel-ag", "full")  # one method per way of building


def run_points(size: str, options: B.BenchmarkOptions, out: Path, methods, dry_run: bool, deadline: float,
               point_timeout_s: float, min_point_s: float) -> dict[str, list[dict]]:
    """Every method without and with gradient checkpointing (the dry run checkpoints one method per way of
    building a model, :data:`DRY_RUN_CHECKPOINTED`); returns {setting: [records]}. A point runs under
    ``min(point_timeout_s, deadline - now)`` and starts only while that is at least ``min_point_s``, so the
    last point ends by the deadline; later points are recorded ``skipped``."""
    results: dict[str, list[dict]] = {}
    for setting, checkpointing in (("plain", False), ("checkpointed", True)):
        records = []
        for method in methods:
            if dry_run and checkpointing and method not in DRY_RUN_CHECKPOINTED:
                continue
            path = B.result_path(out / "steps" / setting, size, method)
            limit = min(point_timeout_s, deadline - time.perf_counter())
            opts = replace(options, gradient_checkpointing=checkpointing, timeout_s=max(limit, 1.0)).validate()
            if limit < min_point_s:
                record = base_record(size, method, opts)
                record.update(status="skipped", detail="time budget of the check spent before this point")
            elif dry_run:
                record = B.run_worker(size, method, opts)
            else:
                record = B.run_one(size, method, opts, path, log=out / "logs" / f"{setting}.log")
            record["gradient_checkpointing"] = checkpointing
            write_json_atomic(path, record)
            records.append(record)
            print(f"[{setting}] {summary_line(record)}", flush=True)
        results[setting] = records
    return results


def _fmt(value, digits=2, suffix=""):
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def render(summary: dict) -> str:
    """The markdown report of a check: tests, the dΔ table, one step/memory table per setting."""
    tests = summary["tests"]
    lines = [f"# GPU device check ({'dry run, CPU' if summary['dry_run'] else summary['device_name']})", "",
             f"{summary['created_utc']}; torch {summary['versions']['torch']}; size `{summary['size']}`, "
             f"{summary['batch_size']}×{summary['seq_len']} tokens, {summary['dtype']}, rank {summary['rank']}.", "",
             "## Tests", "", f"`pytest {' '.join(tests['args'])}`: exit {tests['rc']}, "
             + ", ".join(f"{v} {k}" for k, v in tests["counts"].items()) + f" (CUDA cases skipped: {tests['cuda_skipped']}).",
             "", "## dΔ paths per layer shape (bf16 operands, fp32 accumulation; median time)", "",
             "| out × in | k | tokens | positions | sampled [ms] | dense GEMM+gather [ms] | faster | auto picks |",
             "|---|---:|---:|---|---:|---:|---|---|"]
    for r in summary["delta_grad"]:
        lines.append(f"| {r['out_features']}×{r['in_features']} | {r['k']:,d} | {r['tokens']} | {r['variant']} | "
                     f"{r['sampled_ms']:.3f} | {r['dense_ms']:.3f} | {r['faster']} | {r['auto_choice']} |")
    for setting, rows in summary["ratios"].items():
        lines += ["", f"## Step time and peak memory, {setting}", "",
                  "| method | status | step [s] | CUDA-event step [s] | peak [GiB] | step/LoRA | step/LoRA-d0 | "
                  "step/floor | mem/LoRA | mem/LoRA-d0 | mem/floor |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            status = r["status"] if r["status"] == "ok" else f"{r['status']}: {(r.get('detail') or '')[:60]}"
            lines.append(f"| {r['method']} | {status} | {_fmt(r['step_time_mean_s'], 3)} | "
                         f"{_fmt(r.get('step_time_cuda_event_mean_s'), 3)} | "
                         f"{_fmt(r['peak_memory_bytes'] / 2**30 if r['peak_memory_bytes'] else None)} | "
                         f"{_fmt(r['step_time_vs_lora'], suffix='×')} | {_fmt(r['step_time_vs_lora_dropout0'], suffix='×')} | "
                         f"{_fmt(r['step_time_vs_floor'], suffix='×')} | {_fmt(r['peak_memory_vs_lora'], suffix='×')} | "
                         f"{_fmt(r['peak_memory_vs_lora_dropout0'], suffix='×')} | {_fmt(r['peak_memory_vs_floor'], suffix='×')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the check; returns the exit status (0: tests passed and no point errored or timed out)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "results" / "benchmark" / "cuda"))
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, in-process points (seconds)")
    p.add_argument("--wheels", default=str(REPO / "wheels"))
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--budget-s", type=float, default=465.0,
                   help="every step point ends within this many seconds of the start")
    p.add_argument("--point-timeout-s", type=float, default=90.0)
    p.add_argument("--min-point-s", type=float, default=30.0, help="start no point with less time than this left")
    p.add_argument("--micro-reps", type=int, default=10)
    p.add_argument("--tests-timeout-s", type=float, default=150.0)
    args = p.parse_args(argv)
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wheels = {"skipped": "dry run"} if args.dry_run else install_wheels(Path(args.wheels))
    if args.dry_run:
        size, device = "tiny", "cpu"
        options = B.BenchmarkOptions(rank=2, batch_size=1, seq_len=16, warmup_steps=1, steps=1, dtype="bfloat16",
                                     device="cpu", threads=1)
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device (use --dry-run on CPU)", file=sys.stderr)
            return 2
        size, device = "llama2-7b", "cuda"
        options = B.BenchmarkOptions(rank=64, batch_size=1, seq_len=2048, warmup_steps=1, steps=3, dtype="bfloat16",
                                     device="cuda")
    options.validate()
    B.check_pairs([size], args.methods, options)
    summary = {"created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "dry_run": args.dry_run,
               "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
               "versions": {"torch": torch.__version__, "python": sys.version.split()[0]}, "size": size,
               "batch_size": options.batch_size, "seq_len": options.seq_len, "dtype": options.dtype,
               "rank": options.rank, "budget_s": args.budget_s, "wheels": wheels}
    summary["tests"] = run_tests(args.dry_run, out, args.tests_timeout_s)
    tokens = options.batch_size * options.seq_len
    summary["delta_grad"] = delta_grad_table(B.SIZES[size], torch.device(device), options.rank, tokens,
                                             2 if args.dry_run else args.micro_reps)
    if device == "cuda":
        torch.cuda.empty_cache()  # the workers are other processes: leave them the memory
    points = run_points(size, options, out, args.methods, args.dry_run, started + args.budget_s,
                        args.point_timeout_s, 0.0 if args.dry_run else args.min_point_s)
    summary["points"] = points
    summary["ratios"] = {setting: B.table_rows([r for r in records if r["status"] != "skipped"])
                         + [dict({c: r.get(c) for c in B.TABLE_COLUMNS}, status="skipped", detail=r["detail"])
                            for r in records if r["status"] == "skipped"]
                         for setting, records in points.items()}
    for rows, records in zip(summary["ratios"].values(), points.values()):
        events = {r["method"]: r.get("step_time_cuda_event_mean_s") for r in records}
        for row in rows:
            row["step_time_cuda_event_mean_s"] = events.get(row["method"])
    summary["wall_time_s"] = time.perf_counter() - started
    write_json_atomic(out / "cuda_check.json", summary)
    write_text_atomic(out / "cuda_check.md", render(summary))
    bad = [r["method"] for records in points.values() for r in records if r["status"] in ("error", "timeout")]
    tests_ok = summary["tests"]["rc"] == 0 and (args.dry_run or summary["tests"]["cuda_skipped"] == 0)
    print(f"cuda_check: tests {'passed' if tests_ok else 'FAILED'}; points in error/timeout: {bad or 'none'}; "
          f"{summary['wall_time_s']:.0f} s; wrote {out / 'cuda_check.md'}")
    return 0 if tests_ok and not bad else 1


if __name__ == "__main__":
    sys.exit(main())

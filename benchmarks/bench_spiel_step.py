"""Micro-benchmark (issue 3): one training step of SpIEL vs LoRA vs the floor on the real SmolLM2-135M.

Each method runs in its own fresh process (``spielbench.benchmark.run_one``) on the real model folder
built by the asset rules (``resources/models/smollm2-135m-instruct``), batch 8 x 128 tokens, fp32, at
the LoRA r=16 budget (SpIEL gets ``16 * Σ(in + out)`` = 4,884,480 trainable entries):

* ``floor``: frozen weights, gradient to the inputs only (the cost no method can go below);
* ``lora``: peft LoRA r=16 on the seven projections, dropout 0.1 (the reference's setting);
* ``lora-dropout0``: the same without dropout (the fastest LoRA; ratios "vs LoRA-d0" divide by it);
* ``spiel-ag``, ``spiel-ma``: the project's SpIEL (sampled ``dΔ``; dense ``dW`` only in AG phases);
* ``spiel-reference``: SpIEL-AG with the reference-style layer (dense ``dW`` in every backward).

SpIEL step times are schedule-weighted so that selection phases count in their natural proportion
(S=20, γ=5; see ``spielbench.benchmark``). The script prints step time, peak memory and the ratios to
LoRA and to the floor, all measured in this one run, plus the machine's load average (other work on
the machine disturbs timings). Nothing is asserted: this is a measurement, not a test.

Usage: ``python benchmarks/bench_spiel_step.py [--model-dir DIR] [--steps 4] [--warmup-steps 1]
[--methods ...] [--out-dir DIR]`` (JSONs per method land in ``--out-dir``, default
``results/benchmark/real-smollm2-135m``).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spielbench.benchmark import BenchmarkOptions, result_path, run_one  # noqa: E402
from spielbench.errors import InputError  # noqa: E402

DEFAULT_METHODS = ("floor", "lora", "lora-dropout0", "spiel-ag", "spiel-ma", "spiel-reference")


def main(argv: list[str] | None = None) -> int:
    """Run the methods, print the table of figures and ratios; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default=str(REPO / "resources" / "models" / "smollm2-135m-instruct"))
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--steps", type=int, default=4,
                   help="timed steps (raised to cover every step kind: SpIEL-AG 6 when γ >= 3, MA 3)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-dir", default=str(REPO / "results" / "benchmark" / "real-smollm2-135m"))
    args = p.parse_args(argv)
    try:
        options = BenchmarkOptions(rank=args.rank, batch_size=args.batch_size, seq_len=args.seq_len,
                                   warmup_steps=args.warmup_steps, steps=args.steps, threads=args.threads,
                                   device="cpu", model_dir=args.model_dir).validate()
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    records = {}
    for method in args.methods:
        rec = run_one("smollm2-135m-real", method, options, result_path(args.out_dir, "smollm2-135m-real", method))
        records[method] = rec
        state = rec.get("status")
        print(f"{method:<16} {state}: step {rec.get('step_time_mean_s') or float('nan'):.3f} s, "
              f"peak RSS {(rec.get('peak_memory_bytes') or 0) / 1e9:.2f} GB, load {rec.get('load_avg_start')}",
              flush=True)
    lora, floor, lora0 = records.get("lora"), records.get("floor"), records.get("lora-dropout0")

    def ratio(rec, ref, key):
        ok = rec.get("status") == "ok" and ref is not None and ref.get("status") == "ok"
        return f"{rec[key] / ref[key]:.2f}" if ok else "–"

    print(f"\nSmolLM2-135M (real weights), batch {args.batch_size} x {args.seq_len}, fp32, LoRA r{args.rank} budget; "
          f"{os.cpu_count()} CPUs, {next(iter(records.values())).get('threads')} threads")
    print("| method | step [s] | p50 [s] | vs LoRA | vs LoRA-d0 | vs floor | CPU [s] | CPU vs LoRA | CPU vs LoRA-d0 | "
          "CPU vs floor | peak RSS [GB] | mem vs LoRA | mem vs LoRA-d0 | mem vs floor | trainable | state [MB] | "
          "kinds (mean s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for method, rec in records.items():
        if rec.get("status") != "ok":
            print(f"| {method} | {rec.get('status')}: {str(rec.get('detail'))[:80]} |")
            continue
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in (rec.get("kind_mean_s") or {}).items())
        print(f"| {method} | {rec['step_time_mean_s']:.3f} | {rec['step_time_p50_s']:.3f} | "
              f"{ratio(rec, lora, 'step_time_mean_s')} | {ratio(rec, lora0, 'step_time_mean_s')} | "
              f"{ratio(rec, floor, 'step_time_mean_s')} | {rec['step_cpu_time_mean_s']:.3f} | "
              f"{ratio(rec, lora, 'step_cpu_time_mean_s')} | {ratio(rec, lora0, 'step_cpu_time_mean_s')} | "
              f"{ratio(rec, floor, 'step_cpu_time_mean_s')} | {rec['peak_memory_bytes'] / 1e9:.2f} | "
              f"{ratio(rec, lora, 'peak_memory_bytes')} | {ratio(rec, lora0, 'peak_memory_bytes')} | "
              f"{ratio(rec, floor, 'peak_memory_bytes')} | {rec['trainable_params']:,d} | "
              f"{rec['adapter_state_bytes'] / 1e6:.1f} | {kinds} |")
    loads = [r.get(k) for r in records.values() for k in ("load_avg_start", "load_avg_end") if r.get(k) is not None]
    if loads:
        print(f"\n1-minute load average during the runs: {min(loads):.2f}-{max(loads):.2f} "
              f"(above the thread count means other work disturbed the timings)")
    return 0 if all(r.get("status") == "ok" for r in records.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

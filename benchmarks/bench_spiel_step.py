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
(S=20, γ=5; see docs/BENCHMARK.md). The script prints the efficiency benchmark's table of these
points (step time, peak memory, ratios to LoRA, LoRA without dropout and the floor, all measured in this
one run, and the machine's load average: other work on it disturbs timings) and each method's mean
step time per step kind. Nothing is asserted: this is a measurement, not a test.

Usage: ``python benchmarks/bench_spiel_step.py [--model-dir DIR] [--steps 4] [--warmup-steps 1]
[--methods ...] [--out-dir DIR]`` (JSONs per method land in ``--out-dir``, default
``results/benchmark/real-smollm2-135m``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spielbench.benchmark import BenchmarkOptions, result_path, run_one, table_rows  # noqa: E402
from spielbench.benchmark.runner import summary_line  # noqa: E402
from spielbench.benchmark.table import render_markdown  # noqa: E402
from spielbench.errors import exit_status  # noqa: E402

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
    return exit_status(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    """Measure ``args.methods`` and print the table; returns the exit status (InputError propagates)."""
    options = BenchmarkOptions(rank=args.rank, batch_size=args.batch_size, seq_len=args.seq_len,
                               warmup_steps=args.warmup_steps, steps=args.steps, threads=args.threads,
                               device="cpu", model_dir=args.model_dir).validate()
    records = {}
    for method in args.methods:
        rec = run_one("smollm2-135m-real", method, options, result_path(args.out_dir, "smollm2-135m-real", method))
        records[method] = rec
        print(summary_line(rec), flush=True)
    points = list(records.values())
    print()
    print(render_markdown(table_rows(points), points))  # the efficiency benchmark's own table and ratios
    for method, rec in records.items():
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in (rec.get("kind_mean_s") or {}).items())
        if kinds:
            print(f"{method}: mean step time [s] per step kind: {kinds}")
    return 0 if all(r.get("status") == "ok" for r in records.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Micro-benchmark: the backward of one SpIEL layer at SmolLM2-135M shapes, sampled vs dense gradient.

For each projection shape of a SmolLM2-135M block (q/o 576x576, k/v 192x576, gate/up 1536x576,
down 576x1536; ``--hidden/--intermediate/--kv-dim`` change them), with ``--tokens`` tokens (default
1024 = batch 8 x 128) and k at the LoRA-rank-equivalent budget (``--rank`` 16: k = 4.6% of each matrix,
4,884,480 entries over the whole model), it times on one intra-op thread:

* ``bwd dΔ``: backward to the deltas only, with the sampled product at the k active positions
  (the project's ordinary step) and with a dense ``dW = dYᵀX`` gathered at η (what the reference
  layer computes in every backward);
* ``bwd dΔ+dx``: the same plus the input gradient (what a layer inside the network does);
* SpIEL-AG selection phases (docs/METHOD.md §4.1): the first backward of a phase (dense ``dW``, then
  the k candidates = top-k ``|dW|``, with ``spiel.selection.topk_abs_indices`` and with a plain
  ``torch.topk``), and a later backward of the phase (the project: ``dW`` at η and at the k fixed
  candidates from one sampled product; before: a dense ``dW`` gathered at both);
* ``fwd+bwd``: a whole training step of the layer for SpIEL, a peft-style LoRA r16 layer
  (``W x + B A x``) and the frozen-weight floor (input gradient only).

Times are CPU seconds of this thread (``time.thread_time``, so other work on a shared machine disturbs
them little), the minimum over ``--rounds`` interleaved rounds after two warm-up rounds. The script
prints a table in milliseconds per shape, the total for one block (each shape weighted by how often
it occurs), and the ratios, all measured in this one run. Nothing is asserted: this is a measurement,
not a test.

Usage: ``python benchmarks/bench_layer_backward.py [--tokens 1024] [--rank 16] [--rounds 12]``
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from spiel.layer import SparseDeltaLinear  # noqa: E402
from spiel.selection import topk_abs_indices  # noqa: E402

COLUMNS = {
    "bwd dΔ sampled": "backward to Δ only, sampled at η (ordinary step)",
    "bwd dΔ dense": "backward to Δ only, dense dW gathered at η (reference)",
    "bwd dΔ+dx sampled": "backward to Δ and x, sampled",
    "bwd dΔ+dx dense": "backward to Δ and x, dense dW (reference)",
    "phase first": "AG phase, first backward: dense dW + top-k |dW| (topk_abs_indices)",
    "phase first topk": "AG phase, first backward: dense dW + torch.topk (before)",
    "phase later sampled": "AG phase, later backward: sampled at η + candidates (now)",
    "phase later dense": "AG phase, later backward: dense dW gathered at η + candidates (before)",
    "fwd+bwd spiel": "layer step: SpIEL (sampled)",
    "fwd+bwd lora": "layer step: LoRA (W x + B A x)",
    "fwd+bwd floor": "layer step: frozen weight, input gradient only",
}


def _shapes(hidden: int, intermediate: int, kv_dim: int) -> dict[tuple[int, int], int]:
    """``{(out, in): occurrences per block}`` for the seven projections of a LLaMA block."""
    shapes: dict[tuple[int, int], int] = {}
    for shape in [(hidden, hidden), (kv_dim, hidden), (kv_dim, hidden), (hidden, hidden),
                  (intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]:
        shapes[shape] = shapes.get(shape, 0) + 1
    return shapes


def _case(out_f: int, in_f: int, density: float, tokens: int, rank: int) -> dict[str, Callable[[], None]]:
    """The timed functions of one shape (each one complete backward or step)."""
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f, bias=False)
    layer = SparseDeltaLinear(base, max(1, int(density * out_f * in_f)), generator=torch.Generator().manual_seed(0))
    k = layer.k
    # The selection-phase functions run on a twin layer (same base, same η): each layer caches one CSR
    # pattern, so alternating η-only and η+candidates backwards on one layer would rebuild it every time.
    twin = SparseDeltaLinear(base, indices=layer.indices.clone())
    grad_out = torch.randn(tokens, out_f)
    x_frozen = torch.randn(tokens, in_f)
    x = x_frozen.clone().requires_grad_()
    y_frozen, y, y_twin = layer(x_frozen), layer(x), twin(x)  # graphs kept for repeated backwards
    weight = base.weight.detach()
    lora_a = (torch.randn(rank, in_f) * 0.01).requires_grad_()
    lora_b = torch.zeros(out_f, rank, requires_grad=True)
    candidates = torch.randperm(out_f * in_f, generator=torch.Generator().manual_seed(1))[:k].to(layer.indices.dtype)
    sink = []

    def backward(output, dense_hook=None, sample=False, target=layer):
        target.weight_grad_hook = dense_hook
        target.sample_weight_grad(candidates, sink.append) if sample else target.sample_weight_grad(None, None)
        target.values.grad = None
        x.grad = None
        output.backward(grad_out, retain_graph=True)
        sink.clear()

    def dense_gather(dw):  # the old AG selector on a later backward: gather dW at the candidates
        sink.append(dw.view(-1).index_select(0, candidates))

    def spiel_step():
        layer.weight_grad_hook = None
        layer.sample_weight_grad(None, None)
        layer.values.grad = None
        x.grad = None
        layer(x).backward(grad_out)

    def lora_step():
        x.grad = lora_a.grad = lora_b.grad = None
        (F.linear(x, weight) + F.linear(F.linear(x, lora_a), lora_b)).backward(grad_out)

    def floor_step():
        x.grad = None
        F.linear(x, weight).backward(grad_out)

    return {
        "bwd dΔ sampled": lambda: backward(y_frozen),
        "bwd dΔ dense": lambda: backward(y_frozen, dense_hook=lambda dw: None),
        "bwd dΔ+dx sampled": lambda: backward(y),
        "bwd dΔ+dx dense": lambda: backward(y, dense_hook=lambda dw: None),
        "phase first": lambda: backward(y, dense_hook=lambda dw: sink.append(topk_abs_indices(dw, k))),
        "phase first topk": lambda: backward(
            y, dense_hook=lambda dw: sink.append(torch.topk(dw.abs().view(-1), k, sorted=False).indices)),
        "phase later sampled": lambda: backward(y_twin, sample=True, target=twin),
        "phase later dense": lambda: backward(y, dense_hook=dense_gather),
        "fwd+bwd spiel": spiel_step,
        "fwd+bwd lora": lora_step,
        "fwd+bwd floor": floor_step,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the measurement and print the table; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=576, help="hidden size (SmolLM2-135M: 576)")
    parser.add_argument("--intermediate", type=int, default=1536, help="MLP size (SmolLM2-135M: 1536)")
    parser.add_argument("--kv-dim", type=int, default=192, help="k/v projection size (SmolLM2-135M: 3 x 64)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per backward (batch x sequence)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank defining the budget (and the LoRA layer)")
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds (the minimum is reported)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads")
    args = parser.parse_args(argv)
    for field in ("hidden", "intermediate", "kv_dim", "tokens", "rank", "rounds", "threads"):
        if getattr(args, field) < 1:
            parser.error(f"--{field.replace('_', '-')} must be >= 1, got {getattr(args, field)}")
    torch.set_num_threads(args.threads)

    shapes = _shapes(args.hidden, args.intermediate, args.kv_dim)
    budget = args.rank * sum(n * (o + i) for (o, i), n in shapes.items())
    density = budget / sum(n * o * i for (o, i), n in shapes.items())
    cases = {shape: _case(*shape, density, args.tokens, args.rank) for shape in shapes}
    best: dict[tuple[tuple[int, int], str], float] = {}
    for round_ in range(args.rounds + 2):
        for shape, fns in cases.items():
            for name, fn in fns.items():
                start = time.thread_time()
                fn()
                elapsed = time.thread_time() - start
                if round_ >= 2:
                    best[shape, name] = min(best.get((shape, name), float("inf")), elapsed)

    print(f"one SparseDeltaLinear, {args.tokens} tokens, k = {density:.2%} of each matrix (LoRA r{args.rank} "
          f"budget), {args.threads} thread(s); CPU ms, min of {args.rounds} rounds")
    width = max(len(n) for n in COLUMNS)
    header = "".join(f"{o}x{i}".rjust(11) for o, i in shapes) + "   block".rjust(11)
    print(" " * width + header)
    block = {}
    for name in COLUMNS:
        block[name] = sum(n * best[shape, name] for shape, n in shapes.items())
        row = "".join(f"{best[shape, name] * 1e3:11.2f}" for shape in shapes)
        print(f"{name:<{width}}{row}{block[name] * 1e3:11.1f}")
    print("(block = q, k, v, o, gate, up, down of one transformer block)")
    print()
    ratios = [
        ("dΔ backward, sampled / dense", block["bwd dΔ sampled"] / block["bwd dΔ dense"]),
        ("full backward, sampled / dense (reference)", block["bwd dΔ+dx sampled"] / block["bwd dΔ+dx dense"]),
        ("AG phase first backward, topk_abs_indices / torch.topk", block["phase first"] / block["phase first topk"]),
        ("AG phase first backward / ordinary backward", block["phase first"] / block["bwd dΔ+dx sampled"]),
        ("AG phase later backward, now / before (dense)", block["phase later sampled"] / block["phase later dense"]),
        ("AG phase later backward (now) / ordinary backward",
         block["phase later sampled"] / block["bwd dΔ+dx sampled"]),
        ("layer step, SpIEL / LoRA", block["fwd+bwd spiel"] / block["fwd+bwd lora"]),
        ("layer step, floor / LoRA", block["fwd+bwd floor"] / block["fwd+bwd lora"]),
    ]
    for label, value in ratios:
        print(f"{label:<{max(len(lb) for lb, _ in ratios)}}  {value:5.2f}")
    for name, text in COLUMNS.items():
        print(f"  {name}: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

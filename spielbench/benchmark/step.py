"""One benchmark point's training setup (the method wrapped through the training registry, its optimizer and
selector) and one timed training step, labelled with its kind in the selection schedule."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

from spielbench.benchmark.options import VARIANTS, BenchmarkOptions
from spielbench.benchmark.schedule import DrivingSchedule


@dataclass
class Setup:
    """A built benchmark point: the wrapped ``model``, its ``optimizer`` and ``selector`` (None until
    attached, or for methods without one), ``floor`` (frozen weights) and SpIEL's ``sparse_layers``."""

    model: Any
    optimizer: Any = None
    selector: Any = None
    floor: bool = False
    sparse_layers: list = field(default_factory=list)


def _run_config(method: str, size_label: str, options: BenchmarkOptions, device: str):
    """The registry spec and RunConfig that build ``method`` (a variant: its registry method + overrides)."""
    from spielbench.methods import get_method
    from spielbench.runconfig import RunConfig

    registry_name, overrides = VARIANTS.get(method, (method, {}))
    spec = get_method(registry_name)
    spiel_opts = {}
    if spec.family == "spiel":
        spiel_opts = {"reselection_steps": options.reselection_steps,
                      "selection_accumulation_steps": options.selection_accumulation_steps,
                      "initial_reselection_rate": options.initial_reselection_rate}
    cfg = RunConfig(method=spec.name, model=f"benchmark:{size_label}", train_data="benchmark:random-tokens",
                    rank=options.rank if spec.takes_rank else None, seed=options.seed, device=device,
                    weight_decay=0.0, spiel=spiel_opts, **overrides)
    return spec, cfg


def build_setup(method: str, base, options: BenchmarkOptions, device: str, size_label: str) -> Setup:
    """Wrap ``base`` with ``method`` through the training registry, with the optimizer training builds.

    Benchmark-only variants (:data:`VARIANTS`) are built as their registry method with the RunConfig
    overrides; ``spiel-reference`` then swaps in the reference-style layer. The selector is attached later
    (:func:`attach_selector`). Raises InputError from the registry's config checks.
    """
    if method == "floor":
        for p in base.parameters():
            p.requires_grad_(False)
        return Setup(model=base, floor=True)
    spec, cfg = _run_config(method, size_label, options, device)
    model = spec.build(base, cfg)
    if method == "spiel-reference":
        from spielbench.reference_layer import to_reference_layers

        to_reference_layers(model)
    optimizer = spec.build_optimizer(model, cfg, spec.default_learning_rate)
    selector = None
    layers = []
    if spec.family == "spiel":
        layers = [layer for _, layer in model.sparse_layers()]
    return Setup(model=model, optimizer=optimizer, selector=selector, sparse_layers=layers)


def attach_selector(setup: Setup, schedule: DrivingSchedule) -> None:
    """Attach a ``spiel.SpielSelector`` on the driving schedule at ``completed_steps = c0``."""
    from spiel.selection import SpielSelector

    driving = setup.model.spiel_config.replace(reselection_steps=schedule.driving_period,
                                               selection_accumulation_steps=schedule.driving_accumulation)
    setup.selector = SpielSelector(setup.model, setup.optimizer, total_steps=schedule.total_steps,
                                   grad_accumulation_steps=1, config=driving, completed_steps=schedule.start_step)


def adapter_state(setup: Setup) -> dict[str, int]:
    """Bytes of trainable parameters, gradients, optimizer state, SpIEL indices and fused-forward cache,
    and their ``total``."""
    from spielbench.measure import trainable_state_bytes

    if setup.floor:
        out = {"trainable_param_bytes": 0, "gradient_bytes": 0, "optimizer_state_bytes": 0}
    else:
        out = dict(trainable_state_bytes(setup.model, setup.optimizer))
        out.pop("trainable_state_bytes", None)
    out["index_bytes"] = sum(layer.indices.numel() * layer.indices.element_size() for layer in setup.sparse_layers)
    out["fused_cache_bytes"] = sum(layer.fused_cache_bytes() for layer in setup.sparse_layers)
    out["total"] = sum(out.values())
    return out


def train_step(setup: Setup, ids, autocast, sync, previous_kind: Optional[str] = None,
               cuda_events: bool = False) -> tuple[dict[str, float], str]:
    """One training step; returns ({phase: seconds}, kind): "select" (ended with a reselection),
    "phase-start" (gradient hooks on, the first such step of a phase), "phase-first" (the second),
    "phase" (hooks on, later),
    "after-select" (the step after a "select"), else "plain". With ``cuda_events`` the step is also timed
    by CUDA events on the current stream (``"cuda_event"`` [s])."""
    import torch
    from torch.profiler import record_function

    sel = setup.selector
    # an AG selection phase is open: the step collects candidate gradients (dense dW or sampled candidates)
    hooks_on = sel is not None and getattr(sel, "algorithm", None) == "ag" and bool(getattr(sel, "phase_open", False))
    history = len(setup.selector.history) if setup.selector is not None else 0
    events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda_events else None
    c0 = time.process_time()
    t0 = time.perf_counter()
    if events:
        events[0].record()
    with record_function("bench/forward"), autocast():
        if setup.floor:
            embeds = setup.model.get_input_embeddings()(ids).detach().requires_grad_(True)
            loss = setup.model(inputs_embeds=embeds, labels=ids).loss
        else:
            loss = setup.model(input_ids=ids, labels=ids).loss
    sync()
    t1 = time.perf_counter()
    with record_function("bench/backward"):
        loss.backward()
    del loss
    sync()
    t2 = time.perf_counter()
    with record_function("bench/optimizer"):
        if setup.optimizer is not None:
            setup.optimizer.step()
            setup.optimizer.zero_grad(set_to_none=True)
    sync()
    t3 = time.perf_counter()
    with record_function("bench/selector"):
        if setup.selector is not None:
            setup.selector.step()
    if events:
        events[1].record()
    sync()
    t4 = time.perf_counter()
    c4 = time.process_time()
    selected = setup.selector is not None and len(setup.selector.history) > history
    if selected:
        kind = "select"
    elif hooks_on:
        kind = {"phase-start": "phase-first", "phase-first": "phase", "phase": "phase"}.get(previous_kind,
                                                                                          "phase-start")
    else:
        kind = "after-select" if previous_kind == "select" else "plain"
    out = {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "selector": t4 - t3, "total": t4 - t0,
           "cpu": c4 - c0}
    if events:
        out["cuda_event"] = events[0].elapsed_time(events[1]) / 1e3
    return out, kind

"""One training harness for every method: ``python -m spielbench.train RUN.yaml --output-dir DIR [--set k=v ...]``.

All methods go through the same Hugging Face ``Trainer`` loop, data, schedule and measurement, and differ
only in the adapter (``spielbench.methods``). SpIEL methods use ``spiel.trainer`` (the Trainer
integration that runs the ``SpielSelector`` after each update and checkpoints its state).

Order of work (docs/METHOD.md §8.2 for the training settings):
1. :func:`prepare_run` checks everything that can be checked without the weights: config fields, method,
   budget against the layer shapes (a model built on the ``meta`` device), data files, tokenization and
   filtering. Bad input raises :class:`spielbench.errors.InputError` here, and nothing has been written.
2. :func:`run_training` writes ``DIR/run_config.json``, loads the model, builds the method, and trains
   with a linear schedule after ``warmup_ratio`` of warm-up, checkpointing to ``DIR/checkpoints/`` every
   ``save_steps`` updates (adapter or model, optimizer, scheduler, RNG states, SpIEL selector, and the
   step records of :class:`spielbench.measure.StepMeter`). Rerunning the same command after a kill
   resumes from the last complete checkpoint and ends with the same adapter as an uninterrupted run.
3. At the end it writes ``DIR/adapter/`` (the method's save format; the whole model for full FT) and
   ``DIR/metrics.json`` (atomically, last).

A non-finite training loss stops the run with :class:`NonFiniteLossError` before the optimizer applies
it; the checkpoints written so far are kept. With ``--record-divergence`` (the workflow's choice: a
diverged run is a row of the tables, not a stopped pipeline) the run is recorded as diverged instead
(``metrics.json`` with ``status: "diverged"``, ``adapter/diverged.json``) and the command exits 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spielbench.errors import InputError, exit_status
from spielbench.fsio import atomic_dir
from spielbench.harness_trainer import (HARNESS_STATE_FILE, NonFiniteLossError, StepRecorder,  # noqa: F401
                                        complete_checkpoints, harness_callbacks, harness_trainer_class,
                                        token_mean_loss)
from spielbench.preflight import meta_model_from_config as _meta_model  # noqa: F401 (used by tests)
from spielbench.preflight import resolve_device
from spielbench.runconfig import RunConfig, load_run_config

CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
METRICS_FILE = "metrics.json"
RUN_CONFIG_FILE = "run_config.json"
#: The held-out loss before training, kept for a resumed run's metrics.
HELDOUT_BEFORE_FILE = "heldout_before.json"
#: Keys of ``run_config.json`` that may change between a killed run and its resumption.
RESUMABLE_CHANGES = ("run_id",)


@dataclass
class PreparedRun:
    """Everything checked and loaded before the model weights: see :func:`prepare_run`."""

    cfg: RunConfig
    spec: Any  # spielbench.methods.MethodSpec
    output_dir: Path
    device: str
    learning_rate: float
    tokenizer: Any
    train_dataset: Any  # spielbench.data.InstructionDataset
    heldout_dataset: Any | None
    budget: dict[str, Any]
    resume_from: Path | None = None
    dropped_examples: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ preparation


def _check_resume(cfg: RunConfig, output_dir: Path, restart_if_changed: bool = False) -> Path | None:
    """The checkpoint to resume from, after checking that it belongs to the same run config.

    With ``restart_if_changed`` (the pipeline's choice: a changed setting means a new run), checkpoints
    of a run with another config are moved aside to ``checkpoints.stale/`` (replacing an older one) and
    training starts from scratch; without it, a mismatch raises :class:`InputError` naming the field.
    A last checkpoint at or past ``max_steps`` belongs to a finished run: it is moved aside the same way
    and the run trains again from scratch (the Hugging Face Trainer would otherwise run one step past
    ``max_steps`` when resumed there, and end with a different adapter than the uninterrupted run).
    """
    checkpoints = complete_checkpoints(output_dir / CHECKPOINTS_DIR)
    if not checkpoints:
        return None
    saved_file = output_dir / RUN_CONFIG_FILE
    if saved_file.is_file():
        saved = json.loads(saved_file.read_text()).get("config", {})
        current = cfg.to_dict()
        # a field added to RunConfig after the checkpoints were written holds its default there
        defaults = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.default is not dataclasses.MISSING}
        for key in sorted(set(saved) | set(current)):
            if key in RESUMABLE_CHANGES:
                continue
            if saved.get(key, defaults.get(key)) != current.get(key):
                if restart_if_changed:
                    _move_checkpoints_aside(output_dir, f"{key} changed ({saved.get(key)!r} -> {current.get(key)!r})")
                    return None
                raise InputError(
                    f"{key}: {output_dir} holds checkpoints of a run with {key}={saved.get(key)!r}, this config "
                    f"has {current.get(key)!r}; use another --output-dir or delete {output_dir / CHECKPOINTS_DIR}")
    last_step = int(checkpoints[-1].name.split("-")[1])
    if last_step >= cfg.max_steps:
        _move_checkpoints_aside(output_dir, f"the run finished (checkpoint at step {last_step}, max_steps "
                                            f"{cfg.max_steps})")
        return None
    return checkpoints[-1]


def _move_checkpoints_aside(output_dir: Path, reason: str) -> None:
    """Move ``output_dir/checkpoints`` to ``checkpoints.stale`` (replacing an older one) and say why on stderr."""
    stale = output_dir / (CHECKPOINTS_DIR + ".stale")
    shutil.rmtree(stale, ignore_errors=True)
    os.replace(output_dir / CHECKPOINTS_DIR, stale)
    print(f"note: {reason}; checkpoints of the old run moved to {stale}, training from scratch", file=sys.stderr)


def prepare_run(cfg: RunConfig, output_dir: str | Path, restart_if_changed: bool = False) -> PreparedRun:
    """Check a run and load what it needs except the model weights. Writes nothing (with
    ``restart_if_changed`` it may move a changed run's checkpoints aside, after every other check passed).

    The model-dependent checks are :func:`spielbench.preflight.check_run_against_model`, the same the
    workflow runs at parse time.

    Raises:
        InputError: unknown method; rank/density missing, misplaced or larger than the layers allow;
            unknown ``spiel.target_modules``; ``max_seq_length`` shorter than the chat template's overhead;
            missing model folder or data file; unreadable data; no example left after filtering;
            CUDA requested without CUDA; checkpoints in ``output_dir`` from a different config.
    """
    from spielbench.methods import get_method

    t0 = time.perf_counter()
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"--output-dir: {output_dir} exists and is not a folder")
    spec = get_method(cfg.method)
    spec.check_config(cfg)
    model_dir = Path(cfg.model)
    if not (model_dir / "config.json").is_file():
        raise InputError(f"model: {model_dir} is not a model folder (config.json expected)")
    train_path = Path(cfg.train_data)
    if not train_path.is_file():
        raise InputError(f"train_data: file {train_path} does not exist")
    if cfg.heldout_data is not None and not Path(cfg.heldout_data).is_file():
        raise InputError(f"heldout_data: file {cfg.heldout_data} does not exist")
    device = resolve_device(cfg.device)
    if spec.quantized:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise InputError(f"method: {cfg.method!r} needs bitsandbytes, which is not installed") from None

    from spielbench.data import describe_drops, dropped_examples, load_instruction_dataset, read_data_report
    from spielbench.preflight import check_run_against_model, load_model_info

    info = load_model_info(model_dir)
    budget = check_run_against_model(cfg, spec, info, device)
    tokenizer = info.tokenizer
    data_report = None
    if cfg.data_report is not None:
        data_report = read_data_report(Path(cfg.data_report))
    train_dataset = load_instruction_dataset(train_path, tokenizer, cfg.max_seq_length,
                                             max_examples=cfg.max_train_examples, field_name="train_data",
                                             on_malformed=cfg.on_malformed)
    heldout_dataset = None
    if cfg.heldout_data is not None:
        heldout_dataset = load_instruction_dataset(cfg.heldout_data, tokenizer, cfg.max_seq_length,
                                                   max_examples=cfg.heldout_examples, field_name="heldout_data",
                                                   on_malformed=cfg.on_malformed)
    drops = dropped_examples(train_dataset, heldout_dataset, data_report)
    for what, report in (("data split", drops["before_split"]), ("train_data", drops["train"]),
                         ("heldout_data", drops["heldout"])):
        line = describe_drops(report["dropped"], what, report["read"]) if report else None
        if line:
            print(f"note: {line}", file=sys.stderr)
    resume_from = _check_resume(cfg, output_dir, restart_if_changed)  # last: it may move old checkpoints aside
    lr = cfg.learning_rate if cfg.learning_rate is not None else spec.default_learning_rate
    return PreparedRun(cfg=cfg, spec=spec, output_dir=output_dir, device=device, learning_rate=lr,
                       tokenizer=tokenizer, train_dataset=train_dataset, heldout_dataset=heldout_dataset,
                       budget=budget, resume_from=resume_from, dropped_examples=drops,
                       timings_s={"prepare_s": time.perf_counter() - t0})


def _training_arguments(prep: PreparedRun):
    from transformers import TrainingArguments

    cfg = prep.cfg
    on_cuda = prep.device.startswith("cuda")
    return TrainingArguments(
        output_dir=str(prep.output_dir / CHECKPOINTS_DIR),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=prep.learning_rate,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type="linear",
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of max_steps (transformers v5)
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,  # the newest may be half-written when killed; the one before stays complete
        logging_strategy="steps",
        logging_steps=1,
        logging_nan_inf_filter=False,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=not on_cuda,
        bf16=on_cuda,
    )


def _publish_adapter_dir(prep: PreparedRun, write) -> Path:
    """Fill a temp folder with ``write(folder)``, then swap it into ``DIR/adapter`` (a reader sees the old
    folder or the complete new one: :func:`spielbench.fsio.atomic_dir`)."""
    final = prep.output_dir / ADAPTER_DIR
    with atomic_dir(final) as tmp:
        write(tmp)
    return final


def _save_adapter_atomically(prep: PreparedRun, model) -> Path:
    """Save the adapter (the method's format) into ``DIR/adapter`` through :func:`_publish_adapter_dir`."""
    return _publish_adapter_dir(prep, lambda tmp: prep.spec.save(model, tmp, tokenizer=prep.tokenizer))


#: Fields of each SpIEL reselection record copied into the metrics (the per-matrix counts are left out).
SELECTOR_HISTORY_FIELDS = ("step", "rate", "num_requested", "num_replaced", "num_active", "overlap_initial")


def _selector_history(trainer) -> list[dict[str, Any]] | None:
    """SpIEL reselection records (``spiel.SpielSelector.history``), or None for runs without a selector."""
    selector = getattr(trainer, "selector", None)
    if selector is None or getattr(selector, "history", None) is None:
        return None
    return [{k: rec.get(k) for k in SELECTOR_HISTORY_FIELDS} for rec in selector.history]


def run_training(prep: PreparedRun, *, progress: bool = True, callbacks: list | tuple = (),
                 record_divergence: bool = False) -> dict[str, Any]:
    """Train a prepared run to the end (resuming if a checkpoint exists) and write adapter and metrics.

    Args:
        prep: from :func:`prepare_run`.
        progress: show the tqdm progress bar (step, loss, tokens/s) on stderr.
        callbacks: extra ``transformers.TrainerCallback`` objects (e.g. to stop a run early in tests).
        record_divergence: on a non-finite loss, write a diverged run's records instead of raising
            (:func:`_record_divergence`: ``metrics.json`` with ``status: "diverged"``, ``adapter/diverged.json``).

    Returns:
        The metrics dict written to ``DIR/metrics.json``.

    Raises:
        NonFiniteLossError: the loss became NaN/inf and ``record_divergence`` is False (checkpoints kept, no
            adapter or metrics written).
    """
    import torch
    from transformers import PrinterCallback, set_seed

    from spielbench import measure
    from spielbench.data import make_collator
    from spielbench.fsio import write_json_atomic
    from spielbench.heldout import heldout_loss
    from spielbench.records import RunMetrics

    cfg, spec = prep.cfg, prep.spec
    t_start = time.perf_counter()
    prep.output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(prep.output_dir / RUN_CONFIG_FILE, {
        "config": cfg.to_dict(),
        "resolved": {"device": prep.device, "learning_rate": prep.learning_rate, "budget": prep.budget,
                     "train_examples": prep.train_dataset.stats.as_dict(),
                     "heldout_examples": prep.heldout_dataset.stats.as_dict() if prep.heldout_dataset else None},
    })

    set_seed(cfg.seed)
    t0 = time.perf_counter()
    base = spec.load_base(cfg.model, prep.device)
    if cfg.gradient_checkpointing:
        base.activation_checkpointing_enable({"use_reentrant": False})
    model = spec.build(base, cfg)
    load_s = time.perf_counter() - t0
    trainable = measure.count_parameters(model, trainable_only=True)

    collator = make_collator(prep.tokenizer)

    def measure_heldout():
        return heldout_loss(model, prep.heldout_dataset, collator, file=cfg.heldout_data,
                            max_seq_length=cfg.max_seq_length)

    heldout_before = None
    if prep.heldout_dataset is not None and prep.resume_from is None and cfg.heldout_before:
        heldout_before = measure_heldout()
        write_json_atomic(prep.output_dir / CHECKPOINTS_DIR / HELDOUT_BEFORE_FILE, heldout_before)

    rss_scope = measure.reset_peak_memory(prep.device)
    recorder = StepRecorder(measure.StepMeter())
    args = _training_arguments(prep)
    if spec.family == "spiel":
        from spiel.trainer import SpielTrainer as base_cls
    else:
        from transformers import Trainer as base_cls
    trainer_cls = harness_trainer_class(base_cls)
    trainer_kwargs: dict[str, Any] = dict(model=model, args=args, train_dataset=prep.train_dataset,
                                          data_collator=collator, compute_loss_func=token_mean_loss)
    trainer_kwargs["optimizers"] = (spec.build_optimizer(model, cfg, prep.learning_rate), None)
    trainer = trainer_cls(**trainer_kwargs)
    trainer.harness_meter = recorder
    trainer.remove_callback(PrinterCallback)
    for cb in harness_callbacks(recorder, cfg.max_steps, progress):
        trainer.add_callback(cb)
    for cb in callbacks:
        trainer.add_callback(cb)

    facts = _run_facts(prep, trainable)
    resume = str(prep.resume_from) if prep.resume_from is not None else None
    try:
        trainer.train(resume_from_checkpoint=resume)
    except NonFiniteLossError as exc:
        if not record_divergence:
            raise
        before = heldout_before if heldout_before is not None else _previous_heldout_before(prep.output_dir)
        return _record_divergence(prep, exc, facts, before, time.perf_counter() - t_start)
    state_bytes = measure.trainable_state_bytes(model, trainer.optimizer)
    state_bytes["index_bytes"] = measure.index_bytes(model)
    state_bytes["fused_cache_bytes"] = measure.fused_cache_bytes(model)
    memory = measure.peak_memory(prep.device, rss_scope)

    heldout_after = None
    if prep.heldout_dataset is not None:
        heldout_after = measure_heldout()
    if heldout_before is None and prep.resume_from is not None:
        heldout_before = _previous_heldout_before(prep.output_dir)

    adapter_dir = _save_adapter_atomically(prep, model)
    summary = recorder.meter.summary()
    metrics = {
        **facts,
        **summary,
        "wall_time_s": time.perf_counter() - t_start,
        "model_load_s": load_s,
        "prepare_s": prep.timings_s.get("prepare_s"),
        "memory": {**memory, **state_bytes},
        "adapter_bytes": measure.dir_size_bytes(adapter_dir),
        "loss_curve": [{"step": s, "loss": loss} for s, loss in recorder.meter.losses],
        "heldout_loss_before": heldout_before["loss"] if heldout_before else None,
        "heldout_loss": heldout_after["loss"] if heldout_after else None,
        "heldout_tokens": heldout_after["n_tokens"] if heldout_after else None,
        "selector_history": _selector_history(trainer),
        "packages": measure.package_versions(),
        "git": measure.git_commit(),
        "device": measure.device_description(prep.device),
    }
    RunMetrics.write_checked(metrics, prep.output_dir / METRICS_FILE)
    del trainer
    if prep.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return metrics


def _run_facts(prep: PreparedRun, trainable: int) -> dict[str, Any]:
    """The first keys of metrics.json: what was run (identity, budget with the counted ``trainable`` parameters,
    training settings, data statistics and drops), the same for a finished and a diverged run."""
    from spielbench.records import RunMetrics

    cfg, spec = prep.cfg, prep.spec
    return {
        "format": RunMetrics.VERSION,
        "run_id": cfg.run_id or prep.output_dir.name,
        "method": spec.name,
        "family": spec.family,
        "quantized": spec.quantized,
        "model": cfg.model,
        "budget": {**prep.budget, "trainable_params": trainable,
                   "density": trainable / prep.budget["total_params"] if prep.budget["total_params"] else None,
                   "expected_trainable_params": prep.budget["trainable_params"]},
        "training": {"max_steps": cfg.max_steps, "per_device_train_batch_size": cfg.per_device_train_batch_size,
                     "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
                     "effective_batch_size": cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps,
                     "learning_rate": prep.learning_rate, "weight_decay": cfg.weight_decay,
                     "warmup_ratio": cfg.warmup_ratio, "seed": cfg.seed,
                     "gradient_checkpointing": cfg.gradient_checkpointing, "max_seq_length": cfg.max_seq_length,
                     "resumed_from_step": int(prep.resume_from.name.split("-")[1]) if prep.resume_from else None},
        "data": {"train": prep.train_dataset.stats.as_dict(),
                 "heldout": prep.heldout_dataset.stats.as_dict() if prep.heldout_dataset else None},
        "dropped_examples": prep.dropped_examples,
    }


def _record_divergence(prep: PreparedRun, exc: NonFiniteLossError, facts: dict, heldout_before: dict | None,
                       wall_time_s: float) -> dict[str, Any]:
    """Write a diverged run's records: ``adapter/diverged.json`` (a :class:`spielbench.records.Divergence`; no
    tensor is written) and ``metrics.json`` with ``status: "diverged"``, the step, the losses of the steps
    completed before it, the held-out loss before training when measured, and null measurements.

    Returns:
        The metrics dict written.
    """
    from spielbench import measure
    from spielbench.fsio import write_json_atomic
    from spielbench.records import DIVERGED, Divergence, RunMetrics

    marker = Divergence(step=exc.step, detail=str(exc)).to_json()
    _publish_adapter_dir(prep, lambda tmp: write_json_atomic(tmp / Divergence.FILE, marker))
    metrics = {
        **facts,
        "status": DIVERGED,
        "diverged_at_step": exc.step,
        "detail": str(exc),
        "steps": len(exc.loss_curve),
        "tokens_seen": None, "label_tokens_seen": None, "train_time_s": None, "step_time_mean_s": None,
        "step_time_p50_s": None, "tokens_per_s": None,
        "wall_time_s": wall_time_s,
        "memory": None,
        "adapter_bytes": None,
        "loss_curve": [{"step": s, "loss": loss} for s, loss in exc.loss_curve],
        "heldout_loss_before": heldout_before["loss"] if heldout_before else None,
        "heldout_loss": None,
        "heldout_tokens": None,
        "selector_history": None,
        "packages": measure.package_versions(),
        "git": measure.git_commit(),
        "device": measure.device_description(prep.device),
    }
    RunMetrics.write_checked(metrics, prep.output_dir / METRICS_FILE)
    return metrics


def _previous_heldout_before(output_dir: Path) -> dict | None:
    """The pre-training held-out loss of an interrupted run, saved in its first segment's notes."""
    note = output_dir / CHECKPOINTS_DIR / HELDOUT_BEFORE_FILE
    if note.is_file():
        return json.loads(note.read_text())
    return None


def train(cfg: RunConfig, output_dir: str | Path, *, progress: bool = True, callbacks: list | tuple = ()) -> dict:
    """Check, then train one run; see :func:`prepare_run` and :func:`run_training`."""
    return run_training(prepare_run(cfg, output_dir), progress=progress, callbacks=callbacks)


# ------------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m spielbench.train``."""
    p = argparse.ArgumentParser(
        prog="python -m spielbench.train",
        description="Train one run (SpIEL, LoRA, (IA)3, SHiRA, full FT, 4-bit variants) from a run config.")
    p.add_argument("config", nargs="?", help="run config file (YAML or JSON); optional when --set gives every field")
    p.add_argument("--output-dir", required=True, help="run folder: adapter/, metrics.json, checkpoints/")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable), e.g. --set learning_rate=1e-4 "
                        "--set spiel.reselection_steps=10")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--record-divergence", action="store_true",
                   help="on a non-finite training loss, write metrics.json with status 'diverged' and an adapter/ "
                        "folder holding only diverged.json, and exit 0 (default: exit 1 with nothing written)")
    p.add_argument("--restart-if-changed", action="store_true",
                   help="when DIR holds checkpoints of a run with another config, move them aside and start over "
                        "(default: refuse with an error)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point. Returns 0 on success, 2 on bad input (``error: <message>`` on stderr, nothing written),
    1 when training stops on a non-finite loss (0 with ``--record-divergence``, which records the run as diverged)."""
    args = build_parser().parse_args(argv)
    return exit_status(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    """The body of :func:`main` for parsed ``args`` (an InputError propagates to :func:`exit_status`)."""
    cfg = load_run_config(args.config, args.overrides)
    prep = prepare_run(cfg, args.output_dir, restart_if_changed=args.restart_if_changed)
    try:
        metrics = run_training(prep, progress=not args.no_progress, record_divergence=args.record_divergence)
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if metrics.get("status") == "diverged":
        print(f"{metrics['method']}: diverged ({metrics['detail']}); recorded in "
              f"{Path(args.output_dir) / METRICS_FILE}", file=sys.stderr)
        return 0
    hl = metrics.get("heldout_loss")
    print(f"{metrics['method']}: {metrics['steps']} steps, {metrics['tokens_seen']} tokens, "
          f"{metrics['wall_time_s']:.1f} s, held-out loss "
          f"{'n/a' if hl is None or (isinstance(hl, float) and math.isnan(hl)) else f'{hl:.4f}'}; "
          f"wrote {Path(args.output_dir) / ADAPTER_DIR} and {Path(args.output_dir) / METRICS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

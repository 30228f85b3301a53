"""Training SpIEL models: a Hugging Face ``Trainer`` integration and the plain PyTorch loop.

With Hugging Face ``Trainer`` (recommended): :class:`SpielTrainer` builds the optimizer with
:func:`spiel.optim.build_optimizer` (SparseAdamW for SpIEL-AG, SM3 for SpIEL-MA, from the model's
``SpielConfig``), builds a :class:`~spiel.selection.SpielSelector` once the number of update steps is
known, steps it after every optimizer update through :class:`SpielCallback`, saves only the adapter
(``adapter_config.json`` + ``adapter_model.safetensors``) in checkpoints and at the end, and stores the
selector state (``spiel_selector.pt``) next to the optimizer state, so that
``trainer.train(resume_from_checkpoint=...)`` continues exactly where the interrupted run stopped::

    from transformers import TrainingArguments
    from spiel.config import SpielConfig
    from spiel.model import get_spiel_model
    from spiel.trainer import SpielTrainer

    model = get_spiel_model(hf_model, SpielConfig(lora_rank_equivalent=16, selection_algorithm="ag"))
    args = TrainingArguments(output_dir="out", max_steps=500, learning_rate=1e-4, weight_decay=1.0,
                             gradient_accumulation_steps=8, save_steps=100)
    trainer = SpielTrainer(model=model, args=args, train_dataset=data, data_collator=collator)
    trainer.train()                     # or trainer.train(resume_from_checkpoint=True)
    trainer.save_model("out/adapter")   # adapter only; reload with SpielModel.from_pretrained(base, dir)

A stock ``Trainer`` also works: pass ``optimizers=(make_optimizer(model, args), None)`` and
``callbacks=[SpielCallback(selector)]`` with a selector built for ``args.max_steps``; the callback then
also writes ``spiel_selector.pt`` into each checkpoint and, given ``resume_from_checkpoint``, reloads it.

The plain PyTorch loop (what the callback does, spelled out)::

    from spiel.optim import build_optimizer
    from spiel.selection import SpielSelector

    optimizer = build_optimizer(model, lr=1e-4, weight_decay=1.0)
    selector = SpielSelector(model, optimizer, total_steps=T, grad_accumulation_steps=GA)
    model.train()
    for step in range(T):
        for micro_batch in batches_for(step):            # GA micro-batches per update
            loss = model(**micro_batch).loss / GA
            loss.backward()                               # SpIEL-AG collects dW here during a phase
        optimizer.step()
        selector.step()                                   # drop/grow when the schedule says so
        optimizer.zero_grad(set_to_none=True)
    model.save_pretrained("adapter")
    # checkpoints: model.save_pretrained(dir), optimizer.state_dict(), selector.state_dict()

Under ``torch.distributed`` (DDP) build the selector on every rank after ``init_process_group``; the
selection is identical on all ranks (see :mod:`spiel.selection`).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .model import unwrap_spiel_model
from .optim import build_optimizer
from .selection import SpielSelector

__all__ = [
    "SpielTrainer",
    "SpielCallback",
    "make_optimizer",
    "load_adapter_weights",
    "save_selector_state",
    "load_selector_state",
    "SELECTOR_STATE_NAME",
]

SELECTOR_STATE_NAME = "spiel_selector.pt"
_TRAINING_ARGS_NAME = "training_args.bin"


def make_optimizer(model: Any, args: TrainingArguments) -> torch.optim.Optimizer:
    """The SpIEL optimizer for ``model`` with the Trainer's settings: ``learning_rate``,
    ``weight_decay`` (decoupled, on Δ), ``(adam_beta1, adam_beta2)`` and ``adam_epsilon`` (SM3 uses
    the epsilon only). Raises ValueError as :func:`spiel.optim.build_optimizer` does."""
    return build_optimizer(model, lr=args.learning_rate, weight_decay=args.weight_decay,
                           betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)


def _raw_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Unwrap accelerate's ``AcceleratedOptimizer`` (and similar wrappers) to the SpIEL optimizer."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def save_selector_state(selector: SpielSelector, directory: Union[str, os.PathLike]) -> Path:
    """Write ``selector.state_dict()`` to ``<directory>/spiel_selector.pt`` atomically (temp file +
    ``os.replace``); returns the path. The directory is created if needed."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / SELECTOR_STATE_NAME
    fd, tmp = tempfile.mkstemp(prefix=f".{SELECTOR_STATE_NAME}.", suffix=".tmp", dir=directory)
    os.fchmod(fd, 0o644)  # mkstemp creates 0600; outputs are meant to be readable
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(selector.state_dict(), handle)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def load_selector_state(selector: SpielSelector, directory: Union[str, os.PathLike]) -> bool:
    """Load ``<directory>/spiel_selector.pt`` into ``selector``; returns False if the file is absent.

    Raises ValueError (naming the file) if it is not a selector state for this model."""
    path = Path(directory) / SELECTOR_STATE_NAME
    if not path.is_file():
        return False
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        selector.load_state_dict(state)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return True


def load_adapter_weights(model: Any, directory: Union[str, os.PathLike]) -> None:
    """Copy the indices and deltas saved by ``model.save_pretrained(directory)`` into ``model`` in place
    (same Parameter objects, so an optimizer built on them stays valid): :meth:`SpielModel.load_adapter`
    on ``model`` or on the SpielModel inside a data-parallel wrapper.

    Raises:
        FileNotFoundError: ``<directory>/adapter_model.safetensors`` is missing.
        ValueError: (naming the file) a tensor is missing, unexpected, of the wrong shape, or holds bad
            indices; ``model`` has no ``load_adapter``.
    """
    model = unwrap_spiel_model(model)
    if not callable(getattr(model, "load_adapter", None)) or not callable(getattr(model, "sparse_layers", None)):
        raise ValueError(f"model: expected a spiel SpielModel, got {type(model).__name__}")
    model.load_adapter(directory)


class SpielCallback(TrainerCallback):
    """Steps a :class:`~spiel.selection.SpielSelector` after every optimizer update (``on_step_end``).

    Args:
        selector: the selector (may be set later through the ``selector`` attribute, as
            :class:`SpielTrainer` does).
        save_state: write the selector state into ``<output_dir>/checkpoint-<step>/`` on each save
            (for a stock ``Trainer``; :class:`SpielTrainer` saves it itself and passes False).
        resume_from_checkpoint: a checkpoint directory whose selector state is loaded at
            ``on_train_begin`` (stock ``Trainer`` resume).
    """

    def __init__(self, selector: Optional[SpielSelector] = None, *, save_state: bool = True,
                 resume_from_checkpoint: Optional[Union[str, os.PathLike]] = None) -> None:
        self.selector = selector
        self.save_state = save_state
        self.resume_from_checkpoint = resume_from_checkpoint

    def on_train_begin(self, args, state, control, **kwargs):
        if self.selector is not None and self.resume_from_checkpoint is not None:
            if not load_selector_state(self.selector, self.resume_from_checkpoint):
                raise FileNotFoundError(f"{Path(self.resume_from_checkpoint) / SELECTOR_STATE_NAME}: no selector state")
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.selector is not None:
            self.selector.step()
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.save_state and self.selector is not None and args.should_save:
            save_selector_state(self.selector, Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.selector is not None:
            self.selector.close()  # no gradient hooks outlive training
        return control


class SpielTrainer(Trainer):
    """``transformers.Trainer`` for a :class:`spiel.model.SpielModel` (SpIEL-AG, SpIEL-MA, qSpIEL).

    Differences from ``Trainer``: the optimizer comes from :func:`make_optimizer`; a
    :class:`SpielSelector` (available as ``trainer.selector`` once training starts) is built for the
    run's ``max_steps`` and the Trainer's ``gradient_accumulation_steps`` and stepped after each
    update; checkpoints and ``save_model`` hold the adapter only (plus ``spiel_selector.pt`` in
    checkpoints); resuming loads the adapter in place and restores the selector state exactly (a
    checkpoint without one falls back to the schedule at the checkpoint's step, spec §10.10).

    Args:
        model: the SpielModel (its ``spiel_config`` decides AG/MA).
        selector_kwargs: extra keyword arguments for :class:`SpielSelector` (e.g. ``block_elements``).
        *args, **kwargs: as for ``transformers.Trainer``. A custom ``optimizers=(opt, sched)`` is honoured
            for the scheduler; an optimizer passed there replaces the SpIEL one.

    Raises:
        ValueError: ``model`` is not a SpielModel (no ``sparse_layers()``/``spiel_config``).
    """

    def __init__(self, model: Any = None, *args: Any, selector_kwargs: Optional[dict[str, Any]] = None,
                 **kwargs: Any) -> None:
        if model is None or not callable(getattr(model, "sparse_layers", None)) or getattr(
                model, "spiel_config", None) is None:
            raise ValueError("model: SpielTrainer needs a spiel SpielModel (from spiel.model.get_spiel_model)")
        self.selector: Optional[SpielSelector] = None
        self.selector_kwargs = dict(selector_kwargs or {})
        self._spiel_callback = SpielCallback(save_state=False)
        super().__init__(model, *args, **kwargs)
        self.add_callback(self._spiel_callback)

    # ------------------------------------------------------------------------------ optimizer
    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """Build the SpIEL optimizer (:func:`make_optimizer`) unless one was given."""
        if self.optimizer is None:
            self.optimizer = make_optimizer(self.model, self.args)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: Optional[torch.optim.Optimizer] = None):
        """The Trainer's scheduler, then a fresh :class:`SpielSelector` for ``num_training_steps`` updates."""
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        self._build_selector(num_training_steps)
        return scheduler

    def _build_selector(self, total_steps: int, completed_steps: int = 0) -> None:
        if self.selector is not None:
            self.selector.close()
        self.selector = SpielSelector(self.model, _raw_optimizer(self.optimizer), total_steps=total_steps,
                                      grad_accumulation_steps=self.args.gradient_accumulation_steps,
                                      completed_steps=completed_steps, **self.selector_kwargs)
        self._spiel_callback.selector = self.selector

    # ------------------------------------------------------------------------------ checkpoints
    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """Save only the adapter (``SpielModel.save_pretrained``: ``adapter_config.json`` +
        ``adapter_model.safetensors``, never the base weights), the processing class and the training
        args. Used by ``save_model`` and by every checkpoint. ``state_dict`` is ignored."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = unwrap_spiel_model(self.accelerator.unwrap_model(self.model, keep_torch_compile=False))
        model.save_pretrained(output_dir, is_main_process=True)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, _TRAINING_ARGS_NAME))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.selector is not None and self.args.should_save:
            save_selector_state(self.selector, output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        load_adapter_weights(self.model if model is None else self.accelerator.unwrap_model(model),
                             resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.selector is None:
            return
        if not load_selector_state(self.selector, checkpoint):
            # No saved selector state: follow the schedule from the checkpoint's step (no extra phase).
            self._build_selector(self.selector.total_steps, completed_steps=int(self.state.global_step))

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is not None:
            load_adapter_weights(self.model, best)

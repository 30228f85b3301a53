"""Training SpIEL models: Hugging Face ``Trainer`` (and TRL ``SFTTrainer``) through public API, and the
plain PyTorch loop (docs/METHOD.md §3).

Any ``transformers.Trainer`` (TRL's ``SFTTrainer`` included) trains a :class:`~spiel.model.SpielModel`
given two things, both public API:

* the optimizer, from :func:`make_optimizer` (SparseAdamW for SpIEL-AG, SM3 for SpIEL-MA, with the
  Trainer's learning rate, weight decay, betas and epsilon), passed as ``optimizers=(optimizer, None)``;
* a :class:`SpielCallback`, which builds the :class:`~spiel.selection.SpielSelector` at
  ``on_train_begin`` (for the run's ``max_steps`` and ``gradient_accumulation_steps``), steps it after
  every update, writes the adapter folder and ``spiel_selector.pt`` into each checkpoint, and restores
  the selector state when the run resumes.

``SpielModel.state_dict()`` is the adapter alone, so the Trainer's own checkpoint file
(``model.safetensors``) holds only ``<module>.indices``/``<module>.values`` (tied embeddings are no
problem, and no checkpoint copies the base), and ``train(resume_from_checkpoint=...)`` loads it back in
place. Resuming checks the optimizer kind: an AG checkpoint resumed as MA (or back) is refused, naming
both. ::

    import spiel
    from spiel.trainer import SpielCallback, make_optimizer
    from transformers import Trainer, TrainingArguments

    model = spiel.get_spiel_model(hf_model, spiel.SpielConfig(lora_rank_equivalent=16))
    args = TrainingArguments(output_dir="out", max_steps=500, learning_rate=1e-4, weight_decay=1.0,
                             gradient_accumulation_steps=8, save_steps=100)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator,
                      optimizers=(make_optimizer(model, args), None), callbacks=[SpielCallback()])
    trainer.train()                     # or trainer.train(resume_from_checkpoint=True)
    model.save_pretrained("out/adapter")  # reload: spiel.SpielModel.from_pretrained(base, "out/adapter")

With TRL the same two arguments go to ``trl.SFTTrainer(model=model, args=SFTConfig(..., loss_type="nll"),
...)``: TRL's default ``loss_type="chunked_nll"`` replaces the model's forward with one that reads
``model.base_model`` as the transformer backbone (on a SpielModel it is the whole causal LM), which the
callback detects and refuses.
:class:`SpielTrainer` is that recipe in one class (a ``Trainer`` subclass that only fills in
``optimizers`` and ``callbacks`` and makes ``save_model`` write the adapter folder).

The plain PyTorch loop (what the callback does, spelled out). The loss of each micro-batch is its summed
token cross-entropy divided by the label tokens of the whole update step, so ``GA`` micro-batches of
any lengths give the gradient of one batch holding them all (dividing each micro-batch's mean by ``GA``
would weight short and long micro-batches alike)::

    import torch.nn.functional as F
    from spiel.optim import build_optimizer
    from spiel.selection import SpielSelector

    optimizer = build_optimizer(model, lr=1e-4, weight_decay=1.0)
    selector = SpielSelector(model, optimizer, total_steps=T, grad_accumulation_steps=GA)
    model.train()
    for step in range(T):
        micro_batches = batches_for(step)                  # GA dicts: input_ids, attention_mask, labels
        n_tokens = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro_batches)
        for mb in micro_batches:
            logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), mb["labels"][:, 1:].flatten(),
                                   ignore_index=-100, reduction="sum") / n_tokens
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

import io
import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .adapter_io import atomic_write_bytes
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

logger = logging.getLogger(__name__)

SELECTOR_STATE_NAME = "spiel_selector.pt"


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
    """Write ``selector.state_dict()`` to ``<directory>/spiel_selector.pt`` atomically (temp file, fsync,
    ``os.replace``: :func:`spiel.adapter_io.atomic_write_bytes`); returns the path. The directory is
    created if needed."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(selector.state_dict(), buffer)
    path = directory / SELECTOR_STATE_NAME
    atomic_write_bytes(path, buffer.getvalue())
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


def _is_spiel_model(model: Any) -> bool:
    return callable(getattr(model, "sparse_layers", None)) and getattr(model, "spiel_config", None) is not None


class SpielCallback(TrainerCallback):
    """Runs SpIEL's reselection inside any ``transformers.Trainer`` (TRL's trainers included).

    * ``on_train_begin``: builds the :class:`~spiel.selection.SpielSelector` (unless one was given) on
      the Trainer's model and optimizer, for ``state.max_steps`` updates and the Trainer's
      ``gradient_accumulation_steps``; on a resumed run (``state.global_step > 0``) it loads
      ``spiel_selector.pt`` from the checkpoint (``resume_from_checkpoint``, else
      ``<output_dir>/checkpoint-<global_step>``), or, when the checkpoint has none, follows the
      schedule from that step (no extra phase; docs/METHOD.md §10).
    * ``on_step_end``: ``selector.step()`` after every optimizer update.
    * ``on_save``: writes the adapter folder (``save_pretrained``) and ``spiel_selector.pt`` into the
      new ``checkpoint-<step>`` folder (``save_state``).
    * ``on_train_end``: removes the selector's gradient hooks.

    Args:
        selector: a ready selector, or None to build one at ``on_train_begin`` (``selector_kwargs`` go
            to :class:`SpielSelector`, e.g. ``block_elements``).
        save_state: write the adapter and selector state into each checkpoint.
        resume_from_checkpoint: the checkpoint folder of a resumed run, when it is not
            ``<output_dir>/checkpoint-<global_step>``.

    Raises (at ``on_train_begin``):
        ValueError: the Trainer's model is not a SpielModel, or it has no optimizer; its forward was
            replaced (TRL's chunked loss); a saved selector state of the other algorithm (AG vs MA) or of
            another model (naming the file).
    """

    def __init__(self, selector: Optional[SpielSelector] = None, *, save_state: bool = True,
                 resume_from_checkpoint: Optional[Union[str, os.PathLike]] = None,
                 selector_kwargs: Optional[dict[str, Any]] = None) -> None:
        self.selector = selector
        self.save_state = save_state
        self.resume_from_checkpoint = resume_from_checkpoint
        self.selector_kwargs = dict(selector_kwargs or {})
        self._model: Any = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        spiel_model = unwrap_spiel_model(model) if model is not None else None
        if spiel_model is None or not _is_spiel_model(spiel_model):
            raise ValueError(f"SpielCallback: the Trainer's model must be a spiel SpielModel, got "
                             f"{type(model).__name__}")
        replaced = [vars(spiel_model).get(key) for key in ("forward", "_original_forward")]  # accelerate keeps one
        if any(str(getattr(getattr(f, "__func__", f), "__module__", "")).startswith("trl.") for f in replaced if f):
            raise ValueError("SpielCallback: SpielModel.forward was replaced by the trainer (TRL's loss_type="
                             "'chunked_nll' does this, and reads model.base_model as the transformer backbone, which "
                             "on a SpielModel is the whole causal LM); pass loss_type='nll' in SFTConfig")
        self._model = spiel_model
        resumed = int(state.global_step) > 0
        if self.selector is None:
            if optimizer is None:
                raise ValueError("SpielCallback: the Trainer has no optimizer; pass optimizers=(spiel.trainer."
                                 "make_optimizer(model, args), None)")
            self.selector = SpielSelector(spiel_model, _raw_optimizer(optimizer), total_steps=int(state.max_steps),
                                          grad_accumulation_steps=args.gradient_accumulation_steps,
                                          **self.selector_kwargs)
        if resumed or self.resume_from_checkpoint is not None:
            checkpoint = Path(self.resume_from_checkpoint) if self.resume_from_checkpoint is not None else \
                Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if not load_selector_state(self.selector, checkpoint):
                logger.warning("%s: no %s; following the SpIEL schedule from step %d", checkpoint,
                               SELECTOR_STATE_NAME, state.global_step)
                self.selector.close()
                self.selector = SpielSelector(spiel_model, self.selector.optimizer,
                                              total_steps=self.selector.total_steps,
                                              grad_accumulation_steps=self.selector.grad_accumulation_steps,
                                              completed_steps=int(state.global_step), **self.selector_kwargs)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.selector is not None:
            self.selector.step()
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.save_state and args.should_save:
            directory = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if self._model is not None:
                self._model.save_pretrained(directory)
            if self.selector is not None:
                save_selector_state(self.selector, directory)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.selector is not None:
            self.selector.close()  # no gradient hooks outlive training
        return control


class SpielTrainer(Trainer):
    """``transformers.Trainer`` set up for a :class:`spiel.model.SpielModel` (SpIEL-AG, SpIEL-MA, qSpIEL):
    the recipe of this module's docstring in one class, overriding no private ``Trainer`` method.

    It passes ``optimizers=(make_optimizer(model, args), None)`` unless ``optimizers`` is given, adds a
    :class:`SpielCallback` (``trainer.selector`` is its selector once training starts), and its
    ``save_model`` also writes the adapter folder, so ``trainer.save_model(dir)`` is loadable with
    ``SpielModel.from_pretrained(base, dir)``.

    Args:
        model: the SpielModel (its ``spiel_config`` decides AG/MA).
        args: ``TrainingArguments`` (default: ``TrainingArguments("trainer_output")``, as ``Trainer``).
        selector_kwargs: extra keyword arguments for :class:`SpielSelector` (e.g. ``block_elements``).
        **kwargs: as for ``transformers.Trainer``.

    Raises:
        ValueError: ``model`` is not a SpielModel (no ``sparse_layers()``/``spiel_config``).
    """

    def __init__(self, model: Any = None, args: Optional[TrainingArguments] = None, *,
                 selector_kwargs: Optional[dict[str, Any]] = None, **kwargs: Any) -> None:
        if model is None or not _is_spiel_model(model):
            raise ValueError("model: SpielTrainer needs a spiel SpielModel (from spiel.model.get_spiel_model)")
        args = args if args is not None else TrainingArguments(output_dir="trainer_output")
        if kwargs.get("optimizers") in (None, (None, None)):
            kwargs["optimizers"] = (make_optimizer(model, args), None)
        self._spiel_callback = SpielCallback(selector_kwargs=selector_kwargs)
        kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + [self._spiel_callback]
        super().__init__(model=model, args=args, **kwargs)

    @property
    def selector(self) -> Optional[SpielSelector]:
        """The run's :class:`SpielSelector` (None before ``train()``)."""
        return self._spiel_callback.selector

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model`` (the adapter tensors as ``model.safetensors``, the processing class, the
        training arguments) plus, when called by the user, the adapter folder
        (``SpielModel.save_pretrained``) in ``output_dir`` (checkpoints get theirs from the callback)."""
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save and not _internal_call:
            model = unwrap_spiel_model(self.accelerator.unwrap_model(self.model, keep_torch_compile=False))
            model.save_pretrained(output_dir if output_dir is not None else self.args.output_dir)

"""The harness's additions to the Hugging Face ``Trainer``: token and loss records per update step, the
non-finite loss check, the token-mean loss, and the callbacks that time steps, keep their records in
every checkpoint and draw the progress bar (used by :mod:`spielbench.train`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

#: Written into each checkpoint folder after the Trainer's own files; its presence marks the checkpoint complete.
HARNESS_STATE_FILE = "harness_state.json"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message gives the step and the last checkpoint kept.

    Attributes:
        step: the update step (1-based) whose loss was non-finite.
        loss_curve: ``(step, loss)`` of the update steps completed before it (nats per label token).
    """

    def __init__(self, message: str, step: int | None = None, loss_curve: list | None = None):
        super().__init__(message)
        self.step = step
        self.loss_curve = list(loss_curve or [])


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Checkpoint folders ``checkpoint-N`` holding both ``trainer_state.json`` and the harness state,
    sorted by N (a folder left half-written by a kill is ignored)."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for p in checkpoints_dir.iterdir():
        if p.is_dir() and p.name.startswith("checkpoint-") and p.name[len("checkpoint-"):].isdigit():
            if (p / "trainer_state.json").is_file() and (p / HARNESS_STATE_FILE).is_file():
                found.append(p)
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def harness_trainer_class(base_cls):
    """A subclass of ``base_cls`` (``transformers.Trainer`` or ``spiel.trainer.SpielTrainer``) that counts
    tokens and losses per update step and stops on a non-finite loss before the optimizer step."""
    import torch

    class HarnessTrainer(base_cls):
        """``base_cls`` plus per-step token/loss records and the non-finite loss check."""

        harness_meter = None  # set after construction: a StepRecorder

        def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: D102
            rec = self.harness_meter
            if rec is not None:
                rec.add_micro_batch(inputs)
            loss = super().training_step(model, inputs, num_items_in_batch)
            if not bool(torch.isfinite(loss)):
                ckpts = complete_checkpoints(Path(self.args.output_dir))
                kept = f"the last checkpoint kept is {ckpts[-1]}" if ckpts else "no checkpoint was written yet"
                step = self.state.global_step + 1
                raise NonFiniteLossError(
                    f"training loss is {float(loss)} at update step {step}; stopping before "
                    f"the optimizer applies it ({kept}). Lower learning_rate or check the data.",
                    step=step, loss_curve=rec.meter.losses if rec is not None else None)
            if rec is not None:
                rec.add_loss(float(loss))
            return loss

    return HarnessTrainer


def token_mean_loss(outputs, labels, num_items_in_batch=None):
    """Causal-LM loss normalised by the label tokens of the whole accumulated batch.

    ``Σ_tokens CE(logits[t], labels[t+1]) / num_items_in_batch`` over this micro-batch, where the
    Trainer counts ``num_items_in_batch`` over every micro-batch of the update step; summed over the
    micro-batches this is the token-mean over the step, so gradient accumulation of k micro-batches of
    size b equals one batch of size k*b. Without ``num_items_in_batch`` it is this micro-batch's mean.

    Args:
        outputs: model output with ``logits`` ``[batch, seq, vocab]``.
        labels: ``[batch, seq]`` int64 with -100 on ignored positions.
        num_items_in_batch: label tokens in the accumulated batch (int or 0-d tensor).

    Returns:
        0-d float32 tensor.
    """
    import torch

    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    logits = logits[:, :-1, :].float()
    target = labels[:, 1:].to(logits.device)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    if num_items_in_batch is None:
        num_items_in_batch = (target != -100).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


class StepRecorder:
    """Feeds a :class:`spielbench.measure.StepMeter` from the trainer (micro-batches) and callbacks (steps)."""

    def __init__(self, meter):
        self.meter = meter
        self._t0 = None
        self._tokens = 0
        self._label_tokens = 0
        self._loss = 0.0
        self.segment_start = time.perf_counter()
        self.time_before_segment = 0.0

    def begin_step(self):
        """Start timing an update step and reset its counts."""
        self._t0 = time.perf_counter()
        self._tokens = self._label_tokens = 0
        self._loss = 0.0

    def add_micro_batch(self, inputs):
        """Count the non-padding tokens and label tokens of one micro-batch (``attention_mask``, ``labels``)."""
        mask = inputs.get("attention_mask")
        self._tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        if "labels" in inputs:
            self._label_tokens += int((inputs["labels"][:, 1:] != -100).sum())

    def add_loss(self, loss: float):
        """Add one micro-batch's loss (already normalised by the step's label tokens: the sum is the step's)."""
        self._loss += loss  # micro-batch losses are already normalised by the step's label-token count

    def end_step(self, step: int):
        """Record the finished update step ``step``: its time [s], tokens, label tokens and loss."""
        m = self.meter
        m.step_times_s.append(time.perf_counter() - (self._t0 if self._t0 is not None else time.perf_counter()))
        m.step_tokens.append(self._tokens)
        m.step_label_tokens.append(self._label_tokens)
        m.losses.append((step, self._loss))
        self._t0 = None

    def train_time(self) -> float:
        """Time spent training [s], over every resumed segment so far."""
        return self.time_before_segment + (time.perf_counter() - self.segment_start)


def harness_callbacks(recorder: StepRecorder, total_steps: int, progress: bool):
    """The harness callbacks: step timing/records with checkpointed state, and the progress bar."""
    from transformers import TrainerCallback

    from spielbench.fsio import write_json_atomic

    class StepMeterCallback(TrainerCallback):
        """Times each update step and saves the step records into every checkpoint."""

        def on_train_begin(self, args, state, control, **kwargs):
            if state.global_step > 0:  # resumed: restore the records of the steps already done
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}" / HARNESS_STATE_FILE
                if ckpt.is_file():
                    saved = json.loads(ckpt.read_text())
                    recorder.meter.load_state_dict(saved["meter"], upto_step=state.global_step)
                    recorder.time_before_segment = recorder.meter.train_time_s
            recorder.segment_start = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            recorder.begin_step()

        def on_step_end(self, args, state, control, **kwargs):
            recorder.end_step(state.global_step)

        def on_save(self, args, state, control, **kwargs):
            recorder.meter.train_time_s = recorder.train_time()
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                write_json_atomic(ckpt / HARNESS_STATE_FILE, {"global_step": state.global_step,
                                                              "meter": recorder.meter.state_dict()})

        def on_train_end(self, args, state, control, **kwargs):
            recorder.meter.train_time_s = recorder.train_time()

    class ProgressBarCallback(TrainerCallback):
        """A tqdm bar over update steps showing the step, its loss and tokens/s."""

        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            if progress:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total_steps, initial=state.global_step, desc="train", unit="step",
                                dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is None:
                return
            m = recorder.meter
            tps = m.step_tokens[-1] / m.step_times_s[-1] if m.step_times_s and m.step_times_s[-1] > 0 else 0.0
            self.bar.set_postfix(step=state.global_step, loss=f"{m.losses[-1][1]:.4f}", tok_s=f"{tps:.0f}",
                                 refresh=False)
            self.bar.update(state.global_step - self.bar.n)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return [StepMeterCallback(), ProgressBarCallback()]

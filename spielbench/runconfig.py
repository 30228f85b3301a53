"""The configuration of one training run: a validated dataclass read from YAML plus ``--set`` overrides.

A run config is a flat mapping (docs/DESIGN.md, "One training run"); the pipeline writes one per run
from config/*.yaml, and people write them by hand. Every field has a default except ``method``,
``model`` and ``train_data``. Unknown keys, wrong types, non-finite numbers and out-of-range values raise
:class:`spielbench.errors.InputError` naming the field. Defaults follow the reference runs
(docs/METHOD.md §8.2) where they fit a CPU machine: linear schedule, warm-up ratio 0.03, seed 42,
no gradient clipping, checkpoints every 50 steps.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spielbench.errors import InputError


@dataclass
class RunConfig:
    """One training run.

    Fields (units in brackets):
        method: registry name (``spielbench.methods.METHODS``): spiel-ag, spiel-ma, spiel-static, qspiel-ag,
            qspiel-ma, lora, qlora, ia3, shira, full.
        model: local model folder (``save_pretrained`` layout, with tokenizer and chat template).
        train_data: instruction file (Alpaca JSON, Tülu messages JSONL or Flan JSONL).
        run_id: a name recorded in the outputs (default: the output folder's name).
        heldout_data: instruction file for the held-out loss (None: no held-out loss).
        max_seq_length: truncation length [tokens].
        rank: budget as a LoRA rank (lora, qlora, shira; SpIEL: ``lora_rank_equivalent``).
        density: SpIEL only, instead of rank: fraction of all model parameters that are tunable.
        max_steps: optimizer update steps.
        per_device_train_batch_size: examples per micro-batch.
        gradient_accumulation_steps: micro-batches per update (effective batch = product of both).
        learning_rate: peak learning rate (None: the method's default, ``MethodSpec.default_learning_rate``).
        weight_decay: decoupled weight decay (SpIEL: pulls deltas towards the pretrained weights).
        warmup_ratio: fraction of ``max_steps`` with linear warm-up, then linear decay to 0.
        max_grad_norm: gradient clipping norm; 0 disables clipping (the reference runs: off).
        seed: seed of data order, initialisation of adapters/indices and dropout.
        gradient_checkpointing: recompute activations in backward to save memory.
        save_steps: write a checkpoint every this many update steps.
        max_train_examples: use only the first this many examples of ``train_data`` (None: all).
        heldout_examples: use only the first this many examples of ``heldout_data`` (None: all).
        heldout_before: also measure the held-out loss before training (``metrics.json``: ``heldout_loss_before``,
            null when False).
        lora_alpha, lora_dropout: LoRA/qLoRA scaling numerator and dropout (reference: 16, 0.1).
        device: "auto" (CUDA when available), "cpu" or "cuda"/"cuda:N".
        on_malformed: a malformed record in ``train_data``/``heldout_data``: "error" rejects the file
            (naming the line), "skip" leaves it out and reports it (``metrics.json``: ``dropped_examples``).
        data_report: a JSON report of the examples dropped when the data was prepared (the workflow's
            split of a local ``data.train``, ``spielbench.data.split_user_data``); copied into
            ``metrics.json`` (``dropped_examples.before_split``). None: no such step.
        spiel: SpIEL hyper-parameters passed to ``spiel.SpielConfig`` (e.g. reselection_steps,
            selection_accumulation_steps, initial_reselection_rate, reselection_rate_policy, delta_dtype);
            the budget and the selection algorithm come from ``rank``/``density`` and ``method``.
    """

    method: str
    model: str
    train_data: str
    run_id: str | None = None
    heldout_data: str | None = None
    max_seq_length: int = 512
    rank: int | None = None
    density: float | None = None
    max_steps: int = 100
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 8
    learning_rate: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.0
    seed: int = 42
    gradient_checkpointing: bool = False
    save_steps: int = 50
    max_train_examples: int | None = None
    heldout_examples: int | None = 200
    heldout_before: bool = True
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    device: str = "auto"
    on_malformed: str = "error"
    data_report: str | None = None
    spiel: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        self._check_ranges()

    def _check_ranges(self) -> None:
        for f in dataclasses.fields(self):
            _check_finite(f.name, getattr(self, f.name))

        def positive(name):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise InputError(f"{name}: expected a positive integer, got {v}")

        for name in ("max_seq_length", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                     "save_steps", "max_train_examples", "heldout_examples", "rank"):
            positive(name)
        if self.density is not None and not 0.0 < self.density <= 1.0:
            raise InputError(f"density: expected a fraction in (0, 1], got {self.density}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise InputError(f"learning_rate: expected a positive number, got {self.learning_rate}")
        if self.weight_decay < 0:
            raise InputError(f"weight_decay: expected a number >= 0, got {self.weight_decay}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise InputError(f"warmup_ratio: expected a fraction in [0, 1), got {self.warmup_ratio}")
        if self.max_grad_norm < 0:
            raise InputError(f"max_grad_norm: expected a number >= 0 (0 = no clipping), got {self.max_grad_norm}")
        if self.lora_alpha <= 0:
            raise InputError(f"lora_alpha: expected a positive number, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise InputError(f"lora_dropout: expected a probability in [0, 1), got {self.lora_dropout}")
        if self.device != "auto" and self.device != "cpu" and not (
            self.device == "cuda" or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        ):
            raise InputError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.on_malformed not in ("error", "skip"):
            raise InputError(f"on_malformed: expected 'error' or 'skip', got {self.on_malformed!r}")
        for name in ("method", "model", "train_data"):
            if not getattr(self, name):
                raise InputError(f"{name}: expected a non-empty string")

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (every field, defaults included)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_mapping(cls, data: Any, source: str = "run config") -> "RunConfig":
        """Build from a mapping, rejecting unknown keys and missing required ones.

        Raises:
            InputError: ``data`` is not a mapping, a key is unknown (named, with the known keys), a
                required key is missing, or a value has the wrong type or range.
        """
        if not isinstance(data, dict):
            raise InputError(f"{source}: expected a mapping of run-config fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise InputError(f"{source}: unknown key {key!r}; known keys: {', '.join(sorted(known))}")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        for key in required:
            if key not in data or data[key] is None:
                raise InputError(f"{source}: missing required key {key!r}")
        return cls(**data)


def _check_finite(name: str, value: Any) -> None:
    """Reject NaN and infinities in a number, or in any number nested in a mapping/list (``spiel.*``).

    Raises:
        InputError: naming ``name`` (``spiel.<key>`` for nested values).
    """
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{name}: expected a finite number, got {value}")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(f"{name}.{key}", item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_finite(name, item)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(name: str, value: Any, tp) -> Any:
    """Check ``value`` against the annotation ``tp`` (int, float, bool, str, dict, or ``X | None``)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(name, value, args[0])
    if origin is dict or tp is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise InputError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if value is None:
        raise InputError(f"{name}: expected {_type_name(tp)}, got null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise InputError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise InputError(f"{name}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise InputError(f"{name}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise InputError(f"{name}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise InputError(f"{name}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise InputError(f"{name}: expected a string, got {value!r}")
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one ``--set`` override ``key=value`` (``spiel.reselection_steps=10`` for nested keys).

    The value is read as YAML (``true``, ``3``, ``null``, ``[a, b]``), so types match the config file.

    Returns:
        ``(key_path, value)``.

    Raises:
        InputError: no ``=``, or an empty key.
    """
    import yaml

    if "=" not in text:
        raise InputError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise InputError(f"--set {text!r}: expected key=value with a non-empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise InputError(f"--set {text!r}: the value is not valid YAML ({exc})") from None
    return key.split("."), value


def load_run_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a run config from a YAML (or JSON) file and apply ``key=value`` overrides.

    Args:
        path: the config file, or None to build the config from overrides alone.
        overrides: ``["learning_rate=1e-4", "spiel.reselection_steps=10", ...]``, applied in order.

    Returns:
        The validated :class:`RunConfig`.

    Raises:
        InputError: missing or unparsable file (named, with the line), unknown key, bad value.
    """
    import yaml

    data: dict[str, Any] = {}
    source = "run config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise InputError(f"run config: file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise InputError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise InputError(f"{path}: expected a mapping of run-config fields, got {type(loaded).__name__}")
        data = dict(loaded)
    for text in overrides:
        keys, value = parse_override(text)
        target = data
        for k in keys[:-1]:
            nxt = target.get(k)
            if nxt is None:
                nxt = target[k] = {}
            if not isinstance(nxt, dict):
                raise InputError(f"--set {text!r}: {k!r} is not a mapping")
            target = nxt
        target[keys[-1]] = value
    return RunConfig.from_mapping(data, source=source)

"""The configuration of one training run: a typed dataclass read from YAML plus ``--set`` overrides.

A run config is a flat mapping (docs/DESIGN.md, "One training run"); the pipeline writes one per run
from config/*.yaml, and people write them by hand. Every field has a default except ``method``,
``model`` and ``train_data``. Types, bounds and allowed values are the run config's JSON schema
(``spielbench/runconfig.schema.yaml``, checked by :func:`spielbench.schema.validate`): unknown keys, wrong
types, non-finite numbers and out-of-range values raise :class:`spielbench.errors.InputError` naming the
field. Rules between fields of one method (rank or density) are the method's
(``spielbench.methods.MethodSpec.check_config``), rules against the model ``spielbench.preflight``'s.
Defaults follow the reference runs (docs/METHOD.md §8.2) where they fit a CPU machine: linear schedule,
warm-up ratio 0.03, seed 42, no gradient clipping, checkpoints every 50 steps.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from spielbench.errors import InputError
from spielbench.schema import RUN_SCHEMA, schema_at, validate


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

    Raises:
        InputError: at construction, a value the run config schema refuses (``<field>: expected ..., got ...``).
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
        validate(dataclasses.asdict(self), RUN_SCHEMA, source="run config")
        for name in _NUMBER_FIELDS:  # a JSON schema "number" given as 1 is the float 1.0 here
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(self, name, float(value))

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (every field, defaults included)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every field that has a default, with it (the one home of the run defaults: the workflow's rules
        read them here for settings they need before a run config exists)."""
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out

    @classmethod
    def from_mapping(cls, data: Any, source: str = "run config") -> "RunConfig":
        """Build from a mapping, rejecting unknown keys and missing required ones.

        Raises:
            InputError: ``data`` is not a mapping, a key is unknown (named, with the known keys), a
                required key is missing, or a value has the wrong type or range.
        """
        if not isinstance(data, dict):
            raise InputError(f"{source}: expected a mapping of run-config fields, got {type(data).__name__}")
        validate(data, RUN_SCHEMA, source=source)  # unknown and missing keys before the constructor sees them
        return cls(**data)


def _number_fields() -> tuple[str, ...]:
    """The fields the schema types as numbers (``float`` or ``float | None`` here)."""
    props = {**schema_at(RUN_SCHEMA, "/$defs/settings")["properties"], **schema_at(RUN_SCHEMA)["properties"]}
    kinds = {name: prop.get("type", []) for name, prop in props.items()}
    return tuple(name for name, kind in kinds.items() if "number" in ([kind] if isinstance(kind, str) else kind))


_NUMBER_FIELDS = _number_fields()


@functools.lru_cache(maxsize=None)
def _yaml_loader():
    """A ``yaml.SafeLoader`` that reads ``1e-4`` as a number, as YAML 1.2 does (YAML 1.1 needs ``1.0e-4``)."""
    loader = type("Yaml12FloatLoader", (yaml.SafeLoader,), {})
    loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                                 list("-+0123456789."))
    return loader


def _load_yaml(text: str) -> Any:
    """Parse YAML text, with numbers in exponent form (``1e-4``) read as floats."""
    return yaml.load(text, Loader=_yaml_loader())


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one ``--set`` override ``key=value`` (``spiel.reselection_steps=10`` for nested keys).

    The value is read as YAML (``true``, ``3``, ``null``, ``[a, b]``), so types match the config file.

    Returns:
        ``(key_path, value)``.

    Raises:
        InputError: no ``=``, or an empty key.
    """
    if "=" not in text:
        raise InputError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise InputError(f"--set {text!r}: expected key=value with a non-empty key")
    try:
        value = _load_yaml(raw) if raw.strip() else ""
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
    data: dict[str, Any] = {}
    source = "run config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise InputError(f"run config: file {path} does not exist")
        try:
            loaded = _load_yaml(path.read_text())
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

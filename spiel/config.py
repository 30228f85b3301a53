"""``SpielConfig``: the hyper-parameters of a SpIEL adapter, validated at construction (docs/METHOD.md §1-§3).

Serialised as ``adapter_config.json`` next to ``adapter_model.safetensors`` (see :mod:`spiel.adapter_io`),
with ``"spiel_format_version": 2`` and the base the adapter was trained over (``base_model_dtype``,
``base_model_quantization``). A SpIEL adapter is not a peft adapter, and the file says so: its
``peft_type`` holds the sentence :data:`NOT_A_PEFT_ADAPTER`, which peft and transformers print in the
``KeyError`` they raise when pointed at the folder (they look ``peft_type`` up in their registry), so
the error names spiel and the one-line way to load it. Version-1 files (``"peft_type": "SPIEL"``, no
base recorded) still load. The reference names are accepted as aliases: ``selection_algorithm="rigl"``
is SpIEL-AG (``"ag"``), ``"sm3"`` is SpIEL-MA (``"ma"``).
"""
from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

import torch

__all__ = ["SpielConfig", "CONFIG_NAME", "FORMAT_VERSION", "NOT_A_PEFT_ADAPTER", "QUANTIZATIONS"]

CONFIG_NAME = "adapter_config.json"
#: Version of the adapter folder layout written by this library (1: ``peft_type: SPIEL``, no base record).
FORMAT_VERSION = 2
#: The ``peft_type`` of a saved SpIEL config: not a peft method name, a message for whoever reads it.
NOT_A_PEFT_ADAPTER = ("not a peft adapter: this folder holds a SpIEL adapter (library 'spiel'); load it with "
                      "spiel.SpielModel.from_pretrained(base_model, adapter_dir)")
_LEGACY_PEFT_TYPE = "SPIEL"
#: Values of ``base_model_quantization``: a dense base, or bitsandbytes 4-bit NF4 / FP4 weights.
QUANTIZATIONS = ("none", "nf4", "fp4")
_BASE_DTYPES = ("float32", "bfloat16", "float16")

_ALGORITHM_ALIASES = {"ag": "ag", "rigl": "ag", "ma": "ma", "sm3": "ma"}
_POLICIES = ("linear", "cosine", "none")
_DELTA_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SpielConfig:
    """Configuration of a SpIEL sparse fine-tuning adapter.

    Budget (exactly one of the three, unless ``num_deltas`` is already known, e.g. when loading):
        density: fraction in (0, 1] of ALL model parameters (embeddings and ``lm_head`` included; 4-bit
            weights at their original shape), as the reference defines it (docs/METHOD.md §2.2):
            ``N = int(total_params * density)``.
        num_tunable_weights: absolute number N >= 1 of trainable entries.
        lora_rank_equivalent: r >= 1; ``N = r * Σ(in + out)`` over the targeted modules, i.e. exactly
            LoRA's trainable-parameter count at rank r on the same modules.

    Targets and selection:
        target_modules: None (every ``nn.Linear``/``Linear4bit`` under ``base_model_prefix``: the 7 LLaMA
            projections, never ``lm_head``), a list of names (each matches ``<name>`` or ``*.<name>``), or
            a string regex matched against the full qualified module name (docs/METHOD.md §2.1).
        selection_algorithm: ``"ag"`` (accumulated gradients; alias ``"rigl"``) or ``"ma"`` (momentum
            approximation with SM3; alias ``"sm3"``). Stored normalised.
        reselection_steps: S >= 1, update steps between reselections (docs/METHOD.md §3).
        selection_accumulation_steps: γ with ``0 <= γ < S``, gradient-accumulation window length.
        initial_reselection_rate: ζ in [0, 1], drop/regrow fraction at the start of the decay.
        reselection_rate_policy: ``"linear"`` (first reselection replaces everything), ``"cosine"``, or
            ``"none"`` (a static mask: no reselection at all).
        delta_dtype: dtype of Δ, ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        seed: seed of the random initial index sets.

    Filled in by :func:`spiel.model.get_spiel_model`:
        num_deltas: ``{qualified module name: k}`` once allocated.
        base_model_name_or_path: the wrapped model's ``name_or_path``, for the saved config.
        base_model_dtype: dtype of the base's floating-point weights (``"float32"``, ``"bfloat16"``,
            ``"float16"``); None when unknown (a version-1 adapter).
        base_model_quantization: ``"none"``, ``"nf4"`` or ``"fp4"`` (bitsandbytes 4-bit targets);
            None when unknown (a version-1 adapter). Loaders apply or check both (docs/METHOD.md §7).

    Raises:
        ValueError: naming the offending field and what was expected.
    """

    density: Optional[float] = None
    num_tunable_weights: Optional[int] = None
    lora_rank_equivalent: Optional[int] = None
    target_modules: Optional[Union[list[str], str]] = None
    selection_algorithm: str = "ag"
    reselection_steps: int = 20
    selection_accumulation_steps: int = 5
    initial_reselection_rate: float = 0.2
    reselection_rate_policy: str = "linear"
    delta_dtype: str = "float32"
    seed: int = 0
    num_deltas: Optional[dict[str, int]] = field(default=None)
    base_model_name_or_path: Optional[str] = None
    base_model_dtype: Optional[str] = None
    base_model_quantization: Optional[str] = None

    def __post_init__(self) -> None:
        self._validate_budget()
        self._validate_targets()
        algorithm = self.selection_algorithm
        if not isinstance(algorithm, str) or algorithm.lower() not in _ALGORITHM_ALIASES:
            raise ValueError(f"selection_algorithm: expected one of 'ag' (alias 'rigl') or 'ma' (alias 'sm3'), "
                             f"got {algorithm!r}")
        self.selection_algorithm = _ALGORITHM_ALIASES[algorithm.lower()]
        if not _is_int(self.reselection_steps) or self.reselection_steps < 1:
            raise ValueError(f"reselection_steps: expected an integer >= 1, got {self.reselection_steps!r}")
        gamma = self.selection_accumulation_steps
        if not _is_int(gamma) or not 0 <= gamma < self.reselection_steps:
            raise ValueError(f"selection_accumulation_steps: expected an integer in [0, reselection_steps="
                             f"{self.reselection_steps}), got {gamma!r}")
        rate = self.initial_reselection_rate
        if not _is_number(rate) or not math.isfinite(rate) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"initial_reselection_rate: expected a number in [0, 1], got {rate!r}")
        self.initial_reselection_rate = float(rate)
        if self.reselection_rate_policy not in _POLICIES:
            raise ValueError(f"reselection_rate_policy: expected one of {list(_POLICIES)}, "
                             f"got {self.reselection_rate_policy!r}")
        if self.delta_dtype not in _DELTA_DTYPES:
            raise ValueError(f"delta_dtype: expected one of {list(_DELTA_DTYPES)}, got {self.delta_dtype!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed: expected an integer, got {self.seed!r}")
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            raise ValueError(f"base_model_name_or_path: expected a string or None, got {self.base_model_name_or_path!r}")
        if self.base_model_dtype is not None and self.base_model_dtype not in _BASE_DTYPES:
            raise ValueError(f"base_model_dtype: expected one of {list(_BASE_DTYPES)} or None, "
                             f"got {self.base_model_dtype!r}")
        if self.base_model_quantization is not None and self.base_model_quantization not in QUANTIZATIONS:
            raise ValueError(f"base_model_quantization: expected one of {list(QUANTIZATIONS)} or None, "
                             f"got {self.base_model_quantization!r}")

    def _validate_budget(self) -> None:
        given = [name for name in ("density", "num_tunable_weights", "lora_rank_equivalent")
                 if getattr(self, name) is not None]
        if self.num_deltas is not None:
            nd = self.num_deltas
            if (not isinstance(nd, dict) or not nd
                    or not all(isinstance(k, str) and _is_int(v) and v >= 1 for k, v in nd.items())):
                raise ValueError(f"num_deltas: expected a non-empty mapping of module name -> integer >= 1, got {nd!r}")
            self.num_deltas = dict(nd)
            if len(given) > 1:
                raise ValueError(f"density/num_tunable_weights/lora_rank_equivalent: expected at most one, got {given}")
        elif len(given) != 1:
            raise ValueError("density/num_tunable_weights/lora_rank_equivalent: expected exactly one budget, "
                             f"got {given or 'none'}")
        if self.density is not None:
            d = self.density
            if not _is_number(d) or not math.isfinite(d) or not 0.0 < d <= 1.0:
                raise ValueError(f"density: expected a number in (0, 1], got {d!r}")
            self.density = float(d)
        if self.num_tunable_weights is not None:
            n = self.num_tunable_weights
            if not _is_int(n) or n < 1:
                raise ValueError(f"num_tunable_weights: expected an integer >= 1, got {n!r}")
        if self.lora_rank_equivalent is not None:
            r = self.lora_rank_equivalent
            if not _is_int(r) or r < 1:
                raise ValueError(f"lora_rank_equivalent: expected an integer >= 1, got {r!r}")

    def _validate_targets(self) -> None:
        targets = self.target_modules
        if targets is None:
            return
        if isinstance(targets, str):
            if not targets:
                raise ValueError("target_modules: expected a non-empty regex string, got ''")
            try:
                re.compile(targets)
            except re.error as exc:
                raise ValueError(f"target_modules: invalid regex {targets!r}: {exc}") from None
            return
        if isinstance(targets, (list, tuple, set, frozenset)):
            names = sorted(targets) if isinstance(targets, (set, frozenset)) else list(targets)
            if not names or not all(isinstance(n, str) and n for n in names):
                raise ValueError(f"target_modules: expected a non-empty list of module names, got {targets!r}")
            self.target_modules = names
            return
        raise ValueError(f"target_modules: expected None, a list of module names or a regex string, got {targets!r}")

    # ------------------------------------------------------------------------------------ helpers
    @property
    def torch_delta_dtype(self) -> torch.dtype:
        """``delta_dtype`` as a ``torch.dtype``."""
        return _DELTA_DTYPES[self.delta_dtype]

    @property
    def static_mask(self) -> bool:
        """True when ``reselection_rate_policy == "none"``: the index set never changes."""
        return self.reselection_rate_policy == "none"

    def replace(self, **changes: Any) -> "SpielConfig":
        """A validated copy with ``changes`` applied."""
        data = copy.deepcopy(asdict(self))
        data.update(changes)
        return SpielConfig(**data)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: every field, ``"spiel_format_version": 2`` and ``"peft_type"`` set to
        :data:`NOT_A_PEFT_ADAPTER`."""
        data: dict[str, Any] = {"spiel_format_version": FORMAT_VERSION, "peft_type": NOT_A_PEFT_ADAPTER}
        data.update(copy.deepcopy(asdict(self)))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SpielConfig":
        """Rebuild a config from :meth:`to_dict` output (format 2) or a version-1 dict
        (``"peft_type": "SPIEL"``, no ``spiel_format_version``; its base stays unknown).

        Raises ValueError: a peft adapter's config (another ``peft_type``), a format version this
        library does not know (a newer spiel wrote it), or unknown keys."""
        if not isinstance(data, dict):
            raise ValueError(f"SpielConfig.from_dict: expected a mapping, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("spiel_format_version", None)
        peft_type = data.pop("peft_type", None)
        if version is None:
            if peft_type != _LEGACY_PEFT_TYPE:
                raise ValueError(f"peft_type: {peft_type!r} and no spiel_format_version: not a SpIEL adapter "
                                 "(a peft adapter loads with peft.PeftModel.from_pretrained)")
        elif not _is_int(version) or not 1 <= version <= FORMAT_VERSION:
            raise ValueError(f"spiel_format_version: this spiel reads versions 1..{FORMAT_VERSION}, got {version!r} "
                             "(written by a newer spiel? upgrade it)")
        elif peft_type not in (None, NOT_A_PEFT_ADAPTER, _LEGACY_PEFT_TYPE):
            raise ValueError(f"peft_type: expected {NOT_A_PEFT_ADAPTER!r}, got {peft_type!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"SpielConfig: unknown field(s) {unknown}; expected a subset of {sorted(known)}")
        return cls(**data)

    def to_json_string(self) -> str:
        """The config as indented JSON text (what ``adapter_config.json`` holds)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path]) -> "SpielConfig":
        """Read ``<directory>/adapter_config.json``.

        Raises FileNotFoundError if it is missing; ValueError (naming the file) if it is not valid JSON or
        not a valid SpIEL config."""
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no {CONFIG_NAME} (not a saved SpIEL adapter directory)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None

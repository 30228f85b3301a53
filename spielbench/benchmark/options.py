"""The settings of a benchmark (:class:`BenchmarkOptions`) and the checks of sizes and methods, made before
any work; the methods and their facts come from the registry (:data:`spielbench.methods.REGISTRY`)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional, Sequence

from spielbench.benchmark.sizes import SIZES
from spielbench.errors import InputError
from spielbench.methods import REGISTRY, benchmark_methods

#: Benchmark-only variants of registry methods: name -> (registry method, RunConfig overrides).
#: ``lora-dropout0`` is LoRA without dropout, the fastest LoRA (the registry's LoRA keeps the reference's 0.1).
VARIANTS = {"spiel-reference": ("spiel-ag", {}), "lora-dropout0": ("lora", {"lora_dropout": 0.0})}


def all_methods() -> tuple[str, ...]:
    """Every method name the benchmark accepts: the registry's benchmark entries, in table order."""
    return benchmark_methods()


@dataclass
class BenchmarkOptions:
    """Settings shared by every (size, method) of a benchmark.

    Attributes:
        rank: LoRA rank; SpIEL gets the equal budget ``rank * Σ(in + out)`` (SHiRA too); (IA)3/full/floor
            have no rank.
        batch_size, seq_len: sequences per step and tokens per sequence (random ids, no padding).
        warmup_steps: untimed steps first. steps: timed steps.
        dtype: "float32" or "bfloat16" (bf16: base weights in bf16 for adapter methods and bf16 autocast;
            full fine-tuning keeps fp32 master weights under bf16 autocast, as the training harness does).
        device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".
        threads: CPU threads (``torch.set_num_threads``) in each worker; None = torch's default.
        reselection_steps, selection_accumulation_steps, initial_reselection_rate: the natural SpIEL
            schedule S, γ, ζ whose proportions the weighted step time reproduces (docs/METHOD.md §3).
        seed: seed of the random weights, indices and token batches.
        timeout_s: wall-clock limit of one worker [s] (status "timeout" past it).
        memory_limit_bytes: treat at most this much as available (prediction) and cap the worker to it
            (CPU: address-space limit above the process's size before the build; CUDA: per-process
            memory fraction). None = the machine's available memory.
        predict_oom: skip (status "oom", kind "predicted") pairs whose estimate exceeds the available memory.
        model_dir: benchmark a real model folder instead of a random-init size (float methods only;
            ``size`` is then only a label).
        profile_out: write a ``torch.profiler`` summary of the timed steps to this file (timings inflate).
        gradient_checkpointing: recompute each block's activations in the backward (non-reentrant
            ``gradient_checkpointing_enable``), as memory-bound GPU runs train.
    """

    rank: int = 16
    batch_size: int = 2
    seq_len: int = 128
    warmup_steps: int = 1
    steps: int = 3
    dtype: str = "float32"
    device: str = "auto"
    threads: Optional[int] = None
    reselection_steps: int = 20
    selection_accumulation_steps: int = 5
    initial_reselection_rate: float = 0.2
    seed: int = 0
    timeout_s: float = 3600.0
    memory_limit_bytes: Optional[int] = None
    predict_oom: bool = True
    model_dir: Optional[str] = None
    profile_out: Optional[str] = None
    gradient_checkpointing: bool = False

    def validate(self) -> "BenchmarkOptions":
        """Check every field; returns self. Raises InputError naming the field and what was expected."""
        for name in ("rank", "batch_size", "seq_len", "steps", "reselection_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name}: expected an integer >= 1, got {value!r}")
        for name in ("warmup_steps", "selection_accumulation_steps", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InputError(f"{name}: expected an integer >= 0, got {value!r}")
        if self.selection_accumulation_steps >= self.reselection_steps:
            raise InputError(f"selection_accumulation_steps: expected < reselection_steps={self.reselection_steps}, "
                             f"got {self.selection_accumulation_steps}")
        if not 0.0 <= float(self.initial_reselection_rate) <= 1.0:
            raise InputError("initial_reselection_rate: expected a number in [0, 1], "
                             f"got {self.initial_reselection_rate!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise InputError(f"gradient_checkpointing: expected true or false, got {self.gradient_checkpointing!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise InputError(f"dtype: expected 'float32' or 'bfloat16', got {self.dtype!r}")
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise InputError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {dev!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise InputError(f"threads: expected an integer >= 1 or None, got {self.threads!r}")
        if not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise InputError(f"timeout_s: expected a positive number of seconds, got {self.timeout_s!r}")
        if self.memory_limit_bytes is not None and (not isinstance(self.memory_limit_bytes, int)
                                                    or self.memory_limit_bytes < 1):
            raise InputError("memory_limit_bytes: expected a positive integer or None, "
                             f"got {self.memory_limit_bytes!r}")
        if self.model_dir is not None and not (Path(self.model_dir) / "config.json").is_file():
            raise InputError(f"model_dir: {self.model_dir} has no config.json "
                             "(expected a save_pretrained model folder)")
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BenchmarkOptions":
        """Build from a mapping; unknown keys raise InputError naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"benchmark options: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**data).validate()


def check_pairs(sizes: Sequence[str], methods: Sequence[str], options: BenchmarkOptions) -> None:
    """Validate size and method names and per-method step requirements before any work.

    Raises InputError: an unknown size (listing the known ones), an unknown method, a natural schedule
    too short for a dynamic SpIEL method (AG: S >= γ + 2; MA: S >= 2), or the rank too
    large for a size (LoRA: ``rank <= min(in, out)`` of every projection).
    """
    known_methods = all_methods()
    if not sizes:
        raise InputError("sizes: expected at least one size")
    if not methods:
        raise InputError("methods: expected at least one method")
    for size in sizes:
        if size not in SIZES and options.model_dir is None:
            raise InputError(f"sizes: unknown size {size!r}; known sizes: {', '.join(SIZES)}")
    for method in methods:
        if method not in known_methods:
            raise InputError(f"methods: unknown method {method!r}; known methods: {', '.join(known_methods)}")
        algo = spiel_algorithm(method)
        if algo == "ag" and options.reselection_steps < options.selection_accumulation_steps + 2:
            raise InputError("reselection_steps: SpIEL-AG needs S >= γ + 2 = "
                             f"{options.selection_accumulation_steps + 2}, got {options.reselection_steps}")
        if algo == "ma" and options.reselection_steps < 2:
            raise InputError(f"reselection_steps: SpIEL-MA needs S >= 2, got {options.reselection_steps}")
    for size in sizes:
        shape = SIZES.get(size)
        if shape is None:
            continue
        smallest = min(min(i, o) for _, i, o in shape.linear_shapes())
        if any(method_family(m) == "lora" for m in methods) and options.rank > smallest:
            raise InputError(f"rank: {options.rank} exceeds the smallest projection dimension {smallest} of size "
                             f"{size!r} (LoRA needs rank <= min(in, out))")


def method_family(method: str) -> str:
    """The registry family of a benchmark entry ("floor", "lora", "spiel", ...). Raises KeyError if unknown."""
    return REGISTRY[method].family


def spiel_algorithm(method: str) -> Optional[str]:
    """"ag"/"ma" for dynamic SpIEL methods (they call a selector), else None. Raises KeyError if unknown."""
    spec = REGISTRY[method]
    return spec.selection_algorithm if spec.needs_selector else None

"""Efficiency benchmark: step time and peak memory of every method across LLaMA model sizes.

For each (size, method) a **fresh Python process** (so that peak-memory figures are clean) builds a
randomly initialised LLaMA-architecture model of that size directly on the target device (weights do
not change time or memory), wraps it with the method from the training registry
(:mod:`spielbench.methods`; plus the benchmark-only ``floor`` and ``spiel-reference``), runs
``warmup_steps`` untimed and ``steps`` timed training steps on random token batches, and writes one
JSON. A step is forward + backward + optimizer update + ``SpielSelector.step()`` (dynamic SpIEL).

Methods: every name of :data:`spielbench.methods.METHODS` (``spiel-ag``, ``spiel-ma``,
``spiel-static``, ``qspiel-ag``, ``qspiel-ma``, ``lora``, ``qlora``, ``ia3``, ``shira``, ``full``) plus
``floor`` (frozen weights, gradient to the inputs only: the cost no fine-tuning method can go below),
``lora-dropout0`` (LoRA without dropout: the registry's ``lora`` keeps the reference's dropout 0.1,
which costs LoRA a large share of its step on CPU, so both rows are reported; tables give ratios to
both) and ``spiel-reference`` (SpIEL-AG with :mod:`spielbench.reference_layer`: a dense ``dW`` in every
backward, as the original code, docs/METHOD.md §6). 4-bit methods are recorded ``"unsupported"`` when
bitsandbytes cannot run an NF4 layer forward+backward on the device.

Sizes (:data:`SIZES`): ``tiny`` (tests), ``smollm2-135m``, ``smollm2-360m``, ``smollm2-1.7b`` (CPU
default), ``llama2-7b``, ``llama2-13b`` (the paper's models, for GPUs).

Selection phases in their natural proportion (the *schedule-weighted* estimate)
-----------------------------------------------------------------------------
Under the reference schedule (S = ``reselection_steps`` = 20, γ = ``selection_accumulation_steps`` = 5,
docs/METHOD.md §3) a steady-state period of S update steps holds, for SpIEL-AG, γ + 1 steps of an
open selection phase (the selector collects candidate gradients): one *phase-start* step (a dense
``dW`` per layer and the top-k candidate choice), one *phase-first* step (the first sampled at the
candidates: the layers build the CSR pattern of η ∪ candidates), γ − 2 *phase* steps (accumulation at
the candidates, pattern cached) and one *select* step (accumulation, then drop/grow); then one
*after-select* step (the layers rebuild their cached CSR pattern of η and re-take the fused ``W0[η]``)
and ``S−γ−2`` *plain* steps (sampled ``dΔ`` only). SpIEL-MA
has one after-select, ``S−2`` plain and one select step (drop/grow by the SM3 scores). A few timed
steps cannot cover a period of 20, so:

1. ``warmup_steps`` ordinary steps run first, before a selector is attached (they warm the sampled
   path, the allocator and the optimizer state). Then the selector is attached on a compressed
   schedule whose period is the timed window, ``S_b = steps`` (the natural S when ``steps`` is a
   multiple of it), with ``γ_b = clip(round(γ·S_b/S), min(γ, 3), S_b−3)`` (AG; MA ``[0, S_b−1]``), at
   ``completed_steps = c0 = S_b + γ_b − 1``, and one untimed *entry* step ends with a reselection. The
   timed window is then exactly one period, ``[after-select, plain…, phase-start, phase-first,
   phase…, select]``, after the p = 1 first reselection. Every kind must be timed, so ``steps`` is
   raised to 6 for AG (5 if γ = 2, 4 if γ = 1, 3 if γ = 0) and to 3 for MA when smaller (the record's
   ``steps`` is the number timed);
2. every timed step is labelled with its kind; ``step_time_mean_s`` is ``Σ_kind w_kind · mean(kind)``
   with the natural weights ``w`` (AG: after-select ``1/S``, plain ``(S−γ−2)/S``, phase-start ``1/S``,
   phase-first ``1/S``, phase ``(γ−2)/S``, select ``1/S``; MA: ``1/S, (S−2)/S, 1/S``; every other method: plain 1), and
   ``step_time_p50_s`` is the median of the same weighted distribution (each sample of a kind weighs
   ``w_kind / n_kind``). With ``steps = S`` the window *is* a natural period and the weighted mean
   equals the plain mean.

The unweighted figures are kept too (``step_time_raw_mean_s``, ``step_times_s``, ``step_kinds``).
The one-off first window (γ steps, then p = 1) is not part of the steady state and is not weighted in.

Memory
------
Peak counters are reset after the model and optimizer are built (before the warm-up), so peaks cover
the resident model plus training. CUDA: ``torch.cuda.max_memory_allocated``/``max_memory_reserved``.
CPU: the resident-set high-water mark (``VmHWM`` after a ``clear_refs`` reset on Linux, else
``ru_maxrss``), see :mod:`spielbench.measure`. Plus the exact bytes of trainable parameters, their
gradients, the optimizer state and SpIEL's index buffers.

Out of memory
-------------
Before building, the worker estimates the bytes needed (:func:`estimate_memory`) and, if they exceed
the available memory (``psutil`` available RAM on CPU, free device memory on CUDA, or the
``memory_limit_bytes`` option), records ``status="oom"`` with ``oom_kind="predicted"`` and the
numbers. Otherwise an allocation failure during the run (``torch.OutOfMemoryError``, a CPU
"can't allocate memory" ``RuntimeError``, ``MemoryError``) gives ``oom_kind="raised"``, and a worker
killed by SIGKILL (the kernel's OOM killer) ``oom_kind="killed"``. On CPU the worker caps its own
address space (``RLIMIT_AS``) at its size plus the available memory, so an over-large run fails with
an allocation error instead of waking the OOM killer on a shared machine.

JSON fields (one file per (size, method): ``<out_dir>/<size>__<method>.json``, written atomically)
--------------------------------------------------------------------------------------------------
Stable fields (the aggregation reads these; units in the names):

============================== ================================================================
``size``, ``method``           names as given
``status``                     ``"ok"``, ``"oom"``, ``"unsupported"``, ``"error"`` or ``"timeout"``
``detail``                     human-readable reason when status is not ok (else null)
``oom_kind``                   ``"predicted"``, ``"raised"``, ``"killed"`` or null
``step_time_mean_s``           schedule-weighted mean step time [s] (see above)
``step_time_p50_s``            schedule-weighted median step time [s]
``tokens_per_s``               ``batch_size * seq_len / step_time_mean_s`` [tokens/s]
``peak_memory_bytes``          the headline peak: CUDA max allocated, else CPU peak RSS [bytes]
``peak_rss_bytes``             CPU resident high-water mark of the worker [bytes]
``cuda_max_allocated_bytes``   ``torch.cuda.max_memory_allocated`` (null on CPU) [bytes]
``cuda_max_reserved_bytes``    ``torch.cuda.max_memory_reserved`` (null on CPU) [bytes]
``trainable_params``           parameters with ``requires_grad`` (0 for the floor)
``adapter_state_bytes``        trainable params + their gradients + optimizer state + index buffers [bytes]
``n_params_model``             parameters of the base model (4-bit weights at their logical shape)
``device``                     ``"cpu"`` or ``"cuda:N"``; ``device_name``: CPU/GPU model
``threads``                    ``torch.get_num_threads()`` in the worker
``batch_size``, ``seq_len``    tokens per step = their product
``steps``, ``warmup_steps``    timed and untimed steps
============================== ================================================================

Further fields: ``dtype``, ``rank``, ``step_time_raw_mean_s``, ``step_times_s``, ``step_kinds``,
``kind_mean_s`` ({kind: mean [s]}), ``step_cpu_time_mean_s`` (schedule-weighted process CPU time per
step [s], all threads: steadier than wall time on a machine shared with other work, but it includes
OpenMP spin-waiting when threads > 1), ``step_cpu_times_s``, ``phase_mean_s`` ({forward, backward,
optimizer, selector: mean [s] over timed steps}), ``schedule`` (natural S/γ, weights, driving
S_b/γ_b/c0/T), ``adapter_state`` (byte components), ``adapter_state_bytes_per_trainable_param``,
``memory_estimate`` (the prediction's components [bytes]), ``memory_available_bytes``,
``peak_rss_scope``, ``build_time_s``, ``wall_time_s``, ``gradient_checkpointing`` (the option),
``step_time_cuda_event_mean_s``/``step_times_cuda_event_s`` (CUDA only: the same steps timed by CUDA
events on the current stream, schedule-weighted),
``load_avg_start``/``load_avg_end`` (1-minute load average: other work on the machine disturbs
timings), ``versions``, ``created_utc``, ``model_source`` (``"random-init"`` or a model folder).

Command line: ``python -m spielbench.benchmark run --sizes ... --methods ...`` (every pair, then the
tables), ``one`` (one pair, for the pipeline), ``table`` (tables from JSONs), ``profile`` (a
``torch.profiler`` summary of one pair), ``sizes`` (list the sizes). See ``--help``.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from spielbench.errors import InputError
from spielbench.fsio import write_text_atomic

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Benchmark-only variants of registry methods: name -> (registry method, RunConfig overrides).
#: ``lora-dropout0`` is LoRA without dropout, the fastest LoRA (the registry's LoRA keeps the reference's 0.1).
VARIANTS = {"spiel-reference": ("spiel-ag", {}), "lora-dropout0": ("lora", {"lora_dropout": 0.0})}
#: Status values of a record.
STATUSES = ("ok", "oom", "unsupported", "error", "timeout")
#: Canonical order of methods in tables.
METHOD_ORDER = ("floor", "lora", "lora-dropout0", "ia3", "shira", "spiel-ag", "spiel-ma", "spiel-static",
                "spiel-reference",
                "full", "qlora", "qspiel-ag", "qspiel-ma")
#: Columns of the efficiency_benchmark table (CSV header).
TABLE_COLUMNS = ("size", "method", "status", "step_time_mean_s", "step_time_p50_s", "tokens_per_s",
                 "step_cpu_time_mean_s", "step_cpu_time_vs_lora",
                 "peak_memory_bytes", "trainable_params", "adapter_state_bytes",
                 "adapter_state_bytes_per_trainable_param", "step_time_vs_lora", "step_time_vs_lora_dropout0",
                 "step_time_vs_floor", "peak_memory_vs_lora_dropout0",
                 "peak_memory_vs_lora", "peak_memory_vs_floor", "peak_memory_over_floor_bytes",
                 "n_params_model", "device", "threads", "batch_size", "seq_len", "steps", "detail")


# ------------------------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class ModelSize:
    """A LLaMA-architecture shape (``transformers.LlamaConfig`` fields) benchmarked with random weights.

    Attributes: ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``,
    ``intermediate_size`` (MLP width), ``vocab_size``, ``tie_word_embeddings`` (``lm_head`` shares the
    input embedding), ``rope_theta``, ``max_position_embeddings``, ``description``.
    """

    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    description: str = ""

    @property
    def head_dim(self) -> int:
        """``hidden_size // num_attention_heads``."""
        return self.hidden_size // self.num_attention_heads

    def llama_config(self):
        """The ``transformers.LlamaConfig`` of this size (``use_cache=False``, no biases)."""
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, rope_theta=self.rope_theta, rms_norm_eps=1e-5,
            use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )

    def linear_shapes(self) -> list[tuple[str, int, int]]:
        """The seven projections of one block as ``(name, in_features, out_features)``."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        f = self.intermediate_size
        return [("q_proj", h, h), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", h, h),
                ("gate_proj", h, f), ("up_proj", h, f), ("down_proj", f, h)]

    def num_linear_parameters(self) -> int:
        """Weights of all targeted projections (the matrices SpIEL/LoRA adapt)."""
        return self.num_hidden_layers * sum(i * o for _, i, o in self.linear_shapes())

    def num_parameters(self) -> int:
        """All parameters: embeddings, projections, norms, ``lm_head`` (once if tied)."""
        embed = self.vocab_size * self.hidden_size
        norms = (2 * self.num_hidden_layers + 1) * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return embed + head + norms + self.num_linear_parameters()

    def lora_parameters(self, rank: int) -> int:
        """LoRA's trainable count at ``rank`` over the seven projections: ``rank * Σ(in + out)``."""
        return rank * self.num_hidden_layers * sum(i + o for _, i, o in self.linear_shapes())


def _size(name, h, layers, heads, kv, ffn, vocab, tied, theta, desc, max_pos=4096) -> ModelSize:
    return ModelSize(name, h, layers, heads, kv, ffn, vocab, tied, theta, max_pos, desc)


#: The benchmark sizes by name.
SIZES: dict[str, ModelSize] = {s.name: s for s in (
    _size("tiny", 64, 2, 4, 2, 128, 256, False, 10000.0, "tests only: 2 blocks of width 64", 512),
    _size("smollm2-135m", 576, 30, 9, 3, 1536, 49152, True, 100000.0, "SmolLM2-135M shape (134.5M parameters)", 8192),
    _size("smollm2-360m", 960, 32, 15, 5, 2560, 49152, True, 100000.0, "SmolLM2-360M shape (361.8M parameters)", 8192),
    _size("smollm2-1.7b", 2048, 24, 32, 32, 8192, 49152, True, 130000.0, "SmolLM2-1.7B shape (1.71B parameters)", 8192),
    _size("llama2-7b", 4096, 32, 32, 32, 11008, 32000, False, 10000.0, "Llama-2-7B shape (6.74B parameters)"),
    _size("llama2-13b", 5120, 40, 40, 40, 13824, 32000, False, 10000.0, "Llama-2-13B shape (13.0B parameters)"),
)}


def all_methods() -> tuple[str, ...]:
    """Every method name the benchmark accepts (the registry's benchmark entries), in :data:`METHOD_ORDER`."""
    from spielbench.methods import benchmark_methods

    return tuple(sorted(benchmark_methods(),
                        key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m)))


# ----------------------------------------------------------------------------------------- options
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
        algo = _spiel_algorithm(method)
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
        if any(_method_family(m) in ("lora",) for m in methods) and options.rank > smallest:
            raise InputError(f"rank: {options.rank} exceeds the smallest projection dimension {smallest} of size "
                             f"{size!r} (LoRA needs rank <= min(in, out))")


def _method_family(method: str) -> str:
    """The registry family of a benchmark entry ("floor", "lora", "spiel", ...)."""
    from spielbench.methods import REGISTRY

    return REGISTRY[method].family


def _spiel_algorithm(method: str) -> Optional[str]:
    """"ag"/"ma" for dynamic SpIEL methods (they call a selector), else None."""
    if method == "floor":
        return None
    from spielbench.methods import get_method

    spec = get_method(VARIANTS.get(method, (method,))[0])
    return spec.selection_algorithm if spec.needs_selector else None


# --------------------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class DrivingSchedule:
    """How the selector is driven during a benchmark and how step kinds are weighted (module docstring).

    Attributes: ``algorithm`` ("ag"/"ma"/None), natural ``period`` S and ``accumulation`` γ, driving
    ``driving_period`` S_b and ``driving_accumulation`` γ_b, ``start_step`` c0 (selector's
    ``completed_steps`` at construction), ``total_steps`` T of the selector, ``weights`` {kind: weight}.
    """

    algorithm: Optional[str]
    period: int
    accumulation: int
    driving_period: int
    driving_accumulation: int
    start_step: int
    total_steps: int
    weights: dict


def natural_weights(algorithm: Optional[str], period: int, accumulation: int) -> dict[str, float]:
    """Fraction of steady-state steps of each kind under the natural schedule (S, γ) (docs/METHOD.md §3).

    SpIEL-AG, hooks on in the γ + 1 steps ``t ≡ 0 … γ (mod S)``: ``phase-start 1/S`` (the first hooked
    step: a dense ``dW`` and the top-k candidate choice), ``phase-first 1/S`` (the first step sampled at
    the candidates: it builds the layers' CSR pattern of η ∪ candidates), ``phase (γ−2)/S`` (sampled at
    the candidates, pattern cached), ``select 1/S`` (hooked, then drop/grow), ``after-select 1/S`` (the
    next step: the layers rebuild their cached index pattern), ``plain (S−γ−2)/S``. With γ = 0 the select
    step is also the first hooked one; with γ = 1 there is no phase-first step. SpIEL-MA: ``after-select 1/S``, ``plain (S−2)/S``, ``select 1/S``. Any other
    method: ``plain 1``. Kinds with weight 0 are left out.

    Raises ValueError if S is too short (AG: S >= γ + 2; MA: S >= 2).
    """
    if algorithm == "ag":
        if period < accumulation + 2:
            raise ValueError(f"reselection_steps: SpIEL-AG needs S >= γ + 2, got S={period}, γ={accumulation}")
        w = {"after-select": 1, "plain": period - accumulation - 2, "phase-start": 1 if accumulation >= 1 else 0,
             "phase-first": 1 if accumulation >= 2 else 0, "phase": max(accumulation - 2, 0), "select": 1}
    elif algorithm == "ma":
        if period < 2:
            raise ValueError(f"reselection_steps: SpIEL-MA needs S >= 2 for the benchmark, got {period}")
        w = {"after-select": 1, "plain": period - 2, "select": 1}
    else:
        return {"plain": 1.0}
    return {k: v / period for k, v in w.items() if v > 0}


def timed_steps(algorithm: Optional[str], steps: int, accumulation: int = 5) -> int:
    """Timed steps actually run: ``steps``, raised so that every step kind of the schedule is measured
    (SpIEL-AG: 6, or 5 when γ = 2, 4 when γ = 1, 3 when γ = 0; SpIEL-MA: 3)."""
    if algorithm == "ag":
        return max(steps, 3 + min(accumulation, 3))
    if algorithm == "ma":
        return max(steps, 3)
    return steps


def driving_schedule(algorithm: Optional[str], options: BenchmarkOptions) -> DrivingSchedule:
    """The compressed schedule that makes the timed window exactly one reselection period (docstring §1)."""
    S, gamma = options.reselection_steps, options.selection_accumulation_steps
    n = timed_steps(algorithm, options.steps, gamma)
    weights = natural_weights(algorithm, S, gamma)
    if algorithm is None:
        return DrivingSchedule(None, S, gamma, S, gamma, 0, options.warmup_steps + n, weights)
    if n % S == 0:
        period, acc = S, gamma
    else:
        period = n
        if algorithm == "ag":
            lo = min(gamma, 3)  # phase-start, phase-first and phase steps need γ_b >= 3
            acc = min(max(int(round(gamma * n / S)), lo), n - 3)
        else:
            acc = min(max(int(round(gamma * n / S)), 0), n - 1)
    # entry step t = c0 + 1 ≡ γ_b (mod S_b) reselects; the timed window t = c0 + 2 … c0 + 1 + n is one period.
    c0 = period + acc - 1
    return DrivingSchedule(algorithm, S, gamma, period, acc, c0, c0 + 1 + n + 1000, weights)


def weighted_step_stats(times: Sequence[float], kinds: Sequence[str], weights: dict[str, float]) -> dict[str, Any]:
    """Schedule-weighted mean and median of step times [s] (module docstring §2).

    Returns ``{"mean": float, "p50": float, "kind_mean": {kind: mean}}``. Kinds with zero weight are
    ignored. Raises ValueError if a kind with positive weight has no sample, or a sample's kind has no
    weight.
    """
    by_kind: dict[str, list[float]] = {}
    for t, k in zip(times, kinds):
        if k not in weights:
            raise ValueError(f"step kind {k!r} has no weight (weights: {weights})")
        by_kind.setdefault(k, []).append(float(t))
    active = {k: w for k, w in weights.items() if w > 0}
    missing = [k for k in active if k not in by_kind]
    if missing:
        raise ValueError(f"no timed step of kind(s) {missing}; time more steps")
    kind_mean = {k: statistics.fmean(v) for k, v in by_kind.items()}
    mean = sum(w * kind_mean[k] for k, w in active.items())
    samples = sorted((t, active[k] / len(by_kind[k])) for k in active for t in by_kind[k])
    total = sum(w for _, w in samples)
    acc, p50 = 0.0, samples[-1][0]
    for i, (t, wt) in enumerate(samples):
        acc += wt
        if acc >= total / 2 - 1e-12:
            # exactly half: average with the next value, as the ordinary median does
            if abs(acc - total / 2) <= 1e-12 and i + 1 < len(samples):
                p50 = (t + samples[i + 1][0]) / 2
            else:
                p50 = t
            break
    return {"mean": mean, "p50": p50, "kind_mean": kind_mean}


# ------------------------------------------------------------------------------------ memory model
def _dtype_bytes(dtype: str) -> int:
    return 2 if dtype == "bfloat16" else 4


def estimate_memory(size: ModelSize, method: str, options: BenchmarkOptions) -> dict[str, int]:
    """A coarse estimate [bytes] of what one (size, method) run needs, for the OOM prediction.

    Components: ``weights`` (fp32 or bf16; NF4 projections at 0.5 byte + 1/32 byte of scales per
    weight), ``trainable_state`` (parameters, gradients and AdamW moments: 16 bytes per trainable fp32
    parameter; SpIEL adds 4 bytes of index and 8 of fused-forward cache), ``activations`` (saved tensors of every block without
    checkpointing: ``tokens * (12*h + 5*ffn)`` elements per block, plus fp32 logits and their gradient),
    ``transient`` (a dense per-layer ``dW`` and weight copy), and ``total``. Conservative only in that
    it omits allocator overhead; a miss is caught at run time.
    """
    family = _method_family(method)
    quantized = method.startswith("q")
    act_bytes = _dtype_bytes(options.dtype)
    n_params = size.num_parameters()
    linear = size.num_linear_parameters()
    if quantized:
        weights = int(linear * (0.5 + 1 / 32)) + (n_params - linear) * 4
    elif family == "full":
        weights = n_params * 4
    else:
        weights = n_params * _dtype_bytes(options.dtype)
    if family == "full":
        trainable = n_params * 12  # grads + two Adam moments (fp32)
    elif family == "floor":
        trainable = 0
    elif family == "spiel":  # + the fused forward's copy of η and W0[η] (8 bytes per entry)
        trainable = size.lora_parameters(options.rank) * 28
    elif family in ("lora", "shira"):
        trainable = size.lora_parameters(options.rank) * 20
    else:  # ia3
        trainable = size.num_hidden_layers * 4 * size.hidden_size * 16
    tokens = options.batch_size * options.seq_len
    per_block = tokens * (12 * size.hidden_size + 5 * size.intermediate_size) * act_bytes
    attn = options.batch_size * size.num_attention_heads * options.seq_len * options.seq_len * act_bytes
    activations = size.num_hidden_layers * (per_block + attn) + 3 * tokens * size.vocab_size * 4
    largest = max(i * o for _, i, o in size.linear_shapes())
    transient = 3 * largest * 4 + size.vocab_size * size.hidden_size * 4
    runtime = 400 * 2**20  # python + torch + libraries
    total = weights + trainable + activations + transient + runtime
    return {"weights": int(weights), "trainable_state": int(trainable), "activations": int(activations),
            "transient": int(transient), "runtime": runtime, "total": int(total)}


def available_memory_bytes(device: str) -> int:
    """Memory available to a new run [bytes]: free device memory on CUDA, ``psutil`` available RAM on CPU."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def _vm_size_bytes() -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cap_memory(device: str, limit: int) -> Optional[str]:
    """Cap this process to ``limit`` more bytes: CPU ``RLIMIT_AS`` above the current address-space size;
    CUDA the per-process memory fraction. Returns a description, or None where no cap is possible."""
    import torch

    if device.startswith("cuda"):
        dev = torch.device(device)
        total = torch.cuda.get_device_properties(dev).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), dev)
        return f"cuda memory fraction {min(1.0, limit / total):.4f}"
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    current = _vm_size_bytes()
    if current is None:
        return None
    cap = current + int(limit)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    return f"RLIMIT_AS {cap} bytes (address space {current} + {int(limit)})"


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    if isinstance(exc, RuntimeError):
        msg = str(exc).lower()
        return any(s in msg for s in ("out of memory", "can't allocate memory", "cannot allocate memory",
                                      "not enough memory", "failed to allocate"))
    return False


# ------------------------------------------------------------------------------------ model building
_FILL_BLOCK = 1_000_003  # a prime, so the repeated random block does not align with matrix rows


def _fill_random_(tensor, block, std: float = 0.02) -> None:
    """Fill ``tensor`` with ``N(0, std)`` values by tiling a precomputed random block (fast on CPU; the
    values only need to be finite and of realistic scale: weights do not change time or memory)."""
    import torch

    flat = tensor.view(-1)
    n = flat.numel()
    b = block.numel()
    full = (n // b) * b
    with torch.no_grad():
        if full:
            flat[:full].view(-1, b).copy_(block.to(flat.dtype).expand(n // b, b))
        if n > full:
            flat[full:].copy_(block[: n - full].to(flat.dtype))


def _materialise(model, device, block, skip: Iterable = ()) -> None:
    """Move every meta parameter/buffer of ``model`` (except modules in ``skip``) to ``device`` and fill it:
    matrices with random values, vectors (norm weights) with ones; rotary buffers are rebuilt."""
    import torch

    skip_ids = {id(m) for m in skip}
    for module in model.modules():
        if id(module) in skip_ids:
            continue
        direct = list(module._parameters.values()) + list(module._buffers.values())
        if not any(t is not None and t.is_meta for t in direct):
            continue
        module.to_empty(device=device, recurse=False)
        for p in module._parameters.values():
            if p is None:
                continue
            if p.ndim >= 2:
                _fill_random_(p.data, block)
            else:
                with torch.no_grad():
                    p.data.fill_(1.0)
    for name, module in list(model.named_modules()):
        if hasattr(module, "inv_freq") and hasattr(module, "rope_init_fn"):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, type(module)(config=model.config, device=device))


def build_random_model(size: ModelSize, device: str, dtype, quantized: bool = False, seed: int = 0):
    """A ``LlamaForCausalLM`` of ``size`` with random weights, built directly on ``device``.

    The model is created on the ``meta`` device and each module is materialised in place, so the peak
    memory of building is the model itself (plus one fp32 projection for NF4). Float models have all
    parameters in ``dtype``. With ``quantized`` every projection becomes a bitsandbytes ``Linear4bit``
    (NF4, double quantisation, compute dtype ``dtype``) as ``baselines.quant`` loads real models; embeddings,
    norms and ``lm_head`` stay in ``dtype``; ``model.is_loaded_in_4bit`` is set for peft.

    Raises ImportError (bitsandbytes missing) for ``quantized``; torch allocation errors when it does not fit.
    """
    import torch
    from transformers import LlamaForCausalLM

    gen = torch.Generator(device="cpu").manual_seed(seed)
    block = (torch.randn(_FILL_BLOCK, generator=gen) * 0.02).to(device)
    config = size.llama_config()
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype)
    replaced = []
    if quantized:
        import bitsandbytes as bnb

        for name, module in list(model.named_modules()):
            if not isinstance(module, torch.nn.Linear) or name == "lm_head":
                continue
            weight = torch.empty(module.out_features, module.in_features, dtype=dtype, device=device)
            _fill_random_(weight, block)
            qlayer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                       compute_dtype=dtype, compress_statistics=True, quant_type="nf4",
                                       device="meta")
            qlayer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True,
                                              quant_type="nf4")
            qlayer = qlayer.to(device)
            del weight
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, qlayer)
            replaced.append(qlayer)
        model.is_loaded_in_4bit = True
    _materialise(model, device, block, skip=replaced)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.train()
    return model


def load_real_model(model_dir: str, device: str, dtype, quantized: bool):
    """A real model folder in ``dtype`` (NF4 through ``baselines.quant.load_nf4_model`` for ``quantized``)."""
    from transformers import AutoModelForCausalLM

    if quantized:
        from baselines.quant import load_nf4_model

        model = load_nf4_model(model_dir, device)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    model.config.use_cache = False
    model.train()
    return model


def _count_parameters(model) -> int:
    from spielbench.measure import count_parameters

    return count_parameters(model)


# --------------------------------------------------------------------------------------- the worker
@dataclass
class _Setup:
    model: Any
    optimizer: Any = None
    selector: Any = None
    floor: bool = False
    sparse_layers: list = field(default_factory=list)


def _run_config(method: str, size_label: str, options: BenchmarkOptions, device: str):
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


def _build(method: str, base, options: BenchmarkOptions, device: str, size_label: str,
           schedule: DrivingSchedule) -> _Setup:
    """Wrap ``base`` with ``method`` through the training registry; optimizer and selector as in training."""
    if method == "floor":
        for p in base.parameters():
            p.requires_grad_(False)
        return _Setup(model=base, floor=True)
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
    return _Setup(model=model, optimizer=optimizer, selector=selector, sparse_layers=layers)


def _attach_selector(setup: _Setup, schedule: DrivingSchedule) -> None:
    """Attach a ``spiel.SpielSelector`` on the driving schedule at ``completed_steps = c0``."""
    from spiel.selection import SpielSelector

    driving = setup.model.spiel_config.replace(reselection_steps=schedule.driving_period,
                                               selection_accumulation_steps=schedule.driving_accumulation)
    setup.selector = SpielSelector(setup.model, setup.optimizer, total_steps=schedule.total_steps,
                                   grad_accumulation_steps=1, config=driving, completed_steps=schedule.start_step)


def _adapter_state(setup: _Setup) -> dict[str, int]:
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


def _step(setup: _Setup, ids, autocast, sync, previous_kind: Optional[str] = None,
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


def _device_name(device: str) -> str:
    import platform

    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return "cuda:0"
    return device


def _display_path(path: str) -> str:
    """``path`` relative to the repository when inside it, else its last component (records never hold
    absolute paths of the machine they were made on)."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(REPO_ROOT))
    except ValueError:
        return resolved.name


def _base_record(size: str, method: str, options: BenchmarkOptions) -> dict[str, Any]:
    return {
        "size": size, "method": method, "status": None, "detail": None, "oom_kind": None,
        "step_time_mean_s": None, "step_time_p50_s": None, "tokens_per_s": None,
        "peak_memory_bytes": None, "peak_rss_bytes": None, "cuda_max_allocated_bytes": None,
        "cuda_max_reserved_bytes": None, "trainable_params": None, "adapter_state_bytes": None,
        "n_params_model": None, "device": options.device, "device_name": None, "threads": None,
        "batch_size": options.batch_size, "seq_len": options.seq_len, "steps": options.steps,
        "warmup_steps": options.warmup_steps, "dtype": options.dtype,
        "rank": options.rank if _method_family(method) in ("spiel", "lora", "shira") else None,
        "model_source": _display_path(options.model_dir) if options.model_dir else "random-init",
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_avg_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _probe_4bit(device: str, dtype) -> Optional[str]:
    """None if bitsandbytes runs an NF4 ``Linear4bit`` forward+backward on ``device``, else the reason."""
    try:
        import bitsandbytes as bnb
        import torch

        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=dtype, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(torch.randn(64, 64, dtype=dtype, device=device) * 0.02,
                                         requires_grad=False, quant_type="nf4")
        layer = layer.to(device)
        x = torch.randn(2, 64, dtype=dtype, device=device, requires_grad=True)
        layer(x).float().sum().backward()
        if x.grad is None:
            return "bitsandbytes Linear4bit gave no input gradient"
        return None
    except Exception as exc:  # any failure means the 4-bit path cannot run here
        return f"bitsandbytes NF4 cannot run on {device}: {type(exc).__name__}: {exc}"


def run_worker(size: str, method: str, options: BenchmarkOptions) -> dict[str, Any]:
    """Measure one (size, method) in *this* process and return its record (see the module docstring).

    Never raises for run-time failures: out-of-memory gives ``status="oom"``, a 4-bit method bitsandbytes
    cannot run gives ``"unsupported"``, anything else ``"error"`` with the traceback's last lines.
    Raises InputError for bad names or options (before any work).
    """
    check_pairs([size], [method], options)
    record = _base_record(size, method, options)
    started = time.perf_counter()
    import torch

    if options.threads is not None:
        torch.set_num_threads(options.threads)
    device = _resolve_device(options.device)
    record["device"] = device
    record["threads"] = torch.get_num_threads()
    record["device_name"] = _device_name(device)
    record["versions"] = {"torch": torch.__version__, "python": sys.version.split()[0]}
    if device.startswith("cuda") and not torch.cuda.is_available():
        record.update(status="unsupported", detail=f"device {device}: CUDA is not available")
        return record
    torch.manual_seed(options.seed)
    quantized = method.startswith("q")
    on_cuda = device.startswith("cuda")
    family = _method_family(method)
    bf16 = options.dtype == "bfloat16"
    if quantized:
        from baselines.quant import nf4_compute_dtype

        model_dtype = nf4_compute_dtype(device) if not bf16 else torch.bfloat16
        reason = _probe_4bit(device, model_dtype)
        if reason is not None:
            record.update(status="unsupported", detail=reason)
            return record
    elif family == "full":
        model_dtype = torch.float32  # fp32 master weights; bf16 runs use autocast
    else:
        model_dtype = torch.bfloat16 if bf16 else torch.float32
    shape = SIZES.get(size)
    schedule = driving_schedule(_spiel_algorithm(method), options)
    record["schedule"] = asdict(schedule)

    available = available_memory_bytes(device)
    if options.memory_limit_bytes is not None:
        available = min(available, options.memory_limit_bytes)
    record["memory_available_bytes"] = available
    if shape is not None:
        estimate = estimate_memory(shape, method, options)
        record["memory_estimate"] = estimate
        if options.predict_oom and estimate["total"] > available:
            record.update(status="oom", oom_kind="predicted",
                          detail=f"oom (predicted): needs about {estimate['total'] / 2**30:.2f} GiB "
                                 f"(weights {estimate['weights'] / 2**30:.2f}, trainable state "
                                 f"{estimate['trainable_state'] / 2**30:.2f}, activations "
                                 f"{estimate['activations'] / 2**30:.2f}), {available / 2**30:.2f} GiB available")
            record["n_params_model"] = shape.num_parameters()
            return record

    # import what the build needs before any memory cap, so the cap only bounds the model and the run
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401 (lazy modules: load them now)

    import spielbench.measure as measure
    if family in ("lora", "ia3", "shira") or quantized:
        import peft  # noqa: F401
    if quantized:
        import bitsandbytes  # noqa: F401
    if family == "spiel":
        import spiel.selection  # noqa: F401
        import spiel.model  # noqa: F401

    cap = None
    if options.memory_limit_bytes is not None:
        cap = _cap_memory(device, options.memory_limit_bytes)
    elif not on_cuda:
        cap = _cap_memory(device, available)
    record["memory_cap"] = cap
    sync = (lambda: torch.cuda.synchronize(torch.device(device))) if on_cuda else (lambda: None)
    device_type = "cuda" if on_cuda else "cpu"

    def autocast():
        if bf16:
            return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    setup = None
    try:
        t0 = time.perf_counter()
        if options.model_dir is not None:
            base = load_real_model(options.model_dir, device, model_dtype, quantized)
        else:
            base = build_random_model(shape, device, model_dtype, quantized=quantized, seed=options.seed)
        record["n_params_model"] = _count_parameters(base)
        vocab = int(base.config.vocab_size)
        setup = _build(method, base, options, device, size, schedule)
        del base
        if options.gradient_checkpointing:
            model = setup.model
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (and SpielModel)
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            setup.model.train()
        record["gradient_checkpointing"] = options.gradient_checkpointing
        record["build_time_s"] = time.perf_counter() - t0
        record["trainable_params"] = sum(p.numel() for p in setup.model.parameters() if p.requires_grad)
        gen = torch.Generator(device="cpu").manual_seed(options.seed + 1)
        batches = [torch.randint(3, vocab, (options.batch_size, options.seq_len), generator=gen).to(device)
                   for _ in range(2)]
        scope = measure.reset_peak_memory(device)
        for i in range(options.warmup_steps):
            _step(setup, batches[i % 2], autocast, sync)
        previous = None
        if schedule.algorithm is not None:
            _attach_selector(setup, schedule)
            _, previous = _step(setup, batches[0], autocast, sync)  # the untimed entry step
            if previous != "select":
                raise RuntimeError(f"benchmark schedule: the entry step did not reselect ({asdict(schedule)})")
        times, cpu_times, kinds, phases = [], [], [], []
        profiler = None
        if options.profile_out:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
            profiler = profile(activities=acts, record_shapes=True)
            profiler.__enter__()
        try:
            for i in range(timed_steps(schedule.algorithm, options.steps, options.selection_accumulation_steps)):
                phase, kind = _step(setup, batches[i % 2], autocast, sync, previous, cuda_events=on_cuda)
                previous = kind
                times.append(phase["total"])
                cpu_times.append(phase["cpu"])
                kinds.append(kind)
                phases.append(phase)
        finally:
            if profiler is not None:
                profiler.__exit__(None, None, None)
        peaks = measure.peak_memory(device, scope)
        state = _adapter_state(setup)
        stats = weighted_step_stats(times, kinds, schedule.weights)
        if on_cuda:
            event_times = [p["cuda_event"] for p in phases]
            record.update(step_times_cuda_event_s=event_times,
                          step_time_cuda_event_mean_s=weighted_step_stats(event_times, kinds, schedule.weights)["mean"])
        cpu_stats = weighted_step_stats(cpu_times, kinds, schedule.weights)
        record.update(
            status="ok", steps=len(times),
            step_time_mean_s=stats["mean"], step_time_p50_s=stats["p50"],
            tokens_per_s=options.batch_size * options.seq_len / stats["mean"],
            step_time_raw_mean_s=statistics.fmean(times), step_times_s=times, step_kinds=kinds,
            kind_mean_s=stats["kind_mean"],
            step_cpu_time_mean_s=cpu_stats["mean"], step_cpu_times_s=cpu_times,
            phase_mean_s={k: statistics.fmean(p[k] for p in phases)
                          for k in ("forward", "backward", "optimizer", "selector")},
            peak_rss_bytes=peaks["peak_rss_bytes"], peak_rss_scope=peaks["peak_rss_scope"],
            cuda_max_allocated_bytes=peaks.get("cuda_max_allocated_bytes"),
            cuda_max_reserved_bytes=peaks.get("cuda_max_reserved_bytes"),
            adapter_state=state, adapter_state_bytes=state["total"],
            adapter_state_bytes_per_trainable_param=(state["total"] / record["trainable_params"]
                                                     if record["trainable_params"] else None),
        )
        record["peak_memory_bytes"] = (record["cuda_max_allocated_bytes"] if on_cuda else record["peak_rss_bytes"])
        if setup.selector is not None:
            record["reselections_timed"] = kinds.count("select")
            record["reselection_history"] = [{k: v for k, v in h.items() if k != "replaced"}
                                             for h in setup.selector.history]
        if profiler is not None:
            _write_profile(profiler, options.profile_out, size, method, record, on_cuda)
    except Exception as exc:  # recorded, never raised: the sweep goes on
        if _is_oom(exc):
            setup = None
            record.update(status="oom", oom_kind="raised", detail=f"oom (raised): {type(exc).__name__}: {exc}"[:2000])
            try:
                peaks = measure.peak_memory(device)
                record["peak_rss_bytes"] = peaks["peak_rss_bytes"]
                record["cuda_max_allocated_bytes"] = peaks.get("cuda_max_allocated_bytes")
            except Exception:  # noqa: BLE001 (the record matters more than the peak)
                pass
        else:
            tail = "".join(traceback.format_exception(exc)[-6:])
            record.update(status="error", detail=f"{type(exc).__name__}: {exc}\n{tail}"[-4000:])
    record["wall_time_s"] = time.perf_counter() - started
    record["load_avg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return record


def _write_profile(profiler, path: str, size: str, method: str, record: dict, on_cuda: bool) -> None:
    sort = "self_cuda_time_total" if on_cuda else "self_cpu_time_total"
    averages = profiler.key_averages()
    text = io.StringIO()
    text.write(f"# torch.profiler: size={size} method={method} device={record['device']} "
               f"threads={record['threads']} steps={record['steps']} kinds={record.get('step_kinds')}\n")
    text.write(f"# step times [s]: {record.get('step_times_s')}\n\n")
    text.write(averages.table(sort_by=sort, row_limit=40))
    text.write("\n\n# grouped by input shape (top 40)\n")
    text.write(profiler.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=40))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text.getvalue())
    os.replace(tmp, out)


# --------------------------------------------------------------------------------- fresh processes
def result_path(out_dir: str | Path, size: str, method: str) -> Path:
    """``<out_dir>/<size>__<method>.json``."""
    return Path(out_dir) / f"{size}__{method}.json"


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + paths)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_one(size: str, method: str, options: BenchmarkOptions, output: str | Path,
            log: Optional[str | Path] = None) -> dict[str, Any]:
    """Measure one (size, method) in a fresh Python process and write its JSON to ``output`` atomically.

    The worker's stdout/stderr go to ``log`` (appended) when given. A worker that dies without a result
    is recorded too: SIGKILL (the kernel OOM killer) as ``status="oom"``/``oom_kind="killed"``, a
    timeout as ``"timeout"``, any other exit as ``"error"`` with the end of its output.

    Returns the record. Raises InputError for unknown names or bad options (before starting a worker).
    """
    options.validate()
    check_pairs([size], [method], options)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if options.model_dir is not None:
        options = replace(options, model_dir=os.path.abspath(options.model_dir))
    if options.profile_out is not None:
        options = replace(options, profile_out=os.path.abspath(options.profile_out))
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".worker.json", dir=output.parent)
    os.fchmod(fd, 0o644)  # mkstemp creates 0600; outputs are meant to be readable
    os.close(fd)
    os.unlink(tmp_name)
    tmp_name = os.path.abspath(tmp_name)
    cmd = [sys.executable, "-m", "spielbench.benchmark", "worker", "--size", size, "--method", method,
           "--options", json.dumps(asdict(options)), "--result", tmp_name]
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if log is not None:
            Path(log).parent.mkdir(parents=True, exist_ok=True)
            sink = stack.enter_context(open(log, "a"))
            sink.write(f"== {size} {method}: {' '.join(cmd[:6])} ...\n")
            sink.flush()
        else:
            sink = stack.enter_context(tempfile.TemporaryFile("w+"))
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=_child_env(), start_new_session=True)
        try:
            rc = proc.wait(timeout=options.timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
            timed_out = True
        sink.flush()
        tail = ""
        with contextlib.suppress(OSError):
            with (open(log, "rb") if log is not None else open(os.dup(sink.fileno()), "rb")) as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 3000))
                tail = fh.read().decode(errors="replace")
    record: dict[str, Any]
    if os.path.exists(tmp_name):
        with open(tmp_name) as fh:
            record = json.load(fh)
        os.unlink(tmp_name)
    else:
        record = _base_record(size, method, options)
        if timed_out:
            record.update(status="timeout", detail=f"worker exceeded timeout_s={options.timeout_s}")
        elif rc in (-signal.SIGKILL, 128 + signal.SIGKILL):
            record.update(status="oom", oom_kind="killed",
                          detail=f"oom (killed): the worker was killed by SIGKILL (exit {rc}), most likely by the "
                                 f"kernel's out-of-memory killer")
        else:
            record.update(status="error", detail=f"worker exited with {rc} and no result; output tail:\n{tail[-2000:]}")
    record["worker_exit_code"] = rc
    record["worker_wall_time_s"] = time.perf_counter() - started
    from spielbench.measure import write_json_atomic

    write_json_atomic(output, record)
    return record


def run_sweep(sizes: Sequence[str], methods: Sequence[str], options: BenchmarkOptions, out_dir: str | Path,
              table_stem: Optional[str | Path] = None, log: Optional[str | Path] = None,
              echo: bool = True) -> list[dict[str, Any]]:
    """Run every (size, method) pair, one fresh process each, in order; then write the tables.

    ``table_stem`` (e.g. ``results/tables/efficiency_benchmark``) gets ``.md`` and ``.csv``.
    Returns the records. Raises InputError for bad names or options before the first worker starts.
    """
    options.validate()
    check_pairs(sizes, methods, options)
    records = []
    for size in sizes:
        for method in methods:
            record = run_one(size, method, options, result_path(out_dir, size, method), log=log)
            records.append(record)
            if echo:
                print(_summary_line(record), flush=True)
    if table_stem is not None:
        write_tables(records, f"{table_stem}.md", f"{table_stem}.csv")
    return records


def _summary_line(r: dict[str, Any]) -> str:
    if r.get("status") != "ok":
        return f"{r['size']:>14} {r['method']:<16} {r['status']}: {str(r.get('detail') or '').splitlines()[0][:150]}"
    return (f"{r['size']:>14} {r['method']:<16} step {r['step_time_mean_s']:.3f} s (p50 {r['step_time_p50_s']:.3f}) "
            f"{r['tokens_per_s']:.0f} tok/s  peak {r['peak_memory_bytes'] / 2**30:.2f} GiB  "
            f"state {r['adapter_state_bytes'] / 2**20:.1f} MiB  load {r.get('load_avg_start')}")


# ----------------------------------------------------------------------------------------- tables
def load_records(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Read benchmark JSONs. Raises InputError naming a file that is not a benchmark record."""
    records = []
    for path in paths:
        try:
            with open(path) as fh:
                rec = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: not a readable JSON file ({exc})") from None
        if not isinstance(rec, dict) or not {"size", "method", "status"} <= set(rec):
            raise InputError(f"{path}: expected a benchmark record with size, method and status")
        records.append(rec)
    return records


def _ratio(a, b):
    return a / b if a is not None and b else None


def lora_reference(method: str) -> str:
    """The method a ``*_vs_lora`` ratio divides by: ``qlora`` for 4-bit methods, else ``lora``."""
    return "qlora" if method.startswith("q") else "lora"


def table_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per record with :data:`TABLE_COLUMNS`; ratios are to LoRA (4-bit methods: to qLoRA) and
    to the (float) floor of the same size (None where either is missing or not ok). Sorted by size
    (registry order) then method."""
    by_key = {(r["size"], r["method"]): r for r in records}
    size_order = list(SIZES)

    def ok(size, method, key):
        r = by_key.get((size, method))
        return r.get(key) if r is not None and r.get("status") == "ok" else None

    rows = []
    for r in records:
        s = r["size"]
        step, mem = (r.get("step_time_mean_s"), r.get("peak_memory_bytes")) if r.get("status") == "ok" else (None, None)
        floor_mem = ok(s, "floor", "peak_memory_bytes")
        lora = lora_reference(r["method"])
        row = {c: r.get(c) for c in TABLE_COLUMNS}
        row.update(
            step_time_vs_lora=_ratio(step, ok(s, lora, "step_time_mean_s")),
            step_time_vs_floor=_ratio(step, ok(s, "floor", "step_time_mean_s")),
            step_time_vs_lora_dropout0=(None if r["method"].startswith("q")
                                        else _ratio(step, ok(s, "lora-dropout0", "step_time_mean_s"))),
            peak_memory_vs_lora_dropout0=(None if r["method"].startswith("q")
                                          else _ratio(mem, ok(s, "lora-dropout0", "peak_memory_bytes"))),
            step_cpu_time_vs_lora=_ratio(r.get("step_cpu_time_mean_s") if step is not None else None,
                                         ok(s, lora, "step_cpu_time_mean_s")),
            peak_memory_vs_lora=_ratio(mem, ok(s, lora, "peak_memory_bytes")),
            peak_memory_vs_floor=_ratio(mem, floor_mem),
            peak_memory_over_floor_bytes=(mem - floor_mem) if mem is not None and floor_mem is not None else None,
            detail=(str(r.get("detail")).splitlines()[0][:200] if r.get("detail") else None),
        )
        rows.append(row)
    rows.sort(key=lambda x: (size_order.index(x["size"]) if x["size"] in size_order else len(size_order), x["size"],
                             METHOD_ORDER.index(x["method"]) if x["method"] in METHOD_ORDER else len(METHOD_ORDER),
                             x["method"]))
    return rows


def _fmt(value, kind: str) -> str:
    if value is None:
        return "–"
    if kind == "s":
        return f"{value:.3f}"
    if kind == "x":
        return f"{value:.2f}×"
    if kind == "gib":
        return f"{value / 2**30:.2f}"
    if kind == "mib":
        return f"{value / 2**20:.1f}"
    if kind == "int":
        return f"{int(value):,d}"
    if kind == "f0":
        return f"{value:.0f}"
    if kind == "f1":
        return f"{value:.1f}"
    return str(value)


def render_markdown(rows: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]]) -> str:
    """The markdown table (absolute figures and ratios) with a header naming machine and settings."""
    ok = [r for r in records if r.get("status") == "ok"]
    first = ok[0] if ok else (records[0] if records else {})
    loads = [r.get(k) for r in records for k in ("load_avg_start", "load_avg_end") if r.get(k) is not None]
    lines = [
        "# Efficiency benchmark: step time and peak memory per method and model size",
        "",
        f"Device: {first.get('device')} ({first.get('device_name')}), {first.get('threads')} threads; "
        f"batch {first.get('batch_size')} × {first.get('seq_len')} tokens, dtype {first.get('dtype')}, "
        f"rank {next((r.get('rank') for r in records if r.get('rank')), None)}; "
        f"{first.get('warmup_steps')} warm-up + {min((r.get('steps') or 0) for r in records)}–"
        f"{max((r.get('steps') or 0) for r in records)} timed steps per run (SpIEL-AG at least 6 when γ ≥ 3, SpIEL-MA at "
        f"least 3), each run in a fresh process; weights: {first.get('model_source')}.",
        f"1-minute load average during the runs: {min(loads):.2f}–{max(loads):.2f} (other work on the machine "
        "disturbs timings)." if loads else "",
        "Step time: schedule-weighted mean/median (SpIEL selection phases in their natural proportion, "
        "S=20, γ=5; see `spielbench/benchmark.py`). Peak memory: CUDA max allocated, else peak RSS of the worker "
        "after model build. Ratios \"/LoRA\" divide by LoRA of the same size (dropout 0.1 as the reference; 4-bit "
        "methods: by qLoRA), \"/LoRA-d0\" by LoRA without dropout (`lora-dropout0`, the fastest LoRA); "
        "\"/floor\" by the frozen-weight float floor. "
        "Adapter state: trainable parameters + gradients + optimizer state + SpIEL indices and fused-forward cache. "
        "CPU-time/LoRA: ratio of process CPU time per step (steadier than wall time when other work shares "
        "the machine).",
        "",
        "| size | method | status | step [s] | p50 [s] | tokens/s | peak [GiB] | trainable | state [MiB] | "
        "B/param | step/LoRA | step/LoRA-d0 | step/floor | CPU-time/LoRA | mem/LoRA | mem/LoRA-d0 | mem/floor | "
        "mem over floor [GiB] |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {(r.get('detail') or '')[:80]}"
        lines.append("| " + " | ".join([
            r["size"], r["method"], status, _fmt(r["step_time_mean_s"], "s"), _fmt(r["step_time_p50_s"], "s"),
            _fmt(r["tokens_per_s"], "f0"), _fmt(r["peak_memory_bytes"], "gib"), _fmt(r["trainable_params"], "int"),
            _fmt(r["adapter_state_bytes"], "mib"), _fmt(r["adapter_state_bytes_per_trainable_param"], "f1"),
            _fmt(r["step_time_vs_lora"], "x"), _fmt(r["step_time_vs_lora_dropout0"], "x"),
            _fmt(r["step_time_vs_floor"], "x"), _fmt(r["step_cpu_time_vs_lora"], "x"),
            _fmt(r["peak_memory_vs_lora"], "x"), _fmt(r["peak_memory_vs_lora_dropout0"], "x"),
            _fmt(r["peak_memory_vs_floor"], "x"),
            _fmt(r["peak_memory_over_floor_bytes"], "gib"),
        ]) + " |")
    return "\n".join(line for line in lines) + "\n"


def write_tables(records: Sequence[dict[str, Any]], md_path: str | Path, csv_path: str | Path) -> list[dict[str, Any]]:
    """Write the markdown and CSV tables (each atomically). Returns the rows."""
    rows = table_rows(records)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(TABLE_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    for path, text in ((md_path, render_markdown(rows, records)), (csv_path, buf.getvalue())):
        write_text_atomic(path, text)
    return rows


# -------------------------------------------------------------------------------------------- CLI
def _options_from_args(args: argparse.Namespace) -> BenchmarkOptions:
    data = {f.name: getattr(args, f.name) for f in fields(BenchmarkOptions) if getattr(args, f.name, None) is not None}
    if getattr(args, "no_predict_oom", False):
        data["predict_oom"] = False
    return BenchmarkOptions.from_dict(data)


def _add_options(p: argparse.ArgumentParser) -> None:
    d = BenchmarkOptions()
    p.add_argument("--rank", type=int, help=f"LoRA rank / equal SpIEL budget (default {d.rank})")
    p.add_argument("--batch-size", dest="batch_size", type=int, help=f"sequences per step (default {d.batch_size})")
    p.add_argument("--seq-len", dest="seq_len", type=int, help=f"tokens per sequence (default {d.seq_len})")
    p.add_argument("--warmup-steps", dest="warmup_steps", type=int, help=f"untimed steps (default {d.warmup_steps})")
    p.add_argument("--steps", type=int, help=f"timed steps (default {d.steps}; raised to cover every step kind: "
                                             "SpIEL-AG 6 when γ >= 3, MA 3)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default float32)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--threads", type=int, help="torch CPU threads per worker (default: torch's)")
    p.add_argument("--reselection-steps", dest="reselection_steps", type=int, help="natural S (default 20)")
    p.add_argument("--selection-accumulation-steps", dest="selection_accumulation_steps", type=int,
                   help="natural γ (default 5)")
    p.add_argument("--initial-reselection-rate", dest="initial_reselection_rate", type=float, help="ζ (default 0.2)")
    p.add_argument("--seed", type=int)
    p.add_argument("--timeout-s", dest="timeout_s", type=float, help="per-worker limit [s] (default 3600)")
    p.add_argument("--memory-limit-bytes", dest="memory_limit_bytes", type=int,
                   help="treat this as the available memory and cap each worker to it")
    p.add_argument("--no-predict-oom", dest="no_predict_oom", action="store_true",
                   help="always try, even when the estimate exceeds the available memory")
    p.add_argument("--model-dir", dest="model_dir", help="benchmark a real model folder (size is then a label)")
    p.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true", default=None,
                   help="recompute activations in the backward (non-reentrant checkpointing)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m spielbench.benchmark", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="every (size, method) pair, one fresh process each, then the tables")
    p.add_argument("--sizes", nargs="+", required=True)
    p.add_argument("--methods", nargs="+", required=True)
    p.add_argument("--out-dir", default="results/benchmark", help="per-pair JSONs (default results/benchmark)")
    p.add_argument("--table", default="results/tables/efficiency_benchmark",
                   help="table path without suffix (.md and .csv are written); 'none' to skip")
    p.add_argument("--log", help="append worker output to this file")
    _add_options(p)
    p = sub.add_parser("one", help="one (size, method) pair in a fresh process")
    p.add_argument("--size", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--output", required=True, help="the JSON to write")
    p.add_argument("--log")
    _add_options(p)
    p = sub.add_parser("table", help="write the tables from benchmark JSONs")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--md", required=True)
    p.add_argument("--csv", required=True)
    p = sub.add_parser("profile", help="torch.profiler summary of one pair's timed steps (fresh process)")
    p.add_argument("--size", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--output", required=True, help="profile summary text file")
    p.add_argument("--json", help="also keep the (profiled, so inflated) record here")
    _add_options(p)
    sub.add_parser("sizes", help="list the sizes and their parameter counts")
    p = sub.add_parser("worker", help=argparse.SUPPRESS)
    p.add_argument("--size", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--options", required=True)
    p.add_argument("--result", required=True)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Command-line entry point; returns the exit status (2 on bad input, before any work)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "worker":
            options = BenchmarkOptions.from_dict(json.loads(args.options))
            record = run_worker(args.size, args.method, options)
            from spielbench.measure import write_json_atomic

            write_json_atomic(args.result, record)
            return 0
        if args.command == "sizes":
            for s in SIZES.values():
                print(f"{s.name:>14}  {s.num_parameters():>15,d} params  LoRA r16 {s.lora_parameters(16):>12,d}  "
                      f"{s.description}")
            return 0
        if args.command == "table":
            records = load_records(args.inputs)
            write_tables(records, args.md, args.csv)
            print(Path(args.md).read_text())
            return 0
        options = _options_from_args(args)
        if args.command == "run":
            table = None if args.table == "none" else args.table
            run_sweep(args.sizes, args.methods, options, args.out_dir, table, log=args.log)
            if table is not None:
                print(Path(f"{table}.md").read_text())
            return 0
        if args.command == "one":
            record = run_one(args.size, args.method, options, args.output, log=args.log)
            print(_summary_line(record))
            return 0 if record["status"] in ("ok", "oom", "unsupported") else 1
        if args.command == "profile":
            options = replace(options, profile_out=str(Path(args.output).resolve()))
            out_json = args.json or str(Path(args.output).with_suffix(".json"))
            record = run_one(args.size, args.method, options, out_json)
            print(_summary_line(record))
            if record["status"] == "ok":
                print(Path(args.output).read_text())
            return 0 if record["status"] == "ok" else 1
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Measurement of one training run: time, tokens, memory, adapter size, losses, provenance.

Everything a run reports goes into one JSON next to its adapter (``metrics.json``, the record
:class:`spielbench.records.RunMetrics`), written atomically. Units are in the key names: ``*_s`` seconds, ``*_bytes`` bytes, ``tokens*`` tokens.

Memory:
* CUDA: ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` since training started.
* CPU: the peak resident set size of the process. On Linux the high-water mark is reset when training
  starts (``/proc/self/clear_refs``) and read from ``/proc/self/status`` (VmHWM), so it covers the
  loaded model plus training, not earlier work in the same process; elsewhere it is the lifetime peak
  (``ru_maxrss``). The field ``peak_rss_scope`` says which.
* Exact bytes of the trainable state: trainable parameters + their gradients (same dtype and size) +
  every tensor in the optimizer state. SpIEL's transient dense gradients are not persistent state and
  are not included (they show up in the peak RSS). Sparse adapters' position indices (SpIEL, SHiRA)
  are buffers, reported separately as ``index_bytes``; the copy of η and ``W0[η]`` that SpIEL's fused
  forward keeps is ``fused_cache_bytes``.
"""
from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


#: Packages whose versions every metrics file records.
RECORDED_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "tokenizers")


# ---------------------------------------------------------------------------------------------- memory

_LINUX_HWM = Path("/proc/self/status")
_LINUX_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_memory(device: str) -> str:
    """Reset the peak-memory counters for ``device`` ("cpu" or "cuda[:i]").

    Returns:
        The scope the CPU peak RSS will cover: ``"since_reset"`` (Linux high-water mark reset) or
        ``"process_lifetime"`` (``ru_maxrss``, which cannot be reset).
    """
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(torch.device(device))
    try:
        _LINUX_CLEAR_REFS.write_text("5")
        return "since_reset"
    except OSError:
        return "process_lifetime"


def peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes (VmHWM on Linux, else ``ru_maxrss``)."""
    try:
        for line in _LINUX_HWM.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024  # bytes on macOS, KiB on Linux


def peak_memory(device: str, rss_scope: str = "process_lifetime") -> dict[str, Any]:
    """Peak memory figures [bytes] for ``device``: CPU RSS always, CUDA allocated/reserved when on CUDA."""
    out: dict[str, Any] = {"peak_rss_bytes": peak_rss_bytes(), "peak_rss_scope": rss_scope}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        dev = torch.device(device)
        out["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(dev))
        out["cuda_max_reserved_bytes"] = int(torch.cuda.max_memory_reserved(dev))
    return out


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def trainable_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
    """Exact bytes of the persistent trainable state.

    Returns:
        ``trainable_param_bytes`` (Σ numel·itemsize over parameters with ``requires_grad``, tied
        parameters once), ``gradient_bytes`` (the same: one gradient per trainable parameter, in its
        dtype), ``optimizer_state_bytes`` (Σ over every tensor in ``optimizer.state``), and their sum
        ``trainable_state_bytes``.
    """
    seen: set[int] = set()
    param_bytes = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            param_bytes += _tensor_bytes(p)
    opt_bytes = 0
    if optimizer is not None:
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
        for state in inner.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    opt_bytes += _tensor_bytes(value)
    return {
        "trainable_param_bytes": param_bytes,
        "gradient_bytes": param_bytes,
        "optimizer_state_bytes": opt_bytes,
        "trainable_state_bytes": 2 * param_bytes + opt_bytes,
    }


def index_bytes(model: torch.nn.Module) -> int:
    """Bytes of the position indices sparse adapters keep next to their values (not parameters).

    SpIEL: every ``SparseDeltaLinear.indices`` buffer (int32/int64, one per entry; docs/METHOD.md §6.1);
    SHiRA (peft): the ``shira_indices`` tensors (int32 row and column, 8 bytes per entry). 0 for dense adapters.
    """
    total = 0
    for module in model.modules():
        idx = getattr(module, "indices", None)
        if isinstance(idx, torch.Tensor) and hasattr(module, "values"):
            total += _tensor_bytes(idx)
        shira = getattr(module, "shira_indices", None)
        if isinstance(shira, dict):
            total += sum(_tensor_bytes(t) for t in shira.values() if isinstance(t, torch.Tensor))
    return total


def fused_cache_bytes(model: torch.nn.Module) -> int:
    """Bytes SpIEL layers hold for their fused forward (a copy of η and ``W0[η]`` per layer, spiel/layer.py;
    ``SparseDeltaLinear.fused_cache_bytes``). 0 for other adapters and for unfused (e.g. 4-bit) layers."""
    return sum(int(module.fused_cache_bytes()) for module in model.modules()
               if callable(getattr(module, "fused_cache_bytes", None)))


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (tied ones once; 4-bit packed ones at their original shape, as
    :func:`spiel.budget.parameter_numel` counts them), only those that require grad when ``trainable_only``."""
    from spiel.budget import parameter_numel

    return sum(parameter_numel(p) for p in model.parameters() if p.requires_grad or not trainable_only)


def dir_size_bytes(path: str | Path) -> int:
    """Total size [bytes] of the regular files under ``path`` (0 if it does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ----------------------------------------------------------------------------------------- provenance


def package_versions(names: tuple[str, ...] = RECORDED_PACKAGES) -> dict[str, str | None]:
    """Installed versions of ``names`` (None for a package that is not installed), plus python."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(repo_dir: str | Path | None = None) -> dict[str, Any]:
    """The git commit of ``repo_dir`` (default: this project's checkout) and whether the tree is dirty.

    Returns:
        ``{"commit": "<40 hex>" | None, "dirty": bool | None}``; None values when git or the repo is absent.
    """
    repo_dir = Path(repo_dir) if repo_dir is not None else Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_dir,
                                capture_output=True, text=True, timeout=10, check=True).stdout
        return {"commit": commit or None, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def device_description(device: str) -> dict[str, Any]:
    """What the run ran on: device string, its name (GPU model or CPU), and the CPU thread count."""
    out: dict[str, Any] = {"device": str(device), "torch_threads": torch.get_num_threads(),
                           "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        out["name"] = torch.cuda.get_device_name(torch.device(device))
    else:
        out["name"] = platform.processor() or platform.machine()
    return out


# ----------------------------------------------------------------------------------------- step meter


@dataclass
class StepMeter:
    """Per-update-step records of one run, kept across a resume (its state goes into each checkpoint).

    Attributes:
        step_times_s: duration of each update step [s] (forward, backward, optimizer, selector).
        step_tokens: non-padding input tokens of each update step [tokens].
        step_label_tokens: response (label) tokens of each update step [tokens].
        losses: ``(step, loss)`` per update step; the loss is the token-mean over the step's labels.
        train_time_s: time spent inside the training loop so far [s], summed over resumed segments.
    """

    step_times_s: list[float] = field(default_factory=list)
    step_tokens: list[int] = field(default_factory=list)
    step_label_tokens: list[int] = field(default_factory=list)
    losses: list[tuple[int, float]] = field(default_factory=list)
    train_time_s: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state."""
        return {"step_times_s": self.step_times_s, "step_tokens": self.step_tokens,
                "step_label_tokens": self.step_label_tokens, "losses": [list(x) for x in self.losses],
                "train_time_s": self.train_time_s}

    def load_state_dict(self, state: dict[str, Any], upto_step: int | None = None) -> None:
        """Restore from :meth:`state_dict`, keeping only the first ``upto_step`` steps if given."""
        n = upto_step if upto_step is not None else len(state["step_times_s"])
        self.step_times_s = list(state["step_times_s"])[:n]
        self.step_tokens = list(state["step_tokens"])[:n]
        self.step_label_tokens = list(state["step_label_tokens"])[:n]
        self.losses = [tuple(x) for x in state["losses"] if x[0] <= n]
        self.train_time_s = float(state["train_time_s"])

    def summary(self) -> dict[str, Any]:
        """Totals and rates: steps, tokens seen, mean and p50 step time [s], tokens per second."""
        times = self.step_times_s
        tokens = sum(self.step_tokens)
        step_time_total = sum(times)
        return {
            "steps": len(times),
            "tokens_seen": tokens,
            "label_tokens_seen": sum(self.step_label_tokens),
            "train_time_s": self.train_time_s,
            "step_time_mean_s": statistics.fmean(times) if times else None,
            "step_time_p50_s": statistics.median(times) if times else None,
            "tokens_per_s": tokens / step_time_total if step_time_total > 0 else None,
        }

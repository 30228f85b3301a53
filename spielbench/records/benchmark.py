"""``results/benchmark/<size>__<method>.json``: one (model size, method) point of the efficiency benchmark."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from spielbench.records.base import Record


@dataclass(kw_only=True)
class BenchmarkPoint(Record):
    """One (model size, method) point of the efficiency benchmark (written by ``spielbench.benchmark``).

    ``status`` is "ok", "oom", "unsupported", "error" or "timeout" (``detail`` says why); timings and peaks
    are None unless "ok". ``peak_memory_bytes`` is CUDA max allocated when ``cuda_max_allocated_bytes`` is
    set, else the CPU peak RSS; ``adapter_state_bytes`` = trainable parameters + gradients + optimizer state
    + SpIEL index buffers; ``n_params_model`` = parameters of the base model.
    """

    VERSION: ClassVar[str] = "spielbench-benchmark/1"
    FORMATS: ClassVar[tuple[str, ...]] = (VERSION,)

    format: str = VERSION
    size: str
    method: str
    status: str
    detail: str | None = None
    rank: int | None = None
    trainable_params: int | None = None
    n_params_model: int | None = None
    step_time_mean_s: float | None = None
    step_time_p50_s: float | None = None
    tokens_per_s: float | None = None
    peak_memory_bytes: int | None = None
    cuda_max_allocated_bytes: int | None = None
    adapter_state_bytes: int | None = None

    @property
    def ok(self) -> bool:
        """True when the point completed (timings and peak memory are valid)."""
        return self.status == "ok"

    @property
    def peak_memory_kind(self) -> str | None:
        """What ``peak_memory_bytes`` measures ("CUDA max allocated" or "CPU peak RSS"); None without a peak."""
        if self.peak_memory_bytes is None:
            return None
        return "CUDA max allocated" if self.cuda_max_allocated_bytes is not None else "CPU peak RSS"



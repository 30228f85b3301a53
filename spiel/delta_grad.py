"""The gradient of the sparse delta, ``dΔ[n] = Σ_t dY[t, row_n] · X[t, col_n]`` (docs/METHOD.md §6), by one
of two paths, and the rule that chooses between them.

Paths (both return the weight gradient at the requested flat positions, accumulated in fp32, or fp64
for fp64 inputs):

* ``"sampled"``: a sampled dense-dense product (SDDMM, ``torch.sparse.sampled_addmm``) over a CSR
  pattern of the distinct positions, evaluated only there: O(k·T) work and no ``[out, in]`` temporary.
  On CPU it runs in token chunks that keep both transposed operands cache-resident, and with a thread
  count chosen by measurement (see below);
* ``"dense"``: the dense ``dW = dYᵀ X`` by one GEMM (O(out·in·T) work, an ``[out, in]`` fp32 temporary
  per layer, freed at once), then a gather at the positions. On CUDA with bf16/fp16 operands the GEMM
  reads the half-precision operands and writes fp32 (``torch.mm(..., out_dtype=torch.float32)``) where
  the installed torch has it, else it computes in fp32.

The rule (``SparseDeltaLinear.delta_grad``: ``"auto"`` (default), ``"sampled"`` or ``"dense"``; the two
latter force a path):

* CPU, ``"auto"``: ``"sampled"`` while the density ``k / (out·in)`` is at most
  :data:`CPU_SAMPLED_MAX_DENSITY`, else ``"dense"``. The sampled product costs about k·T multiply-adds
  against the GEMM's out·in·T, at a lower rate per operation; the crossover lies above every density
  the suite trains at (README, "dΔ path");
* CUDA (and any other accelerator), ``"auto"``: a one-time micro-benchmark per process and per key
  ``(device, dtype, out, in, k and T rounded up to powers of two, with or without extra positions)``
  times both paths on the first backward that meets the key (the real operands; the winner's result is
  used) and caches the faster. cuSPARSE's SDDMM has no bf16 kernel and computes in fp32, so the dense
  GEMM usually wins there; the benchmark decides. While a CUDA graph is being captured (or the caller
  is compiled) no benchmark runs and ``"dense"`` is taken. :func:`path_decisions` lists the choices.

CPU threads for the sampled product: an OpenMP parallel region with more threads than free cores waits at
its barrier for descheduled threads, and the SDDMM kernel opens several regions per call; on a loaded
machine the multi-threaded product slowed by an order of magnitude while a single thread did not. So for
each shape key the sampled product runs with either 1 thread or torch's thread count, whichever has the
lower recent time: both are timed on the first calls, the choice is then re-checked every
:data:`_THREAD_RECHECK` calls by one timed call of the other count, so it follows a load that comes and
goes. On an idle machine this keeps torch's thread count wherever that is faster.
"""
from __future__ import annotations

import time
import warnings
from typing import Optional

import torch

__all__ = ["DELTA_GRAD_PATHS", "CPU_SAMPLED_MAX_DENSITY", "check_path", "choose_path", "csr_pattern", "sampled_grad",
           "dense_grad", "delta_grad", "path_decisions", "clear_decisions"]

DELTA_GRAD_PATHS = ("auto", "sampled", "dense")
CPU_SAMPLED_MAX_DENSITY = 0.125
_CPU_CHUNK_ELEMENTS = 1 << 18  # 1 MiB of fp32 per transposed operand chunk: stays in L2 on CPU
_THREAD_RECHECK = 64
_BENCH_REPEATS = 3

_decisions: dict[tuple, str] = {}  # micro-benchmark results, per process
_thread_stats: dict[tuple, dict] = {}  # CPU sampled-product thread choice per shape key


def check_path(path: str) -> str:
    """``path`` if it is one of :data:`DELTA_GRAD_PATHS`; raises ValueError naming the allowed values."""
    if path not in DELTA_GRAD_PATHS:
        raise ValueError(f"delta_grad must be one of {DELTA_GRAD_PATHS}, got {path!r}")
    return path


def path_decisions() -> dict[str, str]:
    """The accelerator micro-benchmark choices made in this process, ``{key description: path}``."""
    return {"|".join(str(part) for part in key): path for key, path in _decisions.items()}


def clear_decisions() -> None:
    """Forget the cached micro-benchmark choices and CPU thread statistics (tests, benchmarks)."""
    _decisions.clear()
    _thread_stats.clear()


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _token_chunk(tokens: int, in_features: int, out_features: int) -> int:
    """Tokens per SDDMM call on CPU: the largest power of two (>= 64) whose ``[chunk, max(in, out)]`` fp32
    slice fits ``_CPU_CHUNK_ELEMENTS``, so the transposed copies and dot products stay cache-resident."""
    chunk = 64
    while chunk * 2 * max(in_features, out_features) <= _CPU_CHUNK_ELEMENTS:
        chunk *= 2
    return max(1, min(tokens, chunk))


def csr_pattern(shape: tuple[int, int], *index_sets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CSR pattern of the *distinct* flat positions of the index sets (η, then any extra positions) in an
    ``shape = (out, in)`` matrix: ``(crow [out+1], col [u], gather [m])``, where ``u`` counts the distinct
    positions and ``gather[i]`` is the pattern slot of entry i of ``cat(index_sets)`` (a position in several
    sets, e.g. a SpIEL-AG candidate that is already active, is computed once). int32 where it fits."""
    out_features, in_features = shape
    flat = torch.cat([t.reshape(-1).long() for t in index_sets]) if len(index_sets) > 1 else index_sets[0].long()
    perm = torch.argsort(flat)
    ordered = flat[perm]
    gather = torch.empty_like(perm)
    if len(index_sets) > 1:
        ordered, slot = torch.unique_consecutive(ordered, return_inverse=True)
        gather[perm] = slot
    else:  # η alone is distinct
        gather[perm] = torch.arange(perm.numel(), device=perm.device)
    rows = torch.div(ordered, in_features, rounding_mode="floor")
    cols = ordered - rows * in_features
    crow = torch.zeros(out_features + 1, dtype=torch.int64, device=flat.device)
    crow[1:] = torch.bincount(rows, minlength=out_features).cumsum(0)
    idx_dtype = torch.int32 if max(out_features * in_features, flat.numel()) < 2**31 else torch.int64
    return crow.to(idx_dtype), cols.to(idx_dtype), gather.to(idx_dtype)


def _sddmm(pattern, grad_out: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor:
    tokens = grad_out.shape[0]
    out_features, in_features = pattern.shape
    step = tokens if grad_out.device.type != "cpu" else _token_chunk(tokens, in_features, out_features)
    sampled = None
    for start in range(0, tokens, step):
        part = torch.sparse.sampled_addmm(pattern, grad_out[start:start + step].t(), x2d[start:start + step],
                                          beta=0.0).values()
        sampled = part if sampled is None else sampled.add_(part)
    return sampled


def _cpu_threads_then(key: tuple, run):
    """Run ``run()`` on CPU with the thread count (1 or torch's) that the recent timings of ``key`` favour."""
    full = torch.get_num_threads()
    if full <= 1:
        return run()
    stats = _thread_stats.setdefault(key, {"calls": 0, 1: None, full: None})
    stats.setdefault(full, None)
    stats["calls"] += 1
    calls = stats["calls"]
    if stats[1] is None or stats[full] is None:
        threads = 1 if stats[1] is None else full
    else:
        best = 1 if stats[1] <= stats[full] else full
        threads = (full if best == 1 else 1) if calls % _THREAD_RECHECK == 0 else best
    if threads != full:
        torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        result = run()
        elapsed = time.perf_counter() - start
    finally:
        if threads != full:
            torch.set_num_threads(full)
    previous = stats[threads]
    stats[threads] = elapsed if previous is None else 0.5 * (previous + elapsed)
    return result


def sampled_grad(pattern_parts: tuple, shape: tuple[int, int], grad_out: torch.Tensor,
                 x2d: torch.Tensor) -> torch.Tensor:
    """The SDDMM path: ``dW[p]`` at the distinct positions of a CSR pattern ``(crow [out+1], col [u],
    gather [m])`` (:func:`csr_pattern`), returned ``[m]`` in the order
    ``gather`` gives. ``grad_out [T, out]`` and ``x2d [T, in]`` in the accumulation dtype (fp32/fp64);
    ``shape = (out, in)``."""
    crow, cols, gather = pattern_parts
    with warnings.catch_warnings():  # torch's one-time "CSR support is in beta" notice
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(
            crow, cols, torch.zeros(cols.numel(), dtype=grad_out.dtype, device=grad_out.device), shape,
            check_invariants=False)
    if grad_out.device.type == "cpu":
        key = (shape, cols.numel(), _pow2(grad_out.shape[0]), grad_out.dtype)
        sampled = _cpu_threads_then(key, lambda: _sddmm(pattern, grad_out, x2d))
    else:
        sampled = _sddmm(pattern, grad_out, x2d)
    return sampled.index_select(0, gather)


def _dense_weight_grad(grad_out: torch.Tensor, x2d: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``dYᵀ X`` ``[out, in]`` in ``acc``: half operands with an fp32 output on CUDA where torch allows it."""
    if grad_out.device.type == "cuda" and grad_out.dtype in (torch.float16, torch.bfloat16) and acc == torch.float32:
        try:
            return torch.mm(grad_out.t(), x2d, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # an older torch without mm(out_dtype=...)
            pass
    return grad_out.to(acc).t() @ x2d.to(acc)


def dense_grad(grad_out: torch.Tensor, x2d: torch.Tensor, acc: torch.dtype, *index_sets: torch.Tensor) -> torch.Tensor:
    """The GEMM-and-gather path: ``dW = grad_out [T, out]ᵀ · x2d [T, in]`` in ``acc``, gathered at the flat
    positions of ``cat(index_sets)``; returns ``[Σ len]`` in ``acc``. The dense temporary is freed here."""
    flat = _dense_weight_grad(grad_out, x2d, acc).view(-1)
    if len(index_sets) == 1:
        return flat[index_sets[0]]
    return torch.cat([flat[idx] for idx in index_sets])


def _capturing(device: torch.device) -> bool:
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return True
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and getattr(compiler, "is_compiling", lambda: False)())


def _time_once(device: torch.device, run) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    if hasattr(torch, device.type) and hasattr(getattr(torch, device.type), "synchronize"):
        getattr(torch, device.type).synchronize()
    begin = time.perf_counter()
    run()
    if hasattr(torch, device.type) and hasattr(getattr(torch, device.type), "synchronize"):
        getattr(torch, device.type).synchronize()
    return time.perf_counter() - begin


def choose_path(requested: str, device: torch.device, dtype: torch.dtype, shape: tuple[int, int], k: int,
                tokens: int, extra: bool) -> Optional[str]:
    """The path for one backward: ``requested`` if forced; for ``"auto"`` the CPU density rule, or the cached
    accelerator decision for the key (None when the key has not been benchmarked yet: the caller runs
    :func:`delta_grad`'s benchmark). See the module docstring for the rule."""
    if requested != "auto":
        return requested
    if device.type == "cpu":
        return "sampled" if k <= CPU_SAMPLED_MAX_DENSITY * shape[0] * shape[1] else "dense"
    if _capturing(device):
        return _decisions.get(_decision_key(device, dtype, shape, k, tokens, extra), "dense")
    return _decisions.get(_decision_key(device, dtype, shape, k, tokens, extra))


def _decision_key(device, dtype, shape, k, tokens, extra) -> tuple:
    return (str(device), str(dtype).replace("torch.", ""), shape[0], shape[1], _pow2(k), _pow2(tokens),
            "extra" if extra else "eta")


def delta_grad(requested: str, pattern_fn, grad_out: torch.Tensor, x2d: torch.Tensor, acc: torch.dtype,
               shape: tuple[int, int], *index_sets: torch.Tensor) -> torch.Tensor:
    """``dW`` at the flat positions of ``cat(index_sets)`` (``[Σ len]`` in ``acc``) by the path the rule
    picks. ``grad_out [T, out]`` and ``x2d [T, in]`` in the compute dtype; ``pattern_fn()`` returns the
    cached CSR pattern of the index sets (built only when the sampled path runs). Raises ValueError for an
    unknown ``requested``."""
    check_path(requested)
    device = grad_out.device
    k = sum(int(idx.numel()) for idx in index_sets)
    path = choose_path(requested, device, grad_out.dtype, shape, k, grad_out.shape[0], len(index_sets) > 1)

    def sampled():
        return sampled_grad(pattern_fn(), shape, grad_out.to(acc), x2d.to(acc))

    def dense():
        return dense_grad(grad_out, x2d, acc, *index_sets)

    if path == "sampled":
        return sampled()
    if path == "dense":
        return dense()
    # accelerator, key not yet measured: time both on these operands, keep the faster, return its result
    key = _decision_key(device, grad_out.dtype, shape, k, grad_out.shape[0], len(index_sets) > 1)
    return _benchmark(key, device, {"sampled": sampled, "dense": dense})


def _benchmark(key: tuple, device: torch.device, runs: dict) -> torch.Tensor:
    """Time each ``runs[name]()`` (one warm-up, then the best of :data:`_BENCH_REPEATS`), cache the fastest
    name under ``key`` and return its warm-up result."""
    results, times = {}, {}
    for name, run in runs.items():
        results[name] = run()  # warm-up (and the CSR pattern / cuSPARSE handle)
        times[name] = min(_time_once(device, run) for _ in range(_BENCH_REPEATS))
    _decisions[key] = min(times, key=times.get)
    return results[_decisions[key]]

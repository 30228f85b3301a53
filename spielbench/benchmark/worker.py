"""The worker: measures one (size, method) point in the current process and returns its record
(docs/BENCHMARK.md lists the fields); run-time failures become a status, never an exception."""
from __future__ import annotations

import contextlib
import io
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from spielbench.benchmark.building import build_random_model, load_real_model, probe_4bit
from spielbench.benchmark.memory import available_memory_bytes, cap_memory, estimate_memory, is_oom
from spielbench.benchmark.options import BenchmarkOptions, check_pairs, method_family, spiel_algorithm
from spielbench.benchmark.schedule import driving_schedule, timed_steps, weighted_step_stats
from spielbench.benchmark.sizes import SIZES
from spielbench.benchmark.step import adapter_state, attach_selector, build_setup, train_step
from spielbench.fsio import write_text_atomic
from spielbench.methods import REGISTRY
from spielbench.records import BenchmarkPoint

REPO_ROOT = Path(__file__).resolve().parents[2]


def _device_name(device: str) -> str:
    """The GPU's name on CUDA, else the CPU model."""
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


def display_path(path: str) -> str:
    """``path`` relative to the repository when inside it, else its last component (records never hold
    absolute paths of the machine they were made on)."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(REPO_ROOT))
    except ValueError:
        return resolved.name


def base_record(size: str, method: str, options: BenchmarkOptions) -> dict[str, Any]:
    """The fields every record has, before the point is measured (status None; the figures None)."""
    return {
        "format": BenchmarkPoint.VERSION, "size": size, "method": method, "status": None, "detail": None,
        "oom_kind": None,
        "step_time_mean_s": None, "step_time_p50_s": None, "tokens_per_s": None,
        "peak_memory_bytes": None, "peak_rss_bytes": None, "cuda_max_allocated_bytes": None,
        "cuda_max_reserved_bytes": None, "trainable_params": None, "adapter_state_bytes": None,
        "n_params_model": None, "device": options.device, "device_name": None, "threads": None,
        "batch_size": options.batch_size, "seq_len": options.seq_len, "steps": options.steps,
        "warmup_steps": options.warmup_steps, "dtype": options.dtype,
        "rank": options.rank if REGISTRY[method].takes_rank else None,
        "model_source": display_path(options.model_dir) if options.model_dir else "random-init",
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_avg_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def run_worker(size: str, method: str, options: BenchmarkOptions) -> dict[str, Any]:
    """Measure one (size, method) in *this* process and return its record (docs/BENCHMARK.md lists its fields).

    Never raises for run-time failures: out-of-memory gives ``status="oom"``, a 4-bit method bitsandbytes
    cannot run gives ``"unsupported"``, anything else ``"error"`` with the traceback's last lines.
    Raises InputError for bad names or options (before any work).
    """
    check_pairs([size], [method], options)
    record = base_record(size, method, options)
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
    quantized = REGISTRY[method].quantized
    on_cuda = device.startswith("cuda")
    family = method_family(method)
    bf16 = options.dtype == "bfloat16"
    if quantized:
        from baselines.quant import nf4_compute_dtype

        model_dtype = nf4_compute_dtype(device) if not bf16 else torch.bfloat16
        reason = probe_4bit(device, model_dtype)
        if reason is not None:
            record.update(status="unsupported", detail=reason)
            return record
    elif family == "full":
        model_dtype = torch.float32  # fp32 master weights; bf16 runs use autocast
    else:
        model_dtype = torch.bfloat16 if bf16 else torch.float32
    shape = SIZES.get(size)
    schedule = driving_schedule(spiel_algorithm(method), options)
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
        cap = cap_memory(device, options.memory_limit_bytes)
    elif not on_cuda:
        cap = cap_memory(device, available)
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
        record["n_params_model"] = measure.count_parameters(base)
        vocab = int(base.config.vocab_size)
        setup = build_setup(method, base, options, device, size)
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
        record["trainable_params"] = measure.count_parameters(setup.model, trainable_only=True)
        gen = torch.Generator(device="cpu").manual_seed(options.seed + 1)
        batches = [torch.randint(3, vocab, (options.batch_size, options.seq_len), generator=gen).to(device)
                   for _ in range(2)]
        scope = measure.reset_peak_memory(device)
        for i in range(options.warmup_steps):
            train_step(setup, batches[i % 2], autocast, sync)
        previous = None
        if schedule.algorithm is not None:
            attach_selector(setup, schedule)
            _, previous = train_step(setup, batches[0], autocast, sync)  # the untimed entry step
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
                phase, kind = train_step(setup, batches[i % 2], autocast, sync, previous, cuda_events=on_cuda)
                previous = kind
                times.append(phase["total"])
                cpu_times.append(phase["cpu"])
                kinds.append(kind)
                phases.append(phase)
        finally:
            if profiler is not None:
                profiler.__exit__(None, None, None)
        peaks = measure.peak_memory(device, scope)
        state = adapter_state(setup)
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
            write_profile(profiler, options.profile_out, size, method, record, on_cuda)
    except Exception as exc:  # recorded, never raised: the sweep goes on
        if is_oom(exc):
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


def write_profile(profiler, path: str, size: str, method: str, record: dict, on_cuda: bool) -> None:
    """Write the ``torch.profiler`` summary of ``record``'s timed steps to ``path`` (atomically): the top 40
    operators by self time (CUDA time on CUDA), overall and grouped by input shape."""
    sort = "self_cuda_time_total" if on_cuda else "self_cpu_time_total"
    averages = profiler.key_averages()
    text = io.StringIO()
    text.write(f"# torch.profiler: size={size} method={method} device={record['device']} "
               f"threads={record['threads']} steps={record['steps']} kinds={record.get('step_kinds')}\n")
    text.write(f"# step times [s]: {record.get('step_times_s')}\n\n")
    text.write(averages.table(sort_by=sort, row_limit=40))
    text.write("\n\n# grouped by input shape (top 40)\n")
    text.write(profiler.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=40))
    write_text_atomic(path, text.getvalue())

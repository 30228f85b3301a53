"""Running benchmark points each in a fresh Python process (clean peak-memory figures), recording a worker
that dies without a result (timeout, SIGKILL by the OOM killer, any other exit), and sweeping pairs."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional, Sequence

from spielbench.benchmark.options import BenchmarkOptions, check_pairs
from spielbench.benchmark.table import write_tables
from spielbench.benchmark.worker import REPO_ROOT, base_record
from spielbench.records import BenchmarkPoint


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
        record = base_record(size, method, options)
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
    BenchmarkPoint.write_checked(record, output)  # the record format the aggregation reads, checked on writing
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
                print(summary_line(record), flush=True)
    if table_stem is not None:
        write_tables(records, f"{table_stem}.md", f"{table_stem}.csv")
    return records


def summary_line(r: dict[str, Any]) -> str:
    """One line for the console: size, method and either the status and its reason, or step time [s], tokens/s,
    peak memory [GiB], adapter state [MiB] and the 1-minute load average at the start."""
    if r.get("status") != "ok":
        return f"{r['size']:>14} {r['method']:<16} {r['status']}: {str(r.get('detail') or '').splitlines()[0][:150]}"
    return (f"{r['size']:>14} {r['method']:<16} step {r['step_time_mean_s']:.3f} s (p50 {r['step_time_p50_s']:.3f}) "
            f"{r['tokens_per_s']:.0f} tok/s  peak {r['peak_memory_bytes'] / 2**30:.2f} GiB  "
            f"state {r['adapter_state_bytes'] / 2**20:.1f} MiB  load {r.get('load_avg_start')}")

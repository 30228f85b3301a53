"""Give one Snakemake job its own GPU(s) on a local multi-GPU machine, then run the job's command.

Snakemake counts GPUs (the rules' ``gpu`` resource against ``--resources gpu=N``) but does not say
*which* device a job gets, so without this every job would use device 0. This wrapper takes ``--gpus
K`` free device slots, sets ``CUDA_VISIBLE_DEVICES`` to them, and replaces itself with the command:

- the visible devices are ``CUDA_VISIBLE_DEVICES`` when set (entries kept as given: indices or
  UUIDs), else the indices ``nvidia-smi -L`` lists; none (a CPU machine) or ``K == 0``: the command
  runs unchanged;
- under SLURM (``SLURM_JOB_ID`` set) the command runs unchanged: SLURM already gave the job its GPUs;
- a slot is an exclusive ``flock`` on ``<lock dir>/<device>.lock`` (default: a per-user folder in the
  system temporary folder, so it is local to the machine and shared by every checkout of this user;
  ``SPIEL_GPU_SLOT_DIR`` overrides it). The lock file stays open across ``exec``, so the slot is held
  exactly as long as the job's processes live and is released by the kernel even after ``kill -9``;
- when fewer than K slots are free it releases what it took and waits (no hold-and-wait deadlock).

Usage: ``python scripts/gpu_slot.py --gpus K [--lock-dir DIR] -- COMMAND [ARGS...]``. Exit status 2
when K is larger than the number of visible devices (the job could never start).
``python scripts/gpu_slot.py --count`` prints the number of visible devices (run.sh passes it to
Snakemake as ``--resources gpu=N``).
"""
from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def visible_devices(env: dict | None = None) -> list[str]:
    """The GPU devices this process may use: ``CUDA_VISIBLE_DEVICES`` entries, else ``nvidia-smi -L`` indices."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        return [d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(l for l in out.splitlines() if line_is_gpu(l))]


def line_is_gpu(line: str) -> bool:
    """Whether a line of ``nvidia-smi -L`` names a GPU (``GPU 0: <name> (UUID: ...)``), not a MIG slice."""
    return line.startswith("GPU ")


def default_lock_dir() -> Path:
    """``$SPIEL_GPU_SLOT_DIR``, else ``<system temp>/spiel-gpu-slots-<uid>``."""
    return Path(os.environ.get("SPIEL_GPU_SLOT_DIR") or Path(tempfile.gettempdir(), f"spiel-gpu-slots-{os.getuid()}"))


def acquire(devices: list[str], count: int, lock_dir: Path, poll_s: float = 1.0,
            timeout_s: float | None = None) -> tuple[list[str], list[int]]:
    """Take ``count`` free devices of ``devices``; returns (devices, open lock fds that hold them).

    Raises:
        ValueError: ``count`` exceeds ``len(devices)``.
        TimeoutError: ``timeout_s`` passed without ``count`` free slots.
    """
    if count > len(devices):
        raise ValueError(f"the job needs {count} GPU(s) but only {len(devices)} are visible ({','.join(devices) or 'none'})")
    lock_dir.mkdir(parents=True, exist_ok=True)
    start, told = time.monotonic(), False
    while True:
        taken: list[tuple[str, int]] = []
        for dev in devices:
            fd = os.open(lock_dir / f"{dev.replace('/', '_')}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            taken.append((dev, fd))
            if len(taken) == count:
                return [d for d, _ in taken], [f for _, f in taken]
        for _, fd in taken:
            os.close(fd)  # releases the lock
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"no {count} free GPU slot(s) among {','.join(devices)} after {timeout_s} s")
        if not told:
            print(f"gpu_slot: waiting for {count} free GPU(s) among {','.join(devices)}", file=sys.stderr, flush=True)
            told = True
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring); replaces itself with the command."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=None)
    parser.add_argument("--count", action="store_true", help="print the number of visible GPUs and exit")
    parser.add_argument("--lock-dir", type=Path, default=None)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.count:
        print(len(visible_devices()))
        return 0
    if args.gpus is None:
        parser.error("--gpus is required")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given after --")
    devices = [] if args.gpus <= 0 or os.environ.get("SLURM_JOB_ID") else visible_devices()
    if devices:
        try:
            chosen, fds = acquire(devices, args.gpus, args.lock_dir or default_lock_dir())
        except ValueError as err:
            print(f"gpu_slot: error: {err}", file=sys.stderr)
            return 2
        for fd in fds:
            os.set_inheritable(fd, True)  # the slot lives as long as the command's processes
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(chosen)
        print(f"gpu_slot: CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']}", file=sys.stderr, flush=True)
    os.execvp(command[0], command)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())

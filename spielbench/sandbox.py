"""Run untrusted Python (HumanEval completions) in a confined child process.

:func:`run_program` starts ``spielbench/_sandbox_child.py`` with the interpreter running this code,
as the leader of a new session and process group (``start_new_session``), with an empty environment
except ``HOME``/``TMPDIR`` = a private temporary folder that is also its working directory. The child
adds what the OS allows (its docstring lists them): a network and user namespace, Landlock (writes
only beneath the private folder, no TCP), and CPU / address-space / file-size / process-count
rlimits. The outcome of each protection comes back in :attr:`SandboxResult.protections`; a missing
one is not an error (the OS may forbid it) but :func:`missing_protections` names it.

At the end (normal exit or the wall-clock timeout) every process of the sandbox is killed with
SIGKILL: the process group and session, and every process in the sandbox's user and PID namespaces
when it got them (a descendant cannot leave those, so ``setsid`` does not let it escape). The private
folder is then removed. stdout/stderr go to files outside the folder (bounded by the file-size
limit) and the first ``output_chars`` characters of each are returned.

This confines accidents and casual hostility of model-written code; it is not a defence against a
completion that fakes its own success (e.g. ``os._exit(0)`` before the tests run).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CHILD = Path(__file__).with_name("_sandbox_child.py")

#: Protections that :func:`missing_protections` expects to be active on a permissive Linux.
EXPECTED_PROTECTIONS = ("network_namespace", "user_namespace", "filesystem_confined", "process_limit_enforced")


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed program.

    Attributes:
        memory_bytes: ``RLIMIT_AS`` (address space, bytes).
        file_bytes: ``RLIMIT_FSIZE`` (largest file the program may write, bytes; stdout/stderr too).
        max_processes: ``RLIMIT_NPROC`` (processes in the sandbox, including the program itself).
        output_chars: how many characters of stdout and of stderr are returned.
    """

    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20
    max_processes: int = 32
    output_chars: int = 8192


@dataclass
class SandboxResult:
    """What happened to one program.

    Attributes:
        passed: the program ran to its end (exit status 0) within the timeout.
        timed_out: it was killed at the wall-clock timeout.
        returncode: the child's exit status (negative: killed by that signal).
        stdout, stderr: the first ``output_chars`` characters of each.
        protections: per protection, whether it was active (plus rlimits and error texts),
            as reported by the child; empty if the child died before reporting.
        killed: processes of the sandbox still alive at the end, and killed then.
        folder: the private folder (removed when the call returns).
    """

    passed: bool
    timed_out: bool
    returncode: int
    stdout: str
    stderr: str
    protections: dict = field(default_factory=dict)
    killed: int = 0
    folder: str = ""


def missing_protections(protections: dict) -> list[str]:
    """The names in :data:`EXPECTED_PROTECTIONS` that ``protections`` does not mark active."""
    return [name for name in EXPECTED_PROTECTIONS if not protections.get(name)]


def run_program(source: str, timeout_s: float, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run the Python program ``source`` in the sandbox, with a wall-clock limit of ``timeout_s`` seconds.

    Raises:
        ValueError: ``timeout_s`` is not a positive finite number.
    """
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    folder = tempfile.mkdtemp(prefix="spiel-sandbox-")
    private = tempfile.mkdtemp(prefix="spiel-sandbox-out-")  # outputs, outside the program's folder
    try:
        program = Path(folder, "program.py")
        program.write_text(source, encoding="utf-8")
        settings = {"cpu_seconds": math.ceil(timeout_s) + 1, "memory_bytes": limits.memory_bytes,
                    "file_bytes": limits.file_bytes, "max_processes": limits.max_processes}
        read_fd, write_fd = os.pipe()
        out_path, err_path = Path(private, "stdout"), Path(private, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", str(CHILD), str(write_fd), json.dumps(settings), str(program)],
                    cwd=folder, env={"HOME": folder, "TMPDIR": folder, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, pass_fds=(write_fd,),
                    start_new_session=True,
                )
            finally:
                os.close(write_fd)
            timed_out = not _wait_unreaped(proc.pid, timeout_s)
            try:
                with os.fdopen(read_fd, "rb") as status_pipe:
                    # the child closes its end before the program runs; after the kill below nobody holds it
                    if timed_out:
                        _kill_all(proc.pid, {})
                    raw = status_pipe.read()
                protections = json.loads(raw.decode() or "{}").get("protections", {})
            except (ValueError, OSError):
                protections = {}
            killed = _kill_all(proc.pid, protections)
            proc.wait()
        return SandboxResult(
            passed=not timed_out and proc.returncode == 0, timed_out=timed_out, returncode=proc.returncode,
            stdout=_head(out_path, limits.output_chars), stderr=_head(err_path, limits.output_chars),
            protections=protections, killed=killed, folder=folder,
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)


def _wait_unreaped(pid: int, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` seconds for child ``pid`` to exit, leaving it unreaped (a zombie), so that
    its pid, which is also the sandbox's process group and session id, cannot be reused before the
    sweep in :func:`_kill_all`. Returns whether it exited."""
    deadline = time.monotonic() + timeout_s
    pause = 0.001
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def _head(path: Path, chars: int) -> str:
    with open(path, "rb") as handle:
        return handle.read(chars * 4).decode("utf-8", errors="replace")[:chars]


def _kill_all(leader: int, protections: dict) -> int:
    """SIGKILL the process group ``leader`` and every live process in the sandbox's user namespace.

    Repeats until a pass finds none (a fork bomb forks while it is being killed; its rlimit bounds
    it). Returns how many processes were found alive (zombies are dead and not counted).
    """
    namespaces = {k: protections[k] for k in ("user_namespace_id", "pid_namespace_id") if k in protections}
    found = 0
    for _ in range(200):
        try:
            os.killpg(leader, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        alive = [pid for pid in _members(leader, namespaces) if pid != os.getpid()]
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        found = max(found, len(alive))
        if not alive:
            break
        time.sleep(0.01)
    return found


def _members(leader: int, namespaces: dict) -> list[int]:
    """Live (non-zombie) processes in process group/session ``leader``, or whose user/PID namespace is
    one of ``namespaces`` (``{"user_namespace_id" | "pid_namespace_id": "user:[inode]" | "pid:[inode]"}``)."""
    links = {"user_namespace_id": "user", "pid_namespace_id": "pid"}
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            state, _ppid, pgrp, session = stat.rsplit(")", 1)[1].split()[:4]
            if state in ("Z", "X"):
                continue
            inside = leader in (int(pgrp), int(session))
            for key, ns_id in namespaces.items():
                inside = inside or os.readlink(f"/proc/{pid}/ns/{links[key]}") == ns_id
        except (OSError, ValueError):
            continue
        if inside:
            members.append(pid)
    return members

"""The first code that runs inside a :mod:`spielbench.sandbox` child (standard library only).

Started as ``python -I _sandbox_child.py <status_fd> <settings JSON> <program file>`` by
:func:`spielbench.sandbox.run_program`, in its own session, with an empty environment and the
private folder as working directory. It applies the protections the OS allows, in this order, and
records each one's outcome:

1. ``unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID)`` (falling back to fewer namespaces;
   ``CLONE_NEWNET`` alone needs root): no network interface but a loopback that is down; a user
   namespace makes ``RLIMIT_NPROC`` count only the sandbox's own processes, even for root, and marks
   every descendant so the parent can find and kill processes that left the process group (nested
   user namespaces are then forbidden); in a PID namespace the program runs as its first process, so
   the kernel kills everything left in it when the program ends.
2. Landlock (Linux >= 5.13): reading and executing anywhere, writing only beneath the private
   folder; with Landlock ABI >= 4 also no TCP bind/connect.
3. ``setrlimit``: CPU seconds, address space, file size, process count, no core files.

It then writes ``{"protections": {...}}`` as JSON to ``status_fd``, closes it, and runs the program
file with ``__name__ == "__sandbox__"`` (so a completion's ``if __name__ == "__main__":`` block does
not run, as in OpenAI's harness). Exit status: 0 when the program ran to its end, 1 when it raised
(including ``SystemExit``; the traceback goes to stderr).
"""
import ctypes
import json
import os
import resource
import sys
import traceback

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
PR_SET_NO_NEW_PRIVS = 38
# Landlock syscall numbers are the same on every architecture (added after the syscall table unification).
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
# Filesystem access rights (linux/landlock.h): EXECUTE .. MAKE_SYM are ABI 1, REFER ABI 2, TRUNCATE ABI 3.
FS_EXECUTE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 2, 1 << 3
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _errno_text() -> str:
    return os.strerror(ctypes.get_errno())


def _unshare(status: dict) -> None:
    status["network_namespace"] = status["user_namespace"] = status["pid_namespace"] = False
    for flags in (CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID, CLONE_NEWUSER | CLONE_NEWNET,
                  CLONE_NEWNET | CLONE_NEWPID, CLONE_NEWNET):
        if _libc.unshare(flags) == 0:
            status["network_namespace"] = True
            status["user_namespace"] = bool(flags & CLONE_NEWUSER)
            status["pid_namespace"] = bool(flags & CLONE_NEWPID)
            if status["user_namespace"]:
                status["user_namespace_id"] = os.readlink("/proc/self/ns/user")
                _block_nested_user_namespaces(status)
            return
        status["unshare_error"] = _errno_text()


def _block_nested_user_namespaces(status: dict) -> None:
    """No user namespace inside ours (a process in one would not be found by the parent's sweep)."""
    try:
        with open("/proc/sys/user/max_user_namespaces", "w") as handle:
            handle.write("0")
        status["nested_user_namespaces_blocked"] = True
    except OSError:
        status["nested_user_namespaces_blocked"] = False


def _landlock(folder: str, status: dict) -> None:
    abi = _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, 0, LANDLOCK_CREATE_RULESET_VERSION)
    status["landlock_abi"] = max(int(abi), 0)
    status["filesystem_confined"] = status["landlock_network"] = False
    if abi < 1:
        status["landlock_error"] = _errno_text()
        return
    handled_fs = (1 << 13) - 1  # every ABI-1 right
    if abi >= 2:
        handled_fs |= 1 << 13   # REFER
    if abi >= 3:
        handled_fs |= 1 << 14   # TRUNCATE
    attr = _RulesetAttr(handled_fs, NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0)
    size = ctypes.sizeof(_RulesetAttr) if abi >= 4 else 8
    ruleset = _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), size, 0)
    if ruleset < 0:
        status["landlock_error"] = _errno_text()
        return
    try:
        for path, allowed in (("/", FS_EXECUTE | FS_READ_FILE | FS_READ_DIR), (folder, handled_fs)):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = _PathBeneathAttr(allowed, fd)
                if _libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH,
                                 ctypes.byref(rule), 0) != 0:
                    status["landlock_error"] = f"add_rule {path}: {_errno_text()}"
                    return
            finally:
                os.close(fd)
        if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
                _libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0) != 0:
            status["landlock_error"] = f"restrict_self: {_errno_text()}"
            return
        status["filesystem_confined"] = True
        status["landlock_network"] = abi >= 4
    finally:
        os.close(ruleset)


def _limits(settings: dict, status: dict) -> None:
    nproc = int(settings["max_processes"])
    if not status["user_namespace"] and os.getuid() != 0:
        # outside a user namespace RLIMIT_NPROC counts every process of this user: allow that many more
        nproc += sum(1 for p in os.listdir("/proc") if p.isdigit() and _owned(p))
    limits = {
        "RLIMIT_CPU": int(settings["cpu_seconds"]),
        "RLIMIT_AS": int(settings["memory_bytes"]),
        "RLIMIT_FSIZE": int(settings["file_bytes"]),
        "RLIMIT_NPROC": nproc,
        "RLIMIT_CORE": 0,
    }
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))
    status["rlimits"] = limits
    # root outside a user namespace is exempt from RLIMIT_NPROC
    status["process_limit_enforced"] = status["user_namespace"] or os.getuid() != 0


def _owned(pid: str) -> bool:
    try:
        return os.stat(f"/proc/{pid}").st_uid == os.getuid()
    except OSError:
        return False


def main() -> None:
    status_fd, settings, program = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    folder = os.getcwd()
    status: dict = {}
    try:
        _unshare(status)
        _landlock(folder, status)
        _limits(settings, status)
    except Exception as exc:  # report, then refuse to run the program unprotected by the limits
        status["error"] = f"{type(exc).__name__}: {exc}"
    if "error" not in status and status["pid_namespace"]:
        # the program runs as the namespace's first process: when it ends, the kernel kills every
        # process left in the namespace; this process only relays its exit status
        init = os.fork()
        if init:
            status["pid_namespace_init"] = init
            try:  # the namespace exists once its first process does
                status["pid_namespace_id"] = os.readlink(f"/proc/{init}/ns/pid")
            except OSError:
                pass
            os.write(status_fd, json.dumps({"protections": status}).encode())
            os.close(status_fd)
            _, code = os.waitpid(init, 0)
            os._exit(os.waitstatus_to_exitcode(code) if os.WIFEXITED(code) else 1)
        os.close(status_fd)
    else:
        os.write(status_fd, json.dumps({"protections": status}).encode())
        os.close(status_fd)
    if "error" in status:
        os._exit(1)
    with open(program, encoding="utf-8") as handle:
        source = handle.read()
    try:
        exec(compile(source, program, "exec"), {"__name__": "__sandbox__", "__builtins__": __builtins__})
    except BaseException:  # noqa: BLE001 - SystemExit and KeyboardInterrupt fail the program too
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

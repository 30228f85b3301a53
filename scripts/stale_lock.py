"""Clear Snakemake's working-directory lock when the run that took it is dead (called by run.sh).

Snakemake writes ``.snakemake/locks/<n>.{input,output}.lock`` when it starts and deletes them when it
ends; after ``kill -9`` they stay, and the next run stops with a LockException. ``clear`` removes them
only when it is sure no live process of this pipeline uses this directory:

1. the lock files are listed first (a run that starts later writes new ones, which are kept);
2. the record of ``run.sh`` starts since the last start without a lock (``.snakemake/run_sh.owner``:
   host and pid per line) must name only this host, or be absent: a run started on another host
   sharing the folder cannot be checked from here;
3. no live process may look like this pipeline's (an argument whose name starts with ``snakemake``,
   a path under ``.snakemake/``, or a ``spielbench.*`` module: the jobs a dead Snakemake left running)
   with this directory, or a folder under it, as its working directory. A process whose working
   directory cannot be read counts as holding the lock. Without ``/proc`` nothing is cleared.

Whenever it cannot be sure, it keeps the lock and says why; Snakemake then stops with its own
message, and ``snakemake --unlock`` (with the same ``--configfile``) clears it by hand.

Usage: ``python scripts/stale_lock.py clear [--dir DIR] [--record-owner PID]``. Exit status 0 in
every case above (the decision is printed to stderr); 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

OWNER_FILE = "run_sh.owner"


def lock_files(workdir: Path) -> list[Path]:
    """The Snakemake lock files of ``workdir`` (``.snakemake/locks/*.lock``), sorted."""
    return sorted((workdir / ".snakemake" / "locks").glob("*.lock"))


def is_pipeline_command(argv: list[str]) -> bool:
    """Whether a command line (``argv``) is Snakemake or one of the jobs it starts."""
    for arg in argv:
        if os.path.basename(arg).startswith("snakemake") or ".snakemake/" in arg or arg.startswith("spielbench."):
            return True
    return False


def holders(workdir: Path, exclude: set[int]) -> list[str]:
    """Live processes (``"<pid> <command>"``) of this pipeline whose working directory is in ``workdir``.

    Raises:
        FileNotFoundError: ``/proc`` is not available (not Linux), so nothing can be checked.
    """
    root = os.path.realpath(workdir)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # exited meanwhile
        if state in ("Z", "X") or not is_pipeline_command(argv):
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            cwd = None  # another user's process: cannot tell, so assume it holds the lock
        if cwd is None or cwd == root or cwd.startswith(root + os.sep):
            found.append(f"{entry} {' '.join(a for a in argv if a)[:200]}")
    return found


def clear(workdir: Path, record_owner: int | None = None) -> str:
    """Remove ``workdir``'s stale lock files when no live process holds them; returns what was done.

    ``record_owner`` (a pid, the process that is about to become Snakemake) is recorded with this
    host's name in ``.snakemake/run_sh.owner`` afterwards: the record starts afresh when no lock is
    left (no run is alive anywhere), and is appended to when a lock was kept, so that a run still
    alive on another host stays on record.
    """
    message, fresh = _decide(workdir)
    if record_owner is not None:
        (workdir / ".snakemake").mkdir(exist_ok=True)
        with open(workdir / ".snakemake" / OWNER_FILE, "w" if fresh else "a") as handle:
            handle.write(f"{socket.gethostname()} {record_owner}\n")
    return message


def _decide(workdir: Path) -> tuple[str, bool]:
    """(what was done, whether no lock is left)."""
    locks = lock_files(workdir)
    if not locks:
        return "no lock", True
    owner = workdir / ".snakemake" / OWNER_FILE
    hosts = {line.split()[0] for line in owner.read_text().splitlines() if line.split()} if owner.exists() else set()
    others = sorted(hosts - {socket.gethostname()})
    if others:
        return (f"lock kept: ./run.sh was started here on host(s) {', '.join(others)} since the last clean start, "
                "which cannot be checked from this one; if no run is alive there, clear it with "
                "`snakemake --unlock`"), False
    exclude = {os.getpid(), os.getppid()}
    try:
        alive = holders(workdir, exclude)
    except FileNotFoundError:
        return ("lock kept: no /proc here, so live Snakemake processes cannot be checked; "
                "use `snakemake --unlock`"), False
    if alive:
        return "lock kept: held by live process(es) of this pipeline: " + "; ".join(alive), False
    for path in locks:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
    return f"cleared a stale lock left by a killed run ({', '.join(p.name for p in locks)})", True


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["clear"])
    parser.add_argument("--dir", type=Path, default=Path.cwd(), help="the Snakemake working directory")
    parser.add_argument("--record-owner", type=int, default=None, metavar="PID")
    args = parser.parse_args(argv)
    message = clear(args.dir, args.record_owner)
    if message != "no lock":
        print(f"run.sh: {message}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The HumanEval sandbox (spielbench.sandbox): hostile completions are scored as failed and leave nothing behind."""
import os
import random
import socket
import sys
import time
from pathlib import Path

import pytest

from spielbench.lm_eval_tasks.humaneval import utils
from spielbench.sandbox import SandboxLimits, missing_protections, run_program

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox reads /proc (Linux)")

ADD = {"task_id": "T/0", "prompt": "def add(a, b):\n", "entry_point": "add", "timeout_s": 3.0,
       "test": "def check(f):\n    assert f(2, 3) == 5\n"}


def _live_processes_with(text: str) -> list[int]:
    """Non-zombie processes whose command line contains ``text``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state not in ("Z", "X"):
            found.append(int(entry))
    return found


def _score(completion: str, timeout_s: float = 3.0) -> float:
    os.environ[utils.CODE_EVAL_ENV] = "1"
    try:
        return utils.humaneval_process_results({**ADD, "timeout_s": timeout_s}, [completion])["pass@1"]
    finally:
        del os.environ[utils.CODE_EVAL_ENV]


def test_correct_and_wrong_completions_are_scored_in_a_private_folder_with_a_cleared_environment(monkeypatch):
    monkeypatch.setenv("SPIEL_SECRET_TOKEN", "leak-me")
    assert _score("    return a + b\n") == 1.0
    assert _score("    return a - b\n") == 0.0
    result = run_program("import os\nprint(os.getcwd())\nprint(sorted(os.environ))\nprint(os.environ['HOME'])\n", 5)
    cwd, env, home = result.stdout.splitlines()
    assert result.passed and cwd == home == result.folder
    assert "SPIEL_SECRET_TOKEN" not in env
    assert not Path(result.folder).exists()            # removed after the run


def test_a_detached_grandchild_that_sleeps_is_killed_and_the_program_fails_at_the_timeout():
    marker = f"1000.{random.randrange(10**8):08d}"   # a unique `sleep` argument to find it by
    completion = (
        "    import os\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        os.setsid()\n"
        f"        os.execv('/bin/sleep', ['sleep', '{marker}'])\n"
        "    os.waitpid(pid, 0)\n"
        "    return a + b\n"
    )
    start = time.monotonic()
    assert _score(completion, timeout_s=2.0) == 0.0
    assert time.monotonic() - start < 30
    assert _live_processes_with(marker) == []


def test_a_write_outside_its_folder_is_refused_and_fails_the_program(tmp_path):
    target = tmp_path / "escaped.txt"
    completion = f"    open({str(target)!r}, 'w').write('x')\n    return a + b\n"
    probe = run_program("pass\n", 5)
    if not probe.protections.get("filesystem_confined"):
        pytest.skip(f"Landlock not available here: {probe.protections.get('landlock_error')}")
    assert _score(completion) == 0.0
    assert not target.exists()
    # writing inside its own folder (cwd, HOME) is allowed
    assert _score("    open('inside.txt', 'w').write('x')\n    return a + b\n") == 1.0


def test_a_fork_bomb_is_bounded_and_every_process_is_gone_afterwards():
    completion = (
        "    import os\n"
        "    while True:\n"
        "        try:\n"
        "            os.fork()\n"
        "        except OSError:\n"
        "            pass\n"
    )
    program = f"{ADD['prompt']}{completion}\n{ADD['test']}\ncheck(add)\n"
    result = run_program(program, timeout_s=2.0, limits=SandboxLimits(max_processes=16))
    assert result.timed_out and not result.passed
    assert result.protections["rlimits"]["RLIMIT_NPROC"] >= 16
    assert _live_processes_with(result.folder) == []   # the folder is in every sandbox process's command line
    assert _score(completion, timeout_s=2.0) == 0.0


def test_a_large_allocation_fails_the_program():
    result = run_program("x = bytearray(8 << 30)\n", 5, limits=SandboxLimits(memory_bytes=512 << 20))
    assert not result.passed and "MemoryError" in result.stderr
    assert _score("    x = bytearray(8 << 30)\n    return a + b\n") == 0.0


def test_the_network_is_unreachable_when_the_os_allows_a_network_namespace():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        result = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n", 5)
        if not (result.protections.get("network_namespace") or result.protections.get("landlock_network")):
            pytest.skip("neither a network namespace nor Landlock networking is available here")
        assert not result.passed
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


def test_the_protections_are_recorded_and_missing_ones_named():
    result = run_program("pass\n", 5)
    assert result.passed
    for key in ("network_namespace", "user_namespace", "filesystem_confined", "process_limit_enforced"):
        assert isinstance(result.protections[key], bool)
    assert result.protections["rlimits"]["RLIMIT_AS"] == SandboxLimits().memory_bytes
    assert missing_protections({"network_namespace": True}) == [
        "user_namespace", "filesystem_confined", "process_limit_enforced"]
    with pytest.raises(ValueError, match="timeout_s"):
        run_program("pass\n", float("inf"))

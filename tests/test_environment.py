"""The three dependency declarations (pyproject.toml, requirements.lock, environment.yml) agree."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _split(req: str) -> tuple[str, str]:
    name, _, version = req.partition("==")
    name = re.sub(r"\[.*\]", "", name).strip()
    return _norm(name), version.strip()


def _pyproject() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for d in deps:
        assert "==" in d, f"pyproject.toml dependency {d!r} is not pinned with =="
    return dict(_split(d) for d in deps)


def _lock() -> dict[str, str]:
    out = {}
    for i, line in enumerate((REPO / "requirements.lock").read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert "==" in line, f"requirements.lock line {i}: {line!r} is not pinned with =="
        name, version = _split(line)
        out[name] = version
    return out


def _conda() -> dict[str, str]:
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return dict(_split(p) for p in pip if "==" in p)


def test_pyproject_pins_match_the_lock():
    lock = _lock()
    for name, version in _pyproject().items():
        assert name in lock, f"{name} is pinned in pyproject.toml but missing from requirements.lock"
        assert lock[name] == version, f"{name}: pyproject.toml pins {version}, requirements.lock {lock[name]}"


def test_environment_yml_mirrors_pyproject():
    assert _conda() == _pyproject()


def test_environment_yml_python_matches():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]

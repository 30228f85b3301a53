"""The library alone: ``spiel/pyproject.toml`` builds a wheel of the package ``spiel`` with lower-bounded
dependencies, which installs into a fresh venv that sees only torch, safetensors and their own
dependencies (no transformers, no suite package), and trains, saves, loads and merges a tiny model there.

What this proves: the wheel's contents and metadata, that ``pip check`` finds its declared dependencies
satisfied, and that the library works with nothing but them. What it does not: the lower bounds (only the
locked versions are present; nothing is downloaded, the fresh venv borrows the suite's installed torch
and safetensors through a ``.pth`` file pointing at a folder of links to just those distributions).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from conftest import REPO

#: Distributions the fresh venv may see: torch, safetensors and what torch imports (names in site-packages).
_ALLOWED = re.compile(r"^(torch|torchgen|safetensors|numpy|numpy\.libs|sympy|mpmath|networkx|jinja2|markupsafe|"
                      r"filelock|fsspec|typing_extensions|setuptools|_distutils_hack)([-.].*)?$", re.IGNORECASE)

_SCRIPT = r'''
import importlib.util, sys, tempfile
from types import SimpleNamespace
for name in ("transformers", "spielbench", "baselines", "peft", "bitsandbytes"):
    assert importlib.util.find_spec(name) is None, name + " is visible in the fresh venv"
import torch
import torch.nn.functional as F
import spiel
assert sys.prefix in spiel.__file__, spiel.__file__

class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.up = torch.nn.Embedding(32, 16), torch.nn.Linear(16, 48)
        self.down, self.head = torch.nn.Linear(48, 16), torch.nn.Linear(16, 32)

    def forward(self, input_ids, labels=None):
        h = self.emb(input_ids)
        logits = self.head(h + self.down(torch.relu(self.up(h))))
        loss = None if labels is None else F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return SimpleNamespace(logits=logits, loss=loss)

ids = torch.randint(0, 32, (4, 12), generator=torch.Generator().manual_seed(1))
for algorithm in ("ag", "ma"):
    config = spiel.SpielConfig(num_tunable_weights=300, target_modules=["up", "down"], selection_algorithm=algorithm,
                               reselection_steps=3, selection_accumulation_steps=1)
    model = spiel.get_spiel_model(TinyLM(), config)
    optimizer = spiel.build_optimizer(model, lr=0.05 if algorithm == "ag" else 0.5)
    selector = spiel.SpielSelector(model, optimizer, total_steps=9)
    losses = []
    for step in range(9):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step(); optimizer.zero_grad(set_to_none=True); selector.step()
        losses.append(float(loss))
    selector.close()
    assert losses[-1] < losses[0] and [h["step"] for h in selector.history] == [1, 4, 7], (losses, selector.history)
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    directory = tempfile.mkdtemp()
    model.save_pretrained(directory)
    loaded = spiel.SpielModel.from_pretrained(TinyLM(), directory)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, trained)
        merged = loaded.merge_and_unload(safe_merge=True)
        assert torch.allclose(merged(input_ids=ids).logits, trained, atol=1e-5)
        assert not torch.allclose(TinyLM()(input_ids=ids).logits, trained, atol=1e-3)
print("LIBRARY-OK")
'''


def test_library_declares_lower_bounds_only_and_the_lock_satisfies_them():
    project = tomllib.loads((REPO / "spiel" / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    assert {re.split(r"[<>=!~ ]", r)[0] for r in project["dependencies"]} == {"torch", "safetensors"}
    assert set(project["optional-dependencies"]) == {"hf", "nf4"}
    lock = dict(line.split("==") for line in (REPO / "requirements.lock").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    from packaging.requirements import Requirement

    for text in requirements:
        req = Requirement(text)
        assert "==" not in text and req.specifier, f"{text}: expected a lower bound, not a pin"
        assert req.specifier.contains(lock[req.name].split("+")[0]), f"{text}: the lock's {lock[req.name]} is outside"


@pytest.mark.slow
def test_the_library_alone_installs_into_a_fresh_venv_and_works(tmp_path):
    source = tmp_path / "src" / "spiel"
    shutil.copytree(REPO / "spiel", source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    str(source), "-w", str(tmp_path / "dist")], check=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("spiel-*.whl"))

    venv = tmp_path / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    deps = tmp_path / "deps"
    deps.mkdir()
    suite_site = Path(sysconfig.get_paths()["purelib"])
    for entry in suite_site.iterdir():
        if _ALLOWED.match(entry.name):
            os.symlink(entry.resolve(), deps / entry.name)
    (purelib / "borrowed_deps.pth").write_text(f"{deps}\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, timeout=300)
    check = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "check"], capture_output=True,
                           text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    run = subprocess.run([str(python), "-c", _SCRIPT], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert run.returncode == 0 and "LIBRARY-OK" in run.stdout, run.stdout + run.stderr

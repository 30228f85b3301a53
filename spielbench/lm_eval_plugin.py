"""Make ``lm_eval --model spiel`` work with lm-eval's own command line.

lm-eval 0.4.13 has no plugin discovery for models: its registry is filled when ``lm_eval.models`` is
imported. This module installs a tiny import hook (``sys.meta_path``) that, right after
``lm_eval.models`` has been executed, registers ``spiel`` as a lazy placeholder
(``"spielbench.lm_eval_model:SpielLM"``), so nothing heavy is imported until lm-eval asks for the model.

It is activated at interpreter start by a one-line ``spiel_lm_eval.pth`` file that
``scripts/ensure_env.sh`` writes into the project environment's site-packages (``.pth`` lines that
start with ``import`` run at startup). Its cost at startup is this module's import (no third-party
imports). Without the ``.pth`` (another environment), use the ``spiel-lm-eval`` console script.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

TARGET_MODULE = "lm_eval.models"
PLACEHOLDER = "spielbench.lm_eval_model:SpielLM"
MODEL_NAME = "spiel"


def register_placeholder() -> None:
    """Register ``spiel`` in lm-eval's model registry as a lazy placeholder (idempotent)."""
    from lm_eval.api.registry import model_registry

    try:
        model_registry.register(MODEL_NAME, target=PLACEHOLDER)
    except ValueError:  # already registered (e.g. the concrete class, by spielbench.lm_eval_model)
        pass


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        register_placeholder()

    def __getattr__(self, name):  # get_resource_reader, is_package, ... of the wrapped loader
        return getattr(self._inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the loader of ``lm_eval.models`` so that :func:`register_placeholder` runs after it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Install the import hook once; if ``lm_eval.models`` is already imported, register right away."""
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    if TARGET_MODULE in sys.modules:
        register_placeholder()
        return
    sys.meta_path.insert(0, _Finder())


install()

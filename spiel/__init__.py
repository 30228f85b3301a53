"""SpIEL: sparse fine-tuning of large language models (Ansell et al. 2024), in plain PyTorch.

Trains only a small set of weight deltas Δ at chosen flat indices η of each targeted weight matrix
(effective weight W0 + scatter(η, Δ)); every ``reselection_steps`` update steps the deltas that moved
least are dropped and new indices are grown from accumulated gradients (SpIEL-AG) or from the SM3
optimizer's row/column statistics (SpIEL-MA). Works over a 4-bit NF4 base (qSpIEL).

Typical use (a plain loop; see :mod:`spiel.trainer` for the Hugging Face ``Trainer`` and TRL, and for a
loop whose loss is normalised by tokens under gradient accumulation)::

    import spiel
    model = spiel.get_spiel_model(hf_model, spiel.SpielConfig(lora_rank_equivalent=16))
    optimizer = spiel.build_optimizer(model, lr=1e-3)
    selector = spiel.SpielSelector(model, optimizer, total_steps=T)
    for batch in loader:
        model(**batch).loss.backward()
        optimizer.step(); optimizer.zero_grad(set_to_none=True)
        selector.step()
    model.save_pretrained("adapter")
    model = spiel.SpielModel.from_pretrained(base_model, "adapter")   # load (is_trainable=True to train on)

The ``trainer`` submodule (``SpielCallback``, ``make_optimizer``, ``SpielTrainer``) imports transformers'
Trainer and is loaded on first access (``spiel.SpielCallback``, ``spiel.trainer``, or ``from spiel.trainer
import SpielCallback``). Only torch and safetensors are needed for the rest (see ``spiel/pyproject.toml``).
"""
from __future__ import annotations

import importlib

from spiel.config import SpielConfig
from spiel.layer import SparseDeltaLinear
from spiel.model import SpielModel, get_spiel_model
from spiel.optim import SM3, SparseAdamW, build_optimizer
from spiel.selection import SpielSelector

__all__ = [
    "SpielConfig",
    "SparseDeltaLinear",
    "SpielModel",
    "get_spiel_model",
    "SparseAdamW",
    "SM3",
    "build_optimizer",
    "SpielSelector",
    "trainer",
    "SpielCallback",
    "SpielTrainer",
    "make_optimizer",
]

__version__ = "0.1.0"


_TRAINER_NAMES = ("SpielCallback", "SpielTrainer", "make_optimizer")


def __getattr__(name: str):
    if name == "trainer":
        return importlib.import_module("spiel.trainer")
    if name in _TRAINER_NAMES:
        return getattr(importlib.import_module("spiel.trainer"), name)
    raise AttributeError(f"module 'spiel' has no attribute {name!r}")

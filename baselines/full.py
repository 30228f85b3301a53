"""Full fine-tuning: every parameter of the model is trained (the reference's upper baseline).

Reference settings (docs/METHOD.md §8.3): learning rate 2e-5, weight decay 0, same batch, schedule and
data as the adapter methods. The "adapter" of a full fine-tuning run is the whole model folder.
"""
from __future__ import annotations

from torch import nn


def build_full_model(model: nn.Module) -> nn.Module:
    """Make every parameter of ``model`` trainable and return the same object.

    Tied parameters (SmolLM2 ties ``lm_head`` to the embeddings) are one ``Parameter`` and are counted
    and trained once. ``save_pretrained(dir)`` on the result writes a complete model folder.
    """
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def decay_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups for full fine-tuning: decay on matrices (ndim >= 2), none on biases/norms.

    Returns:
        Two groups ``[{"params": [...], "weight_decay": weight_decay}, {"params": [...], "weight_decay": 0.0}]``
        over the trainable parameters (each parameter once, even if tied).
    """
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

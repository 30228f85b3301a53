"""SHiRA (static random sparse high-rank adapter) through peft, as a budget-matched ablation.

peft's ``ShiraConfig(r=R)`` gives every targeted ``m x n`` layer ``R * (m + n)`` trainable entries at
random positions fixed for the whole run, i.e. exactly LoRA's parameter count at rank R, layer by
layer. Compared with SpIEL it has the same kind of sparse update but no drop/grow reselection and a
per-layer (not size-proportional) allocation. It is not part of the paper; the suite uses it as an
ablation next to ``spiel-static``.
"""
from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from baselines.lora import TARGET_MODULES


def max_shira_rank(in_features: int, out_features: int) -> int:
    """Largest R for which ``R * (in + out) <= in * out`` (peft refuses larger R for that layer)."""
    return (in_features * out_features) // (in_features + out_features)


def build_shira_model(
    model: nn.Module,
    rank: int,
    *,
    seed: int = 0,
    target_modules: Iterable[str] = TARGET_MODULES,
):
    """Wrap ``model`` with a SHiRA adapter whose budget equals LoRA's at ``rank``.

    Args:
        model: a float ``PreTrainedModel`` (frozen by peft).
        rank: R; each targeted layer gets ``R * (in + out)`` float32 entries, initialised to zero.
        seed: seed of the random mask generator (the same seed gives the same positions).
        target_modules: last name components of the layers to adapt.

    Returns:
        ``peft.PeftModel``; ``save_pretrained`` stores the values and their indices.

    Raises:
        ValueError: rank is not a positive int, or ``R * (in + out) > in * out`` for a targeted layer.
    """
    from peft import ShiraConfig, get_peft_model

    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank: expected a positive int, got {rank!r}")
    config = ShiraConfig(r=rank, random_seed=seed, target_modules=list(target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)

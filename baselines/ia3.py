"""(IA)3 through peft, configured as in the reference runs.

Reference settings (docs/METHOD.md §8.3): ``IA3Config(target_modules=all seven LLaMA projections,
feedforward_modules=[gate_proj, up_proj, down_proj])``, AdamW, weight decay 0. (IA)3 has no rank: it
learns one scaling vector per targeted layer (the output size for attention projections, the input
size for feed-forward ones).
"""
from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from baselines.lora import TARGET_MODULES

#: Feed-forward modules whose *input* (IA)3 rescales (docs/METHOD.md §8.3).
FEEDFORWARD_MODULES: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")


def build_ia3_model(
    model: nn.Module,
    *,
    target_modules: Iterable[str] = TARGET_MODULES,
    feedforward_modules: Iterable[str] = FEEDFORWARD_MODULES,
):
    """Wrap ``model`` with an (IA)3 adapter.

    Args:
        model: a ``PreTrainedModel`` (frozen by peft).
        target_modules: last name components of the layers to rescale.
        feedforward_modules: the subset rescaled at their input instead of their output.

    Returns:
        ``peft.PeftModel``; trainable parameters = Σ out_features over attention projections +
        Σ in_features over feed-forward projections (float32 vectors initialised to ones).
    """
    from peft import IA3Config, get_peft_model

    config = IA3Config(
        target_modules=list(target_modules),
        feedforward_modules=list(feedforward_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)

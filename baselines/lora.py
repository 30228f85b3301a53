"""LoRA (and qLoRA on an NF4 base) through peft, configured as in the reference runs.

Reference settings (docs/METHOD.md §8.3): ``LoraConfig(r=RANK, lora_alpha=16, lora_dropout=0.1,
target_modules=all seven LLaMA projections)``, adapters in float32, ``torch.optim.AdamW``, weight decay
0; for qLoRA the same adapter on an NF4 base, without ``prepare_model_for_kbit_training``.
"""
from __future__ import annotations

from collections.abc import Iterable

from torch import nn

#: The seven LLaMA projections every method targets (docs/METHOD.md §2.1).
TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: LoRA scaling numerator used by the reference runs (docs/METHOD.md §8.3).
DEFAULT_LORA_ALPHA = 16.0
#: LoRA dropout used by the reference runs (docs/METHOD.md §8.3).
DEFAULT_LORA_DROPOUT = 0.1


def targeted_linears(model: nn.Module, target_modules: Iterable[str] = TARGET_MODULES) -> list[tuple[str, int, int]]:
    """The linear layers a method targets, as ``(qualified_name, in_features, out_features)``.

    A module is targeted when its last name component is in ``target_modules`` and it has
    ``in_features``/``out_features`` (``nn.Linear``, bitsandbytes ``Linear4bit``). Works on models
    built on the ``meta`` device, so budgets can be checked before any weights are loaded.
    """
    targets = set(target_modules)
    found = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and hasattr(module, "in_features") and hasattr(module, "out_features"):
            found.append((name, int(module.in_features), int(module.out_features)))
    return found


def lora_parameter_count(model: nn.Module, rank: int, target_modules: Iterable[str] = TARGET_MODULES) -> int:
    """Trainable parameters of LoRA at ``rank``: ``rank * (in + out)`` summed over targeted layers.

    This is the budget SpIEL (``lora_rank_equivalent``) and SHiRA are matched to (docs/METHOD.md §2.2).
    """
    return sum(rank * (fin + fout) for _, fin, fout in targeted_linears(model, target_modules))


def build_lora_model(
    model: nn.Module,
    rank: int,
    *,
    lora_alpha: float = DEFAULT_LORA_ALPHA,
    lora_dropout: float = DEFAULT_LORA_DROPOUT,
    target_modules: Iterable[str] = TARGET_MODULES,
):
    """Wrap ``model`` (float or NF4-quantized) with a LoRA adapter of rank ``rank`` on the targeted layers.

    Args:
        model: a ``PreTrainedModel`` (its weights are frozen by peft).
        rank: LoRA rank r (positive int); the adapter holds ``r * (in + out)`` float32 parameters per layer.
        lora_alpha: scaling numerator (the update is scaled by ``lora_alpha / r``).
        lora_dropout: dropout probability on the adapter input.
        target_modules: last name components of the layers to adapt.

    Returns:
        ``peft.PeftModel``; ``save_pretrained(dir)`` writes ``adapter_model.safetensors`` + ``adapter_config.json``.

    Raises:
        ValueError: rank is not a positive int (peft raises for other bad settings).
    """
    from peft import LoraConfig, get_peft_model

    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank: expected a positive int, got {rank!r}")
    config = LoraConfig(
        r=rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=list(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)

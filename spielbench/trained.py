"""Load a trained run (or a base model) for inference: the base, with the run's adapter applied.

One loader for the evaluation, the lm-eval ``spiel`` model (:mod:`spielbench.lm_eval_model`) and the
tests: SpIEL and peft adapters merged into a float32 base, 4-bit methods on an NF4 base with the adapter
unmerged, a full fine-tuning folder loaded as the model itself (docs/METHOD.md §7).
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from spielbench.errors import InputError



def adapter_kind(adapter_dir: str | os.PathLike) -> str:
    """What a saved adapter folder holds: ``"spiel"``, ``"peft"`` or ``"full"`` (a whole model folder).

    Raises:
        InputError: the folder is missing, holds a diverged run's marker, or holds neither
            ``adapter_config.json`` nor ``config.json``, or its ``adapter_config.json`` is not a JSON object
            with ``peft_type``.
    """
    from spielbench.records import Divergence

    d = Path(adapter_dir)
    if not d.is_dir():
        raise InputError(f"adapter: {d} is not a folder (expected a saved adapter or model folder)")
    if (d / Divergence.FILE).is_file():
        raise InputError(f"adapter: {d} belongs to a run that diverged in training ({Divergence.FILE}); it holds "
                         "no weights")
    cfg = d / "adapter_config.json"
    if cfg.is_file():
        try:
            data = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{cfg}: not valid JSON ({exc})") from None
        from spiel.adapter_io import is_spiel_adapter

        if is_spiel_adapter(d):
            return "spiel"
        if not isinstance(data, dict) or "peft_type" not in data:
            raise InputError(f"{cfg}: expected a JSON object with 'peft_type' or 'spiel_format_version' "
                             "(a peft or SpIEL adapter config)")
        return "peft"
    if (d / "config.json").is_file():
        return "full"
    raise InputError(f"adapter: {d} holds neither adapter_config.json (an adapter) nor config.json (a model)")


def _recorded_quantization(adapter_dir: Path) -> str | None:
    """``base_model_quantization`` recorded in a SpIEL adapter's config (None for a version-1 adapter)."""
    from spiel.config import SpielConfig

    try:
        return SpielConfig.from_pretrained(adapter_dir).base_model_quantization
    except (FileNotFoundError, ValueError) as exc:
        raise InputError(f"adapter: {exc}") from None


def _method_of(adapter_dir: Path, method: str | None) -> str | None:
    if method:
        return method
    marker = adapter_dir / "method.json"
    if marker.is_file():
        with contextlib.suppress(OSError, json.JSONDecodeError, AttributeError):
            return json.loads(marker.read_text(encoding="utf-8")).get("method")
    return None


def load_trained(base: str | os.PathLike, adapter: str | os.PathLike | None = None, *,
                  method: str | None = None, quantized: bool | None = None,
                  device: str = "cpu") -> tuple[Any, Any, dict[str, Any]]:
    """Load a model ready for evaluation: the base, with the run's adapter applied.

    SpIEL adapters (docs/METHOD.md §7) and peft adapters are merged into a float32 base
    (``SpielModel.from_pretrained(...).merge_and_unload()`` / ``PeftModel.from_pretrained(...)
    .merge_and_unload()``); for 4-bit methods (``qspiel-*``, ``qlora``) the base is loaded in NF4
    (``baselines.quant.load_nf4_model``) and the adapter stays unmerged, as merging into 4-bit weights
    is lossy (the reference passes ``--no_merge_peft`` in 4-bit mode, §8.5). A ``full`` folder is
    loaded as the model itself.

    Args:
        base: local base model folder (``save_pretrained`` layout with a tokenizer).
        adapter: saved adapter folder, or None for the base model.
        method: method name (``spielbench.methods.METHODS``); read from ``<adapter>/method.json`` when
            None. Decides whether the base is 4-bit; without one, a SpIEL adapter's recorded
            ``base_model_quantization`` decides.
        quantized: force (True/False) the 4-bit decision instead of taking it from the method.
        device: "cpu" or "cuda[:i]".

    Returns:
        ``(model, tokenizer, info)``: a transformers ``PreTrainedModel`` in eval mode (for unmerged
        adapters, the base model holding the adapter layers), its tokenizer, and ``{"method",
        "adapter", "adapter_kind", "adapter_application", "quantized", "dtype"}``.

    Raises:
        InputError: missing base folder, unusable adapter folder, unknown method, or a method/``quantized``
            that contradicts the base a SpIEL adapter records.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = Path(base)
    if not (base_dir / "config.json").is_file():
        raise InputError(f"model: {base_dir} is not a model folder (no config.json)")
    kind = adapter_kind(adapter) if adapter is not None else None
    method = _method_of(Path(adapter), method) if adapter is not None else method
    recorded = _recorded_quantization(Path(adapter)) if kind == "spiel" else None
    forced = quantized is not None
    if quantized is None:
        quantized = False
        if method:
            from spielbench.methods import get_method

            quantized = get_method(method).quantized
        elif recorded is not None:
            quantized = recorded != "none"  # the adapter's own record decides (docs/METHOD.md §7)
    if recorded is not None and bool(quantized) != (recorded != "none"):
        asked = f"quantized={quantized}" if forced else f"method {method!r}"
        raise InputError(f"adapter: {Path(adapter) / 'adapter_config.json'} records a base_model_quantization="
                         f"{recorded!r} base, but {asked} asks for {'an NF4' if quantized else 'a dense'} base")
    info: dict[str, Any] = {"method": method, "adapter": str(adapter) if adapter is not None else None,
                            "adapter_kind": kind, "quantized": bool(quantized)}
    tok_dir = Path(adapter) if kind == "full" and (Path(adapter) / "tokenizer_config.json").is_file() else base_dir
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))

    if kind == "full":
        model = AutoModelForCausalLM.from_pretrained(str(adapter), dtype=torch.float32).to(device)
        info.update(adapter_application="full-model", dtype="float32")
    else:
        if quantized:
            from baselines.quant import load_nf4_model, nf4_compute_dtype

            model = load_nf4_model(base_dir, device)
            info["dtype"] = f"nf4/{str(nf4_compute_dtype(device)).replace('torch.', '')}"
        else:
            model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).to(device)
            info["dtype"] = "float32"
        if kind is None:
            info["adapter_application"] = "none"
        else:
            if kind == "spiel":
                from spiel.model import SpielModel

                try:
                    wrapped = SpielModel.from_pretrained(model, adapter)
                except (FileNotFoundError, ValueError) as exc:
                    raise InputError(f"adapter: {exc}") from None
            else:
                from peft import PeftModel

                wrapped = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
            # merging into 4-bit weights is lossy: the adapter stays unmerged on an NF4 base
            model = wrapped.get_base_model() if quantized else wrapped.merge_and_unload()
            info["adapter_application"] = "unmerged" if quantized else "merged"
    model.eval()
    return model, tokenizer, info

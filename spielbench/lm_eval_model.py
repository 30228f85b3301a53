"""The ``spiel`` model for lm-eval: a base model with a saved adapter (SpIEL, peft or full) applied.

lm-eval 0.4.13 finds models only in its own registry (``lm_eval.api.registry.model_registry``,
filled from ``lm_eval.models.MODEL_MAPPING``); it has no entry-point group through which an
installed package could add one. Importing this module registers ``spiel``. In the project's
environment, ``lm_eval --model spiel`` works directly (a startup hook, :mod:`spielbench.lm_eval_plugin`,
registers the model lazily); elsewhere a thin wrapper imports this module and runs lm-eval's own CLI::

    python -m spielbench.lm_eval_model --model spiel \\
        --model_args pretrained=resources/models/smollm2-135m-instruct,adapter=runs/spiel-ag-r16/adapter \\
        --tasks spiel_arc_easy --include_path <folder from `python -m spielbench.evaluate --render-tasks`> \\
        --limit 100

(or the ``spiel-lm-eval`` console script with the same arguments, when the project is installed).
Every other argument is lm-eval's. ``model_args``: ``pretrained`` (base model folder), ``adapter``
(adapter folder; omitted = the base model), ``method`` (default: ``<adapter>/method.json``; decides an
NF4 base for ``qspiel-*``/``qlora``; a SpIEL adapter's own record of its base decides when there is no
method, and a method that contradicts it is refused), ``device`` (default ``cpu``), plus any ``HFLM`` argument
(``batch_size``, ``max_length``, ...). The adapter is applied by
:func:`spielbench.trained.load_trained` (merged in float32; unmerged on an NF4 base).
"""
from __future__ import annotations

import os
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

from lm_eval.api.registry import model_registry  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

#: The name under which the model is registered in lm-eval.
MODEL_NAME = "spiel"


class SpielLM(HFLM):
    """lm-eval ``HFLM`` over a base model with a run's adapter applied.

    Args:
        pretrained: base model folder (local; the hub is never contacted).
        adapter: adapter folder (a SpIEL adapter, ``spiel_format_version`` in its ``adapter_config.json``;
            a peft adapter; or a full model folder), or None for the base model alone.
        method: method name (``spielbench.methods.METHODS``), default from ``<adapter>/method.json``; a
            SpIEL adapter's recorded base (dense or NF4) is applied without one and checked against one.
        device: "cpu" or "cuda[:i]" ("cuda" falls back to "cpu" when no GPU is available, as in HFLM).
        **kwargs: passed to ``HFLM`` (``batch_size``, ``max_length``, ...); ``tokenizer`` and
            ``dtype`` are ignored (the base folder's tokenizer is used; weights are float32 or NF4).

    Attributes:
        spiel_info: how the adapter was applied (``spielbench.trained.load_trained``'s info dict).

    Raises:
        spielbench.errors.InputError: bad base or adapter folder, unknown method, a method whose base
            contradicts the SpIEL adapter's record.
    """

    def __init__(self, pretrained: str, adapter: str | None = None, method: str | None = None,
                 device: str | None = "cpu", **kwargs: Any) -> None:
        from spielbench.trained import load_trained

        kwargs.pop("tokenizer", None)
        kwargs.pop("dtype", None)
        import torch

        device = device or "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm-eval's command line asks for "cuda" by default; HFLM falls back the same way
        elif device == "cuda":
            device = "cuda:0"
        model, tokenizer, info = load_trained(pretrained, adapter or None, method=method, device=device)
        super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)
        self.spiel_info = info


def register() -> None:
    """Register :class:`SpielLM` as lm-eval model ``spiel`` (idempotent)."""
    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME)(SpielLM)


register()


def main() -> None:
    """``spiel-lm-eval``: lm-eval's command line with the ``spiel`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    register()
    cli_evaluate()


if __name__ == "__main__":
    main()

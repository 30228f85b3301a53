"""``eval.json``: one evaluated model's task results and held-out loss (written by ``spielbench.evaluate``)."""
from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field
from typing import ClassVar

from spielbench.errors import InputError
from spielbench.records.base import Record


@dataclass(kw_only=True)
class TaskResult(Record):
    """One task of eval.json: the headline metric over ``n`` items, or ``skipped`` with a ``note``.

    ``value`` is a fraction in [0, 1]; ``stderr`` lm-eval's standard error (None when it reports none);
    ``doc_ids``/``item_scores`` give the headline metric per item, for paired comparisons.
    """

    metric: str | None = None
    value: float | None = None
    stderr: float | None = None
    n: int | None = None
    skipped: bool | None = None
    note: str | None = None
    item_scores: list[float] | None = None
    doc_ids: list | None = None


@dataclass(kw_only=True)
class HeldoutResult(Record):
    """The held-out loss of eval.json: token-mean cross-entropy (nats/token) over ``n_examples`` examples.

    ``example_nll`` (summed nats per example) and ``example_tokens`` (label tokens per example) are given
    together or not at all; ``loss = Σ example_nll / Σ example_tokens``.
    """

    loss: float | None = None
    n_examples: int | None = None
    n_tokens: int | None = None
    stderr: float | None = None
    example_nll: list[float] | None = None
    example_tokens: list[int] | None = None

    def check(self, where: str) -> None:
        """Raises InputError when only one per-example list is given, or their lengths differ."""
        a, b = self.example_nll, self.example_tokens
        if (a is None) != (b is None) or (a is not None and len(a) != len(b)):
            raise InputError(f"{where}: example_nll and example_tokens must both be given, with equal lengths")


@dataclass(kw_only=True)
class EvalResult(Record):
    """One evaluated model's ``eval.json`` (written by ``spielbench.evaluate``): task results and held-out loss.

    ``status`` is absent (None) for an evaluated model and ``"diverged"`` for a run that stopped on a
    non-finite training loss: no model was evaluated, every task is skipped with a note, ``heldout`` is None.

    The writer also records (kept as they are, read by nobody but people): ``base_model``, ``adapter``,
    ``adapter_application`` ("none" | "merged" | "unmerged" | "full-model"), ``quantized``, ``dtype`` (the
    weights'), ``autocast`` (null or the autocast dtype of the matrix products), ``prompt_format``
    ("plain" | "chat"), ``seed``, ``limit``, ``batch_size``, the lm-eval/transformers/torch versions,
    ``notes``, ``seconds`` ({"load", "evaluate", "heldout"}); per task ``lm_eval_task``, ``n_available``,
    ``shots``, ``limit``, ``subset`` ({"kind": "all" | "seeded-random" | "first-of-shuffled", "seed",
    "of"}), ``metrics`` ({metric: {"value", "stderr"}}) and ``subtasks`` (groups); in ``heldout`` also
    ``file``, ``max_seq_length`` and ``head`` ("label_rows" | "full": where the LM head was applied).
    """

    VERSION: ClassVar[str] = "spielbench-eval/1"
    FORMATS: ClassVar[tuple[str, ...]] = (VERSION,)

    format: str = VERSION
    run_id: str | None = None
    method: str | None = None
    status: str | None = None
    tasks: dict[str, TaskResult | None] = field(default_factory=dict)
    heldout: HeldoutResult | None = None


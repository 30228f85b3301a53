"""The held-out loss: token-mean cross-entropy over the response tokens of held-out examples.

One function for every caller: the training harness (before and after training, and so the tune stage's
validation loss) and the evaluation (``eval.json``'s ``heldout``). Every label token (not ``-100``)
counts once, whichever example it is in: ``loss = Σ example_nll / Σ example_tokens`` (nats per token),
not a mean of per-example means.

Examples are batched by length (longest first) so that little compute goes to padding; per-example
values come back in the dataset's order. The language-model head is applied only at the positions
that carry a label (``model.get_decoder()``'s ``last_hidden_state`` at those positions, then
``model.get_output_embeddings()``), since a response is a small part of each sequence. A model may
change its logits after the head (final logit softcapping, a scaled head, ...), so the first batch with
a label token of every call is also run through the whole model: when the two disagree (per-example NLL
beyond :data:`RTOL`), or the model has no decoder/head to call, the call goes on with the model's own logits.
The result's ``head`` says which path ran.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Sequence

import torch

from spielbench.data import IGNORE_INDEX

#: Relative tolerance of the first-batch check of the label-rows head against the model's own logits.
RTOL = 1e-4
HEAD_LABEL_ROWS = "label_rows"
HEAD_FULL = "full"


def _nll_full(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """Summed NLL [nats] per example ``[B]`` (float32) from the model's own logits ``[B, L, V]``.

    The cross-entropy runs over rows of ``V`` logits (vocabulary last and contiguous), as in the label-rows
    path: with the vocabulary along dim 1 of a transposed ``[B, V, L]`` view, float32 log-sum-exp over
    a 49k vocabulary drifts by about 1e-4 relative (checked against float64).
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    target = labels[:, 1:]
    shifted = logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), target.reshape(-1),
                                            ignore_index=IGNORE_INDEX, reduction="none")
    return nll.view(target.shape).sum(dim=1)


def _nll_label_rows(decoder, head, input_ids, attention_mask, labels) -> torch.Tensor | None:
    """Summed NLL [nats] per example ``[B]`` (float32), the head applied only where a label is.

    Returns None when the decoder's output has no ``last_hidden_state`` of shape ``[B, L, H]``.
    """
    out = decoder(input_ids=input_ids, attention_mask=attention_mask)
    hidden = getattr(out, "last_hidden_state", None)
    if not isinstance(hidden, torch.Tensor) or hidden.shape[:2] != input_ids.shape:
        return None
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX  # [B, L-1]
    rows = hidden[:, :-1][keep]  # [N, H]
    logits = head(rows).float()  # [N, V]
    token_nll = torch.nn.functional.cross_entropy(logits, target[keep], reduction="none")  # [N]
    owner = keep.nonzero()[:, 0]
    return torch.zeros(input_ids.shape[0], dtype=torch.float32, device=token_nll.device).index_add_(
        0, owner, token_nll)


def _label_rows_parts(model) -> tuple[Any, Any] | None:
    """``(decoder, output embeddings)`` of ``model`` when it has both (through peft's and spiel's
    wrappers, which forward these calls to the transformers model), else None."""
    get_decoder = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if not callable(get_decoder) or not callable(get_head):
        return None
    try:
        decoder, head = get_decoder(), get_head()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    if decoder is None or head is None or decoder is model or not callable(head):
        return None
    return decoder, head


def _agrees(fast: torch.Tensor, full: torch.Tensor) -> bool:
    """Per-example NLLs equal within :data:`RTOL` (relative to each example's NLL, with an absolute floor
    of RTOL times the batch's mean example NLL for examples with few tokens)."""
    floor = RTOL * float(full.abs().mean()) if full.numel() else 0.0
    return bool(torch.allclose(fast, full, rtol=RTOL, atol=floor))


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, dataset: Sequence[dict], collator: Callable[[list], dict], *,
                 batch_size: int = 8, file: str | os.PathLike | None = None,
                 max_seq_length: int | None = None) -> dict[str, Any]:
    """Token-mean cross-entropy over the response tokens of ``dataset`` (module docstring).

    Args:
        model: a causal LM (transformers ``PreTrainedModel``, or a peft/SpIEL model wrapping one) whose
            forward returns ``.logits`` ``[batch, seq, vocab]``; left in its train/eval mode afterwards.
        dataset: features with ``input_ids`` and ``labels`` (lists of token ids, ``-100`` = no label), e.g.
            :class:`spielbench.data.InstructionDataset`.
        collator: pads a list of features into int64 tensors ``input_ids``, ``attention_mask``, ``labels``
            ``[batch, max_len]`` (pads: attention 0, label ``-100``).
        batch_size: examples per forward pass.
        file, max_seq_length: recorded in the result (where the examples came from, their truncation).

    Returns:
        ``{"loss": float (nats/token; NaN without label tokens), "n_examples": int, "n_tokens": int (label
        tokens), "file": str | None, "max_seq_length": int | None, "example_nll": [float] (summed nats per
        example, dataset order), "example_tokens": [int], "head": "label_rows" | "full"}``.
    """
    n = len(dataset)
    device = next(model.parameters()).device
    order = sorted(range(n), key=lambda i: -len(dataset[i]["input_ids"]))
    example_nll: list[float] = [0.0] * n
    example_tokens: list[int] = [0] * n
    parts = _label_rows_parts(model)
    head = HEAD_LABEL_ROWS if parts is not None else HEAD_FULL
    checked = False
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            batch = collator([dataset[i] for i in idx])
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            labels = batch["labels"].to(device)
            if head == HEAD_LABEL_ROWS:
                nll = _nll_label_rows(*parts, ids, mask, labels)
                if not checked:  # the first batch with a label decides whether this head is the model's own
                    full = _nll_full(model, ids, mask, labels)
                    checked = bool((labels[:, 1:] != IGNORE_INDEX).any())
                    if nll is None or not _agrees(nll, full):
                        head, nll = HEAD_FULL, full
            else:
                nll = _nll_full(model, ids, mask, labels)
            counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
            for i, v, t in zip(idx, nll.tolist(), counts.tolist()):
                example_nll[i], example_tokens[i] = v, int(t)
    finally:
        model.train(was_training)
    total, count = math.fsum(example_nll), int(sum(example_tokens))
    return {"loss": total / count if count else float("nan"), "n_examples": n, "n_tokens": count,
            "file": str(file) if file is not None else None, "max_seq_length": max_seq_length,
            "example_nll": example_nll, "example_tokens": example_tokens, "head": head}


def heldout_loss_of_file(model: torch.nn.Module, tokenizer, path: str | os.PathLike, *, max_seq_length: int = 512,
                         max_examples: int | None = None, batch_size: int = 8) -> dict[str, Any]:
    """:func:`heldout_loss` of a held-out instruction file, encoded exactly as for training.

    ``spielbench.data.load_instruction_dataset``: the chat template, labels on assistant tokens only,
    truncation to ``max_seq_length`` tokens, the first ``max_examples`` examples (None: all).

    Args:
        model: as :func:`heldout_loss`; tokenizer: its fast tokenizer with a chat template.
        path: Alpaca JSON / Tülu JSONL / Flan JSONL file.

    Returns:
        :func:`heldout_loss`'s result, ``file`` = ``path``.

    Raises:
        InputError: missing or malformed file, or no example with a response token (names the file).
    """
    from spielbench.data import load_instruction_dataset, make_collator

    data = load_instruction_dataset(path, tokenizer, max_seq_length, max_examples=max_examples,
                                    field_name="heldout_data")
    return heldout_loss(model, data, make_collator(tokenizer), batch_size=batch_size, file=path,
                        max_seq_length=max_seq_length)

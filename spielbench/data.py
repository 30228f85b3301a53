"""Instruction data for training: chat-template rendering, response-only labels, truncation, collation.

Follows the reference's data handling (docs/METHOD.md §8.1, open-instruct's ``encode_with_messages_format``)
with the model's own chat template in place of the Tülu format:

* a conversation is rendered with ``tokenizer.apply_chat_template`` and tokenized once;
* labels are ``-100`` everywhere except the tokens of assistant turns (the turn's content and its
  end-of-turn marker, e.g. ``Yo<|im_end|>\\n`` in ChatML). The character span of each assistant turn is
  found by rendering the conversation prefixes (``messages[:i]`` with the generation prompt, and
  ``messages[:i+1]``), which works for any number of turns; tokens are mapped to spans through the
  fast tokenizer's offsets;
* sequences are truncated to ``max_seq_length`` tokens; examples with an empty response or left with no
  label token are dropped (the workflow's split of a user's file also drops over-long examples, before
  the split), and every drop is counted and reported with the user's file and line;
* batches are padded on the right with the pad id, ``attention_mask`` 0 and label ``-100`` on pads
  (:func:`make_collator`, transformers' ``DataCollatorForSeq2Seq``).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spielbench.errors import InputError

#: Label value ignored by the loss (``torch.nn.CrossEntropyLoss`` default ``ignore_index``).
IGNORE_INDEX = -100


#: Reasons an example is dropped before training (keys of ``EncodeStats.drop_report()["by_reason"]``).
DROP_EMPTY_RESPONSE = "empty response"
DROP_NO_RESPONSE_TOKEN = "no response token within max_seq_length"
DROP_OVERLONG = "longer than max_seq_length"
SKIPPED_MALFORMED = "malformed record (skipped)"


@dataclass
class EncodeStats:
    """Counts from :func:`encode_examples`: examples read, kept, dropped (empty response; no response token
    left after truncation; longer than ``max_seq_length`` when over-long examples are dropped), malformed
    records skipped while reading, truncated (longer than ``max_seq_length``, kept), and token counts.
    ``first_dropped`` lists the first :data:`spielbench.formats.MAX_REPORTED` drops and skips as
    ``{"file", "line", "reason"}`` (the user's file and line, also for records of a derived split)."""

    read: int = 0
    kept: int = 0
    dropped_no_response: int = 0
    dropped_empty_response: int = 0
    dropped_overlong: int = 0
    skipped_malformed: int = 0
    truncated: int = 0
    label_tokens: int = 0
    tokens: int = 0
    first_dropped: list = field(default_factory=list)

    def as_dict(self) -> dict:
        """Plain dict for JSON."""
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()}

    def note_drop(self, origin: tuple[str, int] | None, reason: str) -> None:
        """Note one drop's file, line and reason (only the first few are kept; the caller counts it)."""
        from spielbench.formats import MAX_REPORTED

        if len(self.first_dropped) < MAX_REPORTED:
            file, line = origin if origin is not None else (None, None)
            self.first_dropped.append({"file": file, "line": line, "reason": reason})

    def drop_report(self) -> dict:
        """``{"count", "by_reason": {reason: n}, "first": [{"file", "line", "reason"}]}`` of the examples
        left out (dropped or skipped as malformed); reasons with a zero count are omitted."""
        by_reason = {DROP_EMPTY_RESPONSE: self.dropped_empty_response, DROP_NO_RESPONSE_TOKEN: self.dropped_no_response,
                     DROP_OVERLONG: self.dropped_overlong, SKIPPED_MALFORMED: self.skipped_malformed}
        by_reason = {k: v for k, v in by_reason.items() if v}
        return {"count": sum(by_reason.values()), "by_reason": by_reason, "first": list(self.first_dropped)}


def describe_drops(report: dict, what: str, total: int | None = None) -> str | None:
    """One console line for a drop report (:meth:`EncodeStats.drop_report`), or None when nothing was dropped:
    ``"<what>: dropped 3 of 120 examples (empty response: 2, ...); first: a.json:4 (empty response), ..."``."""
    if not report or not report.get("count"):
        return None
    of = f" of {total}" if total is not None else ""
    reasons = ", ".join(f"{k}: {v}" for k, v in report["by_reason"].items())
    first = ", ".join(f"{d['file']}:{d['line']} ({d['reason']})" for d in report["first"])
    return f"{what}: dropped {report['count']}{of} examples ({reasons}); first: {first}"


#: The open-instruct/Tülu format of the reference runs (docs/METHOD.md §8.1), used for tokenizers that
#: ship no chat template: ``<|user|>\n{content}\n<|assistant|>\n{content}</s>\n``.
TULU_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer) -> bool:
    """Give ``tokenizer`` the Tülu chat template when it has none (base models); True when it was set."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = TULU_CHAT_TEMPLATE
    return True

def _render(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_char_spans(tokenizer, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` and locate the assistant turns in the rendered text.

    Returns:
        ``(text, spans)``: the full rendering and, per assistant message, the half-open character span
        ``[start, end)`` from the end of the generation prompt that precedes it to the end of its
        rendered turn (content plus the template's end-of-turn text). An assistant message that opens
        the conversation has no prompt to answer and gets no span (it stays context).

    A tokenizer without a chat template (a base model such as Llama-2-7b-hf) gets the Tülu format the
    reference runs trained with (:data:`TULU_CHAT_TEMPLATE`, docs/METHOD.md §8.1).

    Raises:
        InputError: the template does not render prefixes of the conversation as prefixes of the full
            text (spans cannot be located).
    """
    ensure_chat_template(tokenizer)
    text = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i == 0:
            # an assistant turn that opens the conversation has no prompt; it is kept as context
            continue
        start_text = _render(tokenizer, messages[:i], add_generation_prompt=True)
        end_text = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (text.startswith(start_text) and text.startswith(end_text) and len(start_text) <= len(end_text)):
            raise InputError(
                "model: the chat template does not render a conversation prefix as a prefix of the whole "
                f"conversation (at message {i}); cannot locate the assistant response"
            )
        spans.append((len(start_text), len(end_text)))
    return text, spans


def encode_messages(tokenizer, messages: Sequence[dict], max_seq_length: int) -> dict[str, list[int]] | None:
    """Tokenize one conversation with labels on the assistant responses only.

    Args:
        tokenizer: a fast tokenizer (``PreTrainedTokenizerFast``) with a chat template.
        messages: ``[{"role": "user"|"assistant"|"system", "content": str}, ...]``.
        max_seq_length: keep at most this many tokens (the first ones).

    Returns:
        ``{"input_ids": [int]*L, "labels": [int]*L}`` with ``L <= max_seq_length`` and labels equal to
        ``input_ids`` on assistant tokens and :data:`IGNORE_INDEX` elsewhere; ``None`` if no assistant
        token survives truncation (the example has nothing to learn from).

    Raises:
        InputError: slow tokenizer, no chat template, or a template that is not prefix-stable.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise InputError("model: a fast tokenizer (tokenizer.json) is required to align labels with responses")
    text, spans = assistant_char_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    if spans:
        for t, (s, e) in enumerate(enc["offset_mapping"]):
            if e <= s:
                continue
            for a, b in spans:
                if a <= s < b:
                    labels[t] = input_ids[t]
                    break
    input_ids = input_ids[:max_seq_length]
    labels = labels[:max_seq_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": input_ids, "labels": labels, "_full_length": len(enc["input_ids"])}


def _has_empty_response(messages: Sequence[dict]) -> bool:
    """True when every assistant turn that answers a prompt (not the opening message) has blank content:
    training would see only the template's end-of-turn marker."""
    answers = [m for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0]
    return bool(answers) and all(not m["content"].strip() for m in answers)


def encode_examples(
    tokenizer, examples: Sequence[dict], max_seq_length: int, *,
    origins: Sequence[tuple[str, int]] | None = None, drop_overlong: bool = False,
    keep: list[int] | None = None,
) -> tuple[list[dict[str, list[int]]], EncodeStats]:
    """Encode examples ``{"messages": [...]}`` with :func:`encode_messages`, dropping those training cannot use.

    Dropped: an empty response (:func:`_has_empty_response`), no response token within ``max_seq_length``,
    and with ``drop_overlong`` any example longer than ``max_seq_length`` tokens after the template
    (otherwise such an example is truncated and kept). Each drop is counted and the first few are noted
    with their file and line (``origins[i]``, from ``spielbench.formats.read_instruction_file``).

    Args:
        keep: when given, the indices of the kept examples are appended to it.

    Returns:
        ``(features, stats)``: features are dicts with ``input_ids`` and ``labels`` (lists of int).

    Raises:
        InputError: as :func:`encode_messages`; ``max_seq_length`` < 1.
    """
    if max_seq_length < 1:
        raise InputError(f"max_seq_length: expected a positive int, got {max_seq_length}")
    stats = EncodeStats()
    features = []
    for i, example in enumerate(examples):
        stats.read += 1
        origin = origins[i] if origins is not None else None
        if _has_empty_response(example["messages"]):
            stats.dropped_empty_response += 1
            stats.note_drop(origin, DROP_EMPTY_RESPONSE)
            continue
        enc = encode_messages(tokenizer, example["messages"], max_seq_length)
        if enc is None:
            stats.dropped_no_response += 1
            stats.note_drop(origin, DROP_NO_RESPONSE_TOKEN)
            continue
        full_length = enc.pop("_full_length")
        if full_length > max_seq_length:
            if drop_overlong:
                stats.dropped_overlong += 1
                stats.note_drop(origin, f"{DROP_OVERLONG} ({full_length} > {max_seq_length} tokens)")
                continue
            stats.truncated += 1
        stats.kept += 1
        stats.tokens += len(enc["input_ids"])
        stats.label_tokens += sum(1 for x in enc["labels"] if x != IGNORE_INDEX)
        features.append(enc)
        if keep is not None:
            keep.append(i)
    return features, stats


class InstructionDataset(torch.utils.data.Dataset):
    """A list of encoded examples (``input_ids``/``labels`` lists of int) as a map-style dataset."""

    def __init__(self, features: list[dict[str, list[int]]], stats: EncodeStats | None = None):
        self.features = features
        self.stats = stats or EncodeStats(read=len(features), kept=len(features))

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.features[i]


def make_collator(tokenizer, pad_to_multiple_of: int | None = None):
    """The batch collator of training and the held-out loss: transformers' ``DataCollatorForSeq2Seq``
    padding on the right to the longest feature (rounded up to ``pad_to_multiple_of``).

    Output tensors (int64, ``[batch, max_len]``): ``input_ids`` padded with :func:`pad_token_id_of`,
    ``attention_mask`` (1 on tokens, 0 on pads), ``labels`` padded with :data:`IGNORE_INDEX`. When the
    tokenizer pads on the left or has no pad token, the collator pads with a copy of it set to the right
    side and its eos token (the caller's tokenizer is not changed).

    Raises:
        InputError: the tokenizer has neither a pad nor an eos token.
    """
    import copy

    from transformers import DataCollatorForSeq2Seq

    pad_id = pad_token_id_of(tokenizer)
    if tokenizer.pad_token_id != pad_id or getattr(tokenizer, "padding_side", "right") != "right":
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.padding_side = "right"
        if tokenizer.pad_token_id != pad_id:
            tokenizer.pad_token = tokenizer.eos_token
    return DataCollatorForSeq2Seq(tokenizer, padding="longest", pad_to_multiple_of=pad_to_multiple_of,
                                  label_pad_token_id=IGNORE_INDEX, return_tensors="pt")


def pad_token_id_of(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else its eos token (as the reference does).

    Raises:
        InputError: the tokenizer has neither a pad nor an eos token.
    """
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise InputError("model: the tokenizer has neither a pad token nor an eos token to pad with")


def _read_examples(path: Path, max_examples: int | None, on_malformed: str):
    from spielbench.formats import read_instruction_file

    if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
        raise InputError(f"max_examples: expected a positive integer or None, got {max_examples!r}")
    return read_instruction_file(path, max_examples=max_examples, on_malformed=on_malformed)


def _add_skipped(stats: EncodeStats, read) -> None:
    """Count the malformed records ``read`` skipped into ``stats``, in file order before the drops noted."""
    from spielbench.formats import MAX_REPORTED

    stats.skipped_malformed = len(read.skipped)
    skipped = [{"file": f, "line": n, "reason": f"{SKIPPED_MALFORMED}: {r}"} for f, n, r in read.skipped]
    stats.first_dropped = (skipped + stats.first_dropped)[:MAX_REPORTED]


def load_instruction_dataset(
    path: str | Path,
    tokenizer,
    max_seq_length: int,
    *,
    max_examples: int | None = None,
    field_name: str = "train_data",
    on_malformed: str = "error",
) -> InstructionDataset:
    """Read an instruction file (Alpaca JSON, Tülu messages JSONL, Flan JSONL) and encode it.

    Args:
        path: the data file (format detected by ``spielbench.formats.read_instruction_file``).
        tokenizer: fast tokenizer with a chat template.
        max_seq_length: truncation length in tokens.
        max_examples: keep only the first this many examples of the file (before filtering).
        field_name: the run-config field that named ``path``, used in error messages.
        on_malformed: "error" (reject the file at a malformed record) or "skip" (leave it out, counted).

    Returns:
        :class:`InstructionDataset` of the examples with at least one response token; its ``stats`` hold
        the drop report (:meth:`EncodeStats.drop_report`).

    Raises:
        InputError: missing file, unreadable format, or no example left after filtering (the message
            names the field, the file and the counts).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{field_name}: file {path} does not exist")
    read = _read_examples(path, max_examples, on_malformed)
    features, stats = encode_examples(tokenizer, read.examples, max_seq_length, origins=read.origins)
    _add_skipped(stats, read)
    if not features:
        sources = sorted({f for f, _ in read.origins}) or [str(path)]
        raise InputError(
            f"{field_name}: no example of {', '.join(sources)} has an assistant response token within "
            f"max_seq_length={max_seq_length} ({stats.read} read, {stats.drop_report()['count']} dropped)"
        )
    return InstructionDataset(features, stats)


def split_user_data(path: str | Path, tokenizer, max_seq_length: int, train_out: str | Path,
                    heldout_out: str | Path, report_out: str | Path, *, heldout_examples: int, seed: int,
                    on_malformed: str = "error", validation_out: str | Path | None = None,
                    validation_examples: int = 96) -> dict:
    """The workflow's split of a user's ``data.train`` into train and held-out files, after dropping what
    training cannot use.

    Reads ``path`` (``on_malformed`` as :func:`load_instruction_dataset`), drops empty-response examples,
    examples without a response token within ``max_seq_length`` and examples longer than
    ``max_seq_length`` tokens after the chat template (:func:`encode_examples` with ``drop_overlong``),
    then draws the held-out set from the rest (``spielbench.formats.heldout_indices``) and, with
    ``validation_out``, a validation set (learning-rate selection) from what remains
    (``spielbench.formats.validation_indices``), and writes the files with each record's origin (the user's file and line; ``spielbench.formats.write_split``), so an
    example can no longer fail a training job from a derived file, and whatever is reported names the
    user's file.

    Returns (and writes atomically to ``report_out`` as JSON) ``{"source", "max_seq_length", "read",
    "train", "heldout", "validation" (0 without ``validation_out``), "dropped": drop report}``.

    Raises:
        InputError: as :func:`load_instruction_dataset`; fewer than 2 usable examples (naming ``path``).
    """
    from spielbench.formats import heldout_indices, validation_indices, write_split
    from spielbench.fsio import write_json_atomic

    read = _read_examples(Path(path), None, on_malformed)
    kept: list[int] = []
    _, stats = encode_examples(tokenizer, read.examples, max_seq_length, origins=read.origins,
                               drop_overlong=True, keep=kept)
    _add_skipped(stats, read)
    examples = [read.examples[i] for i in kept]
    origins = [read.origins[i] for i in kept]
    held = heldout_indices(len(examples), heldout_examples, seed,
                           what=f"{path} (after dropping {stats.drop_report()['count']} unusable examples)")
    val = validation_indices(len(examples), held, validation_examples, seed) if validation_out is not None else set()
    n_train, n_heldout = write_split(examples, origins, held, train_out, heldout_out, validation=val,
                                     validation_out=validation_out)
    report = {"source": str(path), "max_seq_length": max_seq_length, "read": stats.read + stats.skipped_malformed,
              "train": n_train, "heldout": n_heldout, "validation": len(val), "dropped": stats.drop_report()}
    write_json_atomic(report_out, report)
    return report


def read_data_report(path: Path) -> dict:
    """The report of the data-preparation step (:func:`split_user_data`), as a dict.

    Raises:
        InputError: ``data_report`` is missing or not a JSON object.
    """
    if not path.is_file():
        raise InputError(f"data_report: file {path} does not exist")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"data_report: {path} is not valid JSON ({exc.msg})") from None
    if not isinstance(report, dict):
        raise InputError(f"data_report: {path} holds a JSON {type(report).__name__}, expected an object")
    return report


def dropped_examples(train_dataset, heldout_dataset, data_report: dict | None) -> dict[str, Any]:
    """``metrics.json``'s ``dropped_examples``: the drop reports of the train and held-out data as loaded
    (``{"read", "dropped": {"count", "by_reason", "first"}}``) and the data split's report (or None)."""
    def of(ds):
        if ds is None:
            return None
        return {"read": ds.stats.read + ds.stats.skipped_malformed, "dropped": ds.stats.drop_report()}

    return {"train": of(train_dataset), "heldout": of(heldout_dataset), "before_split": data_report}

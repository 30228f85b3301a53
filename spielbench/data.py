"""Instruction data for training: chat-template rendering, response-only labels, truncation, collation.

Follows the reference's data handling (docs/METHOD.md §8.1, open-instruct's ``encode_with_messages_format``)
with the model's own chat template in place of the Tülu format:

* a conversation is rendered with ``tokenizer.apply_chat_template`` and tokenized once;
* labels are ``-100`` everywhere except the tokens of assistant turns (the turn's content and its
  end-of-turn marker, e.g. ``Yo<|im_end|>\\n`` in ChatML). The character span of each assistant turn is
  found by rendering the conversation prefixes (``messages[:i]`` with the generation prompt, and
  ``messages[:i+1]``), which works for any number of turns; tokens are mapped to spans through the
  fast tokenizer's offsets;
* sequences are truncated to ``max_seq_length`` tokens; examples left with no label token are dropped;
* batches are padded on the right with the pad id, ``attention_mask`` 0 and label ``-100`` on pads.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spielbench.errors import InputError

#: Label value ignored by the loss (``torch.nn.CrossEntropyLoss`` default ``ignore_index``).
IGNORE_INDEX = -100


@dataclass
class EncodeStats:
    """Counts from :func:`encode_examples`: examples read, kept, dropped for lack of response tokens,
    and truncated (longer than ``max_seq_length`` before truncation)."""

    read: int = 0
    kept: int = 0
    dropped_no_response: int = 0
    truncated: int = 0
    label_tokens: int = 0
    tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        """Plain dict for JSON."""
        return dict(self.__dict__)



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


def encode_examples(
    tokenizer, examples: Sequence[dict], max_seq_length: int
) -> tuple[list[dict[str, list[int]]], EncodeStats]:
    """Encode examples ``{"messages": [...]}`` with :func:`encode_messages`, dropping empty ones.

    Returns:
        ``(features, stats)``: features are dicts with ``input_ids`` and ``labels`` (lists of int).

    Raises:
        InputError: as :func:`encode_messages`; ``max_seq_length`` < 1.
    """
    if max_seq_length < 1:
        raise InputError(f"max_seq_length: expected a positive int, got {max_seq_length}")
    stats = EncodeStats()
    features = []
    for example in examples:
        stats.read += 1
        enc = encode_messages(tokenizer, example["messages"], max_seq_length)
        if enc is None:
            stats.dropped_no_response += 1
            continue
        if enc.pop("_full_length") > max_seq_length:
            stats.truncated += 1
        stats.kept += 1
        stats.tokens += len(enc["input_ids"])
        stats.label_tokens += sum(1 for x in enc["labels"] if x != IGNORE_INDEX)
        features.append(enc)
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


@dataclass
class PaddingCollator:
    """Pad a list of features to the longest one, on the right.

    Output tensors (int64, shape ``[batch, max_len]``): ``input_ids`` padded with ``pad_token_id``,
    ``attention_mask`` (1 on tokens, 0 on pads), ``labels`` padded with :data:`IGNORE_INDEX`.
    ``pad_to_multiple_of`` rounds ``max_len`` up (useful for tensor cores on CUDA).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    label_pad_token_id: int = field(default=IGNORE_INDEX)

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Collate ``features`` (dicts with ``input_ids`` and ``labels`` lists) into padded tensors."""
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        n = len(features)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, longest), dtype=torch.long)
        labels = torch.full((n, longest), self.label_pad_token_id, dtype=torch.long)
        for i, f in enumerate(features):
            length = len(f["input_ids"])
            input_ids[i, :length] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            attention_mask[i, :length] = 1
            labels[i, :length] = torch.as_tensor(f["labels"], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


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


def load_instruction_dataset(
    path: str | Path,
    tokenizer,
    max_seq_length: int,
    *,
    max_examples: int | None = None,
    field_name: str = "train_data",
) -> InstructionDataset:
    """Read an instruction file (Alpaca JSON, Tülu messages JSONL, Flan JSONL) and encode it.

    Args:
        path: the data file (format detected by ``spielbench.formats.load_instruction_examples``).
        tokenizer: fast tokenizer with a chat template.
        max_seq_length: truncation length in tokens.
        max_examples: keep only the first this many examples of the file (before filtering).
        field_name: the run-config field that named ``path``, used in error messages.

    Returns:
        :class:`InstructionDataset` of the examples with at least one response token.

    Raises:
        InputError: missing file, unreadable format, or no example left after filtering (the message
            names the field, the file and the counts).
    """
    from spielbench.formats import load_instruction_examples

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{field_name}: file {path} does not exist")
    examples = load_instruction_examples(path, max_examples=max_examples)
    features, stats = encode_examples(tokenizer, examples, max_seq_length)
    if not features:
        raise InputError(
            f"{field_name}: no example of {path} has an assistant response token within "
            f"max_seq_length={max_seq_length} ({stats.read} read, {stats.dropped_no_response} dropped)"
        )
    return InstructionDataset(features, stats)

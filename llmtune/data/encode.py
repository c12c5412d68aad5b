"""Render examples with the chat template, tokenize in batches, and label only what should carry loss.

Each conversation is rendered once in full and tokenized once with character offsets; the assistant
turns' character spans come from rendering the conversation up to each turn. A token carries loss
when it starts inside an assistant span (or always, with responses-only off), so the trained tokens
are exactly those of the full rendering the model will see at inference time. Answers end with the
end-of-turn token; if the template writes none, EOS is appended, so the model learns to stop.

Example:
    >>> from llmtune.demo import make_demo_rows, build_demo_tokenizer
    >>> from llmtune.data.formats import Example
    >>> tok = build_demo_tokenizer(make_demo_rows(20, seed=0))
    >>> ex = Example(turns=(("user", "Reverse: a b"), ("assistant", "b a")))
    >>> [enc] = encode_examples(tok, [ex], responses_only=True)
    >>> tok.decode([t for t, l in zip(enc.input_ids, enc.labels) if l != -100])
    'b a<|im_end|>'
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

from llmtune.data.errors import DataError
from llmtune.data.formats import Example

IGNORE = -100
BATCH = 1024


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The template's text for `messages`; template errors become DataError."""
    try:
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt))
    except Exception as err:  # jinja raises TemplateError and its own exceptions for unsupported layouts
        raise DataError(f"The chat template cannot render this conversation: {err}") from None


def assistant_spans(tokenizer: Any, example: Example) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the character spans [start, end) of each assistant answer (end-of-turn included)."""
    messages = example.messages()
    full = render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        last = i == len(messages) - 1
        through = full if last else render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(before) and full.startswith(through) and through.startswith(before)):
            raise DataError(
                "The chat template renders earlier turns differently once later turns follow, so answer tokens "
                "cannot be located. Set data.chat_template to a named template (chatml, llama-3, alpaca)."
            )
        end = len(through.rstrip())  # the newline after an end-of-turn token carries no signal
        spans.append((len(before), end))
    return full, spans


def prompt_for_last_answer(tokenizer: Any, example: Example) -> tuple[str, str]:
    """The rendered prompt up to the last assistant turn, and that turn's content (the reference answer)."""
    messages = example.messages()
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return render(tokenizer, messages[:last], add_generation_prompt=True), messages[last]["content"].strip()


def encode_examples(tokenizer: Any, examples: Sequence[Example], responses_only: bool) -> list[Encoded]:
    """Token ids and labels for each example, tokenized in batches (the fast tokenizer runs in Rust)."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("A fast (Rust) tokenizer is needed to locate answer tokens; this one is a slow tokenizer.")
    batches = [examples[start : start + BATCH] for start in range(0, len(examples), BATCH)]
    if batches and batches[0][0].is_text:
        out = [enc for batch in batches for enc in _encode_text_batch(tokenizer, batch)]
    else:
        out = _encode_chat_batches(tokenizer, batches)
    if not responses_only:
        out = [Encoded(e.input_ids, list(e.input_ids)) for e in out]
    return out


def _encode_chat_batches(tokenizer: Any, batches: list[Sequence[Example]]) -> list[Encoded]:
    """Render and label in Python while the Rust tokenizer (which releases the GIL) encodes the batch before.

    Tokenizing is most of the work and runs on every core; overlapping the single-threaded template
    rendering and labelling with it keeps both cores busy.
    """
    # The Rust tokenizer directly: transformers' per-row conversion of offsets costs more than tokenizing.
    encode = partial(tokenizer.backend_tokenizer.encode_batch, add_special_tokens=False)
    end_ids = _end_of_turn_ids(tokenizer)
    out: list[Encoded] = []
    pending: tuple[Future, list[tuple[str, list[tuple[int, int]]]]] | None = None
    with ThreadPoolExecutor(max_workers=1) as tokenizing:
        for batch in batches:
            rendered = [assistant_spans(tokenizer, example) for example in batch]
            submitted = tokenizing.submit(encode, [text for text, _ in rendered])
            if pending:
                out += _label_batch(*pending, tokenizer.eos_token_id, end_ids)
            pending = (submitted, rendered)
        if pending:
            out += _label_batch(*pending, tokenizer.eos_token_id, end_ids)
    return out


def _label_batch(
    encoded: Future, rendered: list[tuple[str, list[tuple[int, int]]]], eos_id: int, end_ids: set[int]
) -> list[Encoded]:
    results = []
    for encoding, (_, spans) in zip(encoded.result(), rendered, strict=True):
        ids = list(encoding.ids)
        results.append(_end_at_last_answer(ids, _answer_labels(ids, encoding, spans), eos_id, end_ids))
    return results


def _answer_labels(ids: list[int], encoding: Any, spans: list[tuple[int, int]]) -> list[int]:
    """Labels that keep the tokens starting inside an answer span: two lookups per span, not one per token."""
    labels = [IGNORE] * len(ids)
    for start, end in spans:
        first, last = _first_token_from(encoding, start, end), _token_at_or_before(encoding, end - 1, start)
        if first is not None and last is not None and first <= last:
            labels[first : last + 1] = ids[first : last + 1]
    return labels


def _first_token_from(encoding: Any, start: int, end: int) -> int | None:
    """The first token that starts at or after character `start` (and before `end`)."""
    for position in range(start, end):
        token = encoding.char_to_token(position)
        if token is not None and encoding.offsets[token][0] >= start:
            return int(token)
    return None


def _token_at_or_before(encoding: Any, position: int, floor: int) -> int | None:
    """The token covering the last character at or before `position` that a token covers."""
    for p in range(position, floor - 1, -1):
        token = encoding.char_to_token(p)
        if token is not None:
            return int(token)
    return None


def _end_of_turn_ids(tokenizer: Any) -> set[int]:
    return {tokenizer.eos_token_id, *getattr(tokenizer, "all_special_ids", [])} - {None}


def _end_at_last_answer(ids: list[int], labels: list[int], eos_id: int, end_ids: set[int]) -> Encoded:
    """Cut what follows the last answer (it carries no signal) and make sure that answer ends with a stop token."""
    answer_positions = [i for i, label in enumerate(labels) if label != IGNORE]
    if not answer_positions:
        return Encoded(ids, labels)
    last = answer_positions[-1]
    ids, labels = ids[: last + 1], labels[: last + 1]
    if ids[last] not in end_ids:
        ids, labels = [*ids, eos_id], [*labels, eos_id]
    return Encoded(ids, labels)


def _encode_text_batch(tokenizer: Any, batch: Sequence[Example]) -> list[Encoded]:
    encodings = tokenizer([e.text for e in batch], add_special_tokens=True, return_attention_mask=False)
    results = []
    for ids in encodings["input_ids"]:
        ids = list(ids) if ids and ids[-1] == tokenizer.eos_token_id else [*ids, tokenizer.eos_token_id]
        results.append(Encoded(ids, list(ids)))
    return results

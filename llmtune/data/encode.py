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

from llmtune.config import CHAT_TEMPLATE_NAMES
from llmtune.data.errors import DataError, ErrorLog
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


def render(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """The template's text for `messages` (and the row's tool schemas); template errors become DataError."""
    try:
        text = tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return str(text)
    except Exception as err:  # jinja raises TemplateError and its own exceptions; raise_exception() refusals too
        roles = ", ".join(m["role"] for m in messages)
        raise DataError(f"the chat template refused the conversation (turns: {roles}): {err}") from None


def assistant_spans(tokenizer: Any, example: Example) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the character spans [start, end) of each trained answer (end-of-turn included).

    Answers are the assistant turns that say something or call a tool; empty or weight-0 assistant turns
    stay in the prompt without loss, and tool results (role tool) are prompt too.
    """
    messages, tools = example.messages(), example.tool_schemas()
    full = render(tokenizer, messages, add_generation_prompt=False, tools=tools)
    spans = []
    for i, turn in enumerate(example.turns):
        if not turn.is_answer:
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools) if i else ""
        last = i == len(messages) - 1
        through = full if last else render(tokenizer, messages[: i + 1], add_generation_prompt=False, tools=tools)
        if not (full.startswith(before) and full.startswith(through) and through.startswith(before)):
            raise DataError(
                "the chat template renders earlier turns differently once later turns follow, so answer tokens "
                f"cannot be located. Set data.chat_template to a named template ({', '.join(CHAT_TEMPLATE_NAMES)})"
            )
        end = len(through.rstrip())  # the newline after an end-of-turn token carries no signal
        spans.append((len(before), end))
    return full, spans


def prompt_for_last_answer(tokenizer: Any, example: Example) -> tuple[str, str]:
    """The rendered prompt up to the last trained answer, and that answer (the reference for generation metrics).

    A tool-call answer's reference is the call as the template writes it, which is what the model generates.
    """
    messages, tools = example.messages(), example.tool_schemas()
    last = max(i for i, turn in enumerate(example.turns) if turn.is_answer)
    prompt = render(tokenizer, messages[:last], add_generation_prompt=True, tools=tools)
    if example.turns[last].content.strip():
        return prompt, example.turns[last].content.strip()
    through = render(tokenizer, messages[: last + 1], add_generation_prompt=False, tools=tools)
    answer = through[len(prompt) :].strip() if through.startswith(prompt) else ""
    eos = tokenizer.eos_token or ""
    return prompt, (answer[: -len(eos)] if eos and answer.endswith(eos) else answer).strip()


def encode_examples(tokenizer: Any, examples: Sequence[Example], responses_only: bool) -> list[Encoded]:
    """Token ids and labels for each example; a conversation the template refuses raises DataError naming its row."""
    encoded, _ = encode_kept(tokenizer, examples, responses_only, ErrorLog("raise"))
    return encoded


def encode_kept(
    tokenizer: Any, examples: Sequence[Example], responses_only: bool, errors: ErrorLog, template: str = ""
) -> tuple[list[Encoded], list[Example]]:
    """Encode in batches (the fast tokenizer runs in Rust); a refused row goes to `errors` (raised or skipped).

    `template` names the chat template in refusals (e.g. 'data.chat_template=gemma'). Returns the encoded
    examples and the examples they came from, without the skipped ones.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("A fast (Rust) tokenizer is needed to locate answer tokens; this one is a slow tokenizer.")
    batches = [examples[start : start + BATCH] for start in range(0, len(examples), BATCH)]
    out: list[Encoded | None]
    if batches and batches[0][0].is_text:
        out = [enc for batch in batches for enc in _encode_text_batch(tokenizer, batch)]
    else:
        out = _encode_chat_batches(tokenizer, batches, errors, template)
    kept = [(enc, ex) for enc, ex in zip(out, examples, strict=True) if enc is not None]
    if not responses_only:
        kept = [(Encoded(e.input_ids, list(e.input_ids)), ex) for e, ex in kept]
    return [enc for enc, _ in kept], [ex for _, ex in kept]


Rendered = tuple[str, list[tuple[int, int]]] | None


def _encode_chat_batches(
    tokenizer: Any, batches: list[Sequence[Example]], errors: ErrorLog, template: str
) -> list[Encoded | None]:
    """Render and label in Python while the Rust tokenizer (which releases the GIL) encodes the batch before.

    Tokenizing is most of the work and runs on every core; overlapping the single-threaded template
    rendering and labelling with it keeps both cores busy. A refused row is None in the result.
    """
    # The Rust tokenizer directly: transformers' per-row conversion of offsets costs more than tokenizing.
    encode = partial(tokenizer.backend_tokenizer.encode_batch, add_special_tokens=False)
    end_ids = _end_of_turn_ids(tokenizer)
    out: list[Encoded | None] = []
    pending: tuple[Future, list[Rendered]] | None = None
    with ThreadPoolExecutor(max_workers=1) as tokenizing:
        for batch in batches:
            rendered = [_spans_or_refusal(tokenizer, example, errors, template) for example in batch]
            submitted = tokenizing.submit(encode, [r[0] for r in rendered if r is not None])
            if pending:
                out += _label_batch(*pending, tokenizer.eos_token_id, end_ids)
            pending = (submitted, rendered)
        if pending:
            out += _label_batch(*pending, tokenizer.eos_token_id, end_ids)
    return out


def _spans_or_refusal(tokenizer: Any, example: Example, errors: ErrorLog, template: str) -> Rendered:
    """The rendering and answer spans, or None after reporting the template's refusal as a row error."""
    try:
        return assistant_spans(tokenizer, example)
    except DataError as err:
        which = f" Template: {template}." if template else ""
        errors.bad(
            f"{example.where}: {str(err).rstrip('.')}.{which} Change the row (templates of the Mistral, Llama-2 "
            f"and Gemma families refuse turns that do not alternate user/assistant, and some refuse a system turn), "
            f"use another data.chat_template, or set data.on_error: skip to skip and count such rows."
        )
        return None


def _label_batch(encoded: Future, rendered: list[Rendered], eos_id: int, end_ids: set[int]) -> list[Encoded | None]:
    encodings = iter(encoded.result())
    results: list[Encoded | None] = []
    for item in rendered:
        if item is None:
            results.append(None)
            continue
        encoding = next(encodings)
        ids = list(encoding.ids)
        results.append(_end_at_last_answer(ids, _answer_labels(ids, encoding, item[1]), eos_id, end_ids))
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

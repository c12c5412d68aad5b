"""Render examples with the chat template, tokenize in batches, and label only what should carry loss.

Each conversation is rendered once in full and tokenized once with character offsets. Each answer's
character span is found in the conversation rendered up to and including it: it starts after the prompt
for that turn (the generation prompt, or wherever the template puts the answer for an assistant-first row)
and ends with the answer's own end-of-turn token (`templates.end_of_turn_tokens`), so a prefix, a header
or text the template appends after an answer is never trained. A token carries loss when it starts inside
an answer span (or always, with responses-only off). If the template writes no end-of-turn token, EOS is
appended, so the model learns to stop. Where the whole conversation renders an answer differently from
how it renders as the last turn, each answer becomes its own sequence (see `encode_kept`).

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
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from llmtune.data.errors import DataError, ErrorLog
from llmtune.data.formats import Example
from llmtune.data.templates import end_of_turn_ids, end_of_turn_tokens, template_variables

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
            messages,
            tools=tools,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **template_variables(),  # a fixed date (data.template_date)
        )
        return str(text)
    except Exception as err:  # jinja raises TemplateError and its own exceptions; raise_exception() refusals too
        roles = ", ".join(m["role"] for m in messages)
        raise DataError(f"the chat template refused the conversation (turns: {roles}): {err}") from None


class TurnRenderedDifferently(DataError):
    """The template renders an answer differently once later turns follow (e.g. it strips earlier reasoning)."""


# Stands in for an answer's content to find where the template puts it; a private-use character, so no
# template edits or escapes it.
SENTINEL = "\ue000llmtune-answer\ue000"


def assistant_spans(
    tokenizer: Any, example: Example, end_tokens: Sequence[str] | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the character spans [start, end) of each trained answer (end-of-turn included).

    Answers are the assistant turns that say something or call a tool; empty or weight-0 assistant turns
    stay in the prompt without loss, and tool results (role tool) are prompt too. Each answer's span is
    found in the conversation rendered up to and including that answer (`answer_span`), so what the template
    writes before it (BOS, default system prompt, date, header) or after its end-of-turn token (the next
    header) is never trained. TurnRenderedDifferently when the whole conversation renders an answer otherwise.
    """
    messages, tools = example.messages(), example.tool_schemas()
    ends = end_of_turn_tokens(tokenizer) if end_tokens is None else end_tokens
    full = render(tokenizer, messages, add_generation_prompt=False, tools=tools)
    spans = []
    for i, turn in enumerate(example.turns):
        if not turn.is_answer:
            continue
        last = i == len(messages) - 1
        through = full if last else render(tokenizer, messages[: i + 1], add_generation_prompt=False, tools=tools)
        start, end = answer_span(tokenizer, messages, i, through, ends, tools)
        if full[:end] != through[:end]:
            raise TurnRenderedDifferently(_rendered_differently(example, i, through[:end], full))
        spans.append((start, end))
    return full, spans


def answer_span(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    i: int,
    through: str,
    ends: Sequence[str],
    tools: list[dict[str, Any]] | None = None,
) -> tuple[int, int]:
    """Where answer `i` is in `through` (the conversation rendered up to it): from after its header to its
    end-of-turn token, or to the end of its content where the template writes no such token.

    >>> from llmtune.demo import make_demo_rows, build_demo_tokenizer
    >>> tok = build_demo_tokenizer(make_demo_rows(5))
    >>> messages = [{"role": "assistant", "content": "Hello!"}]
    >>> through = render(tok, messages, add_generation_prompt=False)
    >>> start, end = answer_span(tok, messages, 0, through, ["<|im_end|>"])
    >>> through[:start], through[start:end]
    ('<|im_start|>assistant\\n', 'Hello!<|im_end|>')
    """
    start = _answer_start(tokenizer, messages, i, through, tools)
    content = str(messages[i].get("content") or "").strip()
    at = through.find(content, start) if content else -1
    after = at + len(content) if at >= 0 else start  # tool calls and closing tags may follow the content
    hits = [(position, token) for token in ends if (position := through.find(token, after)) >= 0]
    if hits:
        position, token = min(hits)
        return start, position + len(token)
    return start, after if at >= 0 else len(through.rstrip())


def _answer_start(
    tokenizer: Any, messages: list[dict[str, Any]], i: int, through: str, tools: list[dict[str, Any]] | None
) -> int:
    """Where answer `i` starts: after the generation prompt for the turns before it.

    An assistant-first answer has no turns before it (transformers renders no empty conversation): it starts
    after the assistant header the generation prompt writes, found before a stand-in content, so that a
    default system prompt, a date block or BOS before it is prompt.
    """
    if i:
        context = render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
        if through.startswith(context):
            return len(context)
    probe = [*messages[:i], {**messages[i], "content": SENTINEL}]
    before = render(tokenizer, probe, add_generation_prompt=False, tools=tools).split(SENTINEL)[0]
    if SENTINEL in through or not through.startswith(before):
        raise DataError(
            f"the chat template does not write assistant turn {i + 1} after the turns before it (the text rendered "
            f"up to that turn does not start with the prompt for it), so the answer cannot be located"
        )
    header = _generation_header(tokenizer, tools)
    return before.rindex(header) + len(header) if header and header in before else len(before)


def _generation_header(tokenizer: Any, tools: list[dict[str, Any]] | None) -> str:
    """What the generation prompt adds after a turn (e.g. '<|im_start|>assistant\\n'); '' if nothing or refused."""
    probe = [{"role": "user", "content": SENTINEL}]
    try:
        plain = render(tokenizer, probe, add_generation_prompt=False, tools=tools)
        prompted = render(tokenizer, probe, add_generation_prompt=True, tools=tools)
    except DataError:
        return ""
    return prompted[len(plain) :] if prompted.startswith(plain) else ""


def prompt_for_last_answer(tokenizer: Any, example: Example) -> tuple[str, str]:
    """The rendered prompt up to the last trained answer, and that answer (the reference for generation metrics).

    The prompt is the text before the answer's span in training, so evaluation prompts equal training contexts
    (assistant-first rows included). A tool-call answer's reference is the call as the template writes it,
    which is what the model generates.
    """
    messages, tools = example.messages(), example.tool_schemas()
    last = max(i for i, turn in enumerate(example.turns) if turn.is_answer)
    through = render(tokenizer, messages[: last + 1], add_generation_prompt=False, tools=tools)
    ends = end_of_turn_tokens(tokenizer)
    start, end = answer_span(tokenizer, messages, last, through, ends, tools)
    if example.turns[last].content.strip() and not example.turns[last].tool_calls:
        return through[:start], example.turns[last].content.strip()
    answer = through[start:end].strip()
    ending = next((token for token in ends if answer.endswith(token)), "")
    return through[:start], answer[: len(answer) - len(ending)].strip()


def instruction_for_last_answer(example: Example) -> str:
    """What the last trained answer replies to, as plain text without template markup: the user turn before it
    (or, when none, the nearest earlier turn), for tables where the rendered prompt would hide it.

    >>> instruction_for_last_answer(Example(turns=(("system", "Be brief."), ("user", "2+2?"), ("assistant", "4"))))
    '2+2?'
    """
    last = max(i for i, turn in enumerate(example.turns) if turn.is_answer)
    before = example.turns[:last]
    asked = [turn for turn in before if turn.role == "user"] or list(before)
    return asked[-1].content.strip() if asked else ""


def encode_examples(tokenizer: Any, examples: Sequence[Example], responses_only: bool) -> list[Encoded]:
    """Token ids and labels for each example; a conversation the template refuses raises DataError naming its row."""
    encoded, _ = encode_kept(tokenizer, examples, responses_only, ErrorLog("raise"))
    return encoded


def encode_kept(
    tokenizer: Any, examples: Sequence[Example], responses_only: bool, errors: ErrorLog, template: str = ""
) -> tuple[list[Encoded], list[Example]]:
    """Encode in batches (the fast tokenizer runs in Rust); a refused row goes to `errors` (raised or skipped).

    `template` names the chat template in refusals (e.g. 'data.chat_template=gemma'). Returns the encoded
    sequences and the examples they came from, without the skipped ones. A conversation whose template
    renders earlier answers differently once later turns follow (Qwen3 and DeepSeek-R1 strip earlier
    reasoning, some templates render the last answer specially) becomes one sequence per answer, each
    answer trained in the form it has when it is the last turn, as at inference; `errors.split` counts them.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("A fast (Rust) tokenizer is needed to locate answer tokens; this one is a slow tokenizer.")
    batches = [examples[start : start + BATCH] for start in range(0, len(examples), BATCH)]
    if batches and batches[0][0].is_text:
        kept = [pair for batch in batches for pair in zip(_encode_text_batch(tokenizer, batch), batch, strict=True)]
    else:
        kept = _encode_chat_batches(tokenizer, batches, errors, template)
    if not responses_only:
        kept = [(Encoded(e.input_ids, list(e.input_ids)), ex) for e, ex in kept]
    return [enc for enc, _ in kept], [ex for _, ex in kept]


Piece = tuple[Example, str, list[tuple[int, int]]]  # an example (or one answer of it), its text, its answer spans


def _encode_chat_batches(
    tokenizer: Any, batches: list[Sequence[Example]], errors: ErrorLog, template: str
) -> list[tuple[Encoded, Example]]:
    """Render and label in Python while the Rust tokenizer (which releases the GIL) encodes the batch before.

    Tokenizing is most of the work and runs on every core; overlapping the single-threaded template
    rendering and labelling with it keeps both cores busy. A refused row yields nothing.
    """
    # The Rust tokenizer directly: transformers' per-row conversion of offsets costs more than tokenizing.
    backend = tokenizer.backend_tokenizer
    if backend.padding is not None:  # left on by an earlier padded call (e.g. generation): ids must be unpadded
        backend.no_padding()
    encode = partial(backend.encode_batch, add_special_tokens=False)
    ends = end_of_turn_tokens(tokenizer)
    end_ids = set(end_of_turn_ids(tokenizer))
    out: list[tuple[Encoded, Example]] = []
    pending: tuple[Future, list[Piece]] | None = None
    with ThreadPoolExecutor(max_workers=1) as tokenizing:
        for batch in batches:
            pieces = [piece for example in batch for piece in _pieces(tokenizer, example, errors, template, ends)]
            submitted = tokenizing.submit(encode, [text for _, text, _ in pieces])
            if pending:
                out += _label_batch(*pending, tokenizer.eos_token_id, end_ids)
            pending = (submitted, pieces)
        if pending:
            out += _label_batch(*pending, tokenizer.eos_token_id, end_ids)
    return out


def _pieces(tokenizer: Any, example: Example, errors: ErrorLog, template: str, ends: Sequence[str]) -> list[Piece]:
    """The example with its answer spans; one piece per answer where the template renders earlier answers
    differently; nothing after reporting the template's refusal as a row error."""
    try:
        try:
            full, spans = assistant_spans(tokenizer, example, ends)
            return [(example, full, spans)]
        except TurnRenderedDifferently as differently:
            errors.note_split(f"{example.where}: {differently}")
            return [_one_answer(tokenizer, example, i, ends) for i, t in enumerate(example.turns) if t.is_answer]
    except DataError as err:
        which = f" Template: {template}." if template else ""
        errors.bad(
            f"{example.where}: {str(err).rstrip('.')}.{which} Change the row (templates of the Mistral, Llama-2 "
            f"and Gemma families refuse turns that do not alternate user/assistant, and some refuse a system turn), "
            f"use another data.chat_template, or set data.on_error: skip to skip and count such rows."
        )
        return []


def _one_answer(tokenizer: Any, example: Example, i: int, ends: Sequence[str]) -> Piece:
    """The conversation up to answer `i`, only that answer trained (the earlier ones are its context)."""
    turns = tuple(replace(t, trained=False) if j < i else t for j, t in enumerate(example.turns[: i + 1]))
    through = replace(example, turns=turns)
    full, spans = assistant_spans(tokenizer, through, ends)
    return through, full, spans


def _rendered_differently(example: Example, i: int, alone: str, full: str) -> str:
    """What the template did: the first place where answer `i` rendered last differs from the whole conversation."""
    at = next((k for k, (a, b) in enumerate(zip(alone, full, strict=False)) if a != b), min(len(alone), len(full)))
    window = slice(max(0, at - 30), at + 30)
    return (
        f"the chat template renders turn {i + 1} (assistant) differently once later turns follow: as the last turn "
        f"it reads {alone[window]!r}, in the whole conversation {full[window]!r}; each answer is trained in its "
        f"own sequence, in the form the model sees at inference"
    )


def _label_batch(encoded: Future, pieces: list[Piece], eos_id: int, end_ids: set[int]) -> list[tuple[Encoded, Example]]:
    results = []
    for (example, _, spans), encoding in zip(pieces, encoded.result(), strict=True):
        ids = list(encoding.ids)
        results.append((_end_at_last_answer(ids, _answer_labels(ids, encoding, spans), eos_id, end_ids), example))
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

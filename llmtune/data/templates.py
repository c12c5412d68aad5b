"""Chat templates: the tokenizer's own by default, a named one for base models that ship none, or a Jinja file.

The named templates are written for this project from each family's documented prompt format: `chatml`,
`llama-3`, `mistral` (the [INST] instruct format), `gemma`, `phi-3` and `alpaca`. A named template's
end-of-turn marker becomes the tokenizer's EOS when it is a single token, so the token the model learns
to end an answer with is the one generation stops on. `data.chat_template` may also be the path of a
Jinja file, used as it is. The configured tokenizer is saved with the prepared data, the adapter and the
merged model, so every stage renders the same way.

Mistral and Gemma have no system role: their templates put a system prompt at the start of the first user
turn, and refuse (as a row error) conversations whose user/assistant turns do not alternate.

Example:
    >>> from transformers import PreTrainedTokenizerFast
    >>> from tokenizers import Tokenizer, models
    >>> tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1}, "<unk>")),
    ...                               eos_token="</s>", unk_token="<unk>")
    >>> configure_tokenizer(tok, "alpaca")
    'alpaca'
    >>> print(tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True))
    ### Instruction:
    Hi
    <BLANKLINE>
    ### Response:
    <BLANKLINE>
    >>> _ = configure_tokenizer(tok, "mistral")
    >>> tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
    ...                          {"role": "assistant", "content": "Hello"}], tokenize=False)
    '[INST] Be brief.\\n\\nHi [/INST] Hello</s>'
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from llmtune.config import CHAT_TEMPLATE_NAMES
from llmtune.data.errors import DataError
from llmtune.data.formats import Example


def chatml_template(end_of_turn: str = "<|im_end|>") -> str:
    """ChatML; `end_of_turn` replaces <|im_end|> for tokenizers that do not have that token."""
    return (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '" + end_of_turn + "' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Stanford Alpaca's prompt layout; a system message becomes the preamble, turns repeat for multi-turn data.
ALPACA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)


def _alternating_turns(family: str) -> str:
    """Jinja that splits off a first system turn (`system`, `turns`) and refuses what the family cannot render:
    a system turn later on, other roles (tool), and user/assistant turns that do not alternate from user."""
    refuse = "{{ raise_exception('The " + family + " chat template "
    return (
        "{% if messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
        "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
        "{% for message in turns %}"
        "{% if message['role'] == 'system' %}"
        + refuse
        + "takes one system turn, the first; it goes into the first user turn.') }}"
        "{% elif message['role'] not in ('user', 'assistant') %}"
        + refuse
        + "has no ' + message['role'] + ' role; it renders user and assistant turns only.') }}"
        "{% elif (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        + refuse
        + "needs turns that alternate user/assistant/user/assistant/..., starting with user.') }}"
        "{% endif %}{% endfor %}"
    )


# Mistral's instruct format: <s>[INST] question [/INST] answer</s>[INST] ... A system prompt opens the first
# [INST] block (the format has no system role), so earlier turns render the same once later ones follow.
MISTRAL_TEMPLATE = (
    _alternating_turns("mistral") + "{{ bos_token }}{% for message in turns %}"
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (system + '\n\n' if loop.first and system else '') + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

# Gemma's turns: <start_of_turn>user|model ... <end_of_turn>; no system role, so it opens the first user turn.
GEMMA_TEMPLATE = (
    _alternating_turns("gemma") + "{{ bos_token }}{% for message in turns %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\n' }}"
    "{{ (system + '\n\n' if loop.first and system else '') + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# Phi-3's turns: <|system|>, <|user|>, <|assistant|> headers, each turn ending with <|end|>.
PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ('system', 'user', 'assistant') %}"
    "{{ raise_exception('The phi-3 chat template has no ' + message['role'] + ' role; it renders system, user "
    "and assistant turns only.') }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class NamedTemplate:
    """A named template: its Jinja source, the special tokens of its family it needs, and its end-of-turn token."""

    jinja: str
    needs_tokens: tuple[str, ...] = ()
    end_of_turn: str | None = None  # becomes EOS: what answers end with and generation stops on


NAMED_TEMPLATES = {
    "llama-3": NamedTemplate(LLAMA3_TEMPLATE, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|eot_id|>"),
    "mistral": NamedTemplate(MISTRAL_TEMPLATE),
    "gemma": NamedTemplate(GEMMA_TEMPLATE, ("<start_of_turn>", "<end_of_turn>"), "<end_of_turn>"),
    "phi-3": NamedTemplate(PHI3_TEMPLATE, ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), "<|end|>"),
    "alpaca": NamedTemplate(ALPACA_TEMPLATE),
}  # chatml is built per tokenizer (its end-of-turn token falls back to EOS)
TEMPLATE_NAMES = CHAT_TEMPLATE_NAMES
assert set(TEMPLATE_NAMES) == {"chatml", *NAMED_TEMPLATES}
CHATML_TEMPLATE = chatml_template()


def configure_tokenizer(tokenizer: Any, template: str | None, pad_token: str | None = None) -> str:
    """Set the chat template (a name, a Jinja file, or check the tokenizer's own) and a pad token distinct from EOS
    and the end-of-turn tokens (`pad_token` when given, see `set_distinct_pad_token`).

    Returns what is in use: the name, the file's path, or 'tokenizer' for the tokenizer's own.
    """
    if template in TEMPLATE_NAMES:
        _apply_named(tokenizer, template)
    elif template:
        tokenizer.chat_template = read_template_file(template)
        _check_compiles(tokenizer, template)
    elif not tokenizer.chat_template:
        raise DataError(
            "The tokenizer has no chat template (usual for base models). Set data.chat_template to one of "
            f"{', '.join(TEMPLATE_NAMES)} or the path of a Jinja file, or use data.format=text for plain "
            "completion data."
        )
    set_distinct_pad_token(tokenizer, pad_token)
    return template or "tokenizer"


def describe_template(tokenizer: Any, template: str) -> str:
    """How messages name the template in use (`template` as `configure_tokenizer` returned it).

    >>> describe_template(None, "gemma")
    'data.chat_template=gemma'
    """
    if template == "tokenizer":
        return f"the chat template of the tokenizer '{tokenizer.name_or_path}'"
    return f"data.chat_template={template}"


def read_template_file(path: str) -> str:
    """The text of a Jinja chat template file; DataError naming the file when it cannot be read."""
    file = Path(path)
    if not file.is_file():
        raise DataError(
            f"data.chat_template: '{path}' is neither a template name ({', '.join(TEMPLATE_NAMES)}) nor an "
            f"existing file. Give the path of a Jinja chat template file, or one of the names."
        )
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"data.chat_template: '{path}' is not UTF-8 text; save the Jinja template as UTF-8.") from None


def _check_compiles(tokenizer: Any, path: str) -> None:
    """Render a one-turn chat so that a syntax error is reported with the file and line, before any row."""
    from jinja2 import TemplateSyntaxError

    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    except TemplateSyntaxError as err:
        raise DataError(f"data.chat_template: {path}, line {err.lineno}: Jinja syntax error: {err.message}.") from None
    except Exception:  # a template may refuse this probe conversation; rows are checked one by one later
        return


def _apply_named(tokenizer: Any, name: str) -> None:
    vocab = tokenizer.get_vocab()
    if name == "chatml":
        end = "<|im_end|>" if "<|im_end|>" in vocab else tokenizer.eos_token
        tokenizer.chat_template = chatml_template(end)
        tokenizer.eos_token = end
    else:
        named = NAMED_TEMPLATES[name]
        missing = [t for t in named.needs_tokens if t not in vocab]
        if missing:
            raise DataError(
                f"data.chat_template={name} needs the {name} family's special tokens, and this tokenizer lacks "
                f"{', '.join(missing)}. Use chatml, mistral or alpaca (any tokenizer), or a Jinja file."
            )
        tokenizer.chat_template = named.jinja
        if named.end_of_turn:  # e.g. Llama-3 base tokenizers end with <|end_of_text|>; turns end with <|eot_id|>
            tokenizer.eos_token = named.end_of_turn
    if tokenizer.eos_token is None:
        raise DataError(f"The tokenizer has no EOS token, which the '{name}' template needs to end answers.")


# Tokens families reserve for padding or leave unused, tried before any other unused special token.
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|fim_pad|>", "<pad>", "[PAD]", "<|pad|>", "<|dummy_0|>")


def set_distinct_pad_token(tokenizer: Any, pad_token: str | None = None) -> str:
    """Pad with a token that is neither EOS nor an end-of-turn token, and say which and why.

    Collators mask pad positions, which would also mask the EOS the model must learn. `pad_token`
    (data.pad_token) is used when given; else the tokenizer's pad when distinct, else a family's pad token,
    else a special token the template never writes (Phi-4-mini, DeepSeek-R1-Distill and Qwen2.5 base
    tokenizers pad with EOS but carry unused ones), else unk.

    >>> from llmtune.demo import make_demo_rows, build_demo_tokenizer
    >>> tok = build_demo_tokenizer(make_demo_rows(5))
    >>> tok.pad_token = tok.eos_token
    >>> set_distinct_pad_token(tok)
    "<pad> (the tokenizer's pad was EOS)"
    """
    ending = {*end_of_turn_tokens(tokenizer), tokenizer.eos_token}
    if pad_token:
        return _use_configured_pad(tokenizer, pad_token, ending)
    if tokenizer.pad_token is not None and tokenizer.pad_token not in ending:
        return f"{tokenizer.pad_token} (the tokenizer's)"
    why = "the tokenizer's pad was EOS" if tokenizer.pad_token else "the tokenizer has none"
    vocab, source = tokenizer.get_vocab(), _template_source(tokenizer) + _probe_renderings(tokenizer)
    reserved = [t for t in PAD_CANDIDATES if t in vocab and t not in ending]
    unused = [
        t
        for t in sorted(_special_tokens(tokenizer), key=vocab.get)
        if t not in source and t not in ending and t not in (tokenizer.bos_token, tokenizer.unk_token)
    ]
    fallback = [tokenizer.unk_token] if tokenizer.unk_token and tokenizer.unk_token not in ending else []
    chosen = next(iter((*reserved, *unused, *fallback)), None)
    if chosen:
        tokenizer.pad_token = chosen
        return f"{chosen} ({why})"
    raise DataError(
        f"The tokenizer has no token to pad with other than EOS or an end-of-turn token ({', '.join(sorted(ending))})"
        "; padding with those would stop the model from learning to end its answers. Set data.pad_token to a token "
        "of the tokenizer's vocabulary that the data never uses."
    )


def _use_configured_pad(tokenizer: Any, pad_token: str, ending: set[str]) -> str:
    if pad_token in ending:
        raise DataError(
            f"data.pad_token '{pad_token}' ends answers (EOS or an end-of-turn token of the chat template): pad "
            f"positions are masked, so the model would not learn to stop. Choose another token, or null to pick one."
        )
    if pad_token not in tokenizer.get_vocab():
        raise DataError(
            f"data.pad_token '{pad_token}' is not in the tokenizer's vocabulary; use one of its tokens (an unused "
            f"special token, e.g. {', '.join(PAD_CANDIDATES[:3])}), or null to pick one."
        )
    tokenizer.pad_token = pad_token
    return f"{pad_token} (data.pad_token)"


# End-of-turn tokens of the families we know, counted when the template writes them literally even where the
# probe below does not reach them (Llama-3.1's <|eom_id|> follows built-in tool calls only).
KNOWN_END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>", "<|END_OF_TURN_TOKEN|>")
_PROBE_ANSWER = "llmtune probe answer"
_PROBES = (
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE_ANSWER}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE_ANSWER}] * 2,
)


def end_of_turn_tokens(tokenizer: Any) -> list[str]:
    """Every token that ends an assistant turn: what a trained answer ends with, and what generation stops at.

    Found by rendering probe conversations and reading the special tokens the template writes right after
    the answer (EOS or a known end-of-turn token among them, else the first), plus EOS, plus the known
    end-of-turn tokens (<|eot_id|>, <end_of_turn>, ...) that the template writes and the tokenizer has as
    special tokens. Evaluation and chat stop on all of them.

    >>> from llmtune.demo import make_demo_rows, build_demo_tokenizer
    >>> tok = build_demo_tokenizer(make_demo_rows(5))
    >>> end_of_turn_tokens(tok)
    ['<|im_end|>']
    >>> tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    2
    >>> tok.chat_template = GEMMA_TEMPLATE
    >>> end_of_turn_tokens(tok)  # the template's marker first, then EOS
    ['<end_of_turn>', '<|im_end|>']
    """
    special = _special_tokens(tokenizer)
    found = [token for probe in _PROBES for token in _tokens_after_probe_answers(tokenizer, probe, special)]
    source = _template_source(tokenizer)
    known = [t for t in KNOWN_END_OF_TURN if t in special and t in source]
    return list(dict.fromkeys(t for t in (*found, tokenizer.eos_token, *known) if t))


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The ids of `end_of_turn_tokens`: pass them as `eos_token_id` to `generate` to stop where answers end."""
    return [int(tokenizer.convert_tokens_to_ids(token)) for token in end_of_turn_tokens(tokenizer)]


def _special_tokens(tokenizer: Any) -> list[str]:
    """The tokenizer's special tokens, longest first (so that a token is not read as a shorter one it starts with)."""
    added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special]
    return sorted({*added, *tokenizer.all_special_tokens}, key=lambda token: (-len(token), token))  # stable order


def _tokens_after_probe_answers(tokenizer: Any, probe: list[dict[str, str]], special: list[str]) -> list[str]:
    try:
        text = str(tokenizer.apply_chat_template(probe, tokenize=False))
    except Exception:  # a template may refuse the probe (roles it does not take); the other sources still count
        return []
    found = []
    for part in text.split(_PROBE_ANSWER)[1:]:
        run = _special_run(part, special)
        ending = [t for t in run if t == tokenizer.eos_token or t in KNOWN_END_OF_TURN] or run
        found += ending[:1]
    return found


def _special_run(text: str, special: list[str]) -> list[str]:
    """The special tokens at the start of `text`, one after another (whitespace between them allowed).

    Templates may close an answer with several (Command-R's <|END_RESPONSE|><|END_OF_TURN_TOKEN|>), and some
    write the next turn's header right after; the caller picks the end-of-turn one.
    """
    run: list[str] = []
    rest = text.lstrip(" \n")
    while token := next((t for t in special if rest.startswith(t)), None):
        run.append(token)
        rest = rest[len(token) :].lstrip(" \n")
    return run


def _probe_renderings(tokenizer: Any) -> str:
    """The probe conversations as the template renders them (with a system turn): tokens a template builds from
    parts, like '<|' + role + '|>', show here and not in its source."""
    texts = []
    for probe in (*_PROBES, [{"role": "system", "content": "S"}, *_PROBES[0]]):
        try:
            texts.append(str(tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)))
        except Exception:  # a template may refuse a probe (no system role); the others still count
            continue
    return "".join(texts)


def _template_source(tokenizer: Any) -> str:
    template = tokenizer.chat_template
    if isinstance(template, dict):
        return "".join(str(t) for t in template.values())
    return str(template or "")


def check_renders_tools(tokenizer: Any, template_name: str, examples: Sequence[Example]) -> None:
    """Refuse tool rows when the template never reads `tools` / `tool_calls`: it would drop them without a word.

    Templates that render tools (Qwen2.5, Llama-3.1, Hermes-style ChatML) read both names; one that reads
    neither renders a tool call as an empty assistant turn and the schemas not at all.
    """
    with_tools = next((e for e in examples if e.uses_tools()[0]), None)
    with_calls = next((e for e in examples if e.uses_tools()[1]), None)
    if with_tools is None and with_calls is None:
        return
    source = str(tokenizer.get_chat_template(tools=[{}] if with_tools else None))  # a dict picks its tool_use one
    missing = [
        (name, example)
        for name, example in (("tools", with_tools), ("tool_calls", with_calls))
        if example is not None and name not in source
    ]
    if missing:
        name, example = missing[0]
        which = (
            f"The chat template of the tokenizer '{tokenizer.name_or_path}'"
            if template_name == "tokenizer"
            else f"The chat template data.chat_template={template_name}"
        )
        what = "tool schemas (a tools column)" if name == "tools" else "assistant tool calls"
        raise DataError(
            f"{which} cannot render tools: it never reads `{name}`, so the {what} of rows like {example.where} "
            f"would be left out of training. Use a model whose chat template renders tools and tool calls "
            f"(e.g. Qwen2.5, Llama-3.1 or Hermes-style templates), or remove the tool columns and turns."
        )


_TEMPLATE_VARIABLES: ContextVar[dict[str, Any] | None] = ContextVar("template_variables", default=None)


@contextmanager
def template_date(day: str | None) -> Iterator[None]:
    """Render chat templates with `day` (YYYY-MM-DD, data.template_date) as today; None leaves the real date.

    Templates print today through transformers' `strftime_now` (Llama-3.2) or a `date_string` variable
    (Llama-3.1); both are template variables, so `render` passes them (`template_variables`).

    >>> with template_date("2026-01-15"):
    ...     template_variables()["strftime_now"]("%d %b %Y"), template_variables()["date_string"]
    ('15 Jan 2026', '15 Jan 2026')
    >>> template_variables()
    {}
    """
    if day is None:
        yield
        return
    fixed = date.fromisoformat(day)
    token = _TEMPLATE_VARIABLES.set({"strftime_now": fixed.strftime, "date_string": fixed.strftime("%d %b %Y")})
    try:
        yield
    finally:
        _TEMPLATE_VARIABLES.reset(token)


def template_variables() -> dict[str, Any]:
    """Extra variables for `apply_chat_template` in the current `template_date` context."""
    return dict(_TEMPLATE_VARIABLES.get() or {})


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of how the tokenizer renders and tokenizes chats: its chat template's source and renderings
    of probe conversations, its special tokens and vocabulary size. The prepare step's cache key includes it, so
    an edited chat_template.jinja (or a new upstream revision) prepares the data again.

    >>> from llmtune.demo import make_demo_rows, build_demo_tokenizer
    >>> tok = build_demo_tokenizer(make_demo_rows(5))
    >>> before = tokenizer_fingerprint(tok)
    >>> tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    >>> before != tokenizer_fingerprint(tok), len(before)
    (True, 16)
    """
    digest = hashlib.sha256(_template_source(tokenizer).encode())
    for probe in _PROBES:
        try:
            digest.update(str(tokenizer.apply_chat_template(probe, tokenize=False)).encode())
        except Exception:  # no template, or one that refuses the probe: its source is in the hash already
            digest.update(b"-")
    special = {"special": _special_tokens(tokenizer), "map": tokenizer.special_tokens_map, "size": len(tokenizer)}
    digest.update(json.dumps(special, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def tokenizer_cache_key(name: str, revision: str | None, trust_remote_code: bool = False) -> str:
    """`tokenizer_fingerprint` of the model's tokenizer at `revision` (model.revision), with the revision; for
    pipelines to key the prepare step's cache on. A tokenizer that cannot be loaded here keys on the name and
    revision alone (the step reports the problem when it loads it)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except Exception:
        return f"{name}@{revision or 'default'}"
    return f"{revision or 'default'}:{tokenizer_fingerprint(tokenizer)}"

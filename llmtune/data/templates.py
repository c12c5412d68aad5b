"""Chat templates: the tokenizer's own by default, or a named one for base models that ship none.

A named template's end-of-turn marker becomes the tokenizer's EOS when it is a single token, so the
token the model learns to end an answer with is the one generation stops on. The configured tokenizer
is saved with the prepared data, the adapter and the merged model, so every stage renders the same way.

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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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

TEMPLATE_NAMES = ("chatml", "llama-3", "alpaca")
CHATML_TEMPLATE = chatml_template()


def configure_tokenizer(tokenizer: Any, template_name: str | None) -> str:
    """Set the chat template (named, or check the tokenizer's own) and a pad token distinct from EOS.

    Returns the name of the template in use ('tokenizer' for the tokenizer's own).
    """
    if template_name:
        _apply_named(tokenizer, template_name)
    elif not tokenizer.chat_template:
        raise DataError(
            "The tokenizer has no chat template (usual for base models). Set data.chat_template to one of "
            f"{', '.join(TEMPLATE_NAMES)}, or use data.format=text for plain completion data."
        )
    set_distinct_pad_token(tokenizer)
    return template_name or "tokenizer"


def _apply_named(tokenizer: Any, name: str) -> None:
    vocab = tokenizer.get_vocab()
    if name == "chatml":
        end = "<|im_end|>" if "<|im_end|>" in vocab else tokenizer.eos_token
        tokenizer.chat_template = chatml_template(end)
        tokenizer.eos_token = end
    elif name == "llama-3":
        missing = [t for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>") if t not in vocab]
        if missing:
            raise DataError(
                f"data.chat_template=llama-3 needs the Llama-3 special tokens, and this tokenizer lacks "
                f"{', '.join(missing)}. Use chatml or alpaca instead."
            )
        tokenizer.chat_template = LLAMA3_TEMPLATE
        tokenizer.eos_token = "<|eot_id|>"  # Llama-3 base tokenizers end with <|end_of_text|>; turns end here
    elif name == "alpaca":
        tokenizer.chat_template = ALPACA_TEMPLATE
    else:
        raise DataError(f"Unknown data.chat_template '{name}'; use one of {', '.join(TEMPLATE_NAMES)} or null.")
    if tokenizer.eos_token is None:
        raise DataError(f"The tokenizer has no EOS token, which the '{name}' template needs to end answers.")


def set_distinct_pad_token(tokenizer: Any) -> None:
    """Padding must not be EOS: collators mask pad positions, which would also mask the EOS the model must learn."""
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    vocab = tokenizer.get_vocab()
    candidates = [
        t
        for t in ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>", "<pad>", "[PAD]", tokenizer.unk_token)
        if t and t in vocab and t != tokenizer.eos_token
    ]
    if candidates:
        tokenizer.pad_token = candidates[0]
    else:
        raise DataError(
            "The tokenizer has no token to pad with other than EOS; padding with EOS would stop the model "
            "from learning to end its answers. Use a tokenizer with a pad, unk or reserved token."
        )


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

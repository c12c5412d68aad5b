"""Response masking per assistant turn on the chat templates of seven families, written for this project after each
family's documented behaviour (tests/fixtures/data/templates/families): only each answer and its own end-of-turn
token are trained, never BOS, a default system prompt, a date block, a header or text the template writes after the
answer; templates that render earlier answers differently train each answer in its own sequence; evaluation prompts
equal training contexts. Tokenizer-level: the demo BPE vocabulary with each family's special tokens and EOS."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from llmtune.data import DataError, ErrorLog, Example, Turn, configure_tokenizer, encode_kept
from llmtune.data.encode import prompt_for_last_answer
from llmtune.data.report import marked_segments
from llmtune.data.templates import end_of_turn_tokens
from llmtune.demo import build_demo_tokenizer, make_demo_rows

FAMILIES_DIR = Path(__file__).resolve().parent / "fixtures" / "data" / "templates" / "families"
# Each family's special tokens and EOS, as their tokenizers have them.
FAMILIES: dict[str, tuple[list[str], str]] = {
    "llama3": (["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"], "<|eot_id|>"),
    "qwen2": ([], "<|im_end|>"),
    "qwen3": (["<think>", "</think>"], "<|im_end|>"),
    "gemma": (["<start_of_turn>", "<end_of_turn>", "<eos>"], "<eos>"),
    "mistral": (
        [
            "[INST]",
            "[/INST]",
            "[TOOL_CALLS]",
            "[AVAILABLE_TOOLS]",
            "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]",
            "</s>",
        ],
        "</s>",
    ),
    "phi3": (["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"], "<|endoftext|>"),
    "command_r": (
        [
            "<|START_OF_TURN_TOKEN|>",
            "<|END_OF_TURN_TOKEN|>",
            "<|SYSTEM_TOKEN|>",
            "<|USER_TOKEN|>",
            "<|CHATBOT_TOKEN|>",
            "<|START_RESPONSE|>",
            "<|END_RESPONSE|>",
            "<|START_ACTION|>",
            "<|END_ACTION|>",
        ],
        "<|END_OF_TURN_TOKEN|>",
    ),
}
CALL = json.dumps([{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}])
TOOLS = json.dumps([{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}])


def chat(*pairs: tuple[str, str]) -> Example:
    return Example(turns=tuple(Turn(role, content) for role, content in pairs))


ROWS = {
    "single": chat(("user", "Spell 4."), ("assistant", "four")),
    "multi": chat(("user", "Spell 4."), ("assistant", "four"), ("user", "And 5?"), ("assistant", "five")),
    "system": chat(("system", "Be brief."), ("user", "Spell 4."), ("assistant", "four")),
    "system_multi": chat(
        ("system", "Be brief."), ("user", "Spell 4."), ("assistant", "four"), ("user", "And 5?"), ("assistant", "five")
    ),
    "system_only": chat(("system", "Be brief."), ("assistant", "Ask me.")),
    "assistant_first": chat(("assistant", "Ask me."), ("user", "Spell 4."), ("assistant", "four")),
    "tool": Example(
        turns=(
            Turn("user", "Weather in Paris?"),
            Turn("assistant", "", tool_calls=CALL),
            Turn("tool", "sunny"),
            Turn("assistant", "It is sunny."),
        ),
        tools=TOOLS,
    ),
}
QWEN_CALL = '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
THINK = "<think>\n\n</think>\n\n"
RESPONSE = "<|START_RESPONSE|>{}<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"


def plain(end: str, call: str) -> dict[str, list[list[str]] | str]:
    """A family that renders every turn the same wherever it is: one sequence, each answer with `end`."""
    return {
        "single": [["four" + end]],
        "multi": [["four" + end, "five" + end]],
        "system": [["four" + end]],
        "system_multi": [["four" + end, "five" + end]],
        "system_only": [["Ask me." + end]],
        "assistant_first": [["Ask me." + end, "four" + end]],
        "tool": [[call, "It is sunny." + end]],
    }


# The trained text of each sequence (one list per sequence), or the refusal the row gets.
EXPECTED: dict[str, dict[str, list[list[str]] | str]] = {
    "llama3": plain("<|eot_id|>", '{"name": "weather", "parameters": {"city": "Paris"}}<|eot_id|>'),
    "qwen2": plain("<|im_end|>", QWEN_CALL),
    # an answer after the last user turn gets an empty think block when last, none once turns follow: one sequence
    # per answer, each in its last-turn form (the form the model generates at inference)
    "qwen3": {
        "single": [[THINK + "four<|im_end|>"]],
        "multi": [[THINK + "four<|im_end|>"], [THINK + "five<|im_end|>"]],
        "system": [[THINK + "four<|im_end|>"]],
        "system_multi": [[THINK + "four<|im_end|>"], [THINK + "five<|im_end|>"]],
        "system_only": [[THINK + "Ask me.<|im_end|>"]],
        "assistant_first": [[THINK + "Ask me.<|im_end|>"], [THINK + "four<|im_end|>"]],
        "tool": [[THINK + QWEN_CALL], [THINK + "It is sunny.<|im_end|>"]],
    },
    "gemma": {
        **plain("<end_of_turn>", ""),
        "system_only": "Conversation roles must alternate",
        "assistant_first": "Conversation roles must alternate",
        "tool": "Conversation roles must alternate",
    },
    # the system prompt moves to the last user turn: one sequence per answer
    "mistral": {
        **plain("</s>", '[TOOL_CALLS][{"name": "weather", "arguments": {"city": "Paris"}}]</s>'),
        "system_multi": [["four</s>"], ["five</s>"]],
    },
    # EOS after a finished conversation is the template's, not the answer's
    "phi3": {**plain("<|end|>", ""), "tool": "This template has no tool role."},
    # the header the template appends after every answer is never trained
    "command_r": {
        **{
            name: [[RESPONSE.format(answer) for answer in sequence] for sequence in sequences]
            for name, sequences in plain("", "").items()
            if name != "tool"
        },
        "tool": [
            [
                '<|START_ACTION|>[{"name": "weather", "arguments": {"city": "Paris"}}]<|END_ACTION|>'
                "<|END_OF_TURN_TOKEN|>",
                RESPONSE.format("It is sunny."),
            ]
        ],
    },
}


@pytest.fixture(scope="module")
def demo_tokenizer() -> Any:
    return build_demo_tokenizer(make_demo_rows(20, seed=0))


def family_tokenizer(base: Any, family: str) -> Any:
    tokens, eos = FAMILIES[family]
    tok = copy.deepcopy(base)
    tok.add_special_tokens({"additional_special_tokens": tokens})
    tok.eos_token = eos
    tok.chat_template = (FAMILIES_DIR / f"{family}.jinja").read_text()
    return tok


def trained_texts(tok: Any, example: Example) -> tuple[list[list[str]], Any, ErrorLog]:
    errors = ErrorLog("raise")
    encoded, _ = encode_kept(tok, [example], responses_only=True, errors=errors)
    texts = [[text for text, trained in marked_segments(tok, e.input_ids, e.labels) if trained] for e in encoded]
    return texts, encoded, errors


def test_every_family_has_every_row() -> None:
    assert set(EXPECTED) == set(FAMILIES) and all(set(rows) == set(ROWS) for rows in EXPECTED.values())


@pytest.mark.parametrize(("family", "row"), [(f, r) for f in FAMILIES for r in ROWS])
def test_only_each_answer_and_its_end_of_turn_token_are_trained(family: str, row: str, demo_tokenizer: Any) -> None:
    tok, expected = family_tokenizer(demo_tokenizer, family), EXPECTED[family][row]
    if isinstance(expected, str):
        with pytest.raises(DataError, match=expected):
            trained_texts(tok, ROWS[row])
        return
    texts, encoded, errors = trained_texts(tok, ROWS[row])
    assert texts == expected
    assert errors.split == (len(expected) > 1)  # a split conversation is counted once
    assert encoded[-1].input_ids[-1] in tok.convert_tokens_to_ids(end_of_turn_tokens(tok))


@pytest.mark.parametrize(("family", "row"), [(f, r) for f in FAMILIES for r in ROWS])
def test_the_eval_prompt_is_the_training_context_of_the_last_answer(family: str, row: str, demo_tokenizer: Any) -> None:
    tok = family_tokenizer(demo_tokenizer, family)
    if isinstance(EXPECTED[family][row], str):
        return
    _, encoded, _ = trained_texts(tok, ROWS[row])
    last = encoded[-1]
    first_trained_of_last_answer = max(
        i for i, label in enumerate(last.labels) if label != -100 and (i == 0 or last.labels[i - 1] == -100)
    )
    prompt, reference = prompt_for_last_answer(tok, ROWS[row])
    assert tok.decode(last.input_ids[:first_trained_of_last_answer]) == prompt
    assert reference == ROWS[row].turns[-1].content


def test_a_split_conversation_says_what_the_template_did(demo_tokenizer: Any) -> None:
    errors = ErrorLog("raise")
    encode_kept(family_tokenizer(demo_tokenizer, "mistral"), [ROWS["system_multi"]], True, errors)
    assert errors.split == 1 and errors.first_split is not None
    assert "turn 3 (assistant) differently once later turns follow" in errors.first_split
    assert "it reads '<s>[INST]Be brief.\\n\\nSpell 4.[/INST]four'" in errors.first_split  # as the last turn
    assert "conversation '<s>[INST]Spell 4.[/INST]four</s>[INST]B" in errors.first_split  # the system turn moved


def test_reasoning_of_earlier_answers_is_trained_where_the_template_keeps_it(demo_tokenizer: Any) -> None:
    """Qwen3 drops an earlier answer's reasoning once a user turn follows: each answer is trained with its own."""
    row = chat(
        ("user", "Spell 4."),
        ("assistant", "<think>f-o-u-r</think>four"),
        ("user", "And 5?"),
        ("assistant", "<think>f-i-v-e</think>five"),
    )
    texts, encoded, _ = trained_texts(family_tokenizer(demo_tokenizer, "qwen3"), row)
    assert texts == [["<think>\nf-o-u-r\n</think>\n\nfour<|im_end|>"], ["<think>\nf-i-v-e\n</think>\n\nfive<|im_end|>"]]
    tok = family_tokenizer(demo_tokenizer, "qwen3")
    assert "f-o-u-r" not in tok.decode(encoded[1].input_ids)  # the second answer's context, as at inference


@pytest.mark.parametrize(("name", "end"), [("chatml", "<|im_end|>"), ("llama-3", "<|eot_id|>")])
def test_named_templates_train_no_prefix_of_an_assistant_first_row(name: str, end: str, demo_tokenizer: Any) -> None:
    tok = copy.deepcopy(demo_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": FAMILIES["llama3"][0]})
    configure_tokenizer(tok, name)
    texts, _, _ = trained_texts(tok, ROWS["assistant_first"])
    assert texts == [["Ask me." + end, "four" + end]]

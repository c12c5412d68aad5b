"""Tool-calling rows (OpenAI messages with tool_calls, LLaMA-Factory ShareGPT function_call/observation) rendered
through the chat template with their tools; calls trained, results masked; templates without tool support refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from llmtune.artifacts import PreparedData
from llmtune.config import ConfigError, DataConfig, load_config
from llmtune.data import DataError, ErrorLog, encode_examples, load_examples, prepare, to_example

FIXTURES = Path(__file__).parent / "fixtures" / "data"
IGNORE = -100
PARIS_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'


@pytest.fixture()
def tools_tokenizer(tiny_model_dir: Path) -> Any:
    """The tiny tokenizer with a Qwen2.5/Hermes-style template that renders tools and tool calls."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = (FIXTURES / "templates" / "tools_chatml.jinja").read_text()
    return tok


def examples_of(name: str, **cfg: Any) -> list[Any]:
    return load_examples(DataConfig(source=str(FIXTURES / name), **cfg), ErrorLog("raise")).examples


def rendered_and_trained(tokenizer: Any, example: Any) -> tuple[str, str]:
    [enc] = encode_examples(tokenizer, [example], responses_only=True)
    trained = [t for t, label in zip(enc.input_ids, enc.labels, strict=True) if label != IGNORE]
    return tokenizer.decode(enc.input_ids), tokenizer.decode(trained)


def test_openai_tool_rows_render_the_schemas_and_train_the_call_and_the_answer(tools_tokenizer: Any) -> None:
    example = examples_of("openai_tools.jsonl")[0]
    rendered, trained = rendered_and_trained(tools_tokenizer, example)
    assert '"name": "get_weather", "description": "Current weather in a city."' in rendered, "schemas rendered"
    assert trained == PARIS_CALL + "The sky in Paris is clear.<|im_end|>"
    assert '<tool_response>\n{"sky": "clear"}' in rendered and '{"sky"' not in trained, "results are masked"
    assert example.messages()[2] == {"role": "tool", "content": '{"sky": "clear"}', "tool_call_id": "call_1"}


def test_llamafactory_function_call_and_observation_turns_train_like_openai_ones(tools_tokenizer: Any) -> None:
    example = examples_of("llamafactory_tools.json")[0]
    assert [m["role"] for m in example.messages()] == ["user", "assistant", "tool", "assistant"]
    assert example.tool_schemas()[0]["type"] == "function", "bare schemas get OpenAI's wrapper"
    rendered, trained = rendered_and_trained(tools_tokenizer, example)
    assert trained == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>'
        "It is sunny in Rome.<|im_end|>"
    )
    assert "<tools>" in rendered and "<tool_response>" in rendered


def test_rows_that_differ_only_in_tools_are_kept_and_exact_copies_dropped(tmp_path: Path, tools_tokenizer: Any) -> None:
    lines = (FIXTURES / "openai_tools.jsonl").read_text().splitlines()
    source = tmp_path / "rows.jsonl"
    source.write_text("\n".join([*lines, lines[0]]) + "\n")  # row 4 = row 1 with a second tool; row 5 = row 1
    stats = prepare(DataConfig(source=str(source), max_seq_length=1024), tools_tokenizer, tmp_path / "out")
    assert stats["dropped"] == {"duplicate": 1} and stats["rows_kept"] == 4


def test_eval_reference_of_a_final_tool_call_is_the_call_as_rendered(tmp_path: Path, tools_tokenizer: Any) -> None:
    rows = [json.loads(line) for line in (FIXTURES / "openai_tools.jsonl").read_text().splitlines()]
    source = tmp_path / "calls.jsonl"
    source.write_text("".join(json.dumps({**r, "messages": r["messages"][:2]}) + "\n" for r in rows[:3]))
    cfg = DataConfig(source=str(source), max_seq_length=1024, eval_fraction=0.4)
    prepare(cfg, tools_tokenizer, tmp_path / "out")
    [prompt] = PreparedData(str(tmp_path / "out")).eval_prompts()
    assert prompt["prompt"].endswith("<|im_start|>assistant\n")
    asked = next(r["messages"][0]["content"] for r in rows[:3] if r["messages"][0]["content"] in prompt["prompt"])
    assert prompt["instruction"] == asked.strip(), "the user's words, for the samples table, without markup"
    assert (
        prompt["reference"].startswith('<tool_call>\n{"name": "get_weather"')
        and "<|im_end|>" not in prompt["reference"]
    )


def test_a_template_that_never_reads_tools_is_refused_by_name(tmp_path: Path, tiny_model_dir: Path) -> None:
    chatml_only = AutoTokenizer.from_pretrained(tiny_model_dir)  # the demo ChatML template knows no tools
    cfg = DataConfig(source=str(FIXTURES / "openai_tools.jsonl"), max_seq_length=1024)
    with pytest.raises(
        DataError, match=rf"template of the tokenizer '{tiny_model_dir}' cannot render tools: it never reads `tools`"
    ):
        prepare(cfg, chatml_only, tmp_path / "out")
    named = DataConfig(source=str(FIXTURES / "llamafactory_tools.json"), chat_template="alpaca", max_seq_length=1024)
    with pytest.raises(
        DataError, match=r"data.chat_template=alpaca cannot render tools.*llamafactory_tools.json, item 1"
    ):
        prepare(named, chatml_only, tmp_path / "out2")


def test_role_map_can_name_the_tool_and_tool_call_roles() -> None:
    row = {
        "conversations": [
            {"from": "asker", "value": "Time in Oslo?"},
            {"from": "caller", "value": '{"name": "get_time", "arguments": {"city": "Oslo"}}'},
            {"from": "api", "value": "09:00"},
            {"from": "gpt", "value": "It is nine."},
        ]
    }
    roles = {"asker": "user", "caller": "tool_call", "api": "tool"}
    messages = to_example(row, "sharegpt", "row 1", role_map=roles).messages()
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[1]["tool_calls"][0]["function"] == {"name": "get_time", "arguments": {"city": "Oslo"}}
    with pytest.raises(ConfigError, match="roles can only be mapped to system, user, assistant, tool, tool_call"):
        load_config(None, ["data.role_map={api: robot}"])


@pytest.mark.parametrize(
    ("turn", "message"),
    [
        ({"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}, r"tool_calls\[0\]: a call needs"),
        (
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]},
            "is a string that is not JSON",
        ),
        ({"role": "user", "content": "", "tool_calls": [{"function": {"name": "f"}}]}, "only assistant turns can make"),
        ({"from": "function_call", "value": "get_weather(Paris)"}, "value' of a function_call turn is not JSON"),
    ],
)
def test_bad_tool_calls_name_the_row_and_turn(turn: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        to_example({"messages": [{"role": "user", "content": "hi"}, turn]}, "messages", "rows.jsonl, line 4")

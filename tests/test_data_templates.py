"""Chat templates: each named one renders its family's layout and trains only the answers (multi-turn, with a system
prompt); a Jinja file works like a name. Rows a template refuses (Mistral-, Llama-2-, Gemma-style raise_exception) are
row errors: named by file, line and field with the template's message and name, skipped and counted with
on_error=skip, exit 2 from the CLI."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from llmtune.config import ConfigError, DataConfig, load_config
from llmtune.data import TEMPLATE_NAMES, DataError, Example, configure_tokenizer, encode_examples, prepare
from llmtune.data.encode import prompt_for_last_answer
from llmtune.data.formats import Turn
from llmtune.data.report import marked_segments

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "data"
REFUSED = FIXTURES / "refused_by_template.jsonl"


def strict_tokenizer(model_dir: Path) -> Any:
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = (FIXTURES / "templates" / "strict_alternating.jinja").read_text()
    return tok


def test_a_refused_row_stops_the_run_with_file_line_field_and_the_templates_message(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    with pytest.raises(DataError) as raised:
        prepare(DataConfig(source=str(REFUSED)), strict_tokenizer(tiny_model_dir), tmp_path / "out")
    message = str(raised.value)
    assert message.startswith(f"{REFUSED}, line 2, field 'messages': the chat template refused the conversation")
    assert "(turns: system, user, assistant): System role not supported" in message
    assert "data.on_error: skip" in message


def test_with_skip_refused_rows_are_counted_and_the_rest_trained(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = DataConfig(source=str(REFUSED), on_error="skip", eval_fraction=0.25)
    stats = prepare(cfg, strict_tokenizer(tiny_model_dir), tmp_path / "out")
    assert stats["rows_in"] == 6 and stats["rows_kept"] == 4 and stats["dropped"] == {"invalid": 2}
    assert [m.split(": the chat template")[0] for m in stats["first_errors"]] == [
        f"{REFUSED}, line 2, field 'messages'",
        f"{REFUSED}, line 4, field 'messages'",
    ]
    assert "Conversation roles must alternate" in stats["first_errors"][1]
    assert "".join(text for text, trained in stats["example"] if trained).endswith("<|im_end|>")


@pytest.mark.pipeline
def test_cli_ends_a_step_refusal_with_one_paragraph_and_exit_2(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Preflight reads the rows without rendering them; the prepare step's DataError reaches the CLI.

    A separate process: the real exit status, and no MLflow/ZenML state left in this one.
    """
    model = tmp_path / "strict-model"
    strict_tokenizer(tiny_model_dir).save_pretrained(model)
    for name in ("config.json", "model.safetensors"):  # preflight checks that model.name is a loadable model
        shutil.copy(tiny_model_dir / name, model / name)
    args = ["--pipeline", "prepare", "--set", f"data.source={REFUSED}", "--set", f"model.name={model}", "--no-cache"]
    done = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True, timeout=600)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2, done.stderr[-2000:]
    assert last.startswith(f"error: {REFUSED}, line 2, field 'messages': the chat template refused")
    assert "System role not supported" in last and "data.on_error: skip" in last


# --- named templates for base models without one, and Jinja files (issue 16, item 5) ---------------------------

FAMILY_TOKENS = [
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
]
CHAT = Example(
    turns=(
        Turn("system", "Be brief."),
        Turn("user", "Spell 4."),
        Turn("assistant", "four"),
        Turn("user", "And 5?"),
        Turn("assistant", "five"),
    )
)
# Each family's documented layout for CHAT, with the tiny tokenizer's BOS (<s>) and EOS (<|im_end|>).
RENDERED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSpell 4.<|im_end|>\n"
    "<|im_start|>assistant\nfour<|im_end|>\n<|im_start|>user\nAnd 5?<|im_end|>\n"
    "<|im_start|>assistant\nfive<|im_end|>\n",
    "llama-3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nSpell 4.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    "four<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nAnd 5?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nfive<|eot_id|>",
    "mistral": "<s>[INST] Be brief.\n\nSpell 4. [/INST] four<|im_end|>[INST] And 5? [/INST] five<|im_end|>",
    "gemma": "<s><start_of_turn>user\nBe brief.\n\nSpell 4.<end_of_turn>\n<start_of_turn>model\nfour<end_of_turn>\n"
    "<start_of_turn>user\nAnd 5?<end_of_turn>\n<start_of_turn>model\nfive<end_of_turn>\n",
    "phi-3": "<|system|>\nBe brief.<|end|>\n<|user|>\nSpell 4.<|end|>\n<|assistant|>\nfour<|end|>\n"
    "<|user|>\nAnd 5?<|end|>\n<|assistant|>\nfive<|end|>\n",
    "alpaca": "Be brief.\n\n### Instruction:\nSpell 4.\n\n### Response:\nfour<|im_end|>\n\n"
    "### Instruction:\nAnd 5?\n\n### Response:\nfive<|im_end|>\n\n",
}
# What carries loss: each answer with the token that ends its turn (Mistral's answers start after "[/INST]").
TRAINED = {
    "chatml": ["four<|im_end|>", "five<|im_end|>"],
    "llama-3": ["four<|eot_id|>", "five<|eot_id|>"],
    "mistral": [" four<|im_end|>", " five<|im_end|>"],
    "gemma": ["four<end_of_turn>", "five<end_of_turn>"],
    "phi-3": ["four<|end|>", "five<|end|>"],
    "alpaca": ["four<|im_end|>", "five<|im_end|>"],
}


@pytest.fixture()
def family_tokenizer(tiny_model_dir: Path) -> Any:
    """The tiny vocabulary without a chat template, with the special tokens the Llama-3, Gemma and Phi-3 families
    have (as their base models' tokenizers do)."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    tok.add_special_tokens({"additional_special_tokens": FAMILY_TOKENS})
    return tok


def test_every_named_template_is_tested_here() -> None:
    assert set(RENDERED) == set(TRAINED) == set(TEMPLATE_NAMES)


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_named_template_renders_the_familys_layout_with_system_prompt_and_several_turns(
    name: str, family_tokenizer: Any
) -> None:
    assert configure_tokenizer(family_tokenizer, name) == name
    [enc] = encode_examples(family_tokenizer, [CHAT], responses_only=True)
    assert family_tokenizer.decode(enc.input_ids) == RENDERED[name].rstrip("\n")  # cut after the last answer


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_named_template_trains_only_the_answers_and_their_end_of_turn(name: str, family_tokenizer: Any) -> None:
    configure_tokenizer(family_tokenizer, name)
    [enc] = encode_examples(family_tokenizer, [CHAT], responses_only=True)
    segments = marked_segments(family_tokenizer, enc.input_ids, enc.labels)
    assert [text for text, trained in segments if trained] == TRAINED[name]
    assert "Be brief." in "".join(text for text, trained in segments if not trained)  # the system prompt is prompt
    assert enc.input_ids[-1] == family_tokenizer.eos_token_id  # generation stops on what answers end with


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_named_template_eval_prompt_ends_where_the_answer_starts(name: str, family_tokenizer: Any) -> None:
    configure_tokenizer(family_tokenizer, name)
    prompt, reference = prompt_for_last_answer(family_tokenizer, CHAT)
    assert reference == "five"
    assert RENDERED[name].startswith(prompt) and RENDERED[name][len(prompt) :].lstrip(" ").startswith("five")


@pytest.mark.parametrize(("name", "lacks"), [("gemma", "<start_of_turn>, <end_of_turn>"), ("phi-3", "<|system|>")])
def test_family_templates_need_the_familys_tokens(name: str, lacks: str, tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(DataError, match=f"data.chat_template={name} needs .* lacks {re.escape(lacks)}"):
        configure_tokenizer(tok, name)


@pytest.mark.parametrize("name", ["mistral", "gemma"])
def test_mistral_and_gemma_refuse_turns_that_do_not_alternate_as_a_row_error_naming_the_template(
    name: str, tmp_path: Path, family_tokenizer: Any
) -> None:
    with pytest.raises(DataError) as raised:
        prepare(DataConfig(source=str(REFUSED), chat_template=name), family_tokenizer, tmp_path / "out")
    message = str(raised.value)
    assert message.startswith(f"{REFUSED}, line 4, field 'messages': the chat template refused the conversation")
    assert f"The {name} chat template needs turns that alternate user/assistant" in message
    assert f"Template: data.chat_template={name}." in message and "Traceback" not in message
    # line 2's system turn is not refused: it opens the first user turn; with skip only line 4 is dropped
    stats = prepare(
        DataConfig(source=str(REFUSED), chat_template=name, on_error="skip", eval_fraction=0.25),
        family_tokenizer,
        tmp_path / "skip",
    )
    assert stats["dropped"] == {"invalid": 1} and stats["rows_kept"] == 5


def test_a_jinja_file_is_used_saved_and_named_when_it_refuses_a_row(tmp_path: Path, tiny_model_dir: Path) -> None:
    template = FIXTURES / "templates" / "strict_alternating.jinja"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    with pytest.raises(DataError) as raised:
        prepare(DataConfig(source=str(REFUSED), chat_template=str(template)), tok, tmp_path / "out")
    assert str(raised.value).startswith(f"{REFUSED}, line 2, field 'messages': the chat template refused")
    assert f"System role not supported. Template: data.chat_template={template}." in str(raised.value)
    cfg = DataConfig(source=str(REFUSED), chat_template=str(template), on_error="skip", eval_fraction=0.25)
    stats = prepare(cfg, tok, tmp_path / "skip")
    assert stats["template"] == str(template) and stats["dropped"] == {"invalid": 2}
    saved = AutoTokenizer.from_pretrained(tmp_path / "skip" / "tokenizer")
    assert saved.chat_template == template.read_text()


def test_a_jinja_file_with_a_syntax_error_or_missing_is_named(tmp_path: Path, tiny_model_dir: Path) -> None:
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for message in messages %}\n{{ message['content'] }\n{% endfor %}")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(DataError, match=rf"data.chat_template: {re.escape(str(broken))}, line 2: Jinja syntax error"):
        configure_tokenizer(tok, str(broken))
    with pytest.raises(DataError, match=r"'nowhere/my.jinja' is neither a template name .* nor an existing file"):
        configure_tokenizer(tok, "nowhere/my.jinja")


def test_an_unknown_template_name_is_a_config_error_listing_the_names() -> None:
    with pytest.raises(ConfigError, match=r"data.chat_template' = 'gema' .*chatml, llama-3, mistral, gemma, phi-3"):
        load_config(None, ["data.chat_template=gema"])

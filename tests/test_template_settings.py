"""Tokenizer settings around chat templates (issue 18, items 4-6): a pad token that is neither EOS nor an end-of-turn
token (data.pad_token, or an unused special token chosen and reported), a fixed date for templates that print today
(data.template_date: reproducible fingerprints), the tokenizer fingerprint that keys the prepare step's cache, and
the printed example's trained-token brackets."""

from __future__ import annotations

import copy
import os
from datetime import date
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from llmtune.config import ConfigError, DataConfig, load_config
from llmtune.data import DataError, configure_tokenizer, encode_examples, prepare
from llmtune.data.prepare import fingerprint_of
from llmtune.data.templates import PHI3_TEMPLATE, template_date, tokenizer_fingerprint
from llmtune.demo import build_demo_tokenizer, make_demo_rows
from tests.test_template_families import FAMILIES_DIR, ROWS, family_tokenizer

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"


@pytest.fixture(scope="module")
def demo_tokenizer() -> Any:
    return build_demo_tokenizer(make_demo_rows(20, seed=0))


def phi4_like(extra: list[str]) -> Any:
    """A Phi-4-mini-style tokenizer: pads with EOS (<|endoftext|>), turns end with <|end|>, no <pad> or unk."""
    specials = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", *extra]
    vocab = {t: i for i, t in enumerate([*specials, *"abcdefghijklmnopqrstuvwxyz.?"])}
    core = Tokenizer(models.WordLevel(vocab))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    tok.chat_template = PHI3_TEMPLATE
    return tok


def test_a_tokenizer_padding_with_eos_gets_an_unused_special_token_and_says_so() -> None:
    tok = phi4_like(["<|placeholder1|>", "<|placeholder2|>"])
    assert configure_tokenizer(tok, None) == "tokenizer"
    assert tok.pad_token == "<|placeholder1|>"  # not EOS, not <|end|>, not a token the template writes


def test_a_qwen_base_style_tokenizer_pads_with_its_fim_pad(tmp_path: Path, demo_tokenizer: Any) -> None:
    tok = copy.deepcopy(demo_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|fim_pad|>"]})
    tok.pad_token = tok.eos_token
    stats = prepare(DataConfig(source=str(FIXTURES / "sharegpt_system.jsonl")), tok, tmp_path / "out")
    assert stats["pad_token"] == "<|fim_pad|>" and tok.pad_token == "<|fim_pad|>"


def test_data_pad_token_is_used_or_refused_with_what_to_change() -> None:
    tok = phi4_like(["<|placeholder1|>", "<|placeholder2|>"])
    configure_tokenizer(tok, None, pad_token="<|placeholder2|>")
    assert tok.pad_token == "<|placeholder2|>"
    with pytest.raises(DataError, match=r"data.pad_token '<\|end\|>' ends answers"):
        configure_tokenizer(tok, None, pad_token="<|end|>")
    with pytest.raises(DataError, match=r"data.pad_token '<pad>' is not in the tokenizer's vocabulary"):
        configure_tokenizer(tok, None, pad_token="<pad>")
    with pytest.raises(DataError, match=r"Set data.pad_token to a token of the tokenizer's vocabulary"):
        configure_tokenizer(phi4_like([]), None)


def test_template_date_fixes_the_date_templates_print_and_the_fingerprint(demo_tokenizer: Any) -> None:
    tok = family_tokenizer(demo_tokenizer, "llama3")
    today = date.today().strftime("%d %b %Y")
    [enc] = encode_examples(tok, [ROWS["single"]], responses_only=True)
    assert f"Today Date: {today}" in tok.decode(enc.input_ids)  # the real date: fingerprints change daily
    fingerprints = []
    for day in ("2026-01-15", "2026-01-15", "2026-01-16"):
        with template_date(day):
            [enc] = encode_examples(tok, [ROWS["single"]], responses_only=True)
        fingerprints.append(fingerprint_of([enc], []))
    assert "Today Date: 16 Jan 2026" in tok.decode(enc.input_ids)
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]


def test_template_date_is_a_checked_setting() -> None:
    assert load_config(None, ["data.template_date=2026-01-15"]).data.template_date == "2026-01-15"
    with pytest.raises(ConfigError, match="'15/01/2026' is not a date; write it as YYYY-MM-DD"):
        load_config(None, ["data.template_date=15/01/2026"])


def test_the_tokenizer_fingerprint_follows_an_edited_template_file(tmp_path: Path, demo_tokenizer: Any) -> None:
    from transformers import AutoTokenizer

    demo_tokenizer.save_pretrained(tmp_path / "tok")
    before = tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path / "tok"))
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path / "tok")) == before
    template = tmp_path / "tok" / "chat_template.jinja"
    template.write_text((FAMILIES_DIR / "qwen2.jinja").read_text())
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path / "tok")) != before


def test_the_printed_example_marks_trained_tokens_without_colour(tmp_path: Path, demo_tokenizer: Any) -> None:
    from rich.console import Console

    from llmtune.data import report

    tok = copy.deepcopy(demo_tokenizer)
    stats = prepare(DataConfig(source=str(FIXTURES / "sharegpt_system.jsonl")), tok, tmp_path / "out")
    printed = StringIO()
    report.print_report(stats, Console(file=printed, width=400, color_system=None))
    assert "\x1b[" not in printed.getvalue()  # no colour at all
    trained = [text for text, is_trained in stats["example"] if is_trained]
    assert trained and all(f"[[{text}]]" in printed.getvalue() for text in trained)


def test_prepare_counts_conversations_trained_one_sequence_per_answer(tmp_path: Path, demo_tokenizer: Any) -> None:
    """Mistral-style: the system prompt moves to the last user turn, so each answer is its own sequence."""
    import json

    from llmtune.data import report

    rows = tmp_path / "chats.jsonl"
    turns = [("system", "Be brief."), ("user", "Spell 4."), ("assistant", "four"), ("user", "And 5?")]
    with rows.open("w") as f:
        for answer in ("five", "fivE", "FIVE"):
            messages = [{"role": r, "content": c} for r, c in [*turns, ("assistant", answer)]]
            f.write(json.dumps({"messages": messages}) + "\n")
    stats = prepare(DataConfig(source=str(rows)), family_tokenizer(demo_tokenizer, "mistral"), tmp_path / "out")
    assert stats["split_conversations"] == 3 and stats["train_rows"] + stats["eval_rows"] == 6
    assert "differently once later turns follow" in stats["first_split"]
    assert ("conversations trained one sequence per answer", "3") in report.summary_rows(stats)


def test_the_tokenizer_fingerprint_is_the_same_in_every_process(tmp_path: Path, demo_tokenizer: Any) -> None:
    """The prepare step's cache key must not depend on the process's string hash seed (a scheduled or resumed run
    is another process): the special tokens are hashed in a fixed order."""
    import subprocess
    import sys

    demo_tokenizer.save_pretrained(tmp_path)
    code = (
        f"from llmtune.data.templates import tokenizer_cache_key; print(tokenizer_cache_key({str(tmp_path)!r}, None))"
    )

    def key_with_seed(seed: int) -> str:
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.strip()

    keys = {key_with_seed(seed) for seed in range(4)}
    assert len(keys) == 1, keys

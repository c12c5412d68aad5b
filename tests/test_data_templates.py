"""Rows a model's chat template refuses (Mistral-, Llama-2-, Gemma-style raise_exception) are row errors: named by
file, line and field with the template's message, skipped and counted with on_error=skip, exit 2 from the CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from llmtune.config import DataConfig
from llmtune.data import DataError, prepare

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
    shutil.copy(tiny_model_dir / "config.json", model / "config.json")
    args = ["--pipeline", "prepare", "--set", f"data.source={REFUSED}", "--set", f"model.name={model}", "--no-cache"]
    done = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True, timeout=600)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2, done.stderr[-2000:]
    assert last.startswith(f"error: {REFUSED}, line 2, field 'messages': the chat template refused")
    assert "System role not supported" in last and "data.on_error: skip" in last

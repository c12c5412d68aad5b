"""`run.py chat` on the tiny model: the training template, evaluation's greedy answers, multi-turn, /reset, /quit,
the stop tokens, and the one-shot mode on a merged folder. The chat with a finetune run's model (default, --run,
--base, --adapter) is in tests/test_pipeline.py, on that module's run."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cli import chat
from llmtune.artifacts import PreparedData
from llmtune.chat import ChatSession, stop_token_ids
from llmtune.data.encode import render
from llmtune.data.formats import to_example
from llmtune.evaluate.scoring import generate_answers


def user_text(row: dict[str, str]) -> str:
    """The user turn training made of a demo row."""
    return str(to_example(row, "alpaca", "row").messages()[-2]["content"])


def held_out_question(rows: list[dict[str, str]], tokenizer: object, prepared: PreparedData) -> tuple[str, str]:
    """(user text, the prompt training rendered for it) of the first held-out demo row."""
    trained = {p["prompt"] for p in prepared.eval_prompts()}
    session = ChatSession(model=None, tokenizer=tokenizer)
    for row in rows:
        if session.prompt(user_text(row)) in trained:
            return user_text(row), session.prompt(user_text(row))
    raise AssertionError("no demo row renders as any held-out prompt training wrote")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path, prepared_dir: Path) -> dict:
    prepared = PreparedData(str(prepared_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return {"model": model, "tokenizer": prepared.tokenizer(), "prepared": prepared}


def test_one_shot_answer_is_evaluations_greedy_answer_on_the_training_prompt(tiny: dict, demo_rows: list) -> None:
    text, trained_prompt = held_out_question(demo_rows, tiny["tokenizer"], tiny["prepared"])
    session = ChatSession(tiny["model"], tiny["tokenizer"], max_new_tokens=12)
    assert session.prompt(text) == trained_prompt
    streamed: list[str] = []
    answer = session.reply(text, on_text=streamed.append)
    [want] = generate_answers(tiny["model"], tiny["tokenizer"], [trained_prompt], 12, batch_size=1)
    assert answer == want and answer
    assert "".join(streamed).strip() == answer and len(streamed) > 1, "streamed in pieces, ending as the answer"


def test_turns_are_kept_until_reset_and_the_system_prompt_stays(tiny: dict) -> None:
    tok = tiny["tokenizer"]
    session = ChatSession(tiny["model"], tok, system="Answer briefly.", max_new_tokens=4)
    first = session.reply("Count the words.\n\ncat dog")
    second_prompt = session.prompt("Reverse the order of the words.\n\ncat dog")
    conversation = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Count the words.\n\ncat dog"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "Reverse the order of the words.\n\ncat dog"},
    ]
    assert second_prompt == render(tok, conversation, add_generation_prompt=True)
    session.reset()
    assert session.prompt("hi") == render(tok, [conversation[0], {"role": "user", "content": "hi"}], True)


def test_interactive_loop_streams_answers_resets_and_quits(tiny: dict) -> None:
    session = ChatSession(tiny["model"], tiny["tokenizer"], max_new_tokens=4)
    out = io.StringIO()
    code = chat.interactive(session, io.StringIO("Count the words.\n\ncat dog\n\n/reset\nhi\n/quit\nnot read\n"), out)
    assert code == 0
    assert out.getvalue().count("model> ") == 3 and "(conversation reset)" in out.getvalue()
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["hi"], "reset, then one turn"
    assert "not read" not in out.getvalue()


def test_stops_at_eos_and_at_the_templates_end_of_turn_token(tiny: dict) -> None:
    tok = AutoTokenizer.from_pretrained(tiny["prepared"].tokenizer_dir)
    assert tok.convert_ids_to_tokens(stop_token_ids(tok)) == ["<|im_end|>"]  # ChatML: EOS is the end of turn
    tok.add_special_tokens({"additional_special_tokens": ["<|eot_id|>"]})
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|eot_id|>\n' }}{% endfor %}"
    tok.eos_token = "<s>"  # an EOS that is not the end of turn, as Llama-3's <|end_of_text|>
    assert set(tok.convert_ids_to_tokens(stop_token_ids(tok))) == {"<s>", "<|eot_id|>"}


def test_run_py_chat_one_shot_on_a_merged_folder_and_a_clear_error_for_a_wrong_one(
    tiny: dict, tiny_model_dir: Path, tmp_path: Path, demo_rows: list, capsys: pytest.CaptureFixture[str]
) -> None:
    import run

    merged = shutil.copytree(tiny_model_dir, tmp_path / "merged")
    tiny["tokenizer"].save_pretrained(merged)  # an export carries the training tokenizer
    text, trained_prompt = held_out_question(demo_rows, tiny["tokenizer"], tiny["prepared"])
    assert run.main(["chat", "--merged", str(merged), "--prompt", text, "--max-new-tokens", "12"]) == 0
    [want] = generate_answers(tiny["model"], tiny["tokenizer"], [trained_prompt], 12, batch_size=1)
    assert capsys.readouterr().out.strip() == want
    assert run.main(["chat", "--merged", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert f"--merged {tmp_path}: not a folder with config.json" in err and "outputs/<run>/merged" in err

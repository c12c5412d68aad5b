"""Evaluation: generation metrics, batched greedy generation, the LLM judge over HTTP, and the samples table."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from llmtune.config import EvaluationConfig, LoraConfig, load_config
from llmtune.evaluate import judge, metrics, scoring
from tests.conftest import tiny_run_overrides
from tests.http_fakes import JsonHandler

API_KEY = "sk-test-not-a-real-key"


# --- metrics -------------------------------------------------------------------------------------------------


def test_sample_scores_rank_a_closer_answer_higher() -> None:
    close = metrics.sample_scores("one two three four", "one two three five", list(metrics.METRIC_NAMES))
    far = metrics.sample_scores("seven", "one two three five", list(metrics.METRIC_NAMES))
    same = metrics.sample_scores("one two", "one two ", list(metrics.METRIC_NAMES))
    assert same == {"exact_match": 1.0, "rouge_l": 1.0, "chrf": 1.0, "bleu": 1.0}
    assert close["exact_match"] == far["exact_match"] == 0.0
    assert all(close[m] > far[m] for m in ("rouge_l", "chrf", "bleu"))
    assert close["rouge_l"] == 0.75


def test_corpus_chrf_and_bleu_are_sacrebleu_corpus_scores_over_100() -> None:
    from sacrebleu.metrics import BLEU, CHRF

    predictions, references = ["the cat sat on the mat", "a dog"], ["the cat sat on a mat", "the dog"]
    scores = metrics.corpus_scores(predictions, references, ["chrf", "bleu"])
    assert scores["chrf"] == round(CHRF().corpus_score(predictions, [references]).score / 100, 4)
    assert scores["bleu"] == round(BLEU(effective_order=True).corpus_score(predictions, [references]).score / 100, 4)


@pytest.mark.parametrize(
    ("reference", "close", "far"),
    [
        ("今天天气很好", "今天天气不错", "我想吃面条"),  # Chinese: no spaces between words
        ("今日は晴れです", "今日は雨です", "猫が好き"),  # Japanese: kanji and kana, no spaces
    ],
)
def test_rouge_and_bleu_score_unspaced_scripts_per_character(reference: str, close: str, far: str) -> None:
    names = ["rouge_l", "bleu"]
    same, near, off = (metrics.sample_scores(p, reference, names) for p in (reference, close, far))
    assert same == {"rouge_l": 1.0, "bleu": 1.0}
    assert all(1.0 > near[m] > off[m] for m in names), (near, off)
    corpus = metrics.corpus_scores([close, far], [reference, reference], names)
    assert 0.0 < corpus["rouge_l"] < 1.0 and 0.0 < corpus["bleu"] < 1.0


def test_chinese_bleu_is_sacrebleus_zh_bleu_and_rouge_counts_characters() -> None:
    from sacrebleu.metrics import BLEU

    predictions, references = ["今天天气不错。", "我爱北京"], ["今天天气很好。", "我爱上海"]
    zh = BLEU(effective_order=True, tokenize="zh").corpus_score(predictions, [references]).score / 100
    assert metrics.corpus_scores(predictions, references, ["bleu"])["bleu"] == round(zh, 4)
    assert metrics.sample_scores("我爱北京", "我爱上海", ["rouge_l"])["rouge_l"] == 0.5  # 2 of 4 characters


def test_unknown_metric_and_length_mismatch_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown metrics \\['rouge'\\]"):
        metrics.sample_scores("a", "a", ["rouge"])
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        metrics.corpus_scores(["a", "b"], ["a"], ["exact_match"])


def test_metrics_are_chosen_in_config_and_exact_match_is_always_reported() -> None:
    cfg = load_config(None, ["evaluation.metrics=[chrf]"]).evaluation
    assert scoring.report_metrics(cfg) == ["exact_match", "chrf"]
    assert EvaluationConfig().judge_url is None, "the judge is off by default"


# --- generation on the tiny 4-bit model with an adapter ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_peft(quantized_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The 4-bit tiny model with a LoRA adapter whose B weights are moved off zero, so tuned differs from base."""
    import torch

    from llmtune.model import hf

    adapter_dir = tmp_path_factory.mktemp("adapter")
    hf.add_lora(quantized_dir, LoraConfig(r=4, alpha=64), adapter_dir)
    model = hf.load_for_inference(quantized_dir, adapter_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def tiny_tokenizer(prepared_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(prepared_dir / "tokenizer")


@pytest.fixture(scope="module")
def eval_prompts(prepared_dir: Path) -> list[dict[str, str]]:
    from llmtune.artifacts import PreparedData

    return PreparedData(str(prepared_dir)).eval_prompts()[:6]


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(
    tiny_peft: Any, tiny_tokenizer: Any, eval_prompts: list[dict[str, str]]
) -> None:
    prompts = [p["prompt"] for p in eval_prompts]
    lengths = {len(tiny_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts}
    assert len(lengths) > 1, "prompts of different lengths, so the batch needs padding"
    batched = scoring.generate_answers(tiny_peft, tiny_tokenizer, prompts, max_new_tokens=8, batch_size=6)
    single = [scoring.generate_answers(tiny_peft, tiny_tokenizer, [p], 8, 1)[0] for p in prompts]
    no_cache = scoring.generate_answers(tiny_peft, tiny_tokenizer, prompts, 8, batch_size=4, use_cache=False)
    assert batched == single == no_cache
    assert tiny_tokenizer.padding_side == "left"


def test_length_order_puts_the_longest_prompts_first(tiny_tokenizer: Any) -> None:
    assert scoring.length_order(tiny_tokenizer, ["a", "a b c d e f", "a b c"]) == [1, 2, 0]


def test_compare_scores_base_and_tuned_and_builds_the_samples_table(
    tiny_peft: Any,
    tiny_tokenizer: Any,
    prepared_dir: Path,
    eval_prompts: list[dict[str, str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from datasets import load_from_disk

    cfg = EvaluationConfig(max_eval_rows=4, num_generation_prompts=5, max_new_tokens=6, batch_size=4)
    report = scoring.compare(tiny_peft, tiny_tokenizer, load_from_disk(str(prepared_dir / "eval")), eval_prompts, cfg)
    shown = capsys.readouterr().out  # progress of each pass, as the evaluate step's log shows it
    for name in ("base", "tuned"):
        assert re.search(rf"evaluate {name}: loss: 100%.* 4/4 ", shown), shown
        assert re.search(rf"evaluate {name}: answers: 100%.* 5/5 ", shown), shown
    assert isinstance(report, scoring.EvalReport) and report["generation_prompts"] == 5
    for name in ("base", "tuned"):
        assert {f"{name}_{m}" for m in ("eval_loss", "perplexity", *metrics.METRIC_NAMES)} <= set(report)
    assert report["base_eval_loss"] != report["tuned_eval_loss"], "the adapter is switched off for the base"
    samples = report["samples"]
    assert [s["prompt"] for s in samples] == [p["prompt"] for p in eval_prompts[:5]]  # rendered, for reference
    assert [s["instruction"] for s in samples] == [p["instruction"] for p in eval_prompts[:5]]
    assert all("<|im_start|>" in s["prompt"] and "<|im_start|>" not in s["instruction"] for s in samples)
    assert all(s["instruction"] and s["instruction"] in s["prompt"] for s in samples)
    columns = list(scoring.sample_columns(report))
    assert columns[:4] == ["instruction", "reference", "base", "tuned"] and columns[-1] == "prompt"
    assert [s["reference"] for s in samples] == [p["reference"] for p in eval_prompts[:5]]
    assert any(s["base"] != s["tuned"] for s in samples)
    for name in ("base", "tuned"):
        mean = sum(s[f"{name}_rouge_l"] for s in samples) / len(samples)
        assert report[f"{name}_rouge_l"] == pytest.approx(mean, abs=1e-3)
        assert (
            report[f"{name}_chrf"]
            == metrics.corpus_scores([s[name] for s in samples], [s["reference"] for s in samples], ["chrf"])["chrf"]
        )


def test_samples_html_escapes_text_and_shows_every_column() -> None:
    report = scoring.EvalReport(
        base_chrf=0.25,
        tuned_chrf=0.75,
        samples=[
            {**row, "prompt": "<|im_start|>user\n<b>q</b>"}
            for row in scoring.build_samples(["<b>q</b>"], ["x & y"], ["z"], ["x & y"], ["chrf"])
        ],
    )
    page = scoring.samples_html(report)
    assert "&lt;b&gt;q&lt;/b&gt;" in page and "<b>q</b>" not in page
    assert "<td>chrf</td><td class='num'>0.25</td><td class='num'>0.75</td>" in page
    for column in ("instruction", "reference", "base", "tuned", "base_chrf", "tuned_chrf", "prompt"):
        assert f"<th>{column}</th>" in page
    # in a fixed-size frame (dashboard, MLflow): the table scrolls in its own box, the rendered prompt is folded
    assert "<div class='scroll'><table>" in page and ".scroll{overflow:auto" in page
    assert "<details><summary>rendered prompt</summary>&lt;|im_start|&gt;user" in page


# --- the LLM judge against a local OpenAI-compatible server ---------------------------------------------------


class ChatCompletionsHandler(JsonHandler):
    """Speaks POST /v1/chat/completions: scores 9 when the answer equals the reference, else 2."""

    requests: ClassVar[list[dict[str, Any]]] = []
    status = 200

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if self.path != "/v1/chat/completions" or type(self).status != 200:
            self.reply_json({"error": "nope"}, type(self).status if self.path == "/v1/chat/completions" else 404)
            return
        user = body["messages"][1]["content"]
        reference = user.split("Reference answer:\n")[1].split("\n\n")[0]
        answer = user.split("Answer to grade:\n")[1]
        content = f"Close enough. Score: {9 if answer == reference else 2}"
        self.reply_json({"object": "chat.completion", "choices": [{"index": 0, "message": {"content": content}}]})


@pytest.fixture(scope="module")
def judge_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), ChatCompletionsHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.fixture()
def handler() -> Iterator[type[ChatCompletionsHandler]]:
    ChatCompletionsHandler.requests, ChatCompletionsHandler.status = [], 200
    yield ChatCompletionsHandler
    ChatCompletionsHandler.status = 200


def judge_cfg(url: str, **extra: Any) -> EvaluationConfig:
    return EvaluationConfig(judge_url=url, judge_model="judge-1", **extra)


def test_judge_scores_each_sample_with_the_key_from_the_environment(
    judge_server: str, handler: type[ChatCompletionsHandler], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MY_JUDGE_KEY", API_KEY)
    client = judge.judge_from_config(judge_cfg(judge_server, judge_api_key_env="MY_JUDGE_KEY"))
    assert client is not None and API_KEY not in repr(client)
    report = scoring.EvalReport(
        samples=scoring.build_samples(["q1", "q2"], ["4", "ab"], ["5", "ab"], ["4", "ab"], ["exact_match"])
    )
    judge.add_judge_scores(report, client)
    assert [s["base_judge"] for s in report["samples"]] == [0.2, 0.9]
    assert [s["tuned_judge"] for s in report["samples"]] == [0.9, 0.9]
    assert report["base_judge_score"] == 0.55 and report["tuned_judge_score"] == 0.9
    first = handler.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == f"Bearer {API_KEY}"
    assert first["body"]["model"] == "judge-1" and first["body"]["temperature"] == 0.0
    assert first["body"]["messages"][0] == {"role": "system", "content": EvaluationConfig().judge_rubric}


def test_judge_failures_are_clear_errors(judge_server: str, handler: type[ChatCompletionsHandler]) -> None:
    client = judge.judge_from_config(judge_cfg(judge_server))
    assert client is not None
    handler.status = 500
    with pytest.raises(judge.JudgeError, match="answered HTTP 500"):
        judge.score_answer(client, "q", "a", "a")
    unreachable = judge.judge_from_config(judge_cfg("http://127.0.0.1:9/v1", judge_timeout_s=5))
    assert unreachable is not None
    with pytest.raises(judge.JudgeError, match="Could not reach the judge"):
        judge.score_answer(unreachable, "q", "a", "a")
    with pytest.raises(judge.JudgeError, match="no 'Score: N'"):
        judge.parse_score("I like it.", max_score=10)


def test_judge_is_off_without_a_url_and_needs_a_model() -> None:
    from llmtune.config import ConfigError

    assert judge.judge_from_config(EvaluationConfig()) is None
    with pytest.raises(ConfigError, match="judge_model"):
        load_config(None, ["evaluation.judge_url=http://localhost:8000/v1"])


# --- the evaluate step in the finetune pipeline: MLflow table, ZenML visualization, judge key kept out ---------


@pytest.mark.pipeline
def test_pipeline_logs_samples_table_and_judge_scores_without_the_key(
    tiny_model_dir: Path,
    rows_file: Path,
    tmp_path: Path,
    judge_server: str,
    handler: type[ChatCompletionsHandler],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow.tracking import MlflowClient
    from zenml.client import Client
    from zenml.enums import VisualizationType

    import run as cli
    from cli.stack import mlflow_tracking_uri
    from cli.summary import mlflow_run_id

    monkeypatch.setenv("LLMTUNE_JUDGE_API_KEY", API_KEY)
    overrides = [
        *tiny_run_overrides(tiny_model_dir, rows_file, tmp_path, max_steps=2),
        f"evaluation.judge_url={judge_server}",
        "evaluation.judge_model=judge-1",
        "export.formats=[adapter]",
        "export.publish_format=adapter",
    ]
    assert cli.main(["--pipeline", "finetune", *(a for o in overrides for a in ("--set", o))]) == 0
    pipeline_run = Client().list_pipeline_runs(sort_by="desc:created", size=1).items[0]
    outputs = pipeline_run.steps["evaluate"].outputs["eval_report"]
    artifact = outputs[0] if isinstance(outputs, list) else outputs
    report = artifact.load()
    assert len(report["samples"]) == 4 and {"base_judge", "tuned_judge", "tuned_bleu"} <= set(report["samples"][0])
    [visualization] = artifact.visualizations or []
    assert visualization.type == VisualizationType.HTML
    page = Path(visualization.uri).read_text()
    assert "<th>tuned_rouge_l</th>" in page and "<th>base_judge</th>" in page
    assert all(f"Bearer {API_KEY}" == r["auth"] for r in handler.requests) and len(handler.requests) == 8

    client = MlflowClient(tracking_uri=mlflow_tracking_uri())
    run_id = mlflow_run_id(pipeline_run.name)
    assert run_id
    mlflow_run = client.get_run(run_id)
    assert {"base_rouge_l", "tuned_chrf", "tuned_bleu", "base_judge_score", "tuned_judge_score"} <= set(
        mlflow_run.data.metrics
    )
    assert not any(API_KEY in str(v) for v in mlflow_run.data.params.values())
    assert not any(API_KEY in str(v) for v in artifact.run_metadata.values())
    table = json.loads(Path(client.download_artifacts(run_id, "eval_samples.json", str(tmp_path))).read_text())
    assert "tuned_rouge_l" in table["columns"] and len(table["data"]) == 4
    assert {"eval_samples.json", "eval_samples.html"} <= {a.path for a in client.list_artifacts(run_id)}

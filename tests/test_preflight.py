"""Checks before any step runs: the model resolves (local folder, Hub cache, or a Hub that grants access), the
optimizer and GPU count exist here, data.eval_split exists, a bad cron expression is the first thing reported."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import pytest

from llmtune.config import RunConfig
from llmtune.preflight import COMMON_OPTIMIZERS, PreflightError, check_inputs
from tests.http_fakes import JsonHandler
from tests.test_secrets import serve

ROOT = Path(__file__).resolve().parents[1]


def preflight(rows_file: Path, model: str | Path, **sections: dict[str, object]) -> None:
    raw: dict[str, dict[str, object]] = {"data": {"source": str(rows_file)}, "model": {"name": str(model)}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    check_inputs(RunConfig.model_validate(raw), build_demo=False)


def copy_model(tiny_model_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    return folder


def test_a_saved_model_folder_passes(rows_file: Path, tiny_model_dir: Path) -> None:
    preflight(rows_file, tiny_model_dir)


@pytest.mark.parametrize(
    ("damage", "must_mention"),
    [
        (lambda m: (m / "config.json").write_text("{not json"), "config.json of"),
        (lambda m: (m / "config.json").write_text('{"hidden_size": 64}'), "no 'model_type'"),
        (lambda m: (m / "model.safetensors").rename(m / "pytorch_model.bin"), "it has pytorch_model.bin"),
        (lambda m: (m / "config.json").unlink(), "not a folder with config.json"),
    ],
)
def test_a_broken_model_folder_is_refused_naming_model_name(
    rows_file: Path, tiny_model_dir: Path, tmp_path: Path, damage: object, must_mention: str
) -> None:
    folder = copy_model(tiny_model_dir, tmp_path)
    damage(folder)  # type: ignore[operator]
    with pytest.raises(PreflightError, match=r"^model\.name: ") as caught:
        preflight(rows_file, folder)
    assert must_mention in str(caught.value)


def test_a_mistyped_demo_path_suggests_the_demo_without_asking_the_hub(rows_file: Path) -> None:
    with pytest.raises(PreflightError, match=r"'assets/demo-bse' does not exist\. Did you mean 'assets/demo-base'\?"):
        preflight(rows_file, "assets/demo-bse")


def test_an_uncached_hub_model_offline_says_what_to_do(rows_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-cache")
    with pytest.raises(PreflightError) as caught:
        preflight(rows_file, "meta-llama/Llama-3.2-1B-Instruct")
    message = str(caught.value)
    for part in ("model.name: 'meta-llama/Llama-3.2-1B-Instruct'", "HF_HUB_OFFLINE", "HF_TOKEN", "hf download"):
        assert part in message


def test_a_hub_model_in_the_local_cache_passes_offline(
    rows_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "hub" / "models--owner--cached"  # the layout huggingface_hub writes when it downloads
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    preflight(rows_file, "owner/cached")
    with pytest.raises(PreflightError, match="not in the Hugging Face cache"):
        preflight(rows_file, "owner/not-cached")


class AccessCheckingHub(JsonHandler):
    """Answers `HfApi.auth_check` as huggingface.co does: model owner/open and dataset owner/open-rows are
    readable, owner/gated (either kind) is gated, the rest do not exist."""

    def do_GET(self) -> None:
        repo = self.path.removeprefix("/api/models/").removeprefix("/api/datasets/").removesuffix("/auth-check")
        readable = "owner/open-rows" if self.path.startswith("/api/datasets/") else "owner/open"
        if repo == readable:
            self.reply_json({})
            return
        code = "GatedRepo" if repo == "owner/gated" else "RepoNotFound"
        data = json.dumps({"error": code}).encode()
        self.send_response(403 if code == "GatedRepo" else 404)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def access_hub() -> Iterator[str]:
    yield from serve(AccessCheckingHub)


@pytest.mark.parametrize(
    ("model", "must_mention"),
    [
        ("owner/open", None),
        ("owner/gated", "'owner/gated' is a gated Hub model and this token may not read it (HF_TOKEN is not set)"),
        ("owner/missing", "'owner/missing' is neither a local folder nor a Hub model this token can see"),
    ],
)
def test_a_hub_model_must_be_readable_with_this_token(
    rows_file: Path, access_hub: str, monkeypatch: pytest.MonkeyPatch, model: str, must_mention: str | None
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", access_hub)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    if must_mention is None:
        preflight(rows_file, model)
        return
    with pytest.raises(PreflightError) as caught:
        preflight(rows_file, model)
    assert str(caught.value).startswith(f"model.name: {must_mention}")
    assert "HF_TOKEN" in str(caught.value)


def test_an_uncached_hub_dataset_offline_says_what_to_do(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    with pytest.raises(PreflightError) as caught:
        preflight(Path("owner/rows"), tiny_model_dir)
    message = str(caught.value)
    assert message.startswith("data.source: 'owner/rows' is not a local folder and not in the Hugging Face cache")
    for part in ("HF_HUB_OFFLINE", "hf download owner/rows --repo-type dataset", "HF_TOKEN"):
        assert part in message


def test_a_hub_dataset_downloaded_before_passes_offline(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = tmp_path / "hub" / "datasets--owner--raw" / "snapshots" / "abc123"  # huggingface_hub's layout
    snapshot.mkdir(parents=True)
    (snapshot / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    # `datasets`' Arrow cache of a dataset loaded once: <owner>___<snake_case name>/<subset>/<version>/<hash>
    (tmp_path / "datasets" / "owner___alpaca_clean" / "default" / "0.0.0" / "f00d").mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    preflight(Path("owner/raw"), tiny_model_dir)
    preflight(Path("owner/AlpacaClean"), tiny_model_dir)
    with pytest.raises(PreflightError, match=r"^data\.source: 'owner/alpaca' is not a local folder"):
        preflight(Path("owner/alpaca"), tiny_model_dir)


@pytest.mark.parametrize(
    ("dataset", "must_mention"),
    [
        ("owner/open-rows", None),
        ("owner/gated", "'owner/gated' is a gated Hub dataset and this token may not read it (HF_TOKEN is not set)"),
        ("owner/open", "'owner/open' is neither a local folder nor a Hub dataset this token can see"),  # a model
    ],
)
def test_a_hub_dataset_in_a_mix_must_be_readable_with_this_token(
    rows_file: Path,
    tiny_model_dir: Path,
    access_hub: str,
    monkeypatch: pytest.MonkeyPatch,
    dataset: str,
    must_mention: str | None,
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", access_hub)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    mix: dict[str, object] = {"source": None, "sources": [{"source": str(rows_file)}, {"source": dataset}]}
    if must_mention is None:
        preflight(rows_file, tiny_model_dir, data=mix)
        return
    with pytest.raises(PreflightError) as caught:
        preflight(rows_file, tiny_model_dir, data=mix)
    assert str(caught.value).startswith(f"data.sources[1].source: {must_mention}")
    assert "HF_TOKEN" in str(caught.value)
    if dataset == "owner/gated":
        assert "https://huggingface.co/datasets/owner/gated" in str(caught.value)  # the dataset's page, not a model's


def test_an_unknown_optimizer_suggests_real_ones(rows_file: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(PreflightError, match=r"training.optim: 'adamw_troch' .* Did you mean 'adamw_torch'"):
        preflight(rows_file, tiny_model_dir, training={"optim": "adamw_troch"})
    preflight(rows_file, tiny_model_dir, training={"optim": "adamw_torch_4bit"})  # valid, though not in the fast list


def test_the_optimizers_accepted_without_importing_transformers_are_real() -> None:
    from transformers.training_args import OptimizerNames

    assert set(COMMON_OPTIMIZERS) <= {o.value for o in OptimizerNames}


def test_more_gpus_than_this_machine_has_is_refused_for_a_local_run(
    rows_file: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmtune.train.distributed import visible_gpus

    many = visible_gpus() + 2
    monkeypatch.delenv("LLMTUNE_RECIPE", raising=False)
    with pytest.raises(PreflightError, match=f"training.num_gpus={many}"):
        preflight(rows_file, tiny_model_dir, training={"num_gpus": many})
    monkeypatch.setenv("LLMTUNE_RECIPE", "kubernetes")  # a cloud stack's GPUs are not this machine's
    preflight(rows_file, tiny_model_dir, training={"num_gpus": many})


def test_eval_split_must_exist(rows_file: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(PreflightError, match=r"data.eval_split: '.*held-out.jsonl' does not exist"):
        preflight(rows_file, tiny_model_dir, data={"eval_split": str(tmp_path / "held-out.jsonl")})
    with pytest.raises(PreflightError, match=r"data.eval_split: 'test' is not a file.*single file"):
        preflight(rows_file, tiny_model_dir, data={"eval_split": "test"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a"}\n')
    with pytest.raises(PreflightError, match=r"data.eval_split: .*missing field 'output'"):
        preflight(rows_file, tiny_model_dir, data={"eval_split": str(bad)})
    preflight(rows_file, tiny_model_dir, data={"eval_split": str(rows_file)})


def test_a_bad_cron_expression_is_reported_before_the_other_checks() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "--schedule", "every night", "--set", "data.source=no/such.jsonl"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "'every night' is not a cron expression" in result.stderr
    assert "data.source" not in result.stderr

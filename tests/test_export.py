"""Export on the tiny model with the real libraries: streaming 16-bit merge, merge check, formats that load
with plain transformers / PEFT, model card, Hub push failures, MLflow registry, and the export pipeline."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from llmtune import release
from llmtune.artifacts import PreparedData, TrainingReport
from llmtune.config import ExportConfig, LoraConfig, ModelConfig, RunConfig
from llmtune.model import hf
from llmtune.release import card, check, merge, publish, weights

FAKE_TOKEN = "hf_" + "Q7x" * 10  # shaped like a real token, so a leak would be visible


def random_adapter(quantized_dir: Path, out: Path, seed: int, scale: float = 0.05) -> Path:
    """A real PEFT adapter for the base whose B factors are random (nonzero), as training would leave them."""
    hf.add_lora(quantized_dir, LoraConfig(), out / "init")
    model = hf.load_for_inference(quantized_dir, out / "init")
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * scale
    model.save_pretrained(str(out / "adapter"))
    return out / "adapter"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, quantized_dir: Path, prepared_dir: Path) -> dict:
    root = tmp_path_factory.mktemp("export")
    return {
        "root": root,
        "adapter": random_adapter(quantized_dir, root / "a1", seed=1),
        "other_adapter": random_adapter(quantized_dir, root / "a2", seed=2),
        "zero_adapter": root / "a1" / "init",  # LoRA B is zero at init: merging it gives the base alone
        "tokenizer": AutoTokenizer.from_pretrained(prepared_dir / "tokenizer"),
        "prompts": [p["prompt"] for p in PreparedData(str(prepared_dir)).eval_prompts()],
    }


CFG = ExportConfig(max_shard_size="100KB", formats=["adapter", "merged_16bit", "merged_4bit"], merge_check_prompts=6)
TRAINED_ON = "8 x NVIDIA H200 (the training machine), torch 2.11"


def release_inputs(
    tiny_model_dir: Path, quantized_dir: Path, prepared_dir: Path, adapter: Path, export_cfg: ExportConfig = CFG
) -> release.ReleaseInputs:
    config = RunConfig(model=ModelConfig(name=str(tiny_model_dir)), export=export_cfg)
    trained = TrainingReport(first_loss=2.0, final_loss=1.0, train_seconds=12.0, steps=8, hardware=TRAINED_ON)
    scores = {"base_eval_loss": 2.5, "tuned_eval_loss": 1.25, "eval_rows": 24}
    trail = {"zenml_run": "finetune-test", "zenml_run_id": "r1", "training_run": "finetune-test"}
    return release.ReleaseInputs(config, quantized_dir, adapter, prepared_dir, scores, trained, trail)


@pytest.fixture(scope="module")
def exported(work: dict, tiny_model_dir: Path, quantized_dir: Path, prepared_dir: Path) -> dict:
    """All three formats of the random adapter, with model cards, through the library's release order."""
    export_cfg = CFG.model_copy(update={"output_dir": str(work["root"] / "local")})
    inputs = release_inputs(tiny_model_dir, quantized_dir, prepared_dir, work["adapter"], export_cfg)
    seen: list[dict] = []
    report = release.release(inputs, release.Destinations(run_name="run-1"), work["root"] / "out", seen.append)
    assert seen == [report.merge_check], "the check reached the caller before anything was written"
    return {"check": report.merge_check, "folders": report.folders, "local": report.local}


def test_streaming_merge_equals_peft_merge_on_the_16bit_base(work: dict, tiny_model_dir: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = work["root"] / "streamed"
    info = merge.merge_streaming(tiny_model_dir, work["adapter"], out, "bfloat16", max_shard_size="100KB")
    assert info["merged_lora_modules"] == 2 * 7 and info["merged_shards"] > 1
    index = json.loads((out / weights.INDEX_FILE).read_text())
    streamed = {k: v for f in sorted(out.glob("model-*.safetensors")) for k, v in load_file(f).items()}
    assert set(index["weight_map"]) == set(streamed)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    want = PeftModel.from_pretrained(base, str(work["adapter"])).merge_and_unload().state_dict()
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    original = load_file(tiny_model_dir / "model.safetensors")[q_proj]
    assert not torch.equal(streamed[q_proj], original.to(torch.bfloat16)), "the adapter is in the merged weight"
    for name, tensor in streamed.items():
        assert tensor.dtype == torch.bfloat16
        # same float32 sum, one bfloat16 rounding: at most one bfloat16 step apart
        torch.testing.assert_close(tensor.float(), want[name].to(torch.bfloat16).float(), atol=1e-6, rtol=2**-7)


def test_merge_is_onto_the_original_weights_not_the_dequantized_4bit_ones(work: dict, tiny_model_dir: Path) -> None:
    from safetensors.torch import load_file

    out = work["root"] / "zero_merge"
    merge.merge_streaming(tiny_model_dir, work["zero_adapter"], out, "bfloat16", max_shard_size="10GB")
    merged = load_file(out / "model.safetensors")
    original = load_file(tiny_model_dir / "model.safetensors")
    assert all(torch.equal(merged[k], original[k].to(torch.bfloat16)) for k in original)


def test_merge_check_passes_for_a_correct_merge(exported: dict) -> None:
    check = exported["check"]
    assert check["merge_check_passed"], check["merge_check_failures"]
    assert check["merge_check_max_logit_gap"] <= CFG.merge_check_atol
    assert check["merge_check_greedy_mismatches"] == 0
    assert check["merge_check_adapter_effect"] > CFG.merge_check_atol
    # the published model differs from the trained NF4 one by the base's quantization error, and says so
    assert check["vs_trained_nf4_max_logit_gap"] > 0 and 0 <= check["vs_trained_nf4_greedy_agreement"] <= 1


def test_merge_check_refuses_a_merge_that_equals_the_base(
    work: dict, tiny_model_dir: Path, quantized_dir: Path, prepared_dir: Path
) -> None:
    inputs = release_inputs(tiny_model_dir, quantized_dir, prepared_dir, work["zero_adapter"])
    seen: list[dict] = []
    with pytest.raises(release.MergeCheckFailed, match="cannot be told apart from the base"):
        release.release(inputs, release.Destinations(), work["root"] / "zero", seen.append)
    assert not seen[0]["merge_check_passed"] and seen[0]["merge_check_adapter_effect"] == 0.0
    assert not (work["root"] / "zero" / "adapter").exists(), "nothing written after a failed check"


def test_merge_check_refuses_a_merged_model_of_another_adapter(
    work: dict, tiny_model_dir: Path, quantized_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = work["root"] / "wrong"
    merge.merge_streaming(tiny_model_dir, work["other_adapter"], wrong, "bfloat16")
    work["tokenizer"].save_pretrained(str(wrong))
    inputs = check.CheckInputs(tiny_model_dir, work["adapter"], None, work["tokenizer"], work["prompts"])
    result = check.check_merge(wrong, inputs, ExportConfig(merge_check_prompts=4))
    shown = capsys.readouterr().out  # the merge and each pass of the check show their progress
    from safetensors.torch import load_file

    tensors = len(load_file(tiny_model_dir / "model.safetensors"))  # every base tensor is written, merged or not
    assert re.search(rf"^merge into bfloat16: 100%.* {tensors}/{tensors} ", shown, re.MULTILINE), shown
    for part in ("base + adapter", "base alone", "merged"):
        assert re.search(rf"^merge check: {re.escape(part)}: 100%.* 4/4 ", shown, re.MULTILINE), shown
    assert not result["merge_check_passed"]
    assert result["merge_check_max_logit_gap"] > 0.25 and result["merge_check_greedy_mismatches"] > 0


def test_formats_carry_tokenizer_template_card_and_point_at_the_original_base(
    exported: dict, tiny_model_dir: Path, prepared_dir: Path
) -> None:
    folders = exported["folders"]
    assert {p.name for p in folders.values()} == {"adapter", "merged", "merged-4bit"}
    adapter_config = json.loads((folders["adapter"] / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir)
    data = PreparedData(str(prepared_dir))
    template = data.tokenizer().chat_template
    fingerprint = data.stats()["fingerprint"]
    for folder in folders.values():
        assert AutoTokenizer.from_pretrained(folder).chat_template == template
        text = (folder / "README.md").read_text()
        assert str(tiny_model_dir) in text and fingerprint in text and "| eval_loss | 2.5 | 1.25 |" in text
        # the machine that trained (from the training report), not the one that exported
        assert f"Hardware: {TRAINED_ON}" in text and "export machine" not in text
        assert (folder / "llmtune_config.yaml").is_file()
    assert len(list(folders["merged_16bit"].glob("model-*-of-*.safetensors"))) > 1
    for kind, folder in folders.items():  # copied under export.output_dir/<run> before any push
        assert (
            Path(exported["local"][f"{kind}_path"]) == (folder.parents[1] / "local" / "run-1" / folder.name).resolve()
        )


PLAIN_LOAD = r"""
import json, re, sys
import torch
from pathlib import Path
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM, AutoTokenizer

folders = json.loads(sys.argv[1])
prompt = sys.argv[2]
tok = AutoTokenizer.from_pretrained(folders["merged_16bit"])
ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
merged = AutoModelForCausalLM.from_pretrained(folders["merged_16bit"], dtype=torch.float32)
adapter = AutoPeftModelForCausalLM.from_pretrained(folders["adapter"], dtype=torch.float32)
four_bit = AutoModelForCausalLM.from_pretrained(folders["merged_4bit"])
with torch.no_grad():
    gap = (merged(**ids).logits - adapter(**ids).logits).abs().max().item()
answers = {}
for kind, folder in folders.items():  # the card's own "How to load" snippet, as a user would paste it
    code = re.search(r"```python\n(.*?)```", Path(folder, "README.md").read_text(), re.S).group(1)
    scope = {}
    exec(code.replace("path/to/this/folder", folder), scope)
    answers[kind] = type(scope["answer"]).__name__
print(json.dumps({
    "gap": gap,
    "four_bit_layers": sum("Linear4bit" in type(m).__name__ for m in four_bit.modules()),
    "merged_class": type(merged).__name__,
    "answers": answers,
    "project_code_loaded": any(name.split(".")[0] in {"llmtune", "steps", "pipelines"} for name in sys.modules),
}))
"""


def test_exports_load_with_plain_transformers_and_peft_only(exported: dict, work: dict, tmp_path: Path) -> None:
    folders = {kind: str(path) for kind, path in exported["folders"].items()}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-I", "-c", PLAIN_LOAD, json.dumps(folders), work["prompts"][0]],
        cwd=tmp_path,  # nowhere near the project, and -I keeps it off sys.path
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert not result["project_code_loaded"]
    assert result["gap"] <= CFG.merge_check_atol, "merged == base + adapter, each loaded by its own library"
    assert result["merged_class"] == "LlamaForCausalLM" and result["four_bit_layers"] == 2 * 7
    assert result["answers"] == dict.fromkeys(folders, "Tensor")


def test_base_given_as_a_hub_id_is_read_from_the_hub_cache_layout(tiny_model_dir: Path, tmp_path: Path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--llmtune-test--tiny-llama"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, snapshot / name)
    found = weights.resolve_base_checkpoint(ModelConfig(name="llmtune-test/tiny-llama"), cache_dir=tmp_path)
    assert found == snapshot
    with pytest.raises(weights.ExportError, match="Could not get the 16-bit base 'llmtune-test/not-there'"):
        weights.resolve_base_checkpoint(ModelConfig(name="llmtune-test/not-there"), cache_dir=tmp_path)


def tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def hub_reachable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let huggingface_hub make requests (the test session runs it offline) to the local endpoints below."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_hub_push_without_network_fails_clearly_and_keeps_the_export(exported: dict, hub_reachable: None) -> None:
    folder = exported["folders"]["merged_16bit"]
    before = tree_digest(folder)
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there: like no network
    with pytest.raises(publish.PublishError) as err:
        publish.push_to_hub(folder, "me/tuned", FAKE_TOKEN, True, "msg", endpoint=endpoint)
    assert f"could not reach {endpoint}" in str(err.value) and f"local export at {folder} is intact" in str(err.value)
    assert FAKE_TOKEN not in str(err.value)
    assert tree_digest(folder) == before


class RefusingHub(http.server.BaseHTTPRequestHandler):
    """An HTTP server that answers every request as the Hub answers a bad token."""

    def _refuse(self) -> None:
        body = json.dumps({"error": "Invalid credentials in Authorization header"}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _refuse

    def log_message(self, *args: object) -> None:
        pass


def test_hub_push_with_a_bad_token_fails_clearly_and_keeps_the_export(exported: dict, hub_reachable: None) -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), RefusingHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    folder = exported["folders"]["adapter"]
    before = tree_digest(folder)
    try:
        with pytest.raises(publish.PublishError, match="refused the token \\(HTTP 401\\)") as err:
            publish.push_to_hub(
                folder, "me/tuned", FAKE_TOKEN, True, "msg", endpoint=f"http://127.0.0.1:{server.server_port}"
            )
    finally:
        server.shutdown()
    assert FAKE_TOKEN not in str(err.value) and "is intact" in str(err.value)
    assert tree_digest(folder) == before


def test_hub_push_without_a_token_says_where_to_put_one(exported: dict) -> None:
    with pytest.raises(publish.PublishError, match=r"set HF_TOKEN .* or export\.hub_token_secret"):
        publish.push_to_hub(exported["folders"]["adapter"], "me/tuned", None, True, "msg")


def test_mlflow_registry_version_carries_the_trail(exported: dict, tmp_path: Path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("export-test", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(experiment)
    tags = {"zenml_run": "finetune-x", "dataset_fingerprint": "f1a9e7", "base_model": "org/base"}
    first = publish.register_in_mlflow(exported["folders"]["adapter"], "llmtune-tiny", run.info.run_id, tags, uri)
    second = publish.register_in_mlflow(exported["folders"]["adapter"], "llmtune-tiny", run.info.run_id, tags, uri)
    assert (first["mlflow_model_version"], second["mlflow_model_version"]) == ("1", "2")
    version = client.get_model_version("llmtune-tiny", "1")
    assert version.run_id == run.info.run_id and tags.items() <= version.tags.items()
    local = Path(mlflow.artifacts.download_artifacts(version.source, tracking_uri=uri))
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= {p.name for p in local.iterdir()}


def test_model_card_has_no_token_even_when_one_is_in_the_environment(
    exported: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    facts = card.CardFacts(
        kind="merged_16bit",
        base_model="org/base",
        base_revision="main",
        repo_id="me/tuned",
        dataset="org/data",
        dataset_fingerprint="ab",
        resolved_config=f"note: {FAKE_TOKEN}\n",  # even a token pasted into the config is redacted
        eval_report={},
        training_report={},
        hardware="cpu",
        merge_check={},
    )
    text = card.render_model_card(facts)
    assert FAKE_TOKEN not in text and "[redacted]" in text
    assert re.search(r"^datasets:\n- org/data$", text, re.M) and 'from_pretrained("me/tuned")' in text


# --- the pipelines: finetune exports and registers, `--pipeline export` re-exports without training -------------


def cli(pipeline: str, overrides: list[str]) -> int:
    import run as cli_module

    return cli_module.main(["--pipeline", pipeline, *(a for o in overrides for a in ("--set", o))])


def latest_run(pipeline_name: str):
    from zenml.client import Client

    return Client().list_pipeline_runs(pipeline_name=pipeline_name, sort_by="desc:created", size=1).items[0]


def all_text(folder: Path) -> str:
    return "".join(p.read_bytes().decode("latin-1") for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def finetuned(
    tiny_model_dir: Path, rows_file: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch_module: None
) -> dict:
    from tests.conftest import tiny_run_overrides

    out = tmp_path_factory.mktemp("pipeline-out")
    overrides = [
        *tiny_run_overrides(tiny_model_dir, rows_file, out),
        "export.mlflow_registered_model=llmtune-tiny",
        "export.zenml_model=llmtune-tiny",
    ]
    assert cli("finetune", overrides) == 0
    return {"run": latest_run("finetune"), "out": out, "overrides": overrides}


@pytest.fixture(scope="module")
def monkeypatch_module() -> object:
    """HF_TOKEN set for the module's pipeline runs, to prove it never lands in an export."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_TOKEN", FAKE_TOKEN)
        yield


@pytest.mark.pipeline
def test_finetune_run_records_the_check_and_registers_a_version(finetuned: dict) -> None:
    from mlflow.tracking import MlflowClient
    from zenml.client import Client

    from cli.stack import mlflow_tracking_uri

    step = finetuned["run"].steps["merge_and_push"]
    assert step.status.value == "completed"
    assert step.run_metadata["merge_check_passed"] is True and "merge_check_max_logit_gap" in step.run_metadata
    dest = finetuned["out"] / finetuned["run"].name
    assert FAKE_TOKEN not in all_text(dest)
    assert "## How to load" in (dest / "merged" / "README.md").read_text()
    client = MlflowClient(tracking_uri=mlflow_tracking_uri())
    version = client.get_model_version("llmtune-tiny", step.run_metadata["mlflow_model_version"])
    assert version.tags["zenml_run"] == finetuned["run"].name
    assert version.tags["base_model"].endswith("base") and len(version.tags["dataset_fingerprint"]) == 16
    model_version = Client().get_model_version("llmtune-tiny", "latest")
    assert model_version.run_metadata["merge_check_passed"] is True
    assert finetuned["run"].name in model_version.pipeline_runs


@pytest.mark.pipeline
def test_export_pipeline_reexports_without_training_and_a_failed_push_keeps_the_export(
    finetuned: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    source = finetuned["run"]
    overrides = [
        *finetuned["overrides"],
        f"source.run={source.name}",
        "export.formats=[adapter]",
        "export.publish_format=adapter",
        "export.hub_repo_id=me/tuned",
        "export.mlflow_registered_model=null",
    ]
    # the session is offline: the Hub push fails, and ends the CLI as a user-fixable error
    assert cli("export", overrides) == 2
    assert "push it later with: hf upload me/tuned" in capsys.readouterr().err
    failed = latest_run("export")
    assert set(failed.steps) == {"merge_and_push"}, "nothing is retrained"
    assert failed.steps["merge_and_push"].run_metadata["merge_check_passed"] is True
    adapter = finetuned["out"] / failed.name / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "README.md").is_file()
    assert FAKE_TOKEN not in all_text(adapter)
    # the same adapter bytes as the training run's
    trained = finetuned["out"] / source.name / "adapter" / "adapter_model.safetensors"
    assert (adapter / "adapter_model.safetensors").read_bytes() == trained.read_bytes()


@pytest.mark.pipeline
def test_export_pipeline_from_a_model_version(finetuned: dict) -> None:
    from zenml.client import Client

    number = Client().get_model_version("llmtune-tiny", "latest").number
    overrides = [
        *finetuned["overrides"],
        f"source.model_version={number}",
        "export.mlflow_registered_model=null",
    ]
    assert cli("export", overrides) == 0
    run = latest_run("export")
    assert run.status.value == "completed" and run.model_version.number == number
    assert (finetuned["out"] / run.name / "merged" / "model.safetensors").is_file()

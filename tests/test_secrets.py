"""Secrets never leak, weights are read only from safetensors, and remote code runs only when configured.

The end-to-end test plants two canaries: a Hub token in HF_TOKEN and a judge key in a real ZenML secret named
by `evaluation.judge_api_key_secret`. One real finetune run (the CLI, in a subprocess so its whole console is
captured) uses both: the judge is a local OpenAI-compatible server and the Hub a local server that accepts the
push, and each checks it received its secret. Then every place the run wrote to is scanned for either canary,
as it is and base64-encoded: MLflow (params, tags, metric names, artifacts, registry tags, the raw database),
ZenML (run, step, artifact and model-version records, step logs, the raw database, every file of the local
store), the exported folders, the files the Hub received, and the run's stdout and stderr.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import re
import secrets
import shutil
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from tests.conftest import ROOT, tiny_run_overrides
from tests.http_fakes import JsonHandler

TOKEN_HEX = secrets.token_hex(12)
HUB_TOKEN = f"hf_llmtuneCANARY{TOKEN_HEX}"
JUDGE_KEY = f"sk-llmtuneCANARY{secrets.token_hex(12)}"
SECRET_NAME = f"llmtune-judge-{TOKEN_HEX[:8]}"
MLFLOW_MODEL = "llmtune-secrets-test"


# --- the scanner ----------------------------------------------------------------------------------------------


def canary_patterns(secret: str) -> dict[str, bytes]:
    """Byte strings that betray `secret`: itself, and its base64 (standard and URL-safe) wherever it starts.

    A secret inside a base64 blob starts at one of three offsets within a 3-byte group; from the first whole
    group on, its encoding is the same whatever surrounds it.

    >>> sorted(canary_patterns("hf_abcdef"))
    ['base64+0', 'base64+1', 'base64+2', 'plain', 'urlsafe+0', 'urlsafe+1', 'urlsafe+2']
    """
    raw = secret.encode()
    patterns = {"plain": raw}
    for skip in range(3):
        tail = raw[skip:]
        whole_groups = len(tail) // 3 * 4
        patterns[f"base64+{skip}"] = base64.b64encode(tail)[:whole_groups]
        patterns[f"urlsafe+{skip}"] = base64.urlsafe_b64encode(tail)[:whole_groups]
    return patterns


PATTERNS = {"hub token": canary_patterns(HUB_TOKEN), "judge key": canary_patterns(JUDGE_KEY)}


def find_in_bytes(data: bytes, where: str, patterns: dict[str, dict[str, bytes]] = PATTERNS) -> list[str]:
    """'where: <secret> (<form>) at byte <offset>' for every hit."""
    hits = []
    for secret, forms in patterns.items():
        for form, pattern in forms.items():
            start = data.find(pattern)
            while start != -1:
                hits.append(f"{where}: {secret} ({form}) at byte {start}")
                start = data.find(pattern, start + 1)
    return hits


def find_in_text(text: str, where: str) -> list[str]:
    return find_in_bytes(text.encode("utf-8", "surrogateescape"), where)


def find_in_tree(root: Path, skip: Iterable[Path] = ()) -> list[str]:
    """Hits in every file under `root` (a file itself is fine), but the files in `skip`."""
    skipped = {p.resolve() for p in skip}
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return [hit for f in files if f.resolve() not in skipped for hit in find_in_bytes(f.read_bytes(), str(f))]


def as_json(value: Any) -> str:
    return json.dumps(value, default=str, sort_keys=True)


def sqlite_path(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))


def sqlite_snapshot(db: Path, dest: Path, drop_tables: Iterable[str] = ()) -> Path:
    """A compact copy of an SQLite database (the WAL included), without the rows of `drop_tables`.

    VACUUM rewrites the copy, so deleted rows leave no bytes behind in free pages.
    """
    with sqlite3.connect(db) as source, sqlite3.connect(dest) as copy:
        source.backup(copy)
        for table in drop_tables:
            copy.execute(f"DELETE FROM {table}")  # table names are our own constants
        copy.commit()
        copy.execute("VACUUM")
    return dest


def mlflow_leaks(tracking_uri: str, download_to: Path) -> list[str]:
    """Hits in every MLflow run (params, tags, metric names, artifacts), registry version tag, and the raw DB."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    hits: list[str] = []
    experiments = [e.experiment_id for e in client.search_experiments()]
    for run in client.search_runs(experiments, max_results=1000):
        where = f"mlflow run {run.info.run_id}"
        data = run.data
        hits += find_in_text(as_json([data.params, data.tags, sorted(data.metrics)]), f"{where} params/tags/metrics")
        artifacts = Path(client.download_artifacts(run.info.run_id, "", str(download_to / run.info.run_id)))
        hits += find_in_tree(artifacts)
    for version in client.search_model_versions():
        hits += find_in_text(as_json(dict(version)), f"mlflow model version {version.name}/{version.version}")
    db = sqlite_path(tracking_uri)
    hits += find_in_bytes(sqlite_snapshot(db, download_to / "mlflow-copy.db").read_bytes(), f"raw {db}")
    return hits


# --- the scanner finds what it should (so a clean scan means something) ---------------------------------------


def test_scanner_reports_path_and_offset_of_each_form(tmp_path: Path) -> None:
    envelope = json.dumps({"api_key": JUDGE_KEY}).encode()
    for shift in range(3):  # every alignment of the secret inside a base64 blob
        (tmp_path / f"b64-{shift}.txt").write_bytes(base64.b64encode(b"x" * shift + envelope))
    (tmp_path / "plain.log").write_bytes(b"0123456789" + HUB_TOKEN.encode())
    (tmp_path / "url.txt").write_bytes(base64.urlsafe_b64encode(b"?" + HUB_TOKEN.encode() + b"\xff\xfe"))
    (tmp_path / "clean.txt").write_text("hf_llmtuneCANARY without the rest, sk-llmtune and a model card")
    hits = find_in_tree(tmp_path)
    assert f"{tmp_path / 'plain.log'}: hub token (plain) at byte 10" in hits
    for shift in range(3):
        assert any(h.startswith(f"{tmp_path / f'b64-{shift}.txt'}: judge key (base64") for h in hits)
    assert any(h.startswith(f"{tmp_path / 'url.txt'}: hub token (urlsafe") for h in hits)
    assert not any("clean.txt" in h for h in hits)


def test_mlflow_scan_finds_a_planted_param_tag_artifact_and_database_row(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("planted", artifact_location=str(tmp_path / "artifacts")))
    client.log_param(run.info.run_id, "export.note", HUB_TOKEN)
    client.set_tag(run.info.run_id, "note", base64.b64encode(JUDGE_KEY.encode()).decode())
    client.log_text(run.info.run_id, f"Authorization: Bearer {JUDGE_KEY}", "config.yaml")
    hits = mlflow_leaks(uri, tmp_path / "download")
    assert any("params/tags/metrics: hub token (plain)" in h for h in hits)
    assert any("params/tags/metrics: judge key (base64" in h for h in hits)
    assert any("config.yaml: judge key (plain)" in h for h in hits)
    assert any(h.startswith(f"raw {tmp_path / 'mlflow.db'}: hub token (plain)") for h in hits)


# --- local stand-ins for the Hub and the judge --------------------------------------------------------------------


class AcceptingHub(JsonHandler):
    """Speaks the part of the Hub API that `HfApi.create_repo` + `upload_folder` use, and accepts the push.

    Every file goes as a regular (non-LFS) blob, base64 in the commit's NDJSON, so the test sees all bytes pushed.
    """

    requests: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = self.path.split("?")[0]
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        host = f"http://{self.headers['Host']}"
        if path == "/api/repos/create":
            request = json.loads(body)
            self.reply_json({"url": f"{host}/{request['organization']}/{request['name']}"})
        elif path == "/api/validate-yaml":
            self.reply_json({})
        elif "/preupload/" in path:
            files = json.loads(body)["files"]
            self.reply_json(
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        elif "/commit/" in path:
            repo = path.removeprefix("/api/models/").split("/commit/")[0]
            self.reply_json({"commitUrl": f"{host}/{repo}/commit/{'c' * 40}", "commitOid": "c" * 40})
        else:
            self.reply_json({"error": f"the test Hub does not know {path}"}, status=404)

    do_GET = do_PUT = do_POST


def pushed_files(requests: list[dict[str, Any]]) -> dict[str, bytes]:
    """The files of the Hub commit, decoded from its NDJSON body."""
    files = {}
    for request in requests:
        if "/commit/" in request["path"]:
            for line in request["body"].splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
    return files


class ScoringJudge(JsonHandler):
    """An OpenAI-compatible chat completions endpoint that gives every answer 'Score: 7'."""

    requests: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        self.reply_json({"choices": [{"index": 0, "message": {"content": "Score: 7"}}]})


def serve(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def hub() -> Iterator[str]:
    AcceptingHub.requests = []
    yield from serve(AcceptingHub)


@pytest.fixture(scope="module")
def judge_url() -> Iterator[str]:
    ScoringJudge.requests = []
    for url in serve(ScoringJudge):
        yield f"{url}/v1"


# --- one real finetune run with both secrets planted ----------------------------------------------------------------


@pytest.fixture(scope="module")
def judge_secret() -> Iterator[str]:
    from zenml.client import Client

    Client().create_secret(SECRET_NAME, values={"api_key": JUDGE_KEY})
    yield SECRET_NAME
    Client().delete_secret(SECRET_NAME)


@pytest.fixture(scope="module")
def planted_run(
    tiny_model_dir: Path,
    rows_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
    hub: str,
    judge_url: str,
    judge_secret: str,
) -> dict[str, Any]:
    from zenml.client import Client

    out = tmp_path_factory.mktemp("secrets-out")
    overrides = [
        *tiny_run_overrides(tiny_model_dir, rows_file, out, max_steps=4),
        "export.merge_check_prompts=2",
        f"evaluation.judge_url={judge_url}",
        "evaluation.judge_model=judge-1",
        f"evaluation.judge_api_key_secret={judge_secret}",
        "evaluation.judge_api_key_env=LLMTUNE_TEST_NO_SUCH_VAR",  # the key can only come from the ZenML secret
        "export.hub_repo_id=me/tuned",
        f"export.hub_endpoint={hub}",
        "promotion.min_improvement_over_base=-1000",  # publish whatever 4 steps give: the test is about secrets
        "promotion.promote_to=null",
        f"export.mlflow_registered_model={MLFLOW_MODEL}",
        "export.zenml_model=llmtune-secrets",
    ]
    # HF_TOKEN is the env route to the Hub token; the Hub is local, so the run may leave offline mode.
    env = {**os.environ, "HF_TOKEN": HUB_TOKEN, "HF_HUB_OFFLINE": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("LLMTUNE_JUDGE_API_KEY", None)
    command = [sys.executable, "run.py", "--pipeline", "finetune", "--no-cache"]
    done = subprocess.run(
        [*command, *(a for o in overrides for a in ("--set", o))],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = Client().list_pipeline_runs(pipeline_name="finetune", sort_by="desc:created", size=1).items[0]
    return {"run": run, "out": out / run.name, "stdout": done.stdout, "stderr": done.stderr}


@pytest.mark.pipeline
def test_both_secrets_were_really_used(planted_run: dict[str, Any]) -> None:
    assert planted_run["run"].status.value == "completed"
    judged = [r for r in ScoringJudge.requests if r["path"] == "/v1/chat/completions"]
    assert len(judged) == 2 * 4, "base and tuned answers to 4 prompts"
    assert all(r["auth"] == f"Bearer {JUDGE_KEY}" for r in judged), "the key came from the ZenML secret"
    paths = [r["path"].split("?")[0] for r in AcceptingHub.requests]
    assert paths[0] == "/api/repos/create" and paths[-1] == "/api/models/me/tuned/commit/main"
    assert all(r["auth"] == f"Bearer {HUB_TOKEN}" for r in AcceptingHub.requests), "the token came from HF_TOKEN"
    export = planted_run["run"].steps["merge_and_push"].run_metadata
    assert export["hub_commit_url"].endswith(f"/me/tuned/commit/{'c' * 40}")
    # the push says what it sends before the upload starts and how long it took (the step log shows both)
    assert re.search(r"push: \d+ files \([\d.,]+ MiB\) to the Hub repo me/tuned \.\.\.", planted_run["stdout"])
    assert re.search(r"push: done in [\d.]+ s: \S+/me/tuned/commit/", planted_run["stdout"])
    assert re.search(r"export: write: 100%.*\d+(\.\d+)?[kMG]?B/", planted_run["stdout"]), "local copy progress"


@pytest.mark.pipeline
def test_no_secret_in_mlflow(planted_run: dict[str, Any], tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from cli.stack import mlflow_tracking_uri, use_local_stack
    from cli.summary import mlflow_run_id

    use_local_stack()
    uri = mlflow_tracking_uri()
    run_id = mlflow_run_id(planted_run["run"].name)
    assert run_id, "the run is in MLflow, so the scan below covers it"
    assert "evaluation.judge_api_key_secret" in MlflowClient(tracking_uri=uri).get_run(run_id).data.params
    hits = mlflow_leaks(uri, tmp_path)
    assert not hits, "secrets found:\n" + "\n".join(hits)


def zenml_records(run: Any) -> Iterator[tuple[str, Any]]:
    """(what, record) for the run, its steps, their artifact versions and the model version, hydrated."""
    yield f"run {run.name}", run.get_hydrated_version().model_dump(mode="json")
    for name, step in run.steps.items():
        yield f"step {name}", step.get_hydrated_version().model_dump(mode="json")
        for output, versions in step.outputs.items():
            for version in versions if isinstance(versions, list) else [versions]:
                yield f"artifact {name}.{output}", version.get_hydrated_version().model_dump(mode="json")
    if run.model_version is not None:
        yield "model version", run.model_version.get_hydrated_version().model_dump(mode="json")


def log_files(run: Any) -> list[Path]:
    """The local files holding the run's and its steps' logs (a log collection entry names a file or a folder)."""
    collections = [run.get_hydrated_version().log_collection, *(step.log_collection for step in run.steps.values())]
    files = []
    for logs in (entry for collection in collections for entry in collection or []):
        path = Path(logs.uri)
        files += [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return files


@pytest.mark.pipeline
def test_no_secret_in_zenml_records_logs_or_store(planted_run: dict[str, Any], tmp_path: Path) -> None:
    from zenml.client import Client

    run = planted_run["run"]
    records = list(zenml_records(run))
    assert any(what == "model version" for what, _ in records) and len(records) > 12
    hits = [hit for what, record in records for hit in find_in_text(as_json(record), f"zenml {what}")]

    logs = log_files(run)
    log_text = b"".join(p.read_bytes() for p in logs)
    for name in run.steps:
        assert f"Step `{name}` has finished".encode() in log_text, f"the logs of {name} were found and read"
    hits += [hit for path in logs for hit in find_in_tree(path)]

    # The ZenML database must hold the judge key in exactly one place: the secret, where the user put it.
    db = sqlite_path(Client().zen_store.config.url)
    with_secret = sqlite_snapshot(db, tmp_path / "zenml-with-secret.db").read_bytes()
    assert any("judge key (base64" in h for h in find_in_bytes(with_secret, "zenml secret")), "the secret is real"
    without = sqlite_snapshot(db, tmp_path / "zenml-without-secrets.db", drop_tables=["secret"])
    hits += find_in_bytes(without.read_bytes(), f"raw {db} (secret table removed)")

    # Everything else on disk: the local artifact store (artifacts, visualizations, logs, the MLflow store) and config.
    config_root = Path(os.environ["ZENML_CONFIG_PATH"])
    artifact_store = Path(Client().active_stack.artifact_store.path)
    assert artifact_store.is_relative_to(config_root) and all(p.is_relative_to(config_root) for p in logs)
    database_files = [p for p in db.parent.iterdir() if p.name.startswith(db.name)]  # zenml.db and its WAL
    hits += find_in_tree(config_root, skip=database_files)
    assert not hits, "secrets found:\n" + "\n".join(hits)


@pytest.mark.pipeline
def test_no_secret_in_exports_the_hub_push_or_the_console(planted_run: dict[str, Any]) -> None:
    out = planted_run["out"]
    cards = [out / "adapter" / "README.md", out / "merged" / "README.md"]
    assert all(card.is_file() for card in cards) and (out / "adapter" / "llmtune_config.yaml").is_file()
    assert "hub_endpoint" in (out / "merged" / "llmtune_config.yaml").read_text()
    hits = find_in_tree(out)

    pushed = pushed_files(AcceptingHub.requests)
    assert {"README.md", "llmtune_config.yaml", "config.json"} <= set(pushed), "the merged folder was pushed"
    hits += [hit for name, data in pushed.items() for hit in find_in_bytes(data, f"pushed {name}")]
    for request in AcceptingHub.requests:  # the token goes in the Authorization header only, never a URL or body
        hits += find_in_bytes(request["path"].encode() + request["body"], f"hub request {request['path']}")
    for request in ScoringJudge.requests:
        hits += find_in_bytes(request["body"], "judge request body")

    assert "MLflow:" in planted_run["stdout"], "the run's console (its summary) was captured"
    hits += find_in_text(planted_run["stdout"], "stdout") + find_in_text(planted_run["stderr"], "stderr")
    assert not hits, "secrets found:\n" + "\n".join(hits)


# --- weights only from safetensors; remote code only when configured ------------------------------------------------


@pytest.fixture(scope="module")
def pickle_only_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its weights as a real `torch.save` pickle (pytorch_model.bin) and no safetensors."""
    import torch
    from safetensors.torch import load_file

    folder = tmp_path_factory.mktemp("pickle-model")
    for item in tiny_model_dir.iterdir():
        if item.is_file() and not item.name.endswith(".safetensors"):
            shutil.copy(item, folder / item.name)
    torch.save(load_file(tiny_model_dir / "model.safetensors"), folder / "pytorch_model.bin")
    return folder


@pytest.fixture(scope="module")
def pickle_only_adapter(quantized_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real PEFT adapter re-saved as adapter_model.bin only."""
    import torch
    from safetensors.torch import load_file

    from llmtune.config import LoraConfig
    from llmtune.model import hf

    folder = tmp_path_factory.mktemp("pickle-adapter")
    hf.add_lora(quantized_dir, LoraConfig(r=4), folder)
    weights = folder / "adapter_model.safetensors"
    torch.save(load_file(weights), folder / "adapter_model.bin")
    weights.unlink()
    return folder


def test_base_model_with_only_pickle_weights_is_refused(pickle_only_model: Path, tmp_path: Path) -> None:
    from llmtune.config import ModelConfig
    from llmtune.model import hf
    from llmtune.release import weights

    cfg = ModelConfig(name=str(pickle_only_model))
    with pytest.raises(hf.PickleWeightsRefused, match=r"has no model\.safetensors.*it has pytorch_model\.bin"):
        hf.load_quantized(cfg, tmp_path / "q")
    assert not (tmp_path / "q").exists()
    with pytest.raises(hf.PickleWeightsRefused, match="safetensors only"):
        weights.resolve_base_checkpoint(cfg)  # the export's 16-bit base
    with pytest.raises(hf.PickleWeightsRefused, match="safetensors only"):
        hf.load_base(pickle_only_model)


def test_transformers_itself_refuses_pickle_weights_with_use_safetensors(pickle_only_model: Path) -> None:
    """The guard for Hub ids, where the folder cannot be looked at first: `use_safetensors=True`."""
    from transformers import AutoModelForCausalLM

    with pytest.raises(OSError, match="safetensors"):
        AutoModelForCausalLM.from_pretrained(str(pickle_only_model), use_safetensors=True)


def test_adapter_with_only_pickle_weights_is_refused(pickle_only_adapter: Path, quantized_dir: Path) -> None:
    from llmtune.model import hf
    from llmtune.release import merge

    pattern = r"has no adapter_model\.safetensors \(it has adapter_model\.bin\)"
    with pytest.raises(hf.PickleWeightsRefused, match=pattern):
        hf.load_for_inference(quantized_dir, pickle_only_adapter)
    with pytest.raises(hf.PickleWeightsRefused, match=pattern):
        hf.load_trainable(quantized_dir, pickle_only_adapter, gradient_checkpointing=False)
    with pytest.raises(hf.PickleWeightsRefused, match=pattern):
        merge.load_lora_deltas(pickle_only_adapter)


CUSTOM_MODELING = """
raise RuntimeError("custom model code ran")
"""


def test_custom_model_code_is_refused_unless_trust_remote_code(tiny_model_dir: Path, tmp_path: Path) -> None:
    from llmtune.config import ModelConfig, load_config
    from llmtune.model import hf

    assert ModelConfig().trust_remote_code is False and load_config(None).model.trust_remote_code is False
    folder = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="llmtune-custom-llama",
        auto_map={"AutoConfig": "modeling_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.Custom"},
    )
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_custom.py").write_text(CUSTOM_MODELING)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        hf.load_quantized(ModelConfig(name=str(folder)), tmp_path / "q")

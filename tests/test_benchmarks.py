"""The training throughput benchmark on the CPU with the tiny model: its runs go through the pipeline's train path,
and its window counts exactly the tokens trained in the timed steps (what every tokens/s figure rests on)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEQ, BATCH, STEPS = 64, 4, 3


@pytest.fixture(scope="module")
def result(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--model-dir", str(tiny_model_dir)]
    cmd += [
        "--runs",
        "hf,hf-padded@2,hf-packed,hf:mix",
        "--seq",
        str(SEQ),
        "--batch",
        str(BATCH),
        "--steps",
        str(STEPS),
    ]
    cmd += ["--warmup", "2", "--work", str(work), "--json", str(work / "result.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "RESULT {" in proc.stdout and "hf-padded@2" in proc.stdout.split("RESULT")[0]  # the table came first
    return json.loads((work / "result.json").read_text())


def test_every_run_counts_the_tokens_of_its_timed_steps(result: dict) -> None:
    runs = {r["run"]: r for r in result["runs"]}
    assert set(runs) == {"hf", "hf-padded@2", "hf-packed", "hf:mix"}
    # Every row is SEQ tokens long, so a step trains batch x SEQ tokens, packed (one example per row) or not.
    assert runs["hf"]["timed_tokens"] == BATCH * SEQ * STEPS
    assert runs["hf-packed"]["timed_tokens"] == BATCH * SEQ * STEPS
    assert runs["hf-padded@2"]["timed_tokens"] == 2 * SEQ * STEPS and runs["hf-padded@2"]["batch"] == 2
    # The mix: packed rows of up to SEQ tokens, flattened, so no padding is counted and less than a full row may be.
    assert 0 < runs["hf:mix"]["timed_tokens"] <= BATCH * SEQ * STEPS
    for r in runs.values():
        # Every run is profiled by default (GPU busy share and kernels a step; both 0 here, on the CPU).
        assert r["profile"]["steps"] == 3 and {"kernels_per_step", "gpu_busy_fraction"} <= set(r["profile"])
        assert r["tokens_per_s"] == pytest.approx(r["timed_tokens"] / r["seconds"], rel=0.01)
        assert r["backend"] == "hf" and r["timed_steps"] == STEPS and r["profile"]["wall_ms_per_step"] > 0


def test_runs_use_the_batching_they_name(result: dict) -> None:
    runs = {r["run"]: r["trainer_args"] for r in result["runs"]}
    assert runs["hf-packed"]["packing"] and not runs["hf"]["packing"]
    assert runs["hf-padded@2"]["padding_free"] is False
    # The default decides from the data: full rows stay plain rows, the length mix is packed.
    data = {r["run"]: r for r in result["runs"]}
    assert data["hf"]["data"] == "full" and data["hf:mix"]["data"] == "length-mix"
    assert runs["hf:mix"]["packing"] and data["hf:mix"]["packing"] and data["hf"]["padding_free"] is False
    assert runs["hf"]["logging_nan_inf_filter"] is False  # no host sync per step in the pipeline's own trainer


def test_packed_run_is_compared_with_the_padded_one(result: dict) -> None:
    check = result["checks"]["packed_vs_padded_same_memory"]
    assert check["baseline"] == "hf-padded@2"
    by = {r["run"]: r for r in result["runs"]}
    expected = by["hf-packed"]["tokens_per_s"] / by["hf-padded@2"]["tokens_per_s"]
    assert check["ratio"] == pytest.approx(expected, abs=1e-3)

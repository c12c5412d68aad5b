"""A train step killed with SIGKILL resumes from its last checkpoint when the pipeline is run again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, tiny_run_overrides

pytestmark = pytest.mark.pipeline


def checkpoints_under(store: Path) -> list[Path]:
    return sorted(store.glob("**/llmtune-checkpoints/*/checkpoint-*/trainer_state.json"))


def test_killed_training_resumes_from_last_checkpoint(tiny_model_dir: Path, rows_file: Path, tmp_path: Path) -> None:
    from zenml.client import Client

    import run as cli

    overrides = [
        *tiny_run_overrides(tiny_model_dir, rows_file, tmp_path, max_steps=80),
        "training.save_steps=5",
        "training.per_device_train_batch_size=2",
    ]
    args = [a for o in overrides for a in ("--set", o)]
    store = Path(os.environ["ZENML_CONFIG_PATH"])
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], env=os.environ.copy())
    try:
        deadline = time.monotonic() + 600
        while len(checkpoints_under(store)) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert proc.poll() is None, "training finished before it could be killed; raise max_steps"
        assert checkpoints_under(store), "no checkpoint written in time"
        os.kill(proc.pid, signal.SIGKILL)  # no cleanup, no chance to save: like a lost node
    finally:
        proc.wait()
    saved = max(int(p.parent.name.split("-")[1]) for p in checkpoints_under(store))

    assert cli.main(args) == 0
    run = Client().list_pipeline_runs(sort_by="desc:created", size=1).items[0]
    metadata: dict[str, Any] = dict(run.steps["train_sft"].run_metadata)
    assert metadata["resumed_from_step"] >= saved >= 5, "resumed from the last checkpoint, not from scratch"
    assert metadata["steps"] == 80
    assert [run.steps[s].status.value for s in ("prepare_dataset", "load_base_model", "inject_lora")] == ["cached"] * 3
    assert not checkpoints_under(store), "checkpoints are removed once the adapter is stored"

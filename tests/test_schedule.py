"""Scheduled retraining on the local stack: `run.py --schedule` installs a crontab entry, and running that
entry's command the way cron would (plain /bin/sh, cron's bare environment) reuses every cached step while
data and config are unchanged, and retrains after the data file changes.

The entry is installed in the real user crontab with a schedule that never fires (30 February) and is
removed through the CLI at the end, even when a test fails; other crontab lines are left alone.
"""

from __future__ import annotations

import doctest
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import FINETUNE_STEPS, tiny_run_overrides

pytestmark = pytest.mark.pipeline

ROOT = Path(__file__).resolve().parents[1]
NEVER = "0 0 30 2 *"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )


def run_like_cron(command: str) -> subprocess.CompletedProcess[str]:
    """Run a crontab command as cron does: /bin/sh -c, with cron's minimal environment."""
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "SHELL": "/bin/sh", "LANG": "C.UTF-8"}
    return subprocess.run(["/bin/sh", "-c", command], env=env, capture_output=True, text=True, timeout=600)


def latest_run():
    from zenml.client import Client

    return Client().list_pipeline_runs(sort_by="desc:created", size=1, hydrate=True).items[0]


def latest_run_statuses() -> dict[str, str]:
    return {name: step.status.value for name, step in latest_run().steps.items()}


@pytest.fixture(scope="module")
def schedule(tiny_model_dir: Path, rows_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    if shutil.which("crontab") is None:
        if os.environ.get("LLMTUNE_REQUIRE_TOOLS"):
            pytest.fail("crontab is missing; CI installs the Debian package `cron` (see .ci/run)")
        pytest.skip("crontab is not installed (Debian: apt-get install cron)")
    from cli.schedule import cron_entries

    data = tmp_path_factory.mktemp("scheduled") / "rows.jsonl"
    shutil.copy(rows_file, data)
    overrides = tiny_run_overrides(tiny_model_dir, data, tmp_path_factory.mktemp("out"), max_steps=4)
    installed = cli("--pipeline", "finetune", "--schedule", NEVER, *(a for o in overrides for a in ("--set", o)))
    assert installed.returncode == 0, installed.stderr
    mine = [e for e in cron_entries() if e.name in installed.stdout]
    assert len(mine) == 1, installed.stdout
    yield {"entry": mine[0], "data": data, "installed": installed.stdout}
    cli("--remove-schedule", mine[0].name)


def test_entry_runs_the_same_command_on_the_schedule(schedule: dict) -> None:
    entry = schedule["entry"]
    assert entry.cron == NEVER
    assert "run.py --pipeline finetune --set model.name=" in entry.command
    assert "--schedule" not in entry.command
    assert f"ZENML_CONFIG_PATH={os.environ['ZENML_CONFIG_PATH']}" in entry.command, "same ZenML store"
    listed = cli("--list-schedules")
    assert listed.returncode == 0 and entry.name in listed.stdout and NEVER in listed.stdout


def test_scheduled_run_on_unchanged_data_is_a_cache_hit_end_to_end(schedule: dict) -> None:
    first = run_like_cron(schedule["entry"].command)
    assert first.returncode == 0, first.stderr
    again = run_like_cron(schedule["entry"].command)
    assert again.returncode == 0, again.stderr
    run = latest_run()
    # A step declared enable_cache=False (merge_and_push: publishing is a side effect) runs every time by design.
    cacheable = [name for name in FINETUNE_STEPS if run.steps[name].config.enable_cache is not False]
    assert {"prepare_dataset", "load_base_model", "inject_lora", "train_sft", "evaluate"} <= set(cacheable)
    got = {name: step.status.value for name, step in run.steps.items()}
    assert {name: got[name] for name in cacheable} == dict.fromkeys(cacheable, "cached"), "nothing trains"


def test_scheduled_run_retrains_after_the_data_changes(schedule: dict) -> None:
    data: Path = schedule["data"]
    rows = data.read_text().splitlines()
    data.write_text("\n".join(rows[: len(rows) - 24]) + "\n")  # a data refresh: fewer, different rows
    changed = run_like_cron(schedule["entry"].command)
    assert changed.returncode == 0, changed.stderr
    got = latest_run_statuses()
    assert got["prepare_dataset"] == "completed" and got["train_sft"] == "completed"


def test_schedule_is_removed_through_the_cli(schedule: dict) -> None:
    from cli.schedule import cron_entries

    removed = cli("--remove-schedule", schedule["entry"].name)
    assert removed.returncode == 0, removed.stderr
    assert schedule["entry"].name not in {e.name for e in cron_entries()}
    assert cli("--remove-schedule", schedule["entry"].name).returncode == 2, "a second removal finds nothing"


def test_bad_cron_expression_fails_before_anything_is_installed(tiny_model_dir: Path, rows_file: Path) -> None:
    overrides = [f"model.name={tiny_model_dir}", f"data.source={rows_file}"]
    result = cli("--pipeline", "finetune", "--schedule", "every night", *(a for o in overrides for a in ("--set", o)))
    assert result.returncode == 2
    assert "five fields" in result.stderr


def test_module_examples_hold() -> None:
    import cli.schedule
    import cli.stack

    for module in (cli.schedule, cli.stack):
        assert doctest.testmod(module).failed == 0, module.__name__


def test_listing_says_when_cron_is_not_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli.schedule import list_schedules

    monkeypatch.setenv("PATH", str(tmp_path))  # no crontab command on this PATH
    assert list_schedules() == 0
    assert "warning: cron is not installed here (no `crontab` command)" in capsys.readouterr().out


def test_a_running_cron_daemon_is_seen(tmp_path: Path) -> None:
    from cli.schedule import cron_daemon_running

    if not Path("/proc").is_dir():
        pytest.skip("no /proc: the daemon cannot be seen on this system")
    daemon = tmp_path / "cron"  # a real process whose name is cron, as the daemon's is
    shutil.copy(shutil.which("sleep") or "/bin/sleep", daemon)
    process = subprocess.Popen([str(daemon), "30"])
    try:
        assert cron_daemon_running() is True
    finally:
        process.kill()
        process.wait()

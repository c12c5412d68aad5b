"""The MLflow UI in a real headless Chromium, on the store of a tiny finetune run (`mlflow ui` on the stack's
MLflow database): the experiment opens on its training runs, not GenAI traces; the saved runs view shows the
key metrics and the verdict as columns; the run's charts include the per-step learning rate, grad norm and
eval loss beside the training loss; the eval samples table leads with the instruction, without template markup.

Skipped without chromium, chromium-driver and selenium (see tests/browser.py), a failure in CI.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser import chromium, free_port, require_browser, wait_for_elements, wait_for_text
from tests.conftest import tiny_run_overrides
from tests.test_compare import start_mlflow_ui, stop, wait_until_up

pytestmark = pytest.mark.pipeline

SHOTS = os.environ.get("LLMTUNE_SCREENSHOTS")  # a folder: each test saves what the browser showed there


@pytest.fixture(scope="module")
def tracked(tiny_model_dir: Path, rows_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A finetune run of the tiny model with eval during training, promoted by the gate, read back from MLflow."""
    import mlflow

    import run as entry
    from cli.stack import mlflow_tracking_uri
    from cli.summary import mlflow_run_id

    require_browser()  # before the run: without a browser there is nothing to look with
    overrides = [
        *tiny_run_overrides(tiny_model_dir, rows_file, tmp_path_factory.mktemp("out"), max_steps=4),
        "training.eval_steps=2",
        "export.formats=[adapter]",
        "export.publish_format=adapter",
        "export.zenml_model=mlflow-ui-tiny",
    ]
    assert entry.main(["--pipeline", "finetune", "--no-cache", *(a for o in overrides for a in ("--set", o))]) == 0
    from zenml.client import Client

    name = Client().list_pipeline_runs(pipeline_name="finetune", sort_by="desc:created", size=1).items[0].name
    uri = mlflow_tracking_uri()
    run_id = mlflow_run_id(name)
    assert run_id
    found = mlflow.MlflowClient(tracking_uri=uri).get_run(run_id)
    return {"name": name, "uri": uri, "run_id": run_id, "experiment_id": found.info.experiment_id, "run": found}


@pytest.fixture(scope="module")
def ui(tracked: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    server = start_mlflow_ui(tracked["uri"], port, tmp_path_factory.mktemp("mlflow-ui"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(server, url, timeout_s=120)
        yield url
    finally:
        stop(server)


@pytest.fixture(scope="module")
def browser(ui: str) -> Iterator[Any]:
    with chromium(2400, 1000) as driver:  # wide: the runs table draws only the columns in view
        yield driver


def mlflow_client(tracked: dict[str, Any]) -> Any:
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracked["uri"])


def shot(driver: Any, name: str) -> None:
    if SHOTS:
        driver.save_screenshot(str(Path(SHOTS) / f"mlflow-{name}.png"))


def test_the_saved_view_shows_losses_gate_metric_and_verdict_as_columns(
    browser: Any, ui: str, tracked: dict[str, Any]
) -> None:
    from steps.tracking import runs_view_columns, runs_view_url

    browser.get(runs_view_url(ui, tracked["experiment_id"]))
    columns = [c.split("`")[1] for c in runs_view_columns("eval_loss")]  # the tiny runs' gate metric
    # "Model registry" is in the side bar of MLflow's Model training mode only; "Judges" in its GenAI mode only
    text = wait_for_text(browser, ["Model registry", "shared view", tracked["name"], "promoted", *columns])
    assert "Judges" not in text
    shot(browser, "runs-view")
    assert tracked["run"].data.tags["llmtune.verdict"] == "promoted" and "promoted" in text
    headers = [h.text for h in browser.find_elements("css selector", "[role=columnheader]") if h.text]
    shown = list(dict.fromkeys(h for h in headers if h in columns))  # a header can be drawn twice (pinned part)
    assert shown == sorted(columns[:-1]) + columns[-1:], headers  # the UI sorts metrics by name


def test_the_run_charts_have_learning_rate_grad_norm_and_eval_loss_curves(
    browser: Any, ui: str, tracked: dict[str, Any]
) -> None:
    from selenium.webdriver.common.keys import Keys

    browser.get(f"{ui}/#/experiments/{tracked['experiment_id']}/runs/{tracked['run_id']}/model-metrics")
    search = wait_for_elements(browser, "input[placeholder='Search metric charts']", "chart search box", 60)[0]
    for curve in ("train_loss", "learning_rate", "grad_norm", "eval_loss"):
        search.send_keys(Keys.CONTROL, "a")  # clear() does not reach the React state of the box
        search.send_keys(Keys.DELETE)
        search.send_keys(curve)
        wait_for_text(browser, [curve])
        shot(browser, f"chart-{curve}")
    client = mlflow_client(tracked)
    for curve in ("train_loss", "learning_rate", "grad_norm", "eval_loss"):  # curves, not single values
        assert len(client.get_metric_history(tracked["run_id"], curve)) >= 2, curve


def test_the_eval_samples_lead_with_the_instruction_without_template_markup(
    browser: Any, ui: str, tracked: dict[str, Any]
) -> None:

    from tests.browser import click_text

    browser.get(f"{ui}/#/experiments/{tracked['experiment_id']}/runs/{tracked['run_id']}/artifacts")
    wait_for_text(browser, ["eval_samples.json", "eval_samples.html"])
    click_text(browser, "eval_samples.json")
    wait_for_text(browser, ["View as table", "instruction", "reference"])
    shot(browser, "samples-table")
    lines = wait_for_text(browser, ["View as table", "instruction"]).splitlines()
    first = lines.index("instruction")
    assert lines[first : first + 4] == ["instruction", "reference", "base", "tuned"], lines[first : first + 8]
    table = json.loads(
        Path(mlflow_client(tracked).download_artifacts(tracked["run_id"], "eval_samples.json")).read_text()
    )
    instructions = [row[table["columns"].index("instruction")] for row in table["data"]]
    assert instructions and all(text and "<|im_start|>" not in text for text in instructions), instructions
    shown = "\n".join(lines[first:])
    assert all(text.split()[0] in shown for text in instructions), "each row starts with its instruction"
    click_text(browser, "eval_samples.html")  # the same page as the ZenML visualization, in MLflow's viewer
    browser.switch_to.frame(wait_for_elements(browser, "iframe", "eval_samples.html page", 60)[0])
    try:
        wait_for_text(browser, ["Base vs tuned", "Samples", "instruction", "rendered prompt"])
        folded = browser.execute_script("return [...document.querySelectorAll('td details')].map(d => d.open)")
        scrolls = browser.execute_script("return getComputedStyle(document.querySelector('.scroll')).overflow")
    finally:
        browser.switch_to.default_content()
    shot(browser, "samples-html")
    assert folded and not any(folded), "each rendered prompt is folded until opened"
    assert scrolls == "auto", "the samples table scrolls inside its own box"

"""The ZenML dashboard in a real headless Chromium: start a local ZenML server (`zenml login --local`), run the
pipeline against it with the tiny model, open the run's page, and find the run, its seven steps and the
prepared dataset.

Needs the Debian packages `chromium` and `chromium-driver` and the `selenium` package (CI installs them: see
.ci/run and the Makefile). Without them the module is skipped, unless LLMTUNE_REQUIRE_TOOLS is set (CI),
where that is a failure. The server and the pipeline run use their own ZenML config directory, so this
session's other tests keep their store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser import chromium, click_text, free_port, require_browser, wait_for_elements, wait_for_text
from tests.conftest import FINETUNE_STEPS, tiny_run_overrides

pytestmark = pytest.mark.pipeline

ROOT = Path(__file__).resolve().parents[1]


def zenml_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    zenml = str(Path(sys.executable).with_name("zenml"))
    return subprocess.run([zenml, *args], env=env, capture_output=True, text=True, timeout=300, check=False)


def api(url: str, method: str = "GET", body: dict[str, Any] | None = None) -> Any:
    """The local server's REST API; a local server has no authentication."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    require_browser()
    env = {k: v for k, v in os.environ.items() if k != "ZENML_ACTIVE_STACK_ID"}
    env.update(ZENML_CONFIG_PATH=str(tmp_path_factory.mktemp("zenml-server")), ZENML_AUTO_OPEN_DASHBOARD="false")
    port = free_port()
    started = zenml_cli(env, "login", "--local", "--port", str(port))
    assert started.returncode == 0, started.stdout + started.stderr
    url = f"http://127.0.0.1:{port}"
    # A fresh server shows an onboarding survey first; answer it as a user would have, through the API.
    api(
        f"{url}/api/v1/current-user",
        "PUT",
        {"email_opted_in": False, "user_metadata": {"finished_onboarding_survey": True}},
    )
    try:
        yield {"url": url, "env": env}
    finally:
        zenml_cli(env, "logout", "--local")


@pytest.fixture(scope="module")
def pipeline_run(server: dict[str, Any], tiny_model_dir: Path, rows_file: Path, tmp_path_factory) -> dict[str, Any]:
    overrides = tiny_run_overrides(tiny_model_dir, rows_file, tmp_path_factory.mktemp("out"), max_steps=4)
    args = [sys.executable, "run.py", "--pipeline", "finetune", *(a for o in overrides for a in ("--set", o))]
    result = subprocess.run(args, cwd=ROOT, env=server["env"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = api(f"{server['url']}/api/v1/runs?sort_by=desc:created&size=1")["items"]
    assert runs and runs[0]["body"]["status"] == "completed"
    return {"id": runs[0]["id"], "name": runs[0]["name"]}


@pytest.fixture(scope="module")
def browser(server: dict[str, Any]) -> Iterator[Any]:
    with chromium() as driver:
        yield driver


@pytest.fixture(scope="module")
def run_page(browser: Any, server: dict[str, Any], pipeline_run: dict[str, Any]) -> Any:
    """The run's page in the dashboard, once its DAG has rendered."""
    browser.get(f"{server['url']}/projects/default/runs/{pipeline_run['id']}")
    wait_for_text(browser, [pipeline_run["name"], *FINETUNE_STEPS])
    return browser


def open_panel(driver: Any) -> Any:
    """The details panel (a dialog) that the dashboard opens beside the DAG."""
    return wait_for_elements(driver, "[role=dialog]", "details panel")[-1]


def load_preview(driver: Any, panel: Any) -> Any:
    """The panel's Visualization tab, loaded: the dashboard shows an HTML visualization after the user agrees to
    load it, in a sandboxed iframe, which is returned (its `srcdoc` is the HTML fetched from the server)."""
    click_text(driver, "Visualization", within=panel)
    wait_for_text(driver, ["Load Preview"], within=panel)
    click_text(driver, "Load Preview", within=panel)
    return wait_for_elements(panel, "iframe", "visualization rendered")[0]


def test_run_page_shows_the_run_and_its_seven_steps(run_page: Any, pipeline_run: dict[str, Any]) -> None:
    text = wait_for_text(run_page, ["Completed", "Total Steps"])
    assert pipeline_run["name"] in text
    assert all(step in text for step in FINETUNE_STEPS)
    assert "finetune" in text


def test_run_overview_counts_seven_completed_steps(run_page: Any) -> None:
    text = wait_for_text(run_page, ["Total Steps"])
    counts = text.split("Total Steps", 1)[1].split()
    assert counts[:3] == ["7", "Completed", "7"], counts[:6]


def test_dataset_artifact_opens_with_its_producer_and_metadata(run_page: Any) -> None:
    click_text(run_page, "PreparedData")
    panel = open_panel(run_page)
    overview = wait_for_text(run_page, ["Producer Step", "prepare_dataset", "DataDirMaterializer"], within=panel)
    assert "\nprepared_data\n" in overview and "/prepare_dataset/prepared_data/" in overview  # named output
    click_text(run_page, "Metadata", within=panel)
    metadata = wait_for_text(run_page, ["files", "size_bytes"], within=panel)
    size = int(metadata.split("size_bytes", 1)[1].split()[0])
    assert size > 1000, "the prepared dataset (train/eval splits + tokenizer) is not empty"


def step_metadata(server: dict[str, Any], run_id: str, step: str) -> dict[str, Any]:
    found = api(f"{server['url']}/api/v1/steps?pipeline_run_id={run_id}&name={step}")["items"]
    return dict(api(f"{server['url']}/api/v1/steps/{found[0]['id']}?hydrate=true")["metadata"]["run_metadata"])


def test_dataset_visualization_shows_counts_and_token_length_histogram(
    run_page: Any, server: dict[str, Any], pipeline_run: dict[str, Any]
) -> None:
    from selenium.webdriver.common.by import By

    panels = run_page.find_elements(By.CSS_SELECTOR, "[role=dialog]")
    if not panels or "prepared_data" not in panels[-1].text:
        click_text(run_page, "PreparedData")
    page = load_preview(run_page, open_panel(run_page)).get_attribute("srcdoc")
    assert "Dataset preparation" in page and "Token lengths" in page
    assert "<svg" in page and page.count("<rect") >= 2, "an SVG histogram with bars"
    counts = step_metadata(server, pipeline_run["id"], "prepare_dataset")
    assert f"<th>rows kept</th><td>{counts['rows_kept']}</td>" in page
    assert f"{counts['train_rows']} / {counts['eval_rows']}" in page


def test_eval_report_visualization_scrolls_inside_its_frame_and_leads_with_the_instruction(run_page: Any) -> None:

    run_page.refresh()  # an earlier test's details panel would cover the node
    wait_for_text(run_page, ["EvalReport", "merge_and_push"])
    click_text(run_page, "EvalReport")
    panel = open_panel(run_page)
    wait_for_text(run_page, ["eval_report"], within=panel)
    frame = load_preview(run_page, panel)
    page = frame.get_attribute("srcdoc")
    assert "<h3>Samples</h3><div class='scroll'><table><tr><th>instruction</th><th>reference</th>" in page
    run_page.switch_to.frame(frame)
    try:  # the dashboard's frame is short: the table must scroll in its own box, not be cut off
        box = run_page.execute_script(
            "const s = document.querySelector('.scroll'); return [getComputedStyle(s).overflow, s.scrollWidth];"
        )
    finally:
        run_page.switch_to.default_content()
    assert box[0] == "auto" and box[1] > 0, box

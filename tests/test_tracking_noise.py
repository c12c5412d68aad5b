"""ZenML's after-every-step warning about MLflow autolog flavors that do not exist is not shown; real ones are."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from zenml.integrations.mlflow.experiment_trackers.mlflow_experiment_tracker import MLFlowExperimentTracker

from steps.tracking import ZENML_MLFLOW_LOGGER


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def zenml_mlflow_log() -> Iterator[Collect]:
    logger = logging.getLogger(ZENML_MLFLOW_LOGGER)
    collect = Collect()
    logger.addHandler(collect)
    yield collect
    logger.removeHandler(collect)


def test_the_missing_fastai_flavor_does_not_warn_after_every_step(zenml_mlflow_log: Collect) -> None:
    # What ZenML runs after each step; it uses no tracker state, so the class's own function is called as is.
    MLFlowExperimentTracker.disable_autologging(None)  # type: ignore[arg-type]
    assert not any("Failed to disable MLflow autologging" in m for m in zenml_mlflow_log.messages)


def test_a_flavor_that_exists_and_fails_still_warns(zenml_mlflow_log: Collect) -> None:
    logger = logging.getLogger(ZENML_MLFLOW_LOGGER)
    logger.warning("Failed to disable MLflow autologging for the following frameworks: ['sklearn', 'fastai'].")
    logger.warning("Failed to disable MLflow autologging for the following frameworks: ['fastai'].")
    assert zenml_mlflow_log.messages == [
        "Failed to disable MLflow autologging for the following frameworks: ['sklearn', 'fastai']."
    ]

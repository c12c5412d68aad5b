"""The project's local ZenML stack: local orchestrator + local artifact store + MLflow tracker (embedded store).

The stack is made once and selected for this process only (ZENML_ACTIVE_STACK_ID), so a user's
active stack and other stacks stay as they were.
"""

from __future__ import annotations

import os

from zenml.client import Client

STACK_NAME = "llmtune-local"
TRACKER_NAME = "llmtune-mlflow"


def use_local_stack() -> str:
    """Create the stack if missing and select it for this process; return its name."""
    client = Client()
    stack_id = _find_stack(client) or _create_stack(client)
    os.environ["ZENML_ACTIVE_STACK_ID"] = stack_id
    return STACK_NAME


def _find_stack(client: Client) -> str | None:
    stacks = client.list_stacks(name=STACK_NAME).items
    return str(stacks[0].id) if stacks else None


def _create_stack(client: Client) -> str:
    if not client.list_stack_components(name=TRACKER_NAME, type="experiment_tracker").items:
        # No tracking_uri: ZenML's MLflow tracker then keeps an SQLite store inside the artifact store.
        client.create_stack_component(
            name=TRACKER_NAME, flavor="mlflow", component_type="experiment_tracker", configuration={}
        )
    stack = client.create_stack(
        name=STACK_NAME,
        components={"orchestrator": "default", "artifact_store": "default", "experiment_tracker": TRACKER_NAME},
    )
    return str(stack.id)


def mlflow_tracking_uri() -> str:
    """Where the active stack's MLflow tracker stores runs (an sqlite:/// URI for the local stack)."""
    tracker = Client().active_stack.experiment_tracker
    if tracker is None:
        raise RuntimeError(f"Stack has no experiment tracker; run with the {STACK_NAME} stack.")
    return tracker.get_tracking_uri()  # type: ignore[attr-defined, no-any-return]

"""Which ZenML stack a run uses: the project's local stack, or a cloud GPU stack from a recipe in infrastructure/.

The local stack (local orchestrator + local artifact store + MLflow tracker with an embedded store) is made
once and selected for this process only (ZENML_ACTIVE_STACK_ID), so a user's active stack stays as it was.

A recipe is a folder `infrastructure/<name>/` with `stack.yaml` (the stack components to register, with
`${VAR}` placeholders read from the environment) and `run.yaml` (a ZenML run config: DockerSettings and
per-step ResourceSettings, so only the steps that need a GPU ask for one). Choose one with
`LLMTUNE_RECIPE=<name>` (or `run.py --recipe <name>`); register its stack once with
`python -m cli.stack register <name>`.

Example:
    >>> sorted(recipe_names())
    ['kubernetes', 'sagemaker', 'skypilot', 'vertex']
    >>> expand_placeholders("s3://${BUCKET}/zenml", {"BUCKET": "team-ml"})
    's3://team-ml/zenml'
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml
from zenml.client import Client
from zenml.enums import StackComponentType
from zenml.exceptions import EntityExistsError

from llmtune.errors import LlmtuneError

STACK_NAME = "llmtune-local"
TRACKER_NAME = "llmtune-mlflow"
RECIPE_ENV = "LLMTUNE_RECIPE"
RECIPES_DIR = Path(__file__).resolve().parents[1] / "infrastructure"
_PLACEHOLDER = re.compile(r"\$\{([A-Z0-9_]+)\}")


class RecipeError(LlmtuneError, ValueError):
    """A recipe is missing, incomplete, or needs environment values that are not set."""


def use_local_stack() -> str:
    """Create the stack if missing and select it for this process; return its name."""
    with _first_use_lock():
        return _select_local_stack()


def use_project_stack(recipe: str | None = None) -> str:
    """Select the recipe's registered stack (recipe given or from LLMTUNE_RECIPE), else the local stack."""
    recipe = recipe or active_recipe()
    with _first_use_lock():
        return _select_recipe_stack(recipe) if recipe else _select_local_stack()


@contextmanager
def _first_use_lock() -> Iterator[None]:
    """Serialize the first touch of the ZenML store between processes of this machine.

    Two runs started at once on a fresh ZenML config both try to create the SQLite database and then the
    stack; ZenML does neither atomically. An exclusive file lock in the config directory makes the second
    process wait a moment and then find both. Not needed (and not available) on Windows.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    from zenml.utils.io_utils import get_global_config_directory

    directory = Path(get_global_config_directory())
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".llmtune-stack.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            Client().zen_store  # noqa: B018  (creates and migrates the store on first use)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _select_local_stack() -> str:
    client = Client()
    stack_id = _find_stack(client, STACK_NAME) or _create_local_stack(client)
    os.environ["ZENML_ACTIVE_STACK_ID"] = stack_id
    _create_mlflow_store()
    return STACK_NAME


def _create_mlflow_store() -> None:
    """Create and migrate the local MLflow database now, inside the first-use lock.

    MLflow builds its SQLite schema on first use, and two processes doing that at once fail mid-migration
    (steps of two concurrent runs otherwise race to it); afterwards every process finds it ready.
    """
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=mlflow_tracking_uri()).search_experiments(max_results=1)


def _select_recipe_stack(recipe: str) -> str:
    name = load_recipe(recipe)["stack"]
    stack_id = _find_stack(Client(), name)
    if stack_id is None:
        raise RecipeError(
            f"Stack '{name}' of recipe '{recipe}' is not registered in this ZenML store. Register it: "
            f"python -m cli.stack register {recipe}   (see infrastructure/{recipe}/README.md)"
        )
    os.environ["ZENML_ACTIVE_STACK_ID"] = stack_id
    return str(name)


def active_recipe() -> str | None:
    """The recipe named by LLMTUNE_RECIPE, or None for the local stack."""
    return os.environ.get(RECIPE_ENV) or None


def run_options(recipe: str | None = None) -> dict[str, Any]:
    """Keyword arguments for `pipeline.with_options(...)`: the recipe's run config, or nothing on the local stack."""
    recipe = recipe or active_recipe()
    return {"config_path": str(recipe_dir(recipe) / "run.yaml")} if recipe else {}


def orchestrator_supports_schedules() -> bool:
    """Whether the active stack's orchestrator can run a ZenML Schedule (the local one cannot)."""
    return bool(Client().active_stack.orchestrator.config.is_schedulable)


def _find_stack(client: Client, name: str) -> str | None:
    stacks = client.list_stacks(name=name).items
    return str(stacks[0].id) if stacks else None


def _create_local_stack(client: Client) -> str:
    try:
        if not client.list_stack_components(name=TRACKER_NAME, type="experiment_tracker").items:
            # No tracking_uri: ZenML's MLflow tracker then keeps an SQLite store inside the artifact store.
            client.create_stack_component(
                name=TRACKER_NAME,
                flavor="mlflow",
                component_type=StackComponentType.EXPERIMENT_TRACKER,
                configuration={},
            )
        stack = client.create_stack(
            name=STACK_NAME,
            components={
                StackComponentType.ORCHESTRATOR: "default",
                StackComponentType.ARTIFACT_STORE: "default",
                StackComponentType.EXPERIMENT_TRACKER: TRACKER_NAME,
            },
        )
        return str(stack.id)
    except EntityExistsError:  # made meanwhile by a process that shares the store but not the lock
        found = _find_stack(client, STACK_NAME)
        if found is None:
            raise
        return found


def mlflow_tracking_uri() -> str:
    """Where the active stack's MLflow tracker stores runs (an sqlite:/// URI for the local stack)."""
    tracker = Client().active_stack.experiment_tracker
    if tracker is None:
        raise RuntimeError(f"Stack has no experiment tracker; run with the {STACK_NAME} stack.")
    return str(tracker.get_tracking_uri())  # type: ignore[attr-defined]


# --- cloud recipes -------------------------------------------------------------------------------------------


def recipe_names() -> list[str]:
    """The recipes shipped under infrastructure/ (folders with a stack.yaml)."""
    return sorted(p.parent.name for p in RECIPES_DIR.glob("*/stack.yaml"))


def recipe_dir(name: str) -> Path:
    path = RECIPES_DIR / name
    if not (path / "stack.yaml").is_file() or not (path / "run.yaml").is_file():
        raise RecipeError(f"Unknown recipe '{name}'; choose one of: {', '.join(recipe_names())}.")
    return path


def load_recipe(name: str) -> dict[str, Any]:
    """The recipe's stack.yaml as a dict (placeholders not yet filled in)."""
    return dict(yaml.safe_load((recipe_dir(name) / "stack.yaml").read_text()))


def expand_placeholders(text: str, values: Mapping[str, str]) -> str:
    """Replace every ${VAR} with values[VAR]; a missing value is an error that names all of them."""
    missing = sorted({v for v in _PLACEHOLDER.findall(text) if not values.get(v)})
    if missing:
        raise RecipeError(f"Set these environment variables first: {', '.join(missing)}.")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def recipe_placeholders(name: str) -> list[str]:
    """The ${VAR} names a recipe's stack.yaml needs."""
    return sorted(set(_PLACEHOLDER.findall((recipe_dir(name) / "stack.yaml").read_text())))


def register_recipe_stack(name: str, values: Mapping[str, str] | None = None) -> str:
    """Register the recipe's components and stack in the active ZenML store (idempotent); return the stack id.

    ZenML validates each component's configuration against its flavor here, so a typo in a recipe fails now,
    not in the cloud. Values for ${VAR} come from `values`, else the environment.
    """
    text = expand_placeholders((recipe_dir(name) / "stack.yaml").read_text(), values or os.environ)
    spec = yaml.safe_load(text)
    client = Client()
    existing = _find_stack(client, spec["stack"])
    if existing:
        return existing
    for component_type, component in spec["components"].items():
        if not client.list_stack_components(name=component["name"], type=component_type).items:
            _register_component(client, component_type, component)
    components: dict[StackComponentType, str | UUID] = {
        StackComponentType(kind): c["name"] for kind, c in spec["components"].items()
    }
    return str(client.create_stack(name=spec["stack"], components=components).id)


def resolve_step_settings(recipe: str, pipeline: Any, **params: Any) -> dict[str, dict[str, Any]]:
    """Each step's settings under the recipe's run.yaml, resolved against the recipe's registered stack.

    This follows ZenML's compiler (run config parsed by ZenML, pipeline settings under step settings, component
    keys like `orchestrator` matched to the stack's components, values validated by the flavor's settings
    class) but needs no cloud SDK, and is stricter: a step name the pipeline does not have, a settings key no
    component of the stack takes, or an attribute the settings class does not know is an error here, where
    ZenML would only log a warning and drop it.
    """
    from zenml.config.pipeline_run_configuration import PipelineRunConfiguration

    run_config = PipelineRunConfiguration.model_validate(yaml.safe_load((recipe_dir(recipe) / "run.yaml").read_text()))
    components = Client().get_stack(load_recipe(recipe)["stack"]).components
    pipeline.prepare(**params)
    unknown = set(run_config.steps or {}) - set(pipeline.invocations)
    if unknown:
        raise RecipeError(f"run.yaml of '{recipe}' configures steps the pipeline does not have: {sorted(unknown)}")
    resolved = {}
    for step_name in pipeline.invocations:
        step_config = (run_config.steps or {}).get(step_name)
        merged = _merge_settings(run_config.settings or {}, (step_config.settings if step_config else None) or {})
        resolved[step_name] = {key: _resolve_setting(key, value, components) for key, value in merged.items()}
    return resolved


def _merge_settings(outer: Mapping[str, Any], inner: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    merged = {key: dict(value) for key, value in outer.items()}
    for key, value in inner.items():
        merged[key] = {**merged.get(key, {}), **dict(value)}
    return merged


def _resolve_setting(key: str, values: dict[str, Any], components: Mapping[Any, list[Any]]) -> Any:
    from zenml.config.base_settings import BaseSettings
    from zenml.stack.flavor import Flavor
    from zenml.utils import settings_utils

    if settings_utils.is_general_setting_key(key):
        settings_class: type[BaseSettings] = settings_utils.get_general_settings()[key]
    else:
        canonical = settings_utils.resolve_stack_component_setting_key(key, components)
        if canonical is None:
            raise RecipeError(f"Settings key '{key}' matches no component of the stack.")
        kind, name = canonical.split(":", 1)
        component = next(c for c in components[StackComponentType(kind)] if c.name == name)
        settings_class = _settings_class(Flavor.from_model(component.flavor).config_class)
    settings = settings_class.model_validate(values)
    if settings.model_extra:
        raise RecipeError(
            f"Settings '{key}' has attributes {settings_class.__name__} does not know: {sorted(settings.model_extra)}"
        )
    return settings


def _settings_class(config_class: type) -> Any:
    """The settings class of a flavor: ZenML flavor configs inherit from it (e.g. KubernetesOrchestratorSettings)."""
    from zenml.config.base_settings import BaseSettings
    from zenml.stack.stack_component import StackComponentConfig

    return next(
        c for c in config_class.__mro__ if issubclass(c, BaseSettings) and not issubclass(c, StackComponentConfig)
    )


def _register_component(client: Client, component_type: str, component: dict[str, Any]) -> None:
    try:
        client.create_stack_component(
            name=component["name"],
            flavor=component["flavor"],
            component_type=StackComponentType(component_type),
            configuration=component.get("configuration", {}),
        )
    except KeyError as err:  # ZenML resolves {{secret.key}} references at registration
        raise RecipeError(
            f"{err.args[0]} Create the secret first, e.g.: zenml secret create llmtune_mlflow "
            "--username=<mlflow user> --password=<mlflow password>"
        ) from err


def main(argv: list[str]) -> int:
    """`python -m cli.stack register <recipe>` registers a recipe's stack; `list` shows the recipes."""
    if argv[:1] == ["register"] and len(argv) == 2:
        os.environ.setdefault("ZENML_ANALYTICS_OPT_IN", "false")
        try:
            stack_id = register_recipe_stack(argv[1])
        except RecipeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"Stack '{load_recipe(argv[1])['stack']}' ({stack_id}) is registered. Run on it with:")
        print(f"  LLMTUNE_RECIPE={argv[1]} python run.py --pipeline finetune --config <your config>")
        return 0
    if argv[:1] == ["list"]:
        for name in recipe_names():
            print(f"{name:12} needs: {' '.join(recipe_placeholders(name))}")
        return 0
    print("usage: python -m cli.stack register <recipe> | list", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

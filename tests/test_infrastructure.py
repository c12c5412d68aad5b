"""Cloud GPU stack recipes (infrastructure/): valid for the installed ZenML, and the finetune pipeline's step
settings resolve against each, without contacting a cloud.

Each recipe's stack is registered in this session's isolated ZenML store with placeholder values (ZenML
validates every component configuration against its flavor there), then the recipe's run.yaml is applied
to the finetune pipeline and every step's settings are resolved against that stack.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.stack import (
    RecipeError,
    expand_placeholders,
    recipe_dir,
    recipe_names,
    recipe_placeholders,
    register_recipe_stack,
    resolve_step_settings,
    run_options,
)

RECIPES = ["kubernetes", "sagemaker", "skypilot", "vertex"]
# The steps that load the 4-bit model and run it through the backend; unsloth needs CUDA for each of them.
GPU_STEPS = {"load_base_model", "inject_lora", "train_sft", "evaluate"}
CPU_STEPS = {"prepare_dataset", "promotion_gate", "merge_and_push"}
COMPONENT_TYPES = {"orchestrator", "artifact_store", "container_registry", "image_builder", "experiment_tracker"}
ROOT = Path(__file__).resolve().parents[1]


def placeholder_values(recipe: str) -> dict[str, str]:
    """Values of the right shape for every ${VAR}; nothing is contacted, so they need not exist."""
    shapes = {"URI": "s3://llmtune-test/zenml", "ARN": "arn:aws:iam::123456789012:role/llmtune"}
    values = {
        name: next((v for k, v in shapes.items() if name.endswith(k)), "llmtune-test")
        for name in recipe_placeholders(recipe)
    }
    if recipe == "vertex":
        values["LLMTUNE_ARTIFACT_URI"] = "gs://llmtune-test/zenml"
        values["LLMTUNE_REGISTRY_URI"] = "us-central1-docker.pkg.dev/llmtune-test/llmtune"
    if recipe in ("sagemaker", "skypilot"):
        values["LLMTUNE_REGISTRY_URI"] = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
    values["LLMTUNE_MLFLOW_URI"] = "https://mlflow.llmtune.test"
    return values


@pytest.fixture(scope="module")
def registered() -> dict[str, str]:
    from zenml.client import Client

    # The recipes reference MLflow credentials as a ZenML secret, which must exist before registration.
    Client().create_secret("llmtune_mlflow", values={"username": "ci", "password": "not-a-real-password"})
    return {recipe: register_recipe_stack(recipe, placeholder_values(recipe)) for recipe in RECIPES}


def resolved_settings(recipe: str) -> dict[str, dict]:
    from llmtune.config import RunConfig
    from pipelines.finetune import finetune

    return resolve_step_settings(recipe, finetune.copy(), config=RunConfig().model_dump())


def test_the_four_recipes_ship() -> None:
    assert recipe_names() == RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
def test_stack_registers_with_every_component_on_its_flavor(recipe: str, registered: dict[str, str]) -> None:
    from zenml.client import Client
    from zenml.enums import StackComponentType

    stack = Client().get_stack(registered[recipe])
    assert set(stack.components) >= COMPONENT_TYPES
    assert all(c[0].flavor_name != "local" for kind, c in stack.components.items() if kind != "image_builder")
    tracker = stack.components[StackComponentType.EXPERIMENT_TRACKER][0]
    assert tracker.flavor_name == "mlflow"
    assert tracker.configuration["tracking_uri"].startswith("https://"), "a remote MLflow tracking server"
    assert register_recipe_stack(recipe, placeholder_values(recipe)) == registered[recipe], "idempotent"


@pytest.mark.parametrize("recipe", RECIPES)
def test_only_the_model_steps_ask_for_a_gpu(recipe: str, registered: dict[str, str]) -> None:
    settings = resolved_settings(recipe)
    assert set(settings) == GPU_STEPS | CPU_STEPS
    asks_gpu = {step for step, s in settings.items() if "resources" in s and (s["resources"].gpu_count or 0) > 0}
    assert asks_gpu == GPU_STEPS


@pytest.mark.parametrize("recipe", RECIPES)
def test_gpu_steps_get_gpu_machines_from_the_orchestrator(recipe: str, registered: dict[str, str]) -> None:
    settings = resolved_settings(recipe)
    for step, values in settings.items():
        machine = gpu_request(recipe, values["orchestrator"]) if "orchestrator" in values else False
        assert machine == (step in GPU_STEPS), f"{recipe}: {step}"


def gpu_request(recipe: str, orchestrator: object) -> bool:
    """Whether a step's orchestrator settings put it on a GPU machine, in each orchestrator's own terms."""
    if recipe == "kubernetes":
        pod = orchestrator.pod_settings  # type: ignore[attr-defined]
        return pod is not None and any(t.get("key") == "nvidia.com/gpu" for t in pod.tolerations)
    if recipe == "vertex":
        return orchestrator.node_selector_constraint is not None  # type: ignore[attr-defined]
    if recipe == "sagemaker":
        return str(orchestrator.instance_type).startswith(("ml.g", "ml.p"))  # type: ignore[attr-defined]
    return bool(orchestrator.accelerators)  # type: ignore[attr-defined]


@pytest.mark.parametrize("recipe", RECIPES)
def test_step_image_is_the_cuda_dockerfile_with_the_gpu_extra(recipe: str, registered: dict[str, str]) -> None:
    for step, values in resolved_settings(recipe).items():
        docker = values["docker"]
        assert docker.dockerfile == "infrastructure/docker/Dockerfile", step
        assert (ROOT / docker.build_context_root / docker.dockerfile).is_file()
    dockerfile = (ROOT / "infrastructure/docker/Dockerfile").read_text()
    assert "FROM nvidia/cuda:" in dockerfile and 'pip install ".[gpu]"' in dockerfile


@pytest.mark.parametrize("recipe", RECIPES)
def test_run_options_point_the_pipeline_at_the_recipe_run_config(recipe: str) -> None:
    from pipelines.finetune import finetune

    options = run_options(recipe)
    assert options == {"config_path": str(recipe_dir(recipe) / "run.yaml")}
    finetune.with_options(**options)  # ZenML reads and validates the file here


def test_a_step_name_the_pipeline_lacks_is_an_error(
    registered: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cli.stack as stack

    recipe = tmp_path / "kubernetes"
    recipe.mkdir()
    (recipe / "stack.yaml").write_text((recipe_dir("kubernetes") / "stack.yaml").read_text())
    (recipe / "run.yaml").write_text("steps:\n  train:\n    settings:\n      resources: {gpu_count: 1}\n")
    monkeypatch.setattr(stack, "RECIPES_DIR", tmp_path)
    with pytest.raises(RecipeError, match="train"):
        resolved_settings("kubernetes")


def test_missing_environment_values_are_named() -> None:
    with pytest.raises(RecipeError, match="LLMTUNE_A, LLMTUNE_B"):
        expand_placeholders("${LLMTUNE_B} ${LLMTUNE_A} ${LLMTUNE_C}", {"LLMTUNE_C": "x"})

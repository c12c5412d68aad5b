"""GPU tier fixtures. Unsloth must patch transformers, peft and trl before they are imported, so this conftest
orders the imports first (on a machine without CUDA or unsloth that is a no-op and the gpu tests are skipped)."""

from __future__ import annotations

from pathlib import Path

from llmtune.model import import_unsloth_if_used

UNSLOTH_IMPORTED = import_unsloth_if_used("unsloth")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _needs_cuda_for_gpu_tests(request: pytest.FixtureRequest) -> None:
    import torch

    if request.node.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.fixture(scope="session")
def demo_tokenizer(demo_rows: list[dict[str, str]]):
    from llmtune.demo import build_demo_tokenizer

    return build_demo_tokenizer(demo_rows)


@pytest.fixture(scope="session")
def llama_1b_dir(tmp_path_factory: pytest.TempPathFactory, demo_tokenizer) -> Path:
    """A random-init model of the published Llama-3.2-1B shape (bf16), saved with the demo tokenizer."""
    from benchmarks.model_shapes import build_random_llama

    return build_random_llama(tmp_path_factory.mktemp("llama-3.2-1b"), "llama-3.2-1b", demo_tokenizer)

"""Attention over flattened batches (`llmtune.model.attention`): example boundaries from position ids, the
transformers implementation against transformers' own block-diagonal SDPA, and the path each setup reports.

The varlen FlashAttention kernel itself needs CUDA: tests/gpu/test_varlen_attention.py compares it with the
per-example reference that runs here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import load_from_disk
from transformers import AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from llmtune.model import attention
from tests.test_packing import per_example_means, token_losses


def test_segments_restart_where_position_ids_restart() -> None:
    assert attention.segments_of(torch.tensor([[0, 1, 2, 3]])) == ([4], 4)
    # A row that starts mid-example (not at 0) still begins a segment; trailing pad positions are their own.
    assert attention.segments_of(torch.tensor([[5, 6, 0, 1, 2, 0, 0]])) == ([2, 3, 1, 1], 3)


def test_segment_cache_never_serves_another_batch() -> None:
    cache = attention._SegmentCache()
    first = torch.tensor([[0, 1, 0, 1, 2]])
    bounds, longest = cache.get(first)
    assert bounds.tolist() == [0, 2, 5] and longest == 3
    assert cache.get(first)[0] is bounds  # the same tensor again (the next layer): computed once
    first[0, 2] = 2  # changed in place: its version moves on, so it is read again
    assert cache.get(first)[0].tolist() == [0, 5]
    assert cache.get(torch.tensor([[0, 0, 1]]))[0].tolist() == [0, 1, 3]


def test_grouped_query_heads_are_expanded_as_sdpa_does() -> None:
    q, k, v = torch.randn(7, 4, 8), torch.randn(7, 2, 8), torch.randn(7, 2, 8)
    out = attention.attend_segments(q, k, v, [7], 7, scale=None)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True
    ).transpose(0, 1)
    torch.testing.assert_close(out, ref)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture
def examples(prepared_dir: Path) -> list[dict[str, Any]]:
    return load_from_disk(str(prepared_dir / "train")).select(range(5)).to_list()


def test_varlen_implementation_gives_each_packed_example_its_own_loss(model: Any, examples: list[dict]) -> None:
    """Through the model: the registered implementation equals transformers' SDPA with its block-diagonal
    mask on a flattened row, and each example's loss equals that of the example alone."""
    lengths = [len(e["input_ids"]) for e in examples]
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    ids, labels, positions = packed["input_ids"], packed["labels"], packed["position_ids"]
    alone = []
    for e in examples:
        one = torch.tensor([e["labels"]])
        alone += per_example_means(token_losses(model, torch.tensor([e["input_ids"]]), one), one, [len(one[0])])

    block_mask = per_example_means(token_losses(model, ids, labels, position_ids=positions), labels, lengths)
    path = attention.use_for_training(model, flattened=True)
    try:
        assert model.config._attn_implementation == attention.VARLEN
        assert path.name == "per-example-sdpa"  # no CUDA here: the exact per-example reference
        varlen = per_example_means(token_losses(model, ids, labels, position_ids=positions), labels, lengths)
    finally:
        model.set_attn_implementation("sdpa")
    assert varlen == pytest.approx(alone, abs=1e-4)
    assert varlen == pytest.approx(block_mask, abs=1e-4)


def test_varlen_implementation_keeps_padded_batches_correct(model: Any, examples: list[dict]) -> None:
    """A padded batch (eval during training, a collator that pads) falls back to causal SDPA over its mask."""
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.tensor([e["input_ids"] + [0] * (longest - len(e["input_ids"])) for e in examples])
    mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (longest - len(e["input_ids"])) for e in examples])
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
        attention.use_for_training(model, flattened=True)
        try:
            ours = model(input_ids=ids, attention_mask=mask).logits
        finally:
            model.set_attn_implementation("sdpa")
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], reference[keep], atol=1e-4, rtol=1e-4)


def test_each_setup_names_its_attention_path(model: Any) -> None:
    assert attention.use_for_training(model, flattened=False).name == "per-row"
    assert attention.use_for_training(model, flattened=True, enabled=False).name == "backend"
    assert model.config._attn_implementation == "sdpa"  # neither touched the model


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"attn_logit_softcapping": 50.0}, "softcaps"),
        ({"sliding_window": 4096}, "sliding-window"),
        ({"head_dim": 12}, "head_dim 12"),
    ],
)
def test_attention_the_kernel_cannot_compute_stays_on_transformers(extra: dict, reason: str) -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1)
    for key, value in extra.items():
        setattr(config, key, value)
    assert reason in (attention._transformers_unsupported(config) or "")
    assert attention._transformers_unsupported(LlamaConfig(hidden_size=64, num_attention_heads=4)) is None

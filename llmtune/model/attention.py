"""Attention over flattened batches: one variable-length attention call per layer instead of one per example.

A flattened batch (`training.packing`, `training.padding_free`) is one row holding many examples, with
position ids that restart at 0 where each example begins. Attention must stay inside each example. The
libraries' own answers are slow on a GPU without FlashAttention: transformers' SDPA path builds a dense
block-diagonal mask over the whole row, and Unsloth 2026.10 on torch < 2.12 calls SDPA once per example
(its variable-length hook wants a grouped-query argument that torch 2.11's kernel lacks). Here the row's
example boundaries are read once per forward from the position ids and every layer makes one call to
torch's variable-length FlashAttention kernel (`torch.nn.attention.varlen.varlen_attn`), key/value heads
expanded where the kernel has no grouped-query argument. `benchmarks/attention_kernels.py` measures it
against flex attention, a dense mask and the per-example path.

`use_for_training(model, flattened)` picks the path for a model about to train and says which one it took
(`AttentionPath`), so the train step can log it:
- hf backend: the model's attention is switched to `VARLEN`, an implementation registered with
  transformers' `AttentionInterface` (models that do not dispatch through it keep their own);
- unsloth backend (a model whose attention runs Unsloth's forward): Unsloth's attention dispatch gets torch's
  kernel wrapped with the grouped-query argument it looks for (a private hook, so only on the Unsloth
  versions in `UNSLOTH_VARLEN_HOOK_VERSIONS`; off again for a run with `training.varlen_attention=false`).
Without CUDA the same implementation runs one SDPA call per example (exact, used by the CPU tests).

Example (the CPU path; the example boundaries come from the restarting position ids):
    >>> import torch
    >>> segments_of(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]))
    ([3, 2, 4], 4)
    >>> q, k, v = torch.randn(9, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    >>> out = attend_segments(q, k, v, [3, 2, 4], 4, scale=None)
    >>> alone = attend_segments(q[3:5], k[3:5], v[3:5], [2], 2, scale=None)
    >>> out.shape, torch.allclose(out[3:5], alone, atol=1e-6)
    (torch.Size([9, 4, 8]), True)
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from functools import lru_cache
from typing import Any

VARLEN = "llmtune_varlen"
# Unsloth releases whose attention dispatch was read for the hook below (`_TORCH_VARLEN_ATTN`, called as
# (q, k, v, cu_q, cu_k, max_q, max_k, *, scale, window_size, enable_gqa)); tests/gpu compares it with
# Unsloth's own per-example path.
UNSLOTH_VARLEN_HOOK_VERSIONS = ("2026.10.",)


@dataclasses.dataclass(frozen=True)
class AttentionPath:
    """Which attention a training run uses over its batches, and why (step metadata and the log)."""

    name: str
    reason: str

    def describe(self) -> str:
        return f"{self.name} ({self.reason})"


def segments_of(position_ids: Any) -> tuple[list[int], int]:
    """Example lengths in a flattened row, from its position ids (a new example wherever they restart at 0),
    and the longest. Reads the ids on the host once: the kernel needs the longest length as a number."""
    ids = position_ids.reshape(-1).tolist()
    starts = [i for i, p in enumerate(ids) if p == 0 or i == 0]
    lengths = [end - start for start, end in zip(starts, [*starts[1:], len(ids)], strict=True)]
    return lengths, max(lengths)


class _SegmentCache:
    """The segments of the position-ids tensor a forward passes to every layer, computed once per forward.

    Keyed on the tensor object itself (a weak reference) and its version counter, so a new batch, even one
    allocated at the same address, is never taken for the last one.
    """

    def __init__(self) -> None:
        self._key: tuple[Any, int] | None = None
        self._value: tuple[Any, int] = (None, 0)

    def get(self, position_ids: Any) -> tuple[Any, int]:
        import torch

        if self._key is not None and self._key[0]() is position_ids and self._key[1] == position_ids._version:
            return self._value
        lengths, longest = segments_of(position_ids)
        bounds = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        self._value = (bounds.to(position_ids.device, non_blocking=True), longest)
        self._key = (weakref.ref(position_ids), position_ids._version)
        return self._value


_SEGMENTS = _SegmentCache()


@lru_cache(maxsize=1)
def varlen_kernel() -> tuple[Any, bool] | None:
    """torch's variable-length FlashAttention function and whether it takes `enable_gqa`; None if absent."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, "enable_gqa" in inspect.signature(varlen_attn).parameters


def _expand_heads(key: Any, value: Any, heads: int) -> tuple[Any, Any]:
    groups = heads // key.shape[1]
    if groups == 1:
        return key, value
    return key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)


def varlen_with_gqa(
    query: Any,
    key: Any,
    value: Any,
    cu_seq_q: Any,
    cu_seq_k: Any,
    max_q: int,
    max_k: int,
    *,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    enable_gqa: bool = False,
) -> Any:
    """torch's `varlen_attn` with a grouped-query argument on every torch version: where the kernel has none,
    key/value heads are repeated to the query heads (what SDPA's enable_gqa computes). Layout (T, H, D)."""
    kernel = varlen_kernel()
    if kernel is None:
        raise RuntimeError("torch.nn.attention.varlen is not available in this torch build")
    varlen_attn, takes_gqa = kernel
    extra: dict[str, Any] = {}
    if enable_gqa and takes_gqa:
        extra["enable_gqa"] = True
    elif key.shape[1] != query.shape[1]:
        key, value = _expand_heads(key, value, query.shape[1])
    return varlen_attn(
        query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size, **extra
    )


def attend_segments(query: Any, key: Any, value: Any, lengths: Any, longest: int, scale: float | None) -> Any:
    """Causal attention within each segment of a flattened row; (T, H, D) in and out.

    `lengths` is a list of segment lengths or their int32 cumulative bounds (what the kernel takes). On CUDA
    in 16-bit this is one varlen FlashAttention call; elsewhere one SDPA call per segment (the exact reference).
    """
    import torch

    bounds = lengths
    if isinstance(lengths, list):
        bounds = torch.tensor([0, *lengths], dtype=torch.int32, device=query.device).cumsum(0, dtype=torch.int32)
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and varlen_kernel() is not None:
        return varlen_with_gqa(
            query, key, value, bounds, bounds, longest, longest, scale=scale, window_size=(-1, 0), enable_gqa=True
        )
    sizes = (bounds[1:] - bounds[:-1]).tolist()
    key, value = _expand_heads(key, value, query.shape[1])
    outs = [
        torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=scale
        ).transpose(0, 1)
        for q, k, v in zip(query.split(sizes), key.split(sizes), value.split(sizes), strict=True)
    ]
    return torch.cat(outs)


def varlen_attention_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """A transformers attention implementation (`AttentionInterface`): (B, H, T, D) in, (B, T, H, D) out.

    A flattened row (one row, no padding mask) goes through `attend_segments` with the boundaries of its
    position ids. Anything else (a padding mask, several rows, a KV cache) is ordinary attention: SDPA with
    the padding mask made causal, so the model stays correct wherever it is called.
    """
    position_ids = kwargs.get("position_ids")
    if attention_mask is None and query.shape[0] == 1 and query.shape[2] == key.shape[2] and position_ids is not None:
        bounds, longest = _SEGMENTS.get(position_ids)
        q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))
        dtype = q.dtype
        if q.is_cuda and dtype not in _half_dtypes():  # the kernel is 16-bit only (fp32 LoRA outputs, no autocast)
            q, k, v = (x.to(_autocast_dtype()) for x in (q, k, v))
        return attend_segments(q, k, v, bounds, longest, scaling).to(dtype).unsqueeze(0), None
    return _masked_sdpa(module, query, key, value, attention_mask, dropout, scaling)


def _half_dtypes() -> tuple[Any, ...]:
    import torch

    return (torch.float16, torch.bfloat16)


def _autocast_dtype() -> Any:
    import torch

    return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16


def _masked_sdpa(
    module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float, scaling: float | None
) -> tuple[Any, None]:
    """Causal SDPA for batches that are not one flattened row; a 2D padding mask becomes a 4D causal one."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.dim() == 2:
        q_len, k_len = query.shape[2], key.shape[2]
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
        attention_mask = causal[None, None] & attention_mask[:, None, None, -k_len:].bool()
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)


def register_with_transformers() -> None:
    """Make `VARLEN` a transformers attention implementation. Its mask is FlashAttention's: none for a
    flattened row (no dense block-diagonal mask is built), the 2D padding mask otherwise."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, flash_attention_mask)


def use_for_training(model: Any, flattened: bool, enabled: bool = True) -> AttentionPath:
    """Put `model` on the fastest correct attention for its training batches and say which path it is on."""
    unsloth = runs_unsloth_attention(model)
    if unsloth:
        _set_unsloth_hook(False)  # until chosen below: the hook is process-wide, this model may not want it
    elif model.config._attn_implementation == VARLEN:  # set by an earlier call: back to transformers' own
        model.set_attn_implementation("sdpa")
    if not flattened:
        return AttentionPath("per-row", "batches are padded rows, one example each: the backend's own attention")
    if not enabled:
        return AttentionPath("backend", "training.varlen_attention=false: the backend's own attention")
    return _use_for_unsloth() if unsloth else _use_for_transformers(model)


def runs_unsloth_attention(model: Any) -> bool:
    """Whether the model's attention layers run Unsloth's forward (Unsloth patches the classes it loads)."""
    for module in model.modules():
        if type(module).__name__.endswith("Attention"):
            return str(getattr(type(module).forward, "__module__", "")).startswith("unsloth")
    return False


def _use_for_transformers(model: Any) -> AttentionPath:
    import torch

    if unsupported := _transformers_unsupported(model.config):
        return AttentionPath("sdpa-block-mask", f"transformers' SDPA with a block-diagonal mask: {unsupported}")
    register_with_transformers()
    model.set_attn_implementation(VARLEN)
    if model.config._attn_implementation != VARLEN:
        kind = type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__
        return AttentionPath("sdpa-block-mask", f"{kind} does not dispatch through transformers' AttentionInterface")
    if not torch.cuda.is_available():
        return AttentionPath("per-example-sdpa", "one SDPA call per example: no variable-length kernel on the CPU")
    if varlen_kernel() is None:
        return AttentionPath("per-example-sdpa", "this torch build has no torch.nn.attention.varlen")
    return AttentionPath("varlen", "one torch varlen_attn call per layer over each flattened batch")


def _transformers_unsupported(config: Any) -> str | None:
    """Why this model's attention is not plain causal attention the varlen path computes, or None."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if getattr(config, "attn_logit_softcapping", None):
        return "its attention softcaps logits"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "it uses sliding-window attention"
    if head_dim > 256 or head_dim % 8:
        return f"head_dim {head_dim} is outside FlashAttention's range (a multiple of 8, at most 256)"
    return None


_UNSLOTH_OWN: dict[str, Any] = {}  # Unsloth's own value of the hook, kept to put back


def _set_unsloth_hook(on: bool) -> None:
    """Unsloth's torch-varlen hook set to `varlen_with_gqa` (on) or back to Unsloth's own value (off)."""
    from unsloth.utils import attention_dispatch as dispatch

    if hasattr(dispatch, "_TORCH_VARLEN_ATTN"):
        _UNSLOTH_OWN.setdefault("kernel", dispatch._TORCH_VARLEN_ATTN)
        dispatch._TORCH_VARLEN_ATTN = varlen_with_gqa if on else _UNSLOTH_OWN["kernel"]


def _use_for_unsloth() -> AttentionPath:
    import torch
    from unsloth import __version__ as unsloth_version
    from unsloth.utils import attention_dispatch as dispatch

    if not hasattr(dispatch, "_TORCH_VARLEN_ATTN") or not unsloth_version.startswith(UNSLOTH_VARLEN_HOOK_VERSIONS):
        return AttentionPath("unsloth-own", f"Unsloth {unsloth_version}'s own path (the varlen hook is not verified)")
    if _UNSLOTH_OWN.get("kernel", dispatch._TORCH_VARLEN_ATTN) is not None:
        return AttentionPath("varlen", "Unsloth's own variable-length path (its torch varlen hook is active)")
    if not torch.cuda.is_available() or varlen_kernel() is None:
        return AttentionPath("unsloth-per-example-sdpa", "this torch build has no torch.nn.attention.varlen")
    _set_unsloth_hook(True)
    return AttentionPath("varlen", "Unsloth's dispatch on torch varlen_attn, key/value heads expanded")

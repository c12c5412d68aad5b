"""The tokenizer inside a GGUF file: the training tokenizer's vocabulary, merges, special tokens and chat template.

llama.cpp knows two tokenizer models that cover the recipe families:
- `gpt2`: byte-level BPE (Llama-3, Qwen2/3, the demo's tokenizer): tokens in the byte-level alphabet and the
  merges; `tokenizer.ggml.pre` names the split regex that runs before BPE, which llama.cpp implements by name;
- `llama`: SentencePiece-style BPE with byte fallback (Llama-2, Mistral v0.1-v0.3, Phi-3, Gemma): tokens with
  their `▁` word marks, a score per token (merges are applied by descending score) and `<0xNN>` byte tokens.

The split regex is read from the tokenizer itself and matched against the ones llama.cpp names; anything else
(a Unigram or WordPiece model, an unknown split regex) is refused with what was found, rather than written
into a file that llama.cpp would tokenize differently from training.

Example (the decision, on tokenizer.json fragments):
    >>> tokenizer_model({"model": {"type": "BPE", "byte_fallback": False}, "decoder": {"type": "ByteLevel"}})
    'gpt2'
    >>> pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}})
    'gpt-2'
    >>> merge_scores(["▁ t", "e r", "▁t he"], ["<unk>", "▁t", "er", "▁the", "x"])
    [0.0, 0.0, -1.0, -2.0, 0.0]
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from llmtune.release.weights import ExportError

# The split regexes llama.cpp implements, by the name `tokenizer.ggml.pre` gives them (facts of the format).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
KNOWN_SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class TokenType:
    """GGUF token types (`gguf.TokenType`), spelled out so this module's doctests need no gguf import."""

    NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    """The fast tokenizer's tokenizer.json as a dict; a slow (Python) tokenizer is refused."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(
            f"The tokenizer '{tokenizer.name_or_path}' is a slow (Python) tokenizer; the GGUF export reads the "
            "fast tokenizer's tokenizer.json. Save the model with a fast tokenizer (tokenizer.json) and export again."
        )
    return dict(json.loads(backend.to_str()))


def tokenizer_model(data: dict[str, Any]) -> str:
    """'gpt2' (byte-level BPE) or 'llama' (SentencePiece-style BPE with byte fallback), or refuse."""
    model = data.get("model", {})
    decoder = (data.get("decoder") or {}).get("type")
    if model.get("type") == "BPE" and not model.get("byte_fallback") and decoder == "ByteLevel":
        return "gpt2"
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "llama"
    raise ExportError(
        f"The tokenizer is a {model.get('type')} model (byte_fallback={model.get('byte_fallback', False)}, "
        f"decoder {decoder}); the GGUF export writes byte-level BPE (Llama-3, Qwen) and SentencePiece-style BPE "
        "(Llama-2, Mistral, Phi-3, Gemma) tokenizers only. Drop gguf from export.formats for this model."
    )


def pre_tokenizer_name(data: dict[str, Any]) -> str:
    """llama.cpp's name for the split that runs before byte-level BPE, found in the tokenizer's own settings."""
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # ByteLevel's built-in regex is GPT-2's
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    splits = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel" and not p.get("use_regex", True)]
    if len(splits) == 1 and len(byte_level) == 1 and splits[0] in KNOWN_SPLITS:
        return KNOWN_SPLITS[splits[0]]
    raise ExportError(
        f"The tokenizer splits text with a pre-tokenizer llama.cpp does not name ({json.dumps(pre)[:300]}); "
        "the GGUF export knows GPT-2's, Llama-3's and Qwen2's splits. A GGUF with another split would tokenize "
        "differently from training, so drop gguf from export.formats for this model."
    )


def merge_scores(merges: list[str], tokens: list[str]) -> list[float]:
    """A SentencePiece-style score per token: minus the rank of the first merge that makes it (0 when none does),
    so applying merges by descending score, as llama.cpp's SentencePiece tokenizer does, follows the BPE order."""
    rank: dict[str, int] = {}
    for i, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", "", 1), i)
    return [float(-rank[token]) if token in rank else 0.0 for token in tokens]


def add_space_prefix(data: dict[str, Any]) -> bool:
    """Whether the tokenizer puts a `▁` before the first word (Llama-2, Mistral) or not (Gemma)."""
    normalizers = _flatten(data.get("normalizer"), "normalizers")
    if any(n.get("type") == "Prepend" and n.get("prepend") == "▁" for n in normalizers):
        return True
    metaspaces = [p for p in _flatten(data.get("pre_tokenizer"), "pretokenizers") if p.get("type") == "Metaspace"]
    return any(p.get("prepend_scheme", "always") != "never" for p in metaspaces)


def _flatten(node: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    if not node:
        return []
    return list(node.get(key) or []) if node.get("type") == "Sequence" else [node]


def token_list(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every token in id order with its GGUF type, padded to the embedding's `vocab_size` with unused tokens."""
    vocab = {token: i for token, i in tokenizer.get_vocab().items()}
    by_id: dict[int, str] = {i: token for token, i in vocab.items()}
    if max(by_id) >= vocab_size:
        raise ExportError(
            f"The tokenizer has token id {max(by_id)} but the model's embedding has {vocab_size} rows; "
            "the tokenizer does not belong to this model."
        )
    special = set(tokenizer.all_special_ids)
    added = set(tokenizer.get_added_vocab().values())
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:  # embedding rows no token uses (vocabularies padded to a multiple of 64 or 128)
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        tokens.append(token)
        types.append(_token_type(i, token, special, added))
    return tokens, types


def _token_type(i: int, token: str, special: set[int], added: set[int]) -> int:
    if i in special:
        return TokenType.CONTROL
    if BYTE_TOKEN.fullmatch(token):  # byte-fallback tokens, also when the tokenizer lists them as added tokens
        return TokenType.BYTE
    if i in added:
        return TokenType.USER_DEFINED
    return TokenType.NORMAL


def tokenizer_merges(tokenizer: Any) -> list[str]:
    """The BPE merges as 'left right' strings, read by the gguf package's SpecialVocab (it knows both layouts
    tokenizer.json has used, and how spaces inside a merge are written)."""
    from gguf import SpecialVocab

    with tempfile.TemporaryDirectory(prefix="llmtune-vocab-") as folder:
        tokenizer.save_pretrained(folder)
        return list(SpecialVocab(Path(folder), load_merges=True).merges)


def adds_special(tokenizer: Any) -> tuple[bool, bool]:
    """(adds BOS, adds EOS) when the tokenizer encodes plain text, as training's encode did."""
    ids = tokenizer("x")["input_ids"]
    adds_bos = tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]
    adds_eos = tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id]
    return adds_bos, adds_eos


def write_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """Add the training tokenizer and its chat template to a GGUFWriter; returns what was written."""
    data = tokenizer_json(tokenizer)
    model = tokenizer_model(data)
    tokens, types = token_list(tokenizer, vocab_size)
    merges = tokenizer_merges(tokenizer)
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    summary: dict[str, Any] = {"tokenizer_model": model, "tokens": len(tokens)}
    if model == "gpt2":
        summary["pre_tokenizer"] = pre = pre_tokenizer_name(data)
        writer.add_tokenizer_pre(pre)
        writer.add_token_merges(merges)
    else:
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(merge_scores(merges, tokens))
        writer.add_add_space_prefix(add_space_prefix(data))
    _write_special_tokens(writer, tokenizer)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    return summary


def _write_special_tokens(writer: Any, tokenizer: Any) -> None:
    # The training tokenizer's EOS is the end-of-turn token the answers were trained to end with (the named
    # templates set it), so it is the one a runtime must stop on.
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    adds_bos, adds_eos = adds_special(tokenizer)
    writer.add_add_bos_token(adds_bos)
    writer.add_add_eos_token(adds_eos)

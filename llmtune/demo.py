"""The offline demo: a small instruction dataset and a tiny random-init Llama base, both reproducible.

The dataset mixes five rule-based instruction tasks (spell digits as words, reverse a list, count
words, first/last word). A random-init base knows none of them, so fine-tuning visibly helps, and the
rules generalize, so held-out rows measure learning rather than memorization.

Example:
    >>> rows = make_demo_rows(3, seed=1)
    >>> sorted(rows[0])
    ['input', 'instruction', 'output']
    >>> tok = build_demo_tokenizer(rows)
    >>> tok.pad_token != tok.eos_token
    True
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llmtune import progress
from llmtune.data.templates import CHATML_TEMPLATE

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
NOUNS = [
    "apple",
    "pear",
    "plum",
    "fig",
    "lime",
    "kiwi",
    "grape",
    "melon",
    "cherry",
    "peach",
    "lemon",
    "mango",
    "cat",
    "dog",
    "fox",
    "owl",
    "bee",
    "ant",
    "cow",
    "pig",
    "hen",
    "duck",
    "goat",
    "wolf",
    "bear",
    "frog",
    "seal",
    "crab",
    "red",
    "blue",
    "green",
    "black",
    "white",
    "pink",
    "gray",
    "gold",
    "boat",
    "car",
    "bus",
    "train",
    "plane",
    "bike",
    "ship",
    "cart",
    "rock",
    "tree",
    "lake",
    "hill",
    "road",
    "rain",
    "snow",
    "wind",
    "star",
    "moon",
    "sun",
    "cloud",
]

# Same rule, several phrasings, so the model must read the instruction and not a fixed string.
TASKS: dict[str, list[str]] = {
    "digits": ["Write the digits as words.", "Spell out each digit.", "Say these digits in words."],
    "reverse": ["Reverse the order of the words.", "Write the words backwards.", "List the words in reverse."],
    "count": ["How many words are there?", "Count the words.", "Give the number of words."],
    "first": ["What is the first word?", "Return the first word.", "Which word comes first?"],
    "last": ["What is the last word?", "Return the last word.", "Which word comes last?"],
}

SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "<|im_start|>", "<|im_end|>"]


def make_demo_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` Alpaca rows (instruction/input/output), the same for the same seed."""
    rng = random.Random(seed)
    return [_make_row(rng, rng.choice(sorted(TASKS))) for _ in range(n)]


def _make_row(rng: random.Random, task: str) -> dict[str, str]:
    instruction = rng.choice(TASKS[task])
    if task == "digits":
        digits = [rng.randrange(10) for _ in range(rng.randint(2, 5))]
        return {
            "instruction": instruction,
            "input": " ".join(map(str, digits)),
            "output": " ".join(DIGIT_WORDS[d] for d in digits),
        }
    words = rng.sample(NOUNS, rng.randint(2, 6))
    answer = {"reverse": " ".join(reversed(words)), "count": str(len(words)), "first": words[0], "last": words[-1]}[
        task
    ]
    return {"instruction": instruction, "input": " ".join(words), "output": answer}


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write rows as JSON lines (UTF-8), creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def build_demo_tokenizer(rows: Iterable[dict[str, str]], vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer trained on the rows, with a ChatML template and a pad distinct from EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [f"{r['instruction']}\n\n{r['input']}\n{r['output']}" for r in rows] + ["user assistant system"]
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


# Shapes of the random-init bases: "tiny" for tests (2 layers, hidden 64), "demo" for the default run.
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "demo": {
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
}


def build_demo_model(
    out_dir: str | Path,
    shape: str = "demo",
    rows: list[dict[str, str]] | None = None,
    seed: int = 0,
    pretrain_steps: int = 0,
    show_progress: bool = False,
) -> Path:
    """Save a Llama base + tokenizer to `out_dir` (safetensors), reproducible from the seed.

    With `pretrain_steps=0` the weights are random. Otherwise the model is first trained in full on plain
    text (`pretraining_text`), like a real base model: it knows the rules but not the chat format.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_demo_tokenizer(rows if rows is not None else make_demo_rows(2000, seed=seed))
    config = LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **MODEL_SHAPES[shape],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if pretrain_steps:
        pretrain(model, tok, make_demo_rows(4000, seed=seed + 1), pretrain_steps, show_progress=show_progress)
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def pretraining_text(row: dict[str, str]) -> str:
    """A row as plain text, without any chat template: what a base model sees in pretraining."""
    return f"{row['instruction']}\n\n{row['input']}\n{row['output']}"


def pretrain(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, str]],
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    show_progress: bool = False,
) -> list[float]:
    """Full-parameter next-token training on plain-text rows; returns the loss per step.

    `show_progress`: a bar with the loss and ETA (tqdm; on a non-terminal it prints a line every few percent).
    """
    import torch

    texts = [pretraining_text(r) + tokenizer.eos_token for r in rows]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    shown = progress.bar(total=steps, desc="demo base: pretraining", unit="step", disable=not show_progress)
    for _ in range(steps):
        idx = torch.randint(len(texts), (batch_size,), generator=generator).tolist()
        batch = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        shown.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        shown.update()
    shown.close()
    model.eval()
    return losses


DEMO_DATASET_ROWS = 2000
DEMO_PRETRAIN_STEPS = 600


def ensure_demo_model(path: str | Path) -> Path:
    """Build the default run's base model at `path` unless it is there (once; the bar shows how long it takes)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        print(
            f"Building the demo base model in {path} (once): {DEMO_PRETRAIN_STEPS} pretraining steps on this "
            "machine's CPU; the bar below shows the time left.",
            flush=True,
        )
        build_demo_model(
            path,
            shape="demo",
            rows=make_demo_rows(DEMO_DATASET_ROWS, seed=0),
            pretrain_steps=DEMO_PRETRAIN_STEPS,
            show_progress=True,
        )
    return path

"""Talking to a tuned model: turns rendered with the training template, answers streamed as they are generated.

A `ChatSession` keeps the conversation (multi-turn) and renders every prompt with `llmtune.data.encode.render`,
the function training rendered its rows with, on the tokenizer saved with the run, so the model sees the layout
it was trained on. Generation stops at `stop_token_ids`: every end-of-turn token of the template, as evaluation does.

Example (the demo tokenizer with ChatML; the model is only needed to generate):
    >>> from llmtune.demo import make_demo_rows, build_demo_tokenizer
    >>> tok = build_demo_tokenizer(make_demo_rows(20, seed=0))
    >>> session = ChatSession(model=None, tokenizer=tok, system="Be brief.")
    >>> print(session.prompt("Reverse: a b"))
    <|im_start|>system
    Be brief.<|im_end|>
    <|im_start|>user
    Reverse: a b<|im_end|>
    <|im_start|>assistant
    <BLANKLINE>
    >>> tok.convert_ids_to_tokens(stop_token_ids(tok))
    ['<|im_end|>']
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from llmtune.data.encode import render
from llmtune.data.templates import end_of_turn_ids


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids generation stops at: every end-of-turn token the template uses, EOS included (the same
    `llmtune.data.templates.end_of_turn_ids` that evaluation stops at)."""
    return end_of_turn_ids(tokenizer)


class _CallbackStreamer:
    """transformers' TextStreamer, handing each finished piece of text to a callback instead of printing it."""

    def __new__(cls, tokenizer: Any, on_text: Callable[[str], None]) -> Any:
        from transformers import TextStreamer

        class Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    on_text(text)

        return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


@dataclass
class ChatSession:
    """One conversation with a model; `adapter_enabled=False` talks to the base of a PEFT model instead."""

    model: Any
    tokenizer: Any
    system: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy, as evaluation generates
    adapter_enabled: bool = True
    messages: list[dict[str, str]] = field(default_factory=list)

    def conversation(self, user_text: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.messages, {"role": "user", "content": user_text}]

    def prompt(self, user_text: str) -> str:
        """The text the model is given for the next answer: the whole conversation and the generation prompt."""
        return render(self.tokenizer, self.conversation(user_text), add_generation_prompt=True)

    def reply(self, user_text: str, on_text: Callable[[str], None] = lambda _: None) -> str:
        """Generate the answer to `user_text`, streaming its text to `on_text`; the turn joins the conversation."""
        import torch

        batch = self.tokenizer(self.prompt(user_text), return_tensors="pt", add_special_tokens=False)
        batch = batch.to(self.model.device)
        sampling = (
            {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}
        )
        with torch.no_grad(), self._adapter():
            out = self.model.generate(
                **batch,
                max_new_tokens=self.max_new_tokens,
                **sampling,
                eos_token_id=stop_token_ids(self.tokenizer),
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                streamer=_CallbackStreamer(self.tokenizer, on_text),
            )
        new_tokens = out[0, batch["input_ids"].shape[1] :]
        answer = str(self.tokenizer.decode(new_tokens, skip_special_tokens=True)).strip()
        self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]
        return answer

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages.clear()

    @contextlib.contextmanager
    def _adapter(self) -> Iterator[None]:
        if self.adapter_enabled or not hasattr(self.model, "disable_adapter"):
            yield
            return
        with self.model.disable_adapter():
            yield

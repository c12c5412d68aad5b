"""An Ollama Modelfile beside the GGUF file: FROM, a TEMPLATE that renders turns as training did, stop tokens,
PARAMETER lines. `ollama create my-model -f Modelfile` in the folder makes it runnable with `ollama run my-model`.

The TEMPLATE (a Go text/template over Ollama's `.Messages`) is derived from the training chat template by
rendering probe conversations with it: each message's text is what rendering it adds to the conversation
before it, split around its content into a prefix and a suffix per role; the generation prompt is what
`add_generation_prompt` adds; a system prompt the template inserts on its own (Qwen2.5's) becomes the
Modelfile's SYSTEM. The derived format is then rendered back on every probe conversation and must equal the
Jinja rendering character for character. Templates that are not one wrapper per message (Mistral's, which
folds the system prompt into the first user turn) fail that and get no TEMPLATE line: Ollama then takes the
chat template stored in the GGUF file.

Example (ChatML, as the demo trains):
    >>> fmt = TurnFormat(prefix={"user": "<|im_start|>user\\n", "assistant": "<|im_start|>assistant\\n"},
    ...     suffix={"user": "<|im_end|>\\n", "assistant": "<|im_end|>\\n"}, generation="<|im_start|>assistant\\n")
    >>> fmt.render([{"role": "user", "content": "Hi"}])
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
    >>> parse_template(fmt.go_template()) == fmt
    True
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
MARK = "\x1fllmtune-{}\x1f"  # a content no template changes and no real message contains
NUM_CTX_CAP = 4096


@dataclass(frozen=True)
class TurnFormat:
    """A chat format made of one wrapper per message: how Ollama's templates are written."""

    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str
    lead: str = ""  # text before the first message (kept only when it is not the BOS the runtime adds)
    default_system: str | None = None  # what the template says as system when the conversation has none
    roles: tuple[str, ...] = field(default=("user", "assistant"))

    def __post_init__(self) -> None:
        object.__setattr__(self, "roles", tuple(r for r in ROLES if r in self.prefix))

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt for `messages`, ending with the generation prompt."""
        if self.default_system is not None and messages and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.default_system}, *messages]
        turns = "".join(self.prefix[m["role"]] + m["content"] + self.suffix[m["role"]] for m in messages)
        return self.lead + turns + self.generation

    def go_template(self) -> str:
        """The same format as an Ollama TEMPLATE (Go text/template over .Messages)."""
        branches = "".join(
            f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}'
            f"{self.prefix[role]}{{{{ .Content }}}}{self.suffix[role]}"
            for i, role in enumerate(self.roles)
        )
        return f"{self.lead}{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{self.generation}"


BRANCH = re.compile(
    r'\{\{ (?:if|else if) eq \.Role "(\w+)" \}\}(.*?)\{\{ \.Content \}\}(.*?)(?=\{\{ (?:else if|end))', re.S
)


def parse_template(text: str) -> TurnFormat:
    """Read a TEMPLATE written by `go_template` back into a TurnFormat (what the tests check Modelfiles with)."""
    lead, _, rest = text.partition("{{ range .Messages }}")
    body, _, generation = rest.rpartition("{{ end }}{{ end }}")
    found = BRANCH.findall(body + "{{ end }}")
    return TurnFormat({r: p for r, p, _ in found}, {r: s for r, _, s in found}, generation, lead)


def _probes() -> list[list[dict[str, str]]]:
    def conv(*roles: str) -> list[dict[str, str]]:
        return [{"role": r, "content": MARK.format(f"{r}{i}")} for i, r in enumerate(roles)]

    return [
        conv("user"),
        conv("user", "assistant", "user"),
        conv("user", "assistant", "user", "assistant", "user"),
        conv("system", "user"),
        conv("system", "user", "assistant", "user"),
    ]


def _render(tokenizer: Any, messages: list[dict[str, str]], generation: bool) -> str | None:
    try:
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation))
    except Exception:  # a template may refuse a role or an order (jinja raise_exception): that probe is out
        return None


def _pieces(tokenizer: Any, messages: list[dict[str, str]]) -> list[tuple[str, str]] | None:
    """(before content, after content) of each message: what rendering it adds, split around its content."""
    pieces, before = [], ""
    for k in range(1, len(messages) + 1):
        text = _render(tokenizer, messages[:k], generation=False)
        if text is None or not text.startswith(before):
            return None
        added = text[len(before) :]
        mark = messages[k - 1]["content"]
        if added.count(mark) != 1:
            return None
        head, _, tail = added.partition(mark)
        pieces.append((head, tail))
        before = text
    return pieces


def derive(tokenizer: Any) -> TurnFormat | None:
    """The training template as one wrapper per message, verified on every probe; None when it is not one."""
    chat = _probes()[2]  # user, assistant, user, assistant, user: later turns carry no leading text
    pieces = _pieces(tokenizer, chat)
    full = _render(tokenizer, chat, generation=True)
    plain = _render(tokenizer, chat, generation=False)
    if pieces is None or full is None or plain is None or not full.startswith(plain):
        return None
    prefix = {"user": pieces[2][0], "assistant": pieces[1][0]}
    suffix = {"user": pieces[2][1], "assistant": pieces[1][1]}
    first = pieces[0][0]
    if not first.endswith(prefix["user"]):
        return None
    lead, default_system = first[: len(first) - len(prefix["user"])], None
    with_system = _pieces(tokenizer, _probes()[4])
    if with_system is not None:
        sys_head, sys_tail = with_system[0]
        prefix["system"], suffix["system"] = sys_head, sys_tail
        lead, default_system = _split_default_system(lead, prefix, suffix)
        if sys_head.startswith(lead):
            prefix["system"] = sys_head[len(lead) :]
    fmt = TurnFormat(prefix, suffix, full[len(plain) :], lead, default_system)
    return fmt if _reproduces(fmt, tokenizer) else None


def _split_default_system(lead: str, prefix: dict[str, str], suffix: dict[str, str]) -> tuple[str, str | None]:
    """A lead that is a whole system turn the template adds by itself: (what precedes it, its content)."""
    start = lead.find(prefix["system"]) if prefix["system"] else -1
    if start < 0 or not lead.endswith(suffix["system"]):
        return lead, None
    content = lead[start + len(prefix["system"]) : len(lead) - len(suffix["system"])]
    return lead[:start], content


def _reproduces(fmt: TurnFormat, tokenizer: Any) -> bool:
    for messages in _probes():
        want = _render(tokenizer, messages, generation=True)
        if want is None:
            if messages[0]["role"] == "system":
                continue  # the template refuses system turns; so does nobody here
            return False
        if messages[0]["role"] == "system" and "system" not in fmt.prefix:
            return False
        if fmt.render(messages) != want:
            return False
    return True


def stop_tokens(tokenizer: Any, fmt: TurnFormat | None) -> list[str]:
    """Every end-of-turn token of the template (the training EOS among them) and the start of a user turn,
    where a runtime must stop."""
    from llmtune.data.templates import end_of_turn_tokens

    stops = end_of_turn_tokens(tokenizer)
    if fmt is not None and fmt.prefix["user"].strip():
        stops.append(fmt.prefix["user"].strip())
    return list(dict.fromkeys(stops))


def modelfile(gguf_name: str, tokenizer: Any, context_length: int, parameters: dict[str, Any]) -> str:
    """The Modelfile text for a GGUF file in the same folder."""
    fmt = derive(tokenizer)
    if fmt is not None and fmt.lead == (tokenizer.bos_token or "\x00"):
        fmt = TurnFormat(fmt.prefix, fmt.suffix, fmt.generation, "", fmt.default_system)  # llama.cpp adds BOS
    lines = [
        "# Ollama Modelfile written by llmtune. In this folder: ollama create my-model -f Modelfile",
        f"FROM ./{gguf_name}",
    ]
    if fmt is not None and '"""' not in fmt.go_template():
        lines.append(f'TEMPLATE """{fmt.go_template()}"""')
        if fmt.default_system:
            lines.append(f'SYSTEM """{fmt.default_system}"""')
    else:
        lines.append("# No TEMPLATE: the training template is not one wrapper per message; Ollama uses the GGUF's.")
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stop_tokens(tokenizer, fmt)]
    lines.append(f"PARAMETER num_ctx {min(context_length, NUM_CTX_CAP)}")
    lines += [
        f"PARAMETER {key} {json.dumps(value) if isinstance(value, str) else value}" for key, value in parameters.items()
    ]
    return "\n".join(lines) + "\n"


def parse_modelfile(text: str) -> dict[str, Any]:
    """FROM, TEMPLATE, SYSTEM and PARAMETER values of a Modelfile (the subset `modelfile` writes)."""
    found: dict[str, Any] = {"parameters": {}, "stop": []}
    for name in ("TEMPLATE", "SYSTEM"):
        match = re.search(rf'^{name} """(.*?)"""$', text, re.S | re.M)
        found[name.lower()] = match.group(1) if match else None
    for line in text.splitlines():
        if line.startswith("FROM "):
            found["from"] = line[5:]
        elif line.startswith("PARAMETER stop "):
            found["stop"].append(json.loads(line[len("PARAMETER stop ") :]))
        elif line.startswith("PARAMETER "):
            key, _, value = line[len("PARAMETER ") :].partition(" ")
            found["parameters"][key] = value
    return found


def write_modelfiles(
    folder: Path, files: dict[str, Path], tokenizer: Any, context_length: int, params: dict
) -> list[Path]:
    """`Modelfile` for the first GGUF type, `Modelfile.<type>` for each other one."""
    written = []
    for i, (kind, path) in enumerate(files.items()):
        target = folder / ("Modelfile" if i == 0 else f"Modelfile.{kind}")
        target.write_text(modelfile(path.name, tokenizer, context_length, params))
        written.append(target)
    return written

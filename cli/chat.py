"""`python run.py chat`: talk to a finetune run's model, with the chat template it was trained with.

    python run.py chat                                  # the newest completed finetune run's tuned model
    python run.py chat --model-version production       # or a version of export.zenml_model, --run NAME
    python run.py chat --adapter outputs/<run>/adapter  # an exported adapter on its base, loaded in 4-bit
    python run.py chat --merged outputs/<run>/merged    # an exported merged model
    python run.py chat --base                           # the same base with the adapter off, to compare
    python run.py chat --prompt "Reverse the order of the words.\n\ncat dog"   # one answer, then exit

A run's model is its 4-bit base with the trained adapter, as evaluation scored it, on the run's backend
(hf, or unsloth on a GPU). Answers stream token by token; the conversation is kept until /reset.
Inside the chat: /reset forgets the conversation, /quit (or Ctrl-D) leaves.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from llmtune.config import ConfigError, RunConfig, SourceConfig

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = "/reset forgets the conversation, /quit leaves"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="run.py chat",
        description="Chat with a tuned model, rendered with its training chat template.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--run", help="a finetune run (name or id); default: the newest completed one")
    which.add_argument(
        "--model-version", help="a version of export.zenml_model: number or stage (production, staging, latest)"
    )
    which.add_argument("--adapter", type=Path, help="a PEFT adapter folder exported by a run (outputs/<run>/adapter)")
    which.add_argument("--merged", type=Path, help="a merged model folder exported by a run (outputs/<run>/merged)")
    parser.add_argument("--base", action="store_true", help="talk to the base model (adapter off), for comparison")
    parser.add_argument("--system", help="a system prompt for every turn")
    parser.add_argument("--prompt", help="one-shot: answer this prompt, print the answer and exit")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=256, help="longest answer (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, as evaluation (default 0)")
    parser.add_argument(
        "--config",
        default=str(ROOT / "configs" / "finetune.yaml"),
        help="config naming export.zenml_model for --model-version, and model.* for --adapter folders without one",
    )
    args = parser.parse_args(argv)
    if args.base and args.merged:
        parser.error("--base needs a model with an adapter (a run, --model-version or --adapter), not --merged")
    if args.temperature < 0:
        parser.error(f"--temperature must be 0 (greedy) or more, not {args.temperature}")
    return args


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    what: str  # for the banner: which model this is


def load(args: argparse.Namespace) -> Loaded:
    """The model and training tokenizer the options name."""
    if args.merged:
        return load_merged(args.merged)
    from llmtune.config import load_config

    cfg = load_config(args.config, [])
    if args.adapter:
        return load_adapter_folder(args.adapter, cfg)
    return load_run(SourceConfig(run=args.run, model_version=_version(args.model_version)), cfg)


def _version(text: str | None) -> int | str | None:
    return int(text) if text is not None and text.isdigit() else text


def load_merged(folder: Path) -> Loaded:
    """A merged model folder with its tokenizer (float32 on the CPU, its own dtype on a GPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmtune.model import hf

    _require_folder(folder, "config.json", "--merged")
    hf.require_safetensors(folder)
    dtype = "auto" if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, device_map=hf.device_map()).eval()
    return Loaded(model, AutoTokenizer.from_pretrained(str(folder)), f"merged model {folder}")


def load_adapter_folder(folder: Path, cfg: RunConfig) -> Loaded:
    """An exported adapter on its base, quantized as in training; the run's config saved beside it wins over
    `cfg` for the model section."""
    import yaml
    from transformers import AutoTokenizer

    from llmtune.artifacts import Adapter
    from llmtune.model import import_unsloth_if_used, resolve_backend

    _require_folder(folder, "adapter_config.json", "--adapter")
    Adapter(str(folder)).config()  # refuses a folder without safetensors weights
    saved = folder / "llmtune_config.yaml"
    if saved.is_file():
        cfg = RunConfig.from_stored(yaml.safe_load(saved.read_text()) or {})
    import_unsloth_if_used(cfg.model.backend)
    backend = resolve_backend(cfg.model.backend)
    base_dir = Path(tempfile.mkdtemp(prefix="llmtune-chat-base-"))
    backend.load_quantized(cfg.model, base_dir)
    model = backend.load_for_inference(base_dir, folder)
    return Loaded(model, AutoTokenizer.from_pretrained(str(folder)), f"adapter {folder} on {cfg.model.name}")


def load_run(source: SourceConfig, cfg: RunConfig) -> Loaded:
    """A finetune run's 4-bit base and trained adapter, with the tokenizer saved with its prepared data."""
    from cli.sources import find_finetune_run, run_config, step_output
    from cli.stack import use_project_stack
    from llmtune.model import import_unsloth_if_used, resolve_backend

    use_project_stack()
    try:
        run = find_finetune_run(source, cfg.export.zenml_model)
    except ConfigError as err:  # its advice names the source.* keys of the pipelines; here they are options
        raise ConfigError(
            f"{err} For run.py chat: --run NAME, --model-version N|STAGE, --adapter PATH or --merged PATH."
        ) from None
    backend_name = run_config(run).model.backend
    import_unsloth_if_used(backend_name)
    backend = resolve_backend(backend_name)
    base, adapter = step_output(run, "load_base_model").load(), step_output(run, "train_sft").load()
    tokenizer = step_output(run, "prepare_dataset").load().tokenizer()
    model = backend.load_for_inference(base.path, adapter.path)
    return Loaded(model, tokenizer, f"finetune run {run.name}")


def _require_folder(folder: Path, marker: str, option: str) -> None:
    if not (folder / marker).is_file():
        raise ConfigError(
            f"{option} {folder}: not a folder with {marker}. Give the folder a run exported, e.g. "
            f"outputs/<run>/{'merged' if option == '--merged' else 'adapter'}."
        )


def main(argv: list[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    from llmtune.chat import ChatSession

    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = stdout or sys.stdout
    loaded = load(args)
    session = ChatSession(
        loaded.model,
        loaded.tokenizer,
        system=args.system,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        adapter_enabled=not args.base,
    )
    if args.prompt is not None:
        session.reply(args.prompt, on_text=lambda text: print(text, end="", flush=True, file=out))
        print(file=out)
        return 0
    who = f"{loaded.what}{' with the adapter off (base)' if args.base else ''}"
    print(f"Chatting with {who}. {COMMANDS}.", file=out)
    return interactive(session, stdin or sys.stdin, out)


def interactive(session: Any, stdin: TextIO, out: TextIO) -> int:
    """Read a turn, stream the answer, until /quit or the end of input."""
    while True:
        print("you> ", end="", flush=True, file=out)
        line = stdin.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            print(file=out)
            return 0
        text = line.strip()
        if text == "/reset":
            session.reset()
            print("(conversation reset)", file=out)
            continue
        if not text:
            continue
        print("model> ", end="", flush=True, file=out)
        session.reply(text, on_text=lambda piece: print(piece, end="", flush=True, file=out))
        print(file=out)


if __name__ == "__main__":
    sys.exit(main())

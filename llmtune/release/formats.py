"""The export formats of a merged run, each a folder with the training tokenizer (and so its chat template).

- `adapter`: the PEFT adapter, its `base_model_name_or_path` pointing at the original base (`model.name`),
  so plain `peft.AutoPeftModelForCausalLM.from_pretrained(dir)` loads it from anywhere.
- `merged_16bit`: the merged 16-bit model (`llmtune.release.merge`), reused as it is.
- `merged_4bit`: the merged model re-quantized with the run's bitsandbytes settings.
- `gguf`: one GGUF file per `export.gguf_types` for llama.cpp and Ollama (`llmtune.release.gguf`), with the
  training tokenizer and chat template inside, and an Ollama Modelfile beside it (`llmtune.release.ollama`).

Example:
    >>> FOLDER_NAMES["merged_4bit"]
    'merged-4bit'
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmtune.artifacts import Adapter
from llmtune.config import ExportConfig, ModelConfig
from llmtune.model import hf

# The folder of each format, in the work folder and under export.output_dir/<run>.
FOLDER_NAMES = {"adapter": "adapter", "merged_16bit": "merged", "merged_4bit": "merged-4bit", "gguf": "gguf"}
GGUF_STEM = "model"  # model-q8_0.gguf, ...


def write_formats(
    formats: Sequence[str], merged_dir: Path, adapter_dir: Path, model: ModelConfig, tokenizer: Any, work_dir: Path
) -> dict[str, Path]:
    """The folders of `formats` under `work_dir`, each with the training tokenizer; `merged_dir` is reused."""
    folders: dict[str, Path] = {}
    if "adapter" in formats:
        folders["adapter"] = export_adapter(adapter_dir, work_dir / FOLDER_NAMES["adapter"], model)
    if "merged_16bit" in formats:
        folders["merged_16bit"] = merged_dir
    if "merged_4bit" in formats:
        folders["merged_4bit"] = quantize_merged(merged_dir, work_dir / FOLDER_NAMES["merged_4bit"], model)
    for folder in folders.values():
        tokenizer.save_pretrained(str(folder))  # the training chat template travels with every format
    return folders


def quantize_merged(merged_dir: str | Path, out_dir: str | Path, cfg: ModelConfig) -> Path:
    """The merged 16-bit model loaded with the run's bitsandbytes 4-bit settings and saved (loads with plain
    transformers where bitsandbytes is installed)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(merged_dir), quantization_config=hf.bnb_config(cfg), device_map=hf.device_map(), use_safetensors=True
    )
    model.save_pretrained(str(out_dir))
    return Path(out_dir)


def export_adapter(adapter_dir: str | Path, out_dir: str | Path, cfg: ModelConfig) -> Path:
    """Copy the adapter and point its config at the original base, so plain PEFT loads it from anywhere.

    (Training saw the 4-bit copy in a temporary folder; that path means nothing to anyone else.)
    """
    out = copy_tree(adapter_dir, out_dir)
    config_path = Adapter(str(out)).config_file
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = cfg.name
    config["revision"] = cfg.revision
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    return out


def copy_tree(src: str | Path, dst: str | Path, shown: Any = None) -> Path:
    """Copy a folder, replacing what is at `dst`; with `shown` (a progress bar in bytes), count each file copied."""
    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)

    def copy_counted(source: str, target: str) -> None:
        shutil.copy2(source, target)
        if shown is not None:
            shown.update(os.path.getsize(source))

    shutil.copytree(src, dst, copy_function=copy_counted)
    return dst


def tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def write_gguf(merged_dir: Path, tokenizer: Any, cfg: ExportConfig, work_dir: Path, name: str) -> dict[str, Path]:
    """The GGUF file of each `cfg.gguf_types` in `work_dir/gguf`, and the Ollama Modelfiles; {type: file}."""
    from llmtune.release import gguf, ollama

    folder = work_dir / FOLDER_NAMES["gguf"]
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {kind: folder / gguf.file_name(GGUF_STEM, kind) for kind in cfg.gguf_types}
    for kind, path in files.items():
        gguf.convert(merged_dir, tokenizer, path, kind, name)
    context = json.loads((merged_dir / "config.json").read_text())["max_position_embeddings"]
    ollama.write_modelfiles(folder, files, tokenizer, context, cfg.gguf_modelfile_parameters)
    return files

"""Release: a trained adapter becomes checked, exported, documented and published models, in this order.

1. `merge_and_check`: merge the adapter into the original 16-bit base, streamed tensor by tensor
   (`llmtune.release.merge`), and check the merged model against base + adapter (`llmtune.release.check`).
   The result goes to the caller's `on_check` before anything is written, and a failed check ends the
   release with `MergeCheckFailed`: nothing is exported or published.
   With `gguf` in `export.formats`, the GGUF files (`llmtune.release.gguf`) are written next and checked
   against the merged model (`llmtune.release.gguf_check`): the result goes to `on_check` too, and a failed
   check ends the release with `GgufCheckFailed`, so no GGUF (and nothing else) is published.
2. `write_formats`: the folders of `export.formats` (`llmtune.release.formats`), each with the training
   tokenizer, so the chat template travels with the model; the GGUF folder with its Ollama Modelfile.
3. `annotate`: a model card (`llmtune.release.card`) and the resolved config in every folder.
4. `write_local`: a copy under `export.output_dir/<run>`, complete before any push, so a failed push
   leaves it intact. It is all or nothing: written into a hidden `.<run>.partial-*` folder beside it and
   renamed into place when every folder is there, so an export killed midway leaves no `<run>` folder.
5. `publish`: the MLflow Model Registry, then the Hugging Face Hub (`llmtune.release.publish`); the GGUF
   folder goes to the same Hub repo, under `gguf/` (`export.hub_include_gguf`).

The promotion gate before it (`llmtune.release.promotion`) and the stage change after it belong to the
caller, which knows the ZenML model version; secrets reach this module as values in `Destinations`.

Example (the facts a model card is made of, without merging anything):
    >>> from llmtune.config import RunConfig
    >>> inputs = ReleaseInputs(RunConfig(), Path("base4"), Path("adapter"), Path("data"), {}, None, {})
    >>> card_facts(inputs, {"merge_check_passed": True}).hardware.endswith("(the export machine)")
    True
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llmtune import progress
from llmtune.artifacts import PreparedData, TrainingReport
from llmtune.config import RunConfig
from llmtune.release import card, gguf_check, publish
from llmtune.release.check import CheckInputs, MergeCheckFailed, check_merge, ensure_passed
from llmtune.release.formats import FOLDER_NAMES, copy_tree, tree_bytes, write_formats, write_gguf
from llmtune.release.gguf_check import GgufCheckFailed
from llmtune.release.merge import merge_streaming
from llmtune.release.weights import ExportError, resolve_base_checkpoint
from llmtune.train.memory import describe_hardware

__all__ = [
    "Destinations",
    "ExportError",
    "GgufCheckFailed",
    "MergeCheckFailed",
    "ReleaseInputs",
    "ReleaseReport",
    "release",
]


@dataclass(frozen=True)
class ReleaseInputs:
    """What a release starts from: the run's config and artifacts (as folders) and what it measured."""

    config: RunConfig  # model (the original base, the 4-bit settings), data source, export section
    quantized_dir: Path  # the NF4 base the adapter was trained on
    adapter_dir: Path
    data_dir: Path  # the prepared data: tokenizer (training chat template), eval prompts, fingerprint
    eval_report: dict[str, Any]
    training: TrainingReport | None  # None for a run made before training reports were their own artifact
    trail: dict[str, str]  # zenml_run, zenml_run_id, training_run, mlflow_run_id


@dataclass(frozen=True)
class Destinations:
    """Where the release goes besides its work folder, with what the caller resolved (never read here)."""

    run_name: str = "run"  # the folder under export.output_dir
    hub_token: str | None = None
    mlflow_tracking_uri: str | None = None  # registering needs trail["mlflow_run_id"] too


@dataclass
class ReleaseReport:
    merge_check: dict[str, Any]
    merged_dir: Path
    folders: dict[str, Path] = field(default_factory=dict)  # format -> folder in the work folder
    local: dict[str, str] = field(default_factory=dict)  # <format>_path under export.output_dir
    published: dict[str, Any] = field(default_factory=dict)  # hub_commit_url, mlflow_model_version, ...
    gguf_check: dict[str, Any] = field(default_factory=dict)  # gguf_<type>_* fields; empty without gguf

    def destinations(self) -> dict[str, Any]:
        return {**self.local, **self.published}


def release(
    inputs: ReleaseInputs,
    destinations: Destinations,
    work_dir: Path,
    on_check: Callable[[dict[str, Any]], None] = lambda result: None,
) -> ReleaseReport:
    """Merge and check, write the formats with their cards, copy them locally, publish (see the module doc)."""
    data = PreparedData(str(inputs.data_dir))
    tokenizer = data.tokenizer()
    prompts = [p["prompt"] for p in data.eval_prompts()]
    merged, check = merge_and_check(inputs, tokenizer, prompts, work_dir)
    on_check(check)
    ensure_passed(check)
    export = inputs.config.export
    gguf_files, gguf_result = gguf_and_check(merged, tokenizer, prompts, export, work_dir, destinations.run_name)
    if gguf_result:
        on_check(gguf_result)
        gguf_check.ensure_passed(gguf_result)
    folders = write_formats(export.formats, merged, inputs.adapter_dir, inputs.config.model, tokenizer, work_dir)
    if gguf_files:
        folders["gguf"] = next(iter(gguf_files.values())).parent
    facts = card_facts(inputs, {**check, **gguf_result}, data.stats()["fingerprint"])
    annotate(folders, facts, inputs.config.to_yaml())
    report = ReleaseReport(check, merged, folders, gguf_check=gguf_result)
    report.local = write_local(folders, export.output_dir, destinations.run_name)
    extra = {"gguf": folders["gguf"]} if "gguf" in folders and export.hub_include_gguf else {}
    report.published = publish_folder(folders[export.publish_format], inputs.config, facts, destinations, extra)
    return report


def gguf_and_check(
    merged: Path, tokenizer: Any, prompts: list[str], export: Any, work_dir: Path, name: str
) -> tuple[dict[str, Path], dict[str, Any]]:
    """The GGUF files of `export.gguf_types` and their check against the merged model (both empty without gguf)."""
    if "gguf" not in export.formats:
        return {}, {}
    files = write_gguf(merged, tokenizer, export, work_dir, name)
    return files, gguf_check.check_gguf_files(files, merged, tokenizer, prompts, export)


def merge_and_check(
    inputs: ReleaseInputs, tokenizer: Any, prompts: list[str], work_dir: Path
) -> tuple[Path, dict[str, Any]]:
    """Stream-merge onto the original 16-bit base into `work_dir/merged`, then run the merge check."""
    cfg = inputs.config
    base_dir = resolve_base_checkpoint(cfg.model)
    merged = work_dir / FOLDER_NAMES["merged_16bit"]
    info = merge_streaming(base_dir, inputs.adapter_dir, merged, cfg.export.dtype, cfg.export.max_shard_size)
    tokenizer.save_pretrained(str(merged))
    sides = CheckInputs(base_dir, inputs.adapter_dir, inputs.quantized_dir, tokenizer, prompts)
    check = check_merge(merged, sides, cfg.export)
    return merged, {**check, **info}


def card_facts(inputs: ReleaseInputs, check: dict[str, Any], fingerprint: str = "") -> card.CardFacts:
    """What the model cards say: base, data, config, scores, training (and where it ran), merge check, trail."""
    cfg, training = inputs.config, inputs.training
    trained_on = training.hardware if training is not None else ""
    return card.CardFacts(
        kind="adapter",
        base_model=cfg.model.name,
        base_revision=cfg.model.revision,
        repo_id=cfg.export.hub_repo_id,
        dataset=cfg.data.describe(),
        dataset_fingerprint=fingerprint,
        resolved_config=cfg.to_yaml(),
        eval_report=inputs.eval_report,
        training_report=training.summary() if training is not None else {},
        hardware=trained_on or f"{describe_hardware()} (the export machine)",
        merge_check={k: v for k, v in check.items() if k.startswith(("merge_check_", "vs_trained"))},
        gguf_check={k: v for k, v in check.items() if k.startswith("gguf_")},
        trail=inputs.trail,
    )


def annotate(folders: dict[str, Path], facts: card.CardFacts, resolved_config: str) -> None:
    """A model card and the resolved config in every exported folder."""
    for kind, folder in folders.items():
        (folder / "README.md").write_text(card.render_model_card(replace(facts, kind=kind)))
        (folder / "llmtune_config.yaml").write_text(resolved_config)


def write_local(folders: dict[str, Path], output_dir: str | None, run_name: str) -> dict[str, str]:
    """Copy every folder to `output_dir/run_name/<folder>`; their paths by format (none without an output_dir)."""
    if not output_dir:
        return {}
    dest = Path(output_dir) / run_name
    staging = fresh_staging_folder(Path(output_dir), run_name)
    total = sum(tree_bytes(folder) for folder in folders.values())
    with progress.bar(total=total, desc="export: write", unit="B", unit_scale=True, unit_divisor=1024) as shown:
        for folder in folders.values():
            copy_tree(folder, staging / folder.name, shown)
    if dest.exists():  # a re-export under the same run name replaces the earlier one whole
        shutil.rmtree(dest)
    os.replace(staging, dest)  # one rename: `dest` appears complete or not at all
    paths = {kind: (dest / folder.name).resolve() for kind, folder in folders.items()}
    return {f"{kind}_path": str(path) for kind, path in paths.items()} | {
        # the names the run summary has always printed
        "adapter_path": str(paths.get("adapter", "")),
        "merged_path": str(paths.get("merged_16bit", "")),
    }


def fresh_staging_folder(output_dir: Path, run_name: str) -> Path:
    """A new hidden folder beside `output_dir/run_name` to copy into; partial copies a killed export of the same
    run left behind are removed first.

    >>> root = Path(tempfile.mkdtemp())
    >>> first = fresh_staging_folder(root, "run-1")
    >>> second = fresh_staging_folder(root, "run-1")
    >>> first.exists(), second.name.startswith(".run-1.partial-")
    (False, True)
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.glob(f".{run_name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{run_name}.partial-", dir=output_dir))


def publish_folder(
    folder: Path, cfg: RunConfig, facts: card.CardFacts, dest: Destinations, extra: dict[str, Path] | None = None
) -> dict[str, Any]:
    """Register `folder` in the MLflow Model Registry and push it to the Hub, as the export section asks; the
    `extra` folders go to the same Hub repo in the same commit, each under its key (gguf/)."""
    export, done = cfg.export, {}
    trail = facts.trail
    if export.mlflow_registered_model:
        if not trail.get("mlflow_run_id"):
            raise publish.PublishError("export.mlflow_registered_model needs the stack's MLflow experiment tracker.")
        tags = registry_tags(facts, export.publish_format)
        done.update(
            publish.register_in_mlflow(
                folder, export.mlflow_registered_model, trail["mlflow_run_id"], tags, dest.mlflow_tracking_uri
            )
        )
    if export.hub_repo_id:
        message = publish.commit_message(trail["training_run"], trail["zenml_run_id"], trail.get("mlflow_run_id"))
        done["hub_commit_url"] = publish.push_to_hub(
            folder, export.hub_repo_id, dest.hub_token, export.hub_private, message, export.hub_endpoint, extra
        )
    return done


def registry_tags(facts: card.CardFacts, kind: str) -> dict[str, str]:
    """The MLflow registry version's tags: the runs, the data and the base it was made from."""
    return {
        **facts.trail,
        "format": kind,
        "dataset": facts.dataset,
        "dataset_fingerprint": facts.dataset_fingerprint,
        "base_model": facts.base_model,
        "base_model_revision": facts.base_revision or "",
        "merge_check_max_logit_gap": str(facts.merge_check.get("merge_check_max_logit_gap")),
    }

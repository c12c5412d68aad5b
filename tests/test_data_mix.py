"""Several datasets in one run (data.sources): rows drawn in the weights' shares with the seed, counts per source
in the stats and the report, a fingerprint over all of them, and errors that name the entry."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from datasets import load_from_disk
from transformers import AutoTokenizer

from llmtune.config import ConfigError, DataConfig, load_config
from llmtune.data import DataError, prepare, sources_fingerprint
from llmtune.preflight import PreflightError, check_inputs


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def alpaca_rows(n: int) -> list[dict[str, str]]:
    return [{"instruction": f"Spell {i}.", "input": "", "output": f"alpha {i}"} for i in range(n)]


def sharegpt_rows(n: int) -> list[dict[str, Any]]:
    return [
        {"conversations": [{"from": "human", "value": f"Count {i}."}, {"from": "gpt", "value": f"beta {i}"}]}
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def two_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("mix")
    return write_jsonl(folder / "a.jsonl", alpaca_rows(60)), write_jsonl(folder / "b.jsonl", sharegpt_rows(60))


def run(tmp_path: Path, model_dir: Path, name: str = "out", **cfg: Any) -> dict[str, Any]:
    return prepare(DataConfig(**cfg), AutoTokenizer.from_pretrained(model_dir), tmp_path / name)


def rows_from_b(folder: Path, model_dir: Path) -> int:
    """Prepared rows (train and eval) whose tokens hold a sharegpt answer ('beta ...'), read back from disk."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [*load_from_disk(str(folder / "train"))["input_ids"], *load_from_disk(str(folder / "eval"))["input_ids"]]
    return sum("beta" in tokenizer.decode(ids) for ids in rows)


def test_weights_set_each_sources_share_with_the_seed(
    tmp_path: Path, tiny_model_dir: Path, two_files: tuple[Path, Path]
) -> None:
    a, b = two_files
    sources = [{"source": str(a), "weight": 3}, {"source": str(b), "weight": 1}]
    stats = run(tmp_path, tiny_model_dir, sources=sources)
    first, second = stats["sources"]
    assert (first["format"], second["format"]) == ("alpaca", "sharegpt") and stats["format"] == "alpaca + sharegpt"
    assert (first["rows_kept"], second["rows_kept"]) == (60, 20)  # a limits the mix: 60 rows are 3/4 of 80
    assert second["dropped"] == {"over_weight": 40} and (first["share"], second["share"]) == (0.75, 0.25)
    assert rows_from_b(tmp_path / "out", tiny_model_dir) == 20, "the prepared rows hold 20 of b's answers"
    assert first["train_rows"] + first["eval_rows"] == 60 and stats["train_rows"] + stats["eval_rows"] == 80
    assert "data.sources[0] (a.jsonl) is used in full" in stats["mix"]
    assert any("data.sources[1] (b.jsonl): only 20 of its 60 rows" in w for w in stats["warnings"])
    page = (tmp_path / "out" / "report.html").read_text()
    assert "b.jsonl (sharegpt): 60 in, 20 drawn, 20 kept = 25.0% of the mix (weight share 25.0%)" in page

    again = run(tmp_path, tiny_model_dir, "again", sources=sources)
    other_seed = run(tmp_path, tiny_model_dir, "seed", sources=sources, seed=7)
    assert again["fingerprint"] == stats["fingerprint"] != other_seed["fingerprint"]
    assert [s["rows_kept"] for s in other_seed["sources"]] == [60, 20]

    capped = run(tmp_path, tiny_model_dir, "capped", sources=sources, max_rows=40)
    assert [s["rows_kept"] for s in capped["sources"]] == [30, 10] and "data.max_rows=40" in capped["mix"]


def test_without_weights_every_row_is_used_and_fraction_samples_a_source(
    tmp_path: Path, tiny_model_dir: Path, two_files: tuple[Path, Path]
) -> None:
    a, b = two_files
    stats = run(tmp_path, tiny_model_dir, sources=[{"source": str(a), "fraction": 0.25}, str(b)])
    assert [s["rows_kept"] for s in stats["sources"]] == [15, 60] and stats["rows_kept"] == 75
    assert stats["sources"][0]["dropped"] == {"over_fraction": 45} and stats["warnings"] == []
    assert rows_from_b(tmp_path / "out", tiny_model_dir) == 60


def test_fingerprints_change_when_any_source_changes(tmp_path: Path, tiny_model_dir: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(20))
    b = write_jsonl(tmp_path / "b.jsonl", sharegpt_rows(20))
    cfg = {"sources": [str(a), str(b)]}
    before, cache_key = (
        run(tmp_path, tiny_model_dir, "before", **cfg)["fingerprint"],
        sources_fingerprint(DataConfig(**cfg)),
    )
    write_jsonl(b, [*sharegpt_rows(19), sharegpt_rows(21)[-1]])  # one row of the second source differs
    assert run(tmp_path, tiny_model_dir, "after", **cfg)["fingerprint"] != before
    assert sources_fingerprint(DataConfig(**cfg)) != cache_key, "the prepare step's cache key follows every source"


def test_bad_entries_are_named_by_index_and_field(
    tmp_path: Path, tiny_model_dir: Path, two_files: tuple[Path, Path]
) -> None:
    a, b = two_files
    config = tmp_path / "mix.yaml"

    def load(*entries: Any) -> None:
        config.write_text(yaml.safe_dump({"data": {"sources": [str(a), *entries]}}))
        load_config(config)

    with pytest.raises(ConfigError, match=r"'data.sources\[1\].format' = 'sharegtp' \(from file .*'\) is invalid"):
        load({"source": str(b), "format": "sharegtp"})
    with pytest.raises(
        ConfigError,
        match=r"Unknown key 'data.sources\[1\].wieght' \(from .*\)\. Did you mean 'weight'\? Allowed keys in a data",
    ):
        load({"source": str(b), "wieght": 2})
    with pytest.raises(ConfigError, match=r"'data.sources\[1\].source' is missing"):
        load({"weight": 2})
    with pytest.raises(ConfigError, match=r"data.sources\[0\] has no weight while other entries have one"):
        load({"source": str(b), "weight": 2})
    with pytest.raises(DataError, match=r"^data.sources\[1\] \(b.jsonl\): .*line 1.* check data.sources\[1\].format"):
        run(tmp_path, tiny_model_dir, sources=[str(a), {"source": str(b), "format": "alpaca"}])
    with pytest.raises(DataError, match=r"^data.sources\[1\] \(a.jsonl #1\) has no rows left .*duplicate 60"):
        run(tmp_path, tiny_model_dir, sources=[{"source": str(a), "weight": 1}, {"source": str(a), "weight": 1}])
    missing = load_config(None, [f"data.sources=[{a}, {tmp_path / 'nowhere.jsonl'}]", "model.name=/no/model"])
    with pytest.raises(PreflightError, match=r"^data.sources\[1\].source: '.*nowhere.jsonl' does not exist"):
        check_inputs(missing, build_demo=False)


def test_sources_in_a_config_file_and_on_the_command_line(tmp_path: Path, two_files: tuple[Path, Path]) -> None:
    a, b = two_files
    (tmp_path / "a.jsonl").write_bytes(a.read_bytes())
    config = tmp_path / "mix.yaml"
    config.write_text(yaml.safe_dump({"data": {"sources": ["a.jsonl", {"source": str(b), "name": "chats"}]}}))
    cfg = load_config(config).data
    assert [e.cfg.source for e in cfg.entries()] == [str(tmp_path / "a.jsonl"), str(b)]  # next to the config file
    assert [e.label for e in cfg.entries()] == ["a.jsonl", "chats"] and cfg.source is None
    typed = load_config(None, ["data.sources=[a.jsonl, {source: a.jsonl, fraction: 0.5}]"], cwd=tmp_path).data
    assert [e.cfg.source for e in typed.entries()] == [str(tmp_path / "a.jsonl")] * 2, "read from where it ran"
    assert [e.label for e in typed.entries()] == ["a.jsonl #0", "a.jsonl #1"]
    one = load_config(config, [f"data.source={a}"]).data
    assert one.sources is None and one.source == str(a), "--set data.source replaces the file's data.sources"
    with pytest.raises(ConfigError, match=r"both data\.source and data\.sources"):
        load_config(None, [f"data.source={a}", f"data.sources=[{b}]"])


def test_an_eval_split_name_is_read_from_every_source(tmp_path: Path, tiny_model_dir: Path) -> None:
    for name, train, test in (("a", alpaca_rows(30), alpaca_rows(34)[30:]), ("b", sharegpt_rows(30), [])):
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / "train.jsonl", train)
        write_jsonl(tmp_path / name / "test.jsonl", test or sharegpt_rows(32)[30:])
    stats = run(tmp_path, tiny_model_dir, sources=[str(tmp_path / "a"), str(tmp_path / "b")], eval_split="test")
    assert (stats["train_rows"], stats["eval_rows"], stats["eval_rows_in"]) == (60, 6, 6)
    assert [(s["train_rows"], s["eval_rows"]) for s in stats["sources"]] == [(30, 0), (30, 0)]


@pytest.mark.pipeline
def test_prepare_pipeline_records_counts_per_source(
    tmp_path: Path, tiny_model_dir: Path, two_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking import MlflowClient
    from zenml.client import Client

    import run as cli
    from cli.stack import mlflow_tracking_uri

    a, b = two_files
    config = tmp_path / "mix.yaml"
    sources = [{"source": str(a), "weight": 1}, {"source": str(b), "weight": 1, "name": "chats"}]
    config.write_text(yaml.safe_dump({"data": {"sources": sources}, "model": {"name": str(tiny_model_dir)}}))
    assert cli.main(["--pipeline", "prepare", "--config", str(config), "--no-cache"]) == 0
    printed = " ".join(re.sub("[│┃]", " ", capsys.readouterr().out).split())  # the report's table cells wrap
    assert "data.sources[1] chats (sharegpt): 60 in, 60 drawn, 60 kept = 50.0% of the mix" in printed

    run = Client().list_pipeline_runs(sort_by="desc:created", size=1).items[0]
    per_source = run.steps["prepare_dataset"].run_metadata["sources"]
    assert isinstance(per_source, list)
    assert [(s["name"], s["rows_kept"]) for s in per_source] == [("a.jsonl", 60), ("chats", 60)]
    client = MlflowClient(tracking_uri=mlflow_tracking_uri())
    experiment = client.get_experiment_by_name("prepare")
    assert experiment is not None
    [mlflow_run] = client.search_runs([experiment.experiment_id], f"tags.mlflow.runName = '{run.name}'")
    assert mlflow_run.data.metrics["data_sources_1_rows_kept"] == 60
    assert "'name': 'chats'" in mlflow_run.data.params["data.sources"]

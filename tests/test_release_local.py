"""The local copy of an export (`llmtune.release.write_local`) is all or nothing: an export killed midway leaves
no `<run>` folder that looks finished, and the next export of that run clears the partial copy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from llmtune.release import write_local
from llmtune.train.distributed import worker_env

# Run in a child process that the test kills: copies `adapter` and then blocks on reading `merged`'s FIFO.
COPY_AND_HANG = """
import sys
from pathlib import Path
from llmtune.release import write_local
root = Path(sys.argv[1])
work = root / "work"
write_local({"adapter": work / "adapter", "merged_16bit": work / "merged"}, str(root / "out"), "run-1")
"""


def make_folders(root: Path) -> dict[str, Path]:
    adapter, merged = root / "work" / "adapter", root / "work" / "merged"
    for folder in (adapter, merged):
        folder.mkdir(parents=True)
        (folder / "README.md").write_text(f"{folder.name}\n")
    return {"adapter": adapter, "merged_16bit": merged}


def test_an_export_killed_midway_leaves_no_finished_looking_folder(tmp_path: Path) -> None:
    folders = make_folders(tmp_path)
    os.mkfifo(folders["merged_16bit"] / "model.safetensors")  # copying it blocks: the kill lands mid-copy
    child = subprocess.Popen([sys.executable, "-c", COPY_AND_HANG, str(tmp_path)], env=worker_env())
    out = tmp_path / "out"
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob(".run-1.partial-*/adapter/README.md")) and time.monotonic() < deadline:
            assert child.poll() is None, "the copy ended before it reached the blocking file"
            time.sleep(0.1)
        assert list(out.glob(".run-1.partial-*/adapter/README.md")), "the copy never started"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert not (out / "run-1").exists(), "a killed export leaves no folder under the run's name"
    assert [p.name.startswith(".run-1.partial-") for p in out.iterdir()] == [True]

    (folders["merged_16bit"] / "model.safetensors").unlink()
    (folders["merged_16bit"] / "model.safetensors").write_bytes(b"weights")
    paths = write_local(folders, str(out), "run-1")
    assert sorted(p.name for p in out.iterdir()) == ["run-1"], "the next export removed the partial copy"
    assert Path(paths["merged_16bit_path"], "model.safetensors").read_bytes() == b"weights"
    assert Path(paths["adapter_path"], "README.md").read_text() == "adapter\n"

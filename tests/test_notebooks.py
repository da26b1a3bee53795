"""The notebooks run top to bottom (nbclient, kernel python3) on a copy in a temporary folder."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _quickstart_scores_the_reconstruction(text: str) -> None:
    found = re.search(r"registered (\d+)/(\d+) views, median RRE ([\d.]+) deg", text)
    assert found, text[-2000:]
    registered, views, rre = int(found[1]), int(found[2]), float(found[3])
    assert registered == views == 12 and rre < 1.0


def _finetuning_lowers_the_training_depth_error(text: str) -> None:
    found = re.search(r"training frames: default model ([\d.]+), fine-tuned ([\d.]+)", text)
    assert found, text[-2000:]
    assert float(found[2]) < float(found[1])


CLAIMS = {
    "quickstart.ipynb": _quickstart_scores_the_reconstruction,
    "finetune.ipynb": _finetuning_lowers_the_training_depth_error,
}


@pytest.mark.parametrize("name", sorted(CLAIMS))
def test_notebook_runs(name, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    source = NOTEBOOKS / name
    notebook = nbformat.read(source, as_version=4)
    # committed without outputs, so that the repository holds no stale results or images
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
    copy = tmp_path / name
    shutil.copy(source, copy)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    start = time.perf_counter()
    client = nbclient.NotebookClient(
        nbformat.read(copy, as_version=4),
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    executed = client.execute()
    elapsed = time.perf_counter() - start
    errors = [o for c in executed.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    printed = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    CLAIMS[name](printed)  # what the notebook's text says it shows
    assert elapsed < 600, f"{name} took {elapsed:.0f} s"
    assert (tmp_path / name.replace(".ipynb", "_output")).is_dir()  # outputs went to the temporary copy
    assert not (NOTEBOOKS / name.replace(".ipynb", "_output")).exists()

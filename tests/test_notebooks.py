"""Execute the shipped notebooks end to end (they assert their own claims)."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("name", ["harmonization.ipynb", "quickstart.ipynb"])
def test_notebook_executes(name: str, tmp_path: Path) -> None:
    path = NOTEBOOKS / name
    if not path.exists():
        pytest.fail(f"notebook {path} is missing")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError with the failing cell's traceback

"""Every notebook in notebooks/ runs from top to bottom at the small size
(LESDE_NOTEBOOK_SIZE=small), ends in a figure, and is committed with its outputs and small.

Each notebook starts a kernel and imports torch (10-30 s on two shared cores), so they are
marked slow; `make test` runs them, `make test-fast` does not."""
import glob
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))
NAMES = [os.path.basename(p) for p in NOTEBOOKS]

nbformat = pytest.importorskip("nbformat", reason="the notebook runner needs nbformat, nbclient "
                               "and ipykernel: pip install -e '.[test]' (make install does)")


def test_every_job_has_a_notebook_listed_in_the_readme():
    assert len(NOTEBOOKS) >= 8
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    for name in NAMES:
        assert f"notebooks/{name}" in readme, f"README.md does not list {name}"


@pytest.mark.parametrize("name", NAMES)
def test_committed_with_outputs_ending_in_a_figure_and_small(name):
    path = os.path.join(REPO, "notebooks", name)
    assert os.path.getsize(path) < 400_000, f"{name} is {os.path.getsize(path)} bytes"
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code), f"{name}: cells not executed"
    assert not any(o.get("output_type") == "error" for c in code for o in c.outputs)
    assert any("image/png" in o.get("data", {}) for o in code[-1].outputs), \
        f"{name}: the last cell shows no figure"
    assert "LESDE_NOTEBOOK_SIZE" in "".join(c.source for c in code)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_at_small_size(name, monkeypatch):
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from nbclient import NotebookClient

    monkeypatch.setenv("LESDE_NOTEBOOK_SIZE", "small")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    path = os.path.join(REPO, "notebooks", name)
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    assert any("image/png" in o.get("data", {}) for o in last.outputs)
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.outputs if o.get("output_type") == "stream")
    assert "size: small" in printed

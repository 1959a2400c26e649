"""Execute the notebooks of this folder in place (outputs kept), at a size chosen by
LESDE_NOTEBOOK_SIZE (small, medium, large; the committed outputs are medium).

    LESDE_NOTEBOOK_SIZE=medium OMP_NUM_THREADS=1 python notebooks/run.py            # all
    LESDE_NOTEBOOK_SIZE=small python notebooks/run.py notebooks/04_sgd_vs_sde.ipynb   # one
"""
import glob
import os
import sys
import time

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))


def execute(path: str, timeout: int = 1800, write: bool = True):
    """Run every cell of the notebook at ``path`` (working directory: its folder); returns it."""
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(os.path.abspath(path))}}).execute()
    if write:
        for cell in nb.cells:  # no execution dates: the same outputs give the same file
            cell.get("metadata", {}).pop("execution", None)
        nbformat.write(nb, path)
    return nb


def main(paths):
    paths = paths or sorted(glob.glob(os.path.join(HERE, "*.ipynb")))
    for path in paths:
        start = time.time()
        execute(path)
        print(f"{os.path.relpath(path)}: executed in {time.time() - start:.0f} s, "
              f"{os.path.getsize(path) / 1024:.0f} KB")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Re-run chapters and store their outputs in place (what `make notebooks` does).

Usage: python book/execute.py [NOTEBOOK ...]   (default: every chapter in book/)

Outputs and the widget state are kept; cell metadata other than tags and all timing metadata are
dropped so git diffs stay quiet. tqdm's bars are switched off while storing (they would be dead
widgets in the HTML). A notebook is written only if it ran without error, via a temporary file.
"""

import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

BOOK = Path(__file__).resolve().parent


def clean(nb) -> None:
    """Keep only tags in cell metadata and the kernel, language and widget state in the notebook's."""
    for cell in nb.cells:
        cell.metadata = {k: v for k, v in cell.metadata.items() if k == "tags"}
    nb.metadata = {k: v for k, v in nb.metadata.items() if k in ("kernelspec", "language_info", "widgets")}


def execute(path: Path) -> float:
    """Execute one notebook in its folder and store it; returns the wall time in seconds."""
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(BOOK.parent)}},
                   record_timing=False, store_widget_state=True).execute()
    clean(nb)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".ipynb.tmp")
    os.close(fd)
    nbformat.write(nb, tmp)
    os.replace(tmp, path)
    return time.perf_counter() - t0


if __name__ == "__main__":
    os.environ["TQDM_DISABLE"] = "1"
    paths = [Path(p) for p in sys.argv[1:]] or sorted(BOOK.glob("[0-9][0-9]_*.ipynb"))
    for p in paths:
        print(f"{p}: {execute(p):.0f} s", flush=True)

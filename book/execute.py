"""Re-run chapters and store their outputs in place (what `make notebooks` does).

Usage: python book/execute.py [NOTEBOOK ...]   (default: every chapter in book/)

Outputs and the widget state are kept; cell metadata other than tags and all timing metadata are
dropped so git diffs stay quiet. tqdm's bars are switched off while storing (they would be dead
widgets in the HTML). A notebook is written only if it ran without error, via a temporary file.
Each kernel gets one thread (unless OMP_NUM_THREADS says otherwise): the suite runs every chapter
on one thread, and its numbers are the ones stored.
"""

import os
import sys
import time
from functools import partial
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from defenses_lib.run import clean
from defenses_lib.runtime import atomic_write

BOOK = Path(__file__).resolve().parent


def execute(path: Path) -> float:
    """Execute one notebook in its folder and store it; returns the wall time in seconds."""
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(BOOK.parent)}},
                   record_timing=False, store_widget_state=True).execute()
    clean(nb)
    atomic_write(path, partial(nbformat.write, nb))
    return time.perf_counter() - t0


if __name__ == "__main__":
    os.environ["TQDM_DISABLE"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")   # one thread per chapter, as the test suite runs it
    paths = [Path(p) for p in sys.argv[1:]] or sorted(BOOK.glob("[0-9][0-9]_*.ipynb"))
    for p in paths:
        print(f"{p}: {execute(p):.0f} s", flush=True)

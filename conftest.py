"""How ``pytest --nbval`` shares the machine: a pytest-xdist worker per core (``-n auto``), and its share of the cores.

Each file runs whole on one worker (``--dist loadfile``): a chapter's cells in order, in one kernel.
The files start in the order collected here (``--no-loadscope-reorder``): the chapters first, longest
first, chapter 6 after the chapters whose models it reuses (0, 1, 2, 4 and 5), so that it loads their
checkpoints instead of training them again (chapter 0, short, goes first so that it is done by then); then the unit test modules fill in around them.
``pytest -n 0 --nbval`` runs everything in one process, in the same order.
"""

import os

CHAPTER_ORDER = ("00_foundations", "02_atop", "01_ensembles", "04_armor", "05_drsl", "06_comparison", "03_smoothing")


def pytest_configure(config):
    """Give this worker process, and the kernels it starts, cores // workers threads each."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads
        import torch
        torch.set_num_threads(int(threads))


def _chapter(item) -> str | None:
    """The chapter a collected item is a cell of (None for a unit test)."""
    path = str(item.fspath)
    return os.path.basename(path)[:-len(".ipynb")] if path.endswith(".ipynb") else None


def pytest_collection_modifyitems(config, items):
    """Chapters first, in CHAPTER_ORDER (others after them, by name); then the unit tests."""
    rank = {c: i for i, c in enumerate(CHAPTER_ORDER)}
    chapters = [it for it in items if _chapter(it) is not None]
    chapters.sort(key=lambda it: (rank.get(_chapter(it), len(rank)), _chapter(it)))   # stable: cells keep their order
    items[:] = chapters + [it for it in items if _chapter(it) is None]

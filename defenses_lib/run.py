"""Run a chapter headless, for instance at the paper's scale on a GPU server.

    python -m defenses_lib.run armor --profile paper --out runs/armor-paper
    torchrun --nproc_per_node=4 -m defenses_lib.run armor --profile paper    # 4 GPUs, DDP
    python -m defenses_lib.run armor --profile paper --estimate              # what a whole run costs
    python -m defenses_lib.run armor --profile reference --seed 1 --store    # one seed of a reference run

Executes the chapter's notebook, cell by cell, in a fresh kernel with ``DEFENSES_PROFILE`` set to
the profile, and writes to the output folder:

- ``checkpoints/``: every trained model, after every epoch (``DEFENSES_RUNS`` points here);
- ``<chapter>.ipynb``: the executed notebook, saved after every cell;
- ``figures/``: each figure of the notebook as a PNG, named by its cell (``cell-07.png``);
- ``metrics.json``: the profile, versions, commit and device; each cell's time and error, if any;
  every model trained (recipe, epochs, time), every evaluation (setting, attacks, accuracies,
  times) and every sanity-check report, as the library recorded them while the notebook ran.

With ``--seed N`` the kernel gets ``DEFENSES_SEED=N``, which replaces the profile's training seed
(see :mod:`defenses_lib.profiles`). With ``--store`` what the chapter hands over with
``reference.keep(...)`` (its per-example outcomes) is written, with the command, the commit, the
machine and the wall time, to ``results/<chapter>/<profile>/seed-<N>.json`` (see
:mod:`defenses_lib.reference`), once every cell has run (a failed claim does not stop it; a broken cell
does; a cell tagged ``stored-runs``, which reads the stored seeds, is skipped); the library and the
chapters must be committed, since the file cites the commit.

With ``--store`` the finished evaluations are also copied, every minute, to
``results/<chapter>/<profile>/seed-<N>-partial/`` (a few kilobytes each), and that folder is removed
once the run is stored. A run that a session's end interrupts resumes in a fresh clone: commit that
folder, and the same command at the same commit retrains the models and reads back every finished
evaluation whose key still matches (each is keyed by the weights it evaluated: where the retrained
weights are identical, as with the same machine, commit and thread count, that is all of them).

Running the same command again resumes: models whose checkpoints are complete are loaded, an
interrupted training continues from its last finished epoch, and every evaluation that finished is
read back from ``checkpoints/evaluations/`` (see :mod:`defenses_lib.cache`) instead of run again,
so the resumed run does only the remaining work and ends with the same results. ``metrics.json`` is
rewritten atomically after every cell, so a killed run leaves the metrics of the cells it finished.
Progress (a bar per cell and the library's training and attack bars) goes to the terminal.

With ``--estimate`` the chapter runs in estimate mode (every long loop cut to its first steps, see
:mod:`defenses_lib.estimate`), every cell runs whatever fails before it, and the runner prints and
writes (``estimate.json``) the whole run's estimated time on this machine and on one GPU.

A claims cell that asserts what the quick profile found may fail at the paper's scale; the run goes
on, records the failed assertion in ``metrics.json`` and exits with status 1 at the end. Any other
error (missing data, a bug) stops the run at that cell, recorded the same way. Under
``torchrun`` every process runs the notebook (training is shared through DDP, see
:mod:`defenses_lib.distributed`); only the first writes files.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import nbformat
import torch
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, DeadKernelError

from . import estimate
from . import reference
from .profiles import PROFILE_ENV, PROFILES, SEED_ENV
from .runtime import METRICS_ENV, PROGRESS_ENV, atomic_write, progress
from .training import RUNS_ENV

BOOK = Path(__file__).resolve().parent.parent / "book"
STORED_RUNS_TAG = "stored-runs"   # a cell that reads the stored reference runs: a --store run skips it
CHAPTERS = {"foundations": "00_foundations.ipynb", "ensembles": "01_ensembles.ipynb", "purification": "02_atop.ipynb",
            "smoothing": "03_smoothing.ipynb", "armor": "04_armor.ipynb", "drsl": "05_drsl.ipynb",
            "comparison": "06_comparison.ipynb"}


def chapter_notebook(chapter: str, book: Path | None = None) -> Path:
    """The notebook of a chapter given by name (``armor``) or number (``4``), in ``book`` (default: the book's)."""
    book = book or BOOK
    names = list(CHAPTERS)
    if chapter.isdigit() and int(chapter) < len(names):
        chapter = names[int(chapter)]
    if chapter not in CHAPTERS:
        raise ValueError(f"chapter must be one of {names} or 0-{len(names) - 1}, got {chapter!r}")
    path = book / CHAPTERS[chapter]
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run from a clone of the repository, or pass --notebook")
    return path


def clean(nb) -> None:
    """Keep only tags in cell metadata and the kernel, language and widget state in the notebook's."""
    for cell in nb.cells:
        cell.metadata = {k: v for k, v in cell.metadata.items() if k == "tags"}
    nb.metadata = {k: v for k, v in nb.metadata.items() if k in ("kernelspec", "language_info", "widgets")}


def save_figures(cell, index: int, folder: Path) -> list[str]:
    """Write the PNG outputs of one cell as ``cell-<index>[-k].png``; returns their names."""
    names = []
    images = [o["data"]["image/png"] for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    for k, data in enumerate(images):
        name = f"cell-{index:02d}{f'-{k + 1}' if len(images) > 1 else ''}.png"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(base64.b64decode(data))
        names.append(name)
    return names


def commit() -> str:
    """The repository's current commit, or 'unknown' outside a git clone."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=BOOK.parent)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def read_records(path: Path) -> list[dict]:
    """The JSON lines the library recorded while the notebook ran."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def run_cell(client: NotebookClient, cell, index: int) -> str | None:
    """Execute one cell; its error as ``"Name: message"`` (a kernel that died is one), or None."""
    try:
        client.execute_cell(cell, index)
    except CellExecutionError:
        failed = next(o for o in cell.outputs if o.output_type == "error")
        error = f"{failed.ename}: {failed.evalue}"
    except DeadKernelError as e:
        error = f"DeadKernelError: {e}"
    else:
        return None
    print(f"\ncell {index} failed: {error}", file=sys.stderr)
    return error


def write_metrics(out: Path, metrics: dict, log: Path) -> dict:
    """``metrics`` with what the library recorded so far, written atomically to ``out/metrics.json``."""
    records = read_records(log)
    for key, kind in (("trainings", "training"), ("evaluations", "evaluation"), ("sanity_checks", "sanity checks"),
                      ("estimates", "estimate")):
        metrics[key] = [r for r in records if r["kind"] == kind]
    atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2) + "\n"))
    return metrics


def keep_saving(path: Path, evaluations: Path, every: float = 60.0) -> threading.Event:
    """Copy the run's finished evaluations to ``reference.partial_of(path)`` every ``every`` seconds (to commit
    at a session's end, so that the next session resumes), until the returned event is set."""
    stop = threading.Event()

    def loop():
        """Save, then wait; until stopped."""
        while not stop.wait(every):
            reference.save_partial(path, evaluations)

    threading.Thread(target=loop, daemon=True).start()
    return stop


def run_notebook(notebook: Path, out: Path, profile: str, cwd: Path, writes: bool = True,
                 estimating: bool = False, seed: int | None = None, store: tuple[Path, dict] | None = None) -> dict:
    """Execute ``notebook`` cell by cell with ``profile`` (and training ``seed``, if given), writing into
    ``out`` when ``writes`` (in estimate mode with ``estimating``); with ``store`` = (path, about), what the
    chapter kept is stored there once every cell has run. Returns the metrics."""
    nb = nbformat.read(notebook, as_version=4)
    log = out / "records.jsonl"
    env = dict(os.environ, **{PROFILE_ENV: profile, RUNS_ENV: str(out / "checkpoints"), PROGRESS_ENV: "terminal"})
    env.pop(SEED_ENV, None)
    if seed is not None:
        env[SEED_ENV] = str(seed)
    env.pop(estimate.ENV, None)
    if estimating:
        env[estimate.ENV] = "1"
    env.pop(METRICS_ENV, None)
    if writes:
        out.mkdir(parents=True, exist_ok=True)
        log.unlink(missing_ok=True)
        env[METRICS_ENV] = str(log)
    metrics = {"notebook": str(notebook), "profile": profile, "commit": commit(), "torch": torch.__version__,
               "python": platform.python_version(), "machine": platform.machine(),
               "gpus": torch.cuda.device_count(), "processes": int(os.environ.get("WORLD_SIZE", "1")),
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cells": [], "errors": []}
    client = NotebookClient(nb, timeout=None, kernel_name="python3", resources={"metadata": {"path": str(cwd)}},
                            record_timing=False, extra_arguments=["--IPKernelApp.capture_fd_output=False"])
    evaluations = out / "checkpoints" / "evaluations"
    saving = None
    if store is not None and writes:
        if found := reference.restore_partial(store[0], evaluations):
            print(f"resuming: {found} finished evaluations from {reference.partial_of(store[0])}", file=sys.stderr)
        saving = keep_saving(store[0], evaluations)
    t_run = time.perf_counter()
    with client.setup_kernel(env=env):  # the kernel's environment only: this process's stays as it was
        code = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
        for i, cell in progress(code, f"{notebook.stem} ({profile})", enabled=writes):
            if store is not None and STORED_RUNS_TAG in cell.metadata.get("tags", []):
                continue   # it reads the stored seeds, of which this run is about to be one
            t0 = time.perf_counter()
            error = run_cell(client, cell, i)
            if error:
                metrics["errors"].append({"cell": i, "error": error})
            metrics["cells"].append({"cell": i, "seconds": round(time.perf_counter() - t0, 2), "error": error,
                                     "figures": save_figures(cell, i, out / "figures") if writes else []})
            metrics["seconds"] = round(time.perf_counter() - t_run, 1)
            if writes:
                clean(nb)
                atomic_write(out / notebook.name, partial(nbformat.write, nb))
                write_metrics(out, metrics, log)   # a run killed later still leaves its metrics so far
            if error and not error.startswith("AssertionError") and not estimating:
                break  # a broken cell, not a claim that failed: later cells would only fail after it
    metrics["seconds"] = round(time.perf_counter() - t_run, 1)
    if saving is not None:
        saving.set()
        reference.save_partial(store[0], evaluations)
    if not writes:
        return dict(metrics, trainings=[], evaluations=[], sanity_checks=[])
    metrics = write_metrics(out, metrics, log)
    broken = [e for e in metrics["errors"] if not e["error"].startswith("AssertionError")]
    if store is not None and not broken:
        path, about = store
        failed = [e["cell"] for e in metrics["errors"]]
        metrics["stored"] = str(reference.store(path, {**about, "commit": metrics["commit"], "torch": metrics["torch"],
                                                       "started": metrics["started"], "seconds": metrics["seconds"],
                                                       "cells with failed claims": failed}, read_records(log)))
        shutil.rmtree(reference.partial_of(path), ignore_errors=True)   # the run is stored: nothing to resume
    log.unlink(missing_ok=True)
    return metrics


def write_estimate(args, notebook: Path, out: Path, metrics: dict) -> int:
    """Print the estimate of an estimate run and write it to ``out/estimate.json``; 0 unless no stage ran."""
    chapter = args.chapter or notebook.stem
    summary = estimate.summary(metrics["estimates"], sum(c["seconds"] for c in metrics["cells"]), args.gpu_tflops)
    failed = [e["cell"] for e in metrics["errors"]]
    result = {"chapter": chapter, "profile": args.profile, "commit": metrics["commit"], "torch": metrics["torch"],
              "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "gpus": metrics["gpus"],
              "command": f"python -m defenses_lib.run {chapter} --profile {args.profile} --estimate",
              "estimate run seconds": metrics["seconds"], "cells failed": failed, "summary": summary}
    (out / "estimate.json").write_text(json.dumps(result, indent=2) + "\n")
    print(estimate.report(chapter, summary, args.profile))
    if failed:
        print(f"  (cells {failed} failed in the estimate run: the estimate leaves out what they would have run)")
    return 0 if metrics["estimates"] else 1


def main(argv=None) -> int:
    """The command line: parse, run, summarise; the exit status is 1 when a cell failed."""
    parser = argparse.ArgumentParser(prog="python -m defenses_lib.run", description=__doc__.splitlines()[0])
    parser.add_argument("chapter", nargs="?", help=f"one of {list(CHAPTERS)} or its number (0-{len(CHAPTERS) - 1})")
    parser.add_argument("--profile", default="paper", help="quick or paper (default: paper)")
    parser.add_argument("--out", type=Path, help="output folder (default: runs/<notebook name>-<profile>)")
    parser.add_argument("--notebook", type=Path, help="run this notebook instead of a chapter's")
    parser.add_argument("--estimate", action="store_true",
                        help="estimate what the whole run costs from a few steps of each stage")
    parser.add_argument("--seed", type=int, help="training seed (default: the profile's)")
    parser.add_argument("--store", action="store_true",
                        help="store what the chapter keeps in results/<chapter>/<profile>/seed-<seed>.json")
    parser.add_argument("--gpu-tflops", type=float, default=25.0,
                        help="sustained TFLOP/s of the GPU the estimate is for (default 25)")
    args = parser.parse_args(argv)
    if (args.chapter is None) == (args.notebook is None):
        parser.error("give a chapter or --notebook, not both and not neither")
    profiles = {p for chapter in PROFILES.values() for p in chapter}
    if args.profile not in profiles:
        parser.error(f"--profile must be one of {sorted(profiles)}, got {args.profile!r}")
    try:
        notebook = args.notebook or chapter_notebook(args.chapter)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    if not notebook.is_file():
        parser.error(f"--notebook {notebook} is not a file")
    if not args.gpu_tflops > 0:
        parser.error(f"--gpu-tflops must be > 0, got {args.gpu_tflops}")
    if args.seed is not None and args.seed < 0:
        parser.error(f"--seed must be a non-negative integer, got {args.seed}")
    store = store_target(parser, args) if args.store else None
    suffix = ("-estimate" if args.estimate else "") + (f"-seed-{args.seed}" if args.seed is not None else "")
    out = (args.out or Path("runs") / f"{notebook.stem}-{args.profile}{suffix}").resolve()
    is_main = int(os.environ.get("RANK", "0")) == 0  # under torchrun, only the first process writes
    metrics = run_notebook(notebook.resolve(), out, args.profile, cwd=BOOK.parent if args.notebook is None
                           else notebook.resolve().parent, writes=is_main, estimating=args.estimate, seed=args.seed,
                           store=store if is_main else None)
    if args.estimate and is_main:
        return write_estimate(args, notebook, out, metrics)
    if is_main:
        print(f"{notebook.name} ({args.profile}): {len(metrics['cells'])} cells in {metrics['seconds']:.0f} s, "
              f"{len(metrics['trainings'])} models trained or loaded, {len(metrics['evaluations'])} evaluations; "
              f"{len(metrics['errors'])} cell(s) failed; results in {out}")
        for e in metrics["errors"]:
            print(f"  cell {e['cell']}: {e['error']}")
        if store is not None:
            print(f"stored: {metrics['stored']}" if "stored" in metrics else "nothing stored: a cell broke")
    return 1 if metrics["errors"] else 0


def uncommitted() -> str:
    """What differs from the commit in the library and the chapters, new files included ('' if nothing)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "defenses_lib", "book"],
                             capture_output=True, text=True, check=True, cwd=BOOK.parent)
    except (OSError, subprocess.CalledProcessError) as e:
        return f"not a git clone ({e})"
    return "; ".join(out.stdout.split("\n")).strip("; ")


def store_target(parser, args) -> tuple[Path, dict]:
    """Where ``--store`` writes and what it says about the run; refuses a run it could not cite."""
    if args.chapter is None or args.estimate:
        parser.error("--store needs a chapter (not --notebook) and a real run (not --estimate)")
    chapter = next(c for c, f in CHAPTERS.items() if f == chapter_notebook(args.chapter).name)
    dirty = uncommitted()
    if dirty:
        parser.error(f"--store needs the library and the chapters committed (the stored run cites the commit): "
                     f"{dirty}")
    seed = args.seed if args.seed is not None else PROFILES[chapter][args.profile].seed
    threads = os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())
    about = {"chapter": chapter, "profile": args.profile, "seed": seed,
             "command": f"python -m defenses_lib.run {chapter} --profile {args.profile} --seed {seed} --store",
             "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, {threads} threads, "
                        f"{torch.cuda.device_count()} GPUs",
             "python": platform.python_version()}
    return reference.path_of(chapter, args.profile, seed), about


if __name__ == "__main__":
    sys.exit(main())

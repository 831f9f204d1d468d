"""Per-example outcomes a headless run stores, and stored runs read back (the reference runs).

A chapter names what its conclusions rest on with ``keep(results=..., certified=...)``: nested dicts
and lists of :class:`~defenses_lib.evaluation.RobustResult`, per-example tensors, numbers and strings.
Under the runner (``python -m defenses_lib.run CHAPTER --profile reference --seed 1 --store``) each is
recorded as the run goes, and stored at the end, with the command, the commit, the machine and the
wall time, in ``results/<chapter>/<profile>/seed-<seed>.json``; anywhere else ``keep`` does nothing.
Per-example outcomes are stored as packed bits (a probability, for a randomized defense, as float32),
so a run of 1,000 test images is a few hundred kilobytes. :func:`load` reads every stored seed back
into the same objects, so a chapter's own table and claim code runs on them.
"""

from __future__ import annotations

import base64
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .evaluation import RobustResult
from .runtime import atomic_write, record
from .stats import pooled  # noqa: F401  (re-exported: the seeds of a stored run, averaged per image)

KIND = "outcomes"                  # the runner's record kind of what keep() hands it
RESULTS = Path(__file__).resolve().parent.parent / "results"   # the repository's results folder
_TAGS = ("RobustResult", "bits", "float32", "dict", "list")


def keep(**values) -> None:
    """Hand ``values`` (by name) to the headless runner to store with the run; nothing outside a runner."""
    for name, value in values.items():
        record(KIND, name=name, value=encode(value))


def _b64(data: bytes) -> str:
    """Bytes as ASCII."""
    return base64.b64encode(data).decode("ascii")


def encode(value):
    """``value`` as JSON-ready data that :func:`decode` turns back into it (dict keys keep their type)."""
    if isinstance(value, RobustResult):
        return {"RobustResult": {"setting": value.setting, "seconds": encode(value.seconds),
                                 "correct": encode(value.correct)}}
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        if t.dtype == torch.bool and t.ndim == 1:
            return {"bits": _b64(np.packbits(t.numpy()).tobytes()), "n": len(t)}
        return {"float32": _b64(t.to(torch.float32).numpy().tobytes()), "shape": list(t.shape)}
    if isinstance(value, dict):
        return {"dict": [[encode(k), encode(v)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"list": [encode(v) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"keep() stores results, tensors, dicts, lists, numbers and strings; got a {type(value).__name__}")


def decode(data):
    """The value :func:`encode` stored."""
    if not isinstance(data, dict):
        return data
    tag = next((k for k in _TAGS if k in data), None)
    body = data.get(tag)
    if tag == "RobustResult":
        return RobustResult(decode(body["correct"]), decode(body["seconds"]), body["setting"])
    if tag == "bits":
        bits = np.unpackbits(np.frombuffer(base64.b64decode(body), dtype=np.uint8))[:data["n"]]
        return torch.from_numpy(bits.astype(bool))
    if tag == "float32":
        flat = np.frombuffer(base64.b64decode(body), dtype=np.float32).copy()
        return torch.from_numpy(flat).reshape(data["shape"])
    if tag == "dict":
        return {decode(k): decode(v) for k, v in body}
    if tag == "list":
        return [decode(v) for v in body]
    raise ValueError(f"stored data must be tagged with one of {_TAGS}, got keys {sorted(data)}")


@dataclass
class StoredRun:
    """One stored run: its seed, how and where it ran (``about``), and what the chapter kept."""

    seed: int
    about: dict
    kept: dict

    def __getitem__(self, name: str):
        """What the chapter kept under ``name``."""
        if name not in self.kept:
            raise KeyError(f"the run of seed {self.seed} kept {sorted(self.kept)}, not {name!r}")
        return self.kept[name]

    def describe(self) -> str:
        """The seed, the commit, the wall time and the machine; on a second line, the command."""
        a = self.about
        hours, minutes = divmod(round(a.get("seconds", 0) / 60), 60)
        failed = a.get("cells with failed claims") or []
        note = f"; claims failed in cells {failed}" if failed else ""
        return (f"seed {self.seed}: commit {str(a.get('commit', '?'))[:7]}, {hours} h {minutes:02d} min on "
                f"{a.get('machine', '?')}{note}\n    {a.get('command', '?')}")


def path_of(chapter: str, profile: str, seed: int, results: Path | None = None) -> Path:
    """Where the run of ``chapter`` at ``profile`` and ``seed`` is stored (under the repository's results/)."""
    return Path(results or RESULTS) / chapter / profile / f"seed-{seed}.json"


def store(path: Path, about: dict, records: list[dict]) -> Path:
    """Write a run's ``about`` and the values its chapter kept (its ``outcomes`` records) to ``path``."""
    kept = {r["name"]: r["value"] for r in records if r.get("kind") == KIND}
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({**about, "kept": kept}, separators=(",", ":")) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def partial_of(path: Path) -> Path:
    """Where a run to be stored at ``path`` keeps its finished evaluations while under way (``seed-N-partial/``):
    committed at the end of a session, they let the next session's run of the same command resume there."""
    return path.with_name(f"{path.stem}-partial")


def save_partial(path: Path, evaluations: Path) -> int:
    """Copy the finished evaluations in ``evaluations`` that ``partial_of(path)`` lacks there; how many."""
    target, new = partial_of(path), 0
    for entry in sorted(Path(evaluations).glob("*.pt")):
        if not (target / entry.name).is_file():
            target.mkdir(parents=True, exist_ok=True)
            atomic_write(target / entry.name, lambda tmp, entry=entry: shutil.copyfile(entry, tmp))
            new += 1
    return new


def restore_partial(path: Path, evaluations: Path) -> int:
    """Copy the evaluations an earlier, unfinished run left in ``partial_of(path)`` into ``evaluations``; how
    many. Each is checked (its digest) when the cache reads it, and used only where its key matches."""
    entries = sorted(partial_of(path).glob("*.pt"))
    Path(evaluations).mkdir(parents=True, exist_ok=True)
    for entry in entries:
        if not (Path(evaluations) / entry.name).is_file():
            atomic_write(Path(evaluations) / entry.name, lambda tmp, entry=entry: shutil.copyfile(entry, tmp))
    return len(entries)


def load(chapter: str, profile: str = "reference", results: Path | None = None, at_least: int = 0) -> list[StoredRun]:
    """Every stored run of ``chapter`` at ``profile``, by seed; fewer than ``at_least`` is an error that says
    how to make one."""
    folder = Path(results or RESULTS) / chapter / profile
    found = sorted(folder.glob("seed-*.json"))
    if len(found) < at_least:
        raise FileNotFoundError(f"{folder} holds {len(found)} stored runs, at_least={at_least} were asked for; "
                                f"make one with: python -m defenses_lib.run {chapter} --profile {profile} --seed N "
                                f"--store")
    runs = []
    for p in found:
        data = json.loads(p.read_text())
        kept = {name: decode(v) for name, v in data.pop("kept").items()}
        runs.append(StoredRun(int(data["seed"]), data, kept))
    return sorted(runs, key=lambda r: r.seed)

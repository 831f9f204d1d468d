"""Estimate mode: stages scale their own time by the iterations they skipped, nested stages multiply,
and the runner's ``--estimate`` turns a cut-down run into the whole run's estimate."""

import json
import time

import nbformat
import pytest

from defenses_lib import estimate, run
from defenses_lib.run import read_records

from test_run import CELLS


@pytest.fixture
def estimating(tmp_path, monkeypatch):
    """Estimate mode on, the library's records going to a file; returns a reader of them."""
    log = tmp_path / "records.jsonl"
    monkeypatch.setenv(estimate.ENV, "1")
    monkeypatch.setenv("DEFENSES_METRICS", str(log))
    return lambda: [r for r in read_records(log) if r["kind"] == "estimate"]


def test_outside_estimate_mode_nothing_is_cut_or_recorded(tmp_path, monkeypatch):
    monkeypatch.delenv(estimate.ENV, raising=False)
    monkeypatch.setenv("DEFENSES_METRICS", str(tmp_path / "log"))
    assert estimate.cap(100, 2) == 100
    with estimate.stage("training", 100, 2):
        pass
    assert not (tmp_path / "log").exists()


def test_a_stage_counts_its_own_time_scaled_and_an_inner_stage_multiplies_the_outer_factor(estimating):
    assert estimate.cap(100, 2) == 2 and estimate.cap(1, 2) == 1 and estimate.cap(5, 0) == 1
    with estimate.stage("training", 10, 2):          # 5 times the work it did
        with estimate.stage("attacks", 4, 1):        # PGD inside adversarial training: 4 times
            time.sleep(0.05)
        time.sleep(0.02)
    inner, outer = estimating()
    assert inner["stage"] == outer["stage"] == "training", "an inner stage counts as the outer one's kind"
    assert inner["scale"] == pytest.approx(20) and outer["scale"] == pytest.approx(5)
    assert inner["seconds"] == pytest.approx(0.05, abs=0.03) and outer["seconds"] == pytest.approx(0.02, abs=0.03)
    s = estimate.summary(estimating(), cell_seconds=1.0, gpu_tflops=10.0)
    expected = inner["seconds"] * 20 + outer["seconds"] * 5
    assert s["stages"]["training"]["estimated seconds"] == pytest.approx(expected)
    assert s["other seconds"] == pytest.approx(1.0 - inner["seconds"] - outer["seconds"])
    assert s["CPU seconds"] == pytest.approx(s["other seconds"] + expected)


def test_the_training_set_scale_applies_to_data_stages_only(estimating, monkeypatch):
    monkeypatch.setattr(estimate, "_data_scale", [12.5])
    with estimate.stage("training", 2, 1, data=True):
        pass
    with estimate.stage("attacks", 2, 1):
        pass
    assert [r["scale"] for r in estimating()] == [25.0, 2.0]


def test_the_runner_estimates_a_notebook_from_a_few_steps(tmp_path, capsys):
    """The tiny notebook trains 2 epochs of 4 batches and attacks 64 images: in estimate mode it runs
    2 batches (a quarter) and attacks 8 images (an eighth), and the records say so."""
    path = tmp_path / "tiny.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS]), path)
    out = tmp_path / "estimate"
    assert run.main(["--notebook", str(path), "--profile", "quick", "--estimate", "--out", str(out)]) == 0
    result = json.loads((out / "estimate.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    training = [r for r in metrics["estimates"] if r["stage"] == "training"]
    assert [r["scale"] for r in training] == [4.0]
    assert metrics["trainings"][0]["history"][0]["examples"] == 32, "two batches of 16"
    assert 8.0 in {r["scale"] for r in metrics["estimates"] if r["stage"] == "attacks"}
    assert not list((out / "checkpoints").rglob("*.pt")), "an estimate run writes no checkpoint and caches nothing"
    summary = result["summary"]
    assert summary["CPU seconds"] > sum(v["measured seconds"] for v in summary["stages"].values())
    assert summary["stages"]["training"]["estimated FLOPs"] > 0 and summary["GPU seconds"] > 0
    assert result["cells failed"] == [5, 7], "every cell ran, whatever failed before it"
    assert "on this machine's CPU" in capsys.readouterr().out

"""The headless runner: a notebook runs with the chosen profile, writes its outputs, records its metrics and resumes."""

import json
import os

import nbformat
import pytest

from defenses_lib import run
from defenses_lib.profiles import PROFILE_ENV
from defenses_lib.runtime import METRICS_ENV, PROGRESS_ENV
from defenses_lib.training import RUNS_ENV

CELLS = [
    "from functools import partial\nimport matplotlib.pyplot as plt\nimport torch\n"
    "from defenses_lib.attacks import fgsm\nfrom defenses_lib.evaluation import evaluate, sanity_checks\n"
    "from defenses_lib.profiles import get_profile\n"
    "from defenses_lib.defenses.baselines import CrossEntropy\nfrom defenses_lib.training import fit\n"
    "P = get_profile('foundations')\nprint('n_train', P.n_train)",
    "g = torch.Generator().manual_seed(0)\n"
    "x, y = torch.rand(64, 1, 6, 6, generator=g), torch.randint(0, 3, (64,), generator=g)\n"
    "torch.manual_seed(0)\nmodel = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 3))\n"
    "fit(model, torch.utils.data.TensorDataset(x, y), CrossEntropy(), chapter='tiny', name='linear', "
    "recipe={'data': 'random'}, epochs=2, batch_size=16, device='cpu')",
    "r = evaluate(model, x, y, {'FGSM': partial(fgsm, eps=0.1)}, setting='tiny')\nprint(r)",
    "print(sanity_checks(model, x[:16], y[:16], eps=0.1, steps=2, n_queries=20, num_classes=3))",
    "plt.plot([0, 1], [1, 0])\nplt.show()",
    "assert False, 'a claim that fails at this scale'",
    "print('still running')",
    "raise RuntimeError('a broken cell')",
    "print('never reached')",
]


@pytest.fixture
def notebook(tmp_path):
    path = tmp_path / "tiny.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS]), path)
    return path


def test_runner_writes_notebook_figures_metrics_and_checkpoints_then_resumes(notebook, tmp_path):
    out = tmp_path / "out"
    before = {key: os.environ.get(key) for key in (PROFILE_ENV, RUNS_ENV, METRICS_ENV, PROGRESS_ENV)}
    assert run.main(["--notebook", str(notebook), "--out", str(out), "--profile", "paper"]) == 1
    assert {key: os.environ.get(key) for key in before} == before, "the settings reach the kernel, not this process"
    metrics = json.loads((out / "metrics.json").read_text())
    executed = nbformat.read(out / "tiny.ipynb", as_version=4)
    assert "n_train 60000" in executed.cells[0].outputs[0].text, "the paper profile reached the kernel"
    assert executed.cells[6].outputs[0].text == "still running\n", "the run goes on after a failed cell"
    assert metrics["errors"] == [{"cell": 5, "error": "AssertionError: a claim that fails at this scale"},
                                 {"cell": 7, "error": "RuntimeError: a broken cell"}], \
        "a failed claim goes on, an error stops"
    assert metrics["profile"] == "paper" and [c["cell"] for c in metrics["cells"]] == list(range(8))
    assert executed.cells[8].outputs == []
    assert (out / "figures" / "cell-04.png").read_bytes()[:4] == b"\x89PNG"
    [training] = metrics["trainings"]
    assert training["how"] == "trained now" and len(training["history"]) == 2
    assert (out / "checkpoints" / "tiny").is_dir() and training["checkpoint"].startswith(str(out / "checkpoints"))
    [evaluation] = metrics["evaluations"]
    assert evaluation["setting"] == "tiny" and set(evaluation["accuracy"]) == {"clean", "FGSM", "worst case"}
    [report] = metrics["sanity_checks"]
    assert len(report["checks"]) == 5 and report["setting"] == "linf eps = 0.1, n = 16"
    assert not (out / "records.jsonl").exists()

    assert run.main(["--notebook", str(notebook), "--out", str(out), "--profile", "paper"]) == 1
    assert json.loads((out / "metrics.json").read_text())["trainings"][0]["how"] == "finished run loaded"


def test_chapters_resolve_by_name_or_number():
    assert run.chapter_notebook("armor") == run.chapter_notebook("4") == run.BOOK / "04_armor.ipynb"
    assert set(run.CHAPTERS) == set(run.PROFILES), "every chapter with profiles can be run"


@pytest.mark.parametrize("argv, message", [
    (["nope"], "chapter must be one of"),
    (["9"], "chapter must be one of"),
    ([], "give a chapter or --notebook"),
    (["armor", "--profile", "huge"], "--profile must be one of"),
    (["--notebook", "missing.ipynb"], "is not a file"),
])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        run.main(argv)
    assert message in capsys.readouterr().err


RESUME = [
    "from functools import partial\nimport os, signal\nimport torch\n"
    "from defenses_lib.attacks import fgsm, pgd\nfrom defenses_lib.evaluation import evaluate\n"
    "from defenses_lib.defenses.baselines import CrossEntropy\nfrom defenses_lib.training import fit\n"
    "g = torch.Generator().manual_seed(0)\n"
    "x, y = torch.rand(64, 1, 6, 6, generator=g), torch.randint(0, 3, (64,), generator=g)\n"
    "torch.manual_seed(0)\nmodel = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 3))\n"
    "fit(model, torch.utils.data.TensorDataset(x, y), CrossEntropy(), chapter='tiny', name='linear', "
    "recipe={'data': 'random'}, epochs=2, batch_size=16, device='cpu')",
    "print(evaluate(model, x, y, {'PGD': partial(pgd, eps=0.1, steps=3)}, setting='first'))",
    "if os.environ.get('KILL_THE_KERNEL'):\n    os.kill(os.getpid(), signal.SIGKILL)",
    "print(evaluate(model, x, y, {'PGD': partial(pgd, eps=0.2, steps=3)}, setting='second'))",
]


def test_a_killed_run_leaves_its_metrics_and_the_resumed_run_does_only_the_rest(tmp_path, monkeypatch):
    """Killed after the first evaluation, the run leaves metrics.json; run again, it loads the model and
    the finished evaluation (random starts included) and ends with the results of an uninterrupted run."""
    path = tmp_path / "resume.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in RESUME]), path)
    args = ["--notebook", str(path), "--profile", "quick", "--out"]
    monkeypatch.setenv("KILL_THE_KERNEL", "1")
    assert run.main(args + [str(tmp_path / "killed")]) == 1
    killed = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert killed["errors"][0]["error"].startswith("DeadKernelError") and len(killed["evaluations"]) == 1
    monkeypatch.delenv("KILL_THE_KERNEL")
    assert run.main(args + [str(tmp_path / "killed")]) == 0
    assert run.main(args + [str(tmp_path / "whole")]) == 0
    resumed, whole = (json.loads((tmp_path / f / "metrics.json").read_text()) for f in ("killed", "whole"))
    assert resumed["trainings"][0]["how"] == "finished run loaded"
    assert [e["cached"] for e in resumed["evaluations"]] == [["clean", "PGD"], []]
    assert [e["cached"] for e in whole["evaluations"]] == [[], []]
    assert [e["accuracy"] for e in resumed["evaluations"]] == [e["accuracy"] for e in whole["evaluations"]]

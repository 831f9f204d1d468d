"""Profiles: typed, frozen and documented; ``paper`` differs from ``quick`` only where it says so;
bad names and values are refused; and every chapter's paper profile runs for a few steps here (on
a small slice of real data) through the defense interface."""

import dataclasses
import json
import runpy
from functools import partial
from pathlib import Path

import pytest
import torch

from defenses_lib.attacks import pgd, rfgsm_k
from defenses_lib.data import balanced_subset, load_dataset
from defenses_lib.defenses import armor, build
from defenses_lib.profiles import PAPER, PROFILES, QUICK, get_profile


def test_every_chapter_has_its_three_profiles_of_one_type_and_every_field_is_described():
    for chapter, profiles in PROFILES.items():
        assert set(profiles) == {"quick", "reference", "paper"}, chapter
        assert type(profiles["quick"]) is type(profiles["paper"]) is type(profiles["reference"]), chapter
        assert all(doc for doc in profiles["quick"].docs().values()), f"{chapter}: a field without a description"


def test_the_paper_profile_is_the_quick_one_with_its_changes():
    for chapter in QUICK:
        changes = PAPER[chapter].changes(QUICK[chapter])
        assert changes["name"] == ("quick", "paper") and len(changes) > 5, chapter
        assert QUICK[chapter].replace(**{k: new for k, (_, new) in changes.items()}) == PAPER[chapter]


def test_profile_from_environment_and_overrides(monkeypatch):
    monkeypatch.setenv("DEFENSES_PROFILE", "paper")
    assert get_profile("foundations").name == "paper"
    assert get_profile("foundations", "quick").n_train < get_profile("foundations").n_train
    assert get_profile("armor", "quick", seed=2).seed == 2 and QUICK["armor"].seed == 0


def test_bad_profile_names_and_values():
    with pytest.raises(ValueError, match="profile must be one of"):
        get_profile("foundations", "huge")
    with pytest.raises(ValueError, match="chapter must be one of"):
        get_profile("nope")
    with pytest.raises(ValueError, match="has no setting epoch; its settings are"):
        get_profile("armor", epoch=3)
    with pytest.raises(ValueError, match="Armor.epochs must be int, got '3'"):
        get_profile("armor", epochs="3")
    with pytest.raises(ValueError, match="eval_eps must be"):
        get_profile("drsl", eval_eps=0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_profile("drsl").epochs = 3


def test_foundations_paper_profile_runs_a_few_steps(data_root, paper_profile):
    P, data = paper_profile("foundations", n_train=250, epochs_standard=1, epochs_at=1)  # two steps each
    x, y = balanced_subset(load_dataset(P.dataset, "test", data_root), 10, seed=1).tensors()
    defenses = build("foundations", P, data)
    assert list(defenses) == ["standard", "PGD-AT", "TRADES"]
    for d in defenses.values():
        h = d.trainings[0].record["history"][0]
        assert h["examples"] == 250 and torch.isfinite(torch.tensor(h["loss"]))
    trades = defenses["TRADES"]
    res = trades.evaluate(x, y, {"PGD": partial(pgd, eps=P.eval_eps[-1], alpha=P.eval_step, steps=P.eval_steps)})
    assert res.n == 10
    assert trades.autoattack(x, y, P.train_eps, n=2, version=P.aa_version).n == 2


def test_ensembles_paper_profile_runs_a_few_steps(data_root, paper_profile):
    P, data = paper_profile("ensembles", n_train=20, batch_size=10, epochs_pretrain=1, epochs_finetune=1)
    ensembles = build("ensembles", P, data)
    assert list(ensembles) == ["pre-trained", "independent", "GAL", "DLC"]
    x, y = balanced_subset(load_dataset(P.dataset, "test", data_root), 10, seed=1).tensors()
    for d in ensembles.values():
        assert len(d.model.members) == P.members and d.model(x).shape == (10, 10)
    res = ensembles["DLC"].evaluate(x, y, {"PGD": partial(pgd, eps=P.eval_eps[-1], alpha=P.eval_step, steps=3)})
    assert res.n == 10


def test_purification_paper_profile_runs_a_few_steps(data_root, paper_profile):
    P, data = paper_profile("purification", n_train=20, batch_size=10, epochs_classifier=1, epochs_pretrain=1,
                            epochs_finetune=1, eot_draws=2, attack_draws=1)
    atop = build("purification", P, data)["AToP"]
    x, y = balanced_subset(load_dataset(P.dataset, "test", data_root), 10, seed=1).tensors()
    res = atop.evaluate(x[:4], y[:4], {"PGD+EOT": partial(pgd, eps=P.eval_eps[-1], steps=2)})
    assert res.n == 4 and atop.model(x[:4]).shape == (4, 10) and atop.randomized


def test_smoothing_paper_profile_runs_a_few_steps(data_root, paper_profile):
    P, data = paper_profile("smoothing", n_train=10, batch_size=10, epochs=1, train_draws=2, smooth_draws=2,
                            median_draws=5, cert_n0=10, cert_n=20, selector_draws=50)
    defenses = build("smoothing", P, data)
    assert list(defenses) == [f"sigma = {s:g}" for s in P.sigmas] + [f"variational, sigma_t = {s:g}"
                                                                   for s in P.sigmas]
    x, y = balanced_subset(load_dataset(P.dataset, "test", data_root), 10, seed=1).tensors()
    variational = defenses["variational, sigma_t = 0.25"]
    res = variational.evaluate(x[:2], y[:2], {"PGD+EOT": partial(pgd, eps=P.l2_eps[-1], steps=2, norm="l2")})
    assert res.n == 2
    assert variational.certify(x[:1]).radius.shape == (1,)
    assert defenses["sigma = 0.25"].certify(x[:1]).radius.shape == (1,)


def test_armor_paper_profile_runs_a_few_steps(data_root, paper_profile):
    P, data = paper_profile("armor", n_train=200, epochs=1)  # two steps of 100 per model
    models = build("armor", P, data)
    assert list(models) == list(P.models)
    x, y = balanced_subset(load_dataset(P.dataset, "test", data_root), 10, seed=1).tensors()
    res = models["ARMOR_D KL"].evaluate(x, y, {"PGD": partial(pgd, eps=0.1, alpha=P.eval_step, steps=P.eval_steps,
                                                               random_start=False)})
    assert res.n == 10
    B = P.binary
    binary = balanced_subset(load_dataset(P.dataset, "train", data_root), 200).binarized(B.threshold)
    nets = armor.build_binary(P.replace(binary=B.replace(epochs=1)), binary)
    xb = (x > B.threshold).float()
    x_adv = rfgsm_k(nets["ARMOR_D"].model, xb, y, B.attack_steps, B.attack_step)
    assert ((x_adv == 0) | (x_adv == 1)).all() and (x_adv >= xb).all()


def test_armor_paper_runner_writes_its_result_file_and_resumes(data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DEFENSES_RUNS", str(tmp_path))
    monkeypatch.setenv("DEFENSES_DATA", str(data_root))
    runner = runpy.run_path(str(Path(__file__).resolve().parents[1] / "experiments" / "armor_mnist_paper.py"))
    P = get_profile("armor", "paper", n_train=200, n_test=10, epochs=1, eval_steps=3)  # two steps, short attacks
    monkeypatch.setitem(runner["main"].__globals__, "get_profile", lambda chapter, name: P)
    args = ["--models", "ARMOR_D KL", "--out", str(tmp_path / "results")]
    runner["main"](args)
    record = json.loads((tmp_path / "results" / "ARMOR_D_KL.json").read_text())
    assert record["model"] == "ARMOR_D KL" and record["n_test"] == 10 and record["lambda"] > 0
    assert {"clean", "FGSM eps=0.1", "PGD-3 eps=0.1 (paper: zero start)", "worst case"} <= set(record["accuracy"])
    assert "trained now" in capsys.readouterr().out
    runner["main"](args)  # the same command again: the finished checkpoint is loaded, not retrained
    assert "finished run loaded" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        runner["main"](["--models", "ARMOR_D KL", "PGD-AT", "nope"])


def test_drsl_paper_profile_runs_a_few_steps(data_root, paper_profile):
    P, data = paper_profile("drsl", n_train=20, batch_size=10, epochs=1)
    models = build("drsl", P, data)
    assert list(models) == ["CE", "DRSL", "DRSL b=0.1", "DRSL b=10", "PGD-AT"]
    x, y = balanced_subset(load_dataset(P.dataset, "test", data_root), 10, seed=1).tensors()
    res = models["DRSL"].evaluate(x[:4], y[:4], {"margin": partial(pgd, eps=P.eval_eps[-1], steps=2, loss="margin")})
    assert res.n == 4


def test_a_paper_profile_on_a_cpu_warns_with_the_stored_estimate(monkeypatch):
    import warnings

    from defenses_lib import runtime

    monkeypatch.setattr(runtime, "pick_device", lambda prefer=None: torch.device("cpu"))
    with pytest.warns(UserWarning, match=r"paper profile of armor is meant for a GPU.*--estimate"):
        get_profile("armor", "paper")
    monkeypatch.setattr(runtime, "pick_device", lambda prefer=None: torch.device("cuda"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_profile("armor", "paper")
        get_profile("armor", "quick")


@pytest.mark.parametrize("chapter", sorted(PAPER))
def test_every_profiles_data_can_be_drawn_class_balanced(chapter):
    """chapter_data draws class-balanced subsets: each size a multiple of the 10 classes, or the whole
    split (the purification paper profile once asked for 512 test images and could not load its data)."""
    for P in (QUICK[chapter], PAPER[chapter]):
        whole = {"mnist": (60_000, 10_000), "cifar10": (50_000, 10_000)}[P.dataset]
        for n, total in zip((P.n_train, P.n_test), whole):
            assert n == total or (n % 10 == 0 and 0 < n < total), (P.name, n)
        assert P.aa_n <= P.n_test and P.sanity_n <= P.n_test, P.name

"""Profiles: both exist for every chapter, bad names are refused, and the paper profile's own
settings run for a few steps here (on a small slice of real data)."""

import json
import runpy
from functools import partial
from pathlib import Path

import pytest
import torch

from defenses_lib.attacks import EOT, pgd
from defenses_lib.data import balanced_subset, load_dataset
from defenses_lib.attacks import rfgsm_k
from defenses_lib.defenses.armor import armor_losses, binary_losses
from defenses_lib.defenses.drsl import drsl_losses
from defenses_lib.defenses.ensembles import train_ensembles
from defenses_lib.defenses.purification import train_purification
from defenses_lib.defenses.smoothing import certify, certify_variational, train_smoothing
from defenses_lib.evaluation import autoattack, evaluate
from defenses_lib.models import build_model
from defenses_lib.profiles import PROFILES, get_profile
from defenses_lib.runtime import seed_everything
from defenses_lib.training import PGDAdversarialLoss, TradesLoss, train, train_models


def test_every_chapter_has_both_profiles():
    for chapter, profiles in PROFILES.items():
        assert set(profiles) == {"quick", "paper"}, chapter
        assert set(profiles["quick"]) == set(profiles["paper"]), f"{chapter}: the two profiles name different settings"


def test_profile_from_environment(monkeypatch):
    monkeypatch.setenv("DEFENSES_PROFILE", "paper")
    assert get_profile("foundations").name == "paper"
    assert get_profile("foundations", "quick").n_train < get_profile("foundations").n_train


def test_bad_profile_names():
    with pytest.raises(ValueError, match="profile must be one of"):
        get_profile("foundations", "huge")
    with pytest.raises(ValueError, match="chapter must be one of"):
        get_profile("nope")


def test_foundations_paper_profile_runs_a_few_steps(data_root):
    P = get_profile("foundations", "paper")
    seed_everything(P.seed)
    data = balanced_subset(load_dataset(P.dataset, "train", data_root), 250)  # two optimiser steps
    x, y = balanced_subset(load_dataset(P.dataset, "test", data_root), 10, seed=1).tensors()
    for loss in (PGDAdversarialLoss(P.train_eps, steps=P.train_steps, alpha=P.train_alpha),
                 TradesLoss(P.train_eps, beta=P.trades_beta, steps=P.train_steps, alpha=P.train_alpha)):
        model = build_model(P.arch, P.dataset)
        history = train(model, data, loss, epochs=1, batch_size=P.batch_size, lr=P.lr, show_progress=False)
        assert history[0]["examples"] == 250 and torch.isfinite(torch.tensor(history[0]["loss"]))
    res = evaluate(model, x, y, {"PGD": partial(pgd, eps=P.eval_eps[-1], alpha=P.eval_alpha, steps=P.eval_steps)})
    assert res.n == 10
    x_aa = autoattack(model, x[:2], y[:2], P.train_eps, version=P.aa_version)
    assert x_aa.shape == (2, 1, 28, 28)


def test_ensembles_paper_profile_runs_a_few_steps(data_root, paper_profile):
    P, data = paper_profile("ensembles", n_train=20, batch_size=10, epochs_pretrain=1, epochs_finetune=1)  # 2 steps
    ensembles = train_ensembles(P, data)
    assert list(ensembles) == ["pre-trained", "independent", "GAL", "DLC"]
    x, y = balanced_subset(load_dataset(P.dataset, "test", data_root), 10, seed=1).tensors()
    for ens in ensembles.values():
        assert len(ens.members) == P.members and ens(x).shape == (10, 10)
    res = evaluate(ensembles["DLC"], x, y, {"PGD": partial(pgd, eps=P.eval_eps[-1], alpha=P.eval_alpha, steps=3)})
    assert res.n == 10


def test_purification_paper_profile_runs_a_few_steps(data_root, paper_profile):
    P, data = paper_profile("purification", n_train=20, batch_size=10, epochs_classifier=1, epochs_pretrain=1,
                            epochs_finetune=1)
    models = train_purification(P, data)
    x, y = balanced_subset(load_dataset(P.dataset, "test", data_root), 10, seed=1).tensors()
    defended = EOT(models["AToP"], draws=2)
    res = evaluate(defended, x[:4], y[:4], {"PGD+EOT": partial(pgd, eps=P.eval_eps[-1], steps=2)},
                   attack_model=EOT(models["AToP"], draws=1))
    assert res.n == 4 and defended(x[:4]).shape == (4, 10)


def test_smoothing_paper_profile_runs_a_few_steps(data_root, paper_profile):
    P, data = paper_profile("smoothing", n_train=10, batch_size=10, epochs=1, train_draws=2)  # one step per model
    models = train_smoothing(P, data)
    assert list(models) == [f"sigma={s:g}" for s in P.sigmas] + ["variational"]
    x, y = balanced_subset(load_dataset(P.dataset, "test", data_root), 10, seed=1).tensors()
    variational = models["variational"]
    variational.draws, variational.median_draws = 2, 5
    res = evaluate(variational, x[:2], y[:2], {"PGD+EOT": partial(pgd, eps=P.l2_eps[-1], steps=2, norm="l2")})
    assert res.n == 2
    cert = certify_variational(variational, x[:1], P.radii, n0=10, n=20, num_classes=10, selector_draws=50)
    assert cert.radius.shape == (1,)
    assert certify(models["sigma=0.25"], x[:1], 0.25, n0=10, n=20).radius.shape == (1,)


def test_armor_paper_profile_runs_a_few_steps(data_root, paper_profile):
    P, data = paper_profile("armor", n_train=200)  # two steps of 100 per model
    models = train_models(P, data, armor_losses(P), arch=P.arch, epochs=1, chapter="armor")
    assert list(models) == list(P.models)
    x, y = balanced_subset(load_dataset(P.dataset, "test", data_root), 10, seed=1).tensors()
    res = evaluate(models["ARMOR_D KL"], x, y, {"PGD": partial(pgd, eps=0.1, alpha=P.eval_alpha, steps=P.eval_steps,
                                                                random_start=False)})
    assert res.n == 10
    B = P.binary
    binary = balanced_subset(load_dataset(P.dataset, "train", data_root), 200).binarized(B["threshold"])
    nets = train_models(P, binary, binary_losses(P), arch=B["arch"], epochs=1, chapter="armor-binary",
                        optimizer=B["optimizer"], lr=B["lr"], milestones=())
    xb = (x > B["threshold"]).float()
    x_adv = rfgsm_k(nets["ARMOR_D"], xb, y, B["attack_steps"], B["attack_step_size"])
    assert ((x_adv == 0) | (x_adv == 1)).all() and (x_adv >= xb).all()


def test_armor_paper_runner_writes_its_result_file_and_resumes(data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DEFENSES_RUNS", str(tmp_path))
    monkeypatch.setenv("DEFENSES_DATA", str(data_root))
    runner = runpy.run_path(str(Path(__file__).resolve().parents[1] / "experiments" / "armor_mnist_paper.py"))
    P = get_profile("armor", "paper")
    P.update(n_train=200, n_test=10, epochs=1, eval_steps=3)  # two training steps, ten test images, short attacks
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
    models = train_models(P, data, drsl_losses(P), arch=P.arch, epochs=P.epochs, chapter="drsl")
    assert list(models) == ["CE", "DRSL", "DRSL b=0.1", "DRSL b=10", "PGD-AT"]
    x, y = balanced_subset(load_dataset(P.dataset, "test", data_root), 10, seed=1).tensors()
    res = evaluate(models["DRSL"], x[:4], y[:4], {"margin": partial(pgd, eps=P.eval_eps[-1], steps=2, loss="margin")})
    assert res.n == 4

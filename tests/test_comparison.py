"""Chapter 6's plumbing: recipes are the chapters' own on common data, FLOPs are counted correctly,
costs are in the stated units, and the attacks are the same for every defense."""

import pytest
import torch
from torch import nn

from defenses_lib.attacks import EOT
from defenses_lib import comparison
from defenses_lib.comparison import (COMMON, ORDER, Defense, aa_description, aa_name, build_defenses, evaluate_defense,
                                     inference_cost, recipe_profile, sanity_report, standard_costs, threat_attacks,
                                     threat_name, training_cost, worst_case)
from defenses_lib.data import load_dataset
from defenses_lib.evaluation import RobustResult
from defenses_lib.defenses.ensembles import train_ensembles
from defenses_lib.defenses.smoothing import SmoothedClassifier, fewer_draws
from defenses_lib.profiles import get_profile
from defenses_lib.runtime import count_flops, records
from defenses_lib.training import CrossEntropy, fit


@pytest.mark.parametrize("name", ["quick", "paper"])
def test_recipe_profiles_take_only_the_common_settings(name):
    P = get_profile("comparison", name)
    for chapter in ("foundations", "ensembles", "purification", "smoothing", "armor", "drsl"):
        Q, own = recipe_profile(P, chapter), get_profile(chapter, name)
        assert {k: Q[k] for k in COMMON} == {k: P[k] for k in COMMON}
        changed = {k for k in own if Q[k] != own[k]}
        assert changed <= set(COMMON) | set(P.overrides.get(chapter, {})), (chapter, changed)


def test_chapters_1_2_4_5_recipes_are_the_chapters_own_in_the_quick_profile():
    """So their checkpoints (named by the recipe's hash) are shared with those chapters."""
    P = get_profile("comparison", "quick")
    for chapter in ("ensembles", "purification", "armor", "drsl"):
        assert recipe_profile(P, chapter) == get_profile(chapter, "quick"), chapter


def test_a_fit_with_the_same_recipe_in_the_same_chapter_folder_is_loaded(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DEFENSES_RUNS", str(tmp_path))
    data = torch.utils.data.TensorDataset(torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,)))
    net = lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    kw = dict(chapter="drsl", name="CE", recipe={"data": "x"}, epochs=1, batch_size=8, show_progress=False)
    torch.manual_seed(0)
    first = fit(net(), data, CrossEntropy(), **kw)
    second = fit(net(), data, CrossEntropy(), **kw)
    assert "finished run loaded" in capsys.readouterr().out.splitlines()[-1]
    assert torch.equal(first[1].weight, second[1].weight)
    assert records("training")[-1]["how"] == "finished run loaded"


def test_flop_count_of_a_linear_layer_forward_and_backward():
    b, i, o = 5, 7, 3
    layer = nn.Linear(i, o)
    x = torch.rand(b, i, requires_grad=True)
    assert count_flops(lambda: layer(x)) == 2 * b * i * o
    # backward: the input's gradient and the weight's gradient, one matrix product each
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * b * i * o
    # a gradient with respect to the input only (what attacks take) is counted too
    assert count_flops(lambda: torch.autograd.grad(layer(x).sum(), x)) == 2 * 2 * b * i * o


def test_training_records_flops_per_example_and_costs_are_in_standard_units(tmp_path, monkeypatch):
    monkeypatch.setenv("DEFENSES_RUNS", str(tmp_path))
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,)))
    x, y = data.tensors
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    fit(model, data, CrossEntropy(), chapter="t", name="CE", recipe={}, epochs=2, batch_size=16, show_progress=False)
    trainings = records("training")[-1:]
    assert trainings[0]["history"][0]["flops_per_example"] == 2 * 2 * 64 * 10   # forward and weight gradient
    std_train, std_forward = standard_costs(model, x, y)
    assert std_forward == 2 * 64 * 10 and std_train == trainings[0]["history"][0]["flops_per_example"]
    standard = Defense("standard", "t", model, trainings)
    assert training_cost(standard, std_train, len(data))["standard epochs"] == pytest.approx(2.0)
    assert inference_cost(standard, x, std_forward, repeat=1)["forward passes"] == pytest.approx(1.0)
    eot = Defense("EOT", "t", EOT(model, 4), trainings)
    assert inference_cost(eot, x, std_forward, repeat=1)["forward passes"] == pytest.approx(4.0)


def test_every_defense_meets_the_same_attacks_at_every_threat():
    P = get_profile("comparison", "quick")
    for t in P.threats:
        assert list(threat_attacks(P, t)) == [f"CE-PGD-{P.eval_steps}", f"margin-PGD-{P.eval_steps}"]
    assert threat_name(("linf", 0.1)) == "l_inf 0.1" and threat_name(("l2", 2.0)) == "l_2 2"
    assert aa_name(P) == f"AutoAttack, l_inf 0.1, first {P.aa_n}"


@pytest.mark.parametrize("profile", ["quick", "paper"])
def test_autoattack_meets_a_randomized_defense_with_the_rand_versions_attacks_through_its_eot_model(profile, monkeypatch):
    P = type(get_profile("comparison", profile))({**get_profile("comparison", profile), "threats": (), "aa_n": 2})
    seen = {}
    monkeypatch.setattr(comparison, "evaluate", lambda model, x, y, attacks, **kw: seen.update(attacks=attacks, **kw))
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 10))
    x, y = torch.rand(2, 1, 2, 2), torch.tensor([0, 1])
    eot = EOT(net, 2)
    randomized = Defense("r", "smoothing", net, [], attack_model=eot, repeats=2, fixed_model=net)
    evaluate_defense(P, randomized, x, y)
    aa = seen["attacks"]["AutoAttack"].keywords
    assert (aa["version"], aa["attacks"]) == ("custom", ("apgd-ce", "apgd-dlr")) and seen["attack_model"] is eot
    assert f"through the {P.attack_draws}-draw average" in aa_description(P, True)
    evaluate_defense(P, Defense("d", "drsl", net, []), x, y)
    aa = seen["attacks"]["AutoAttack"].keywords
    assert (aa["version"], aa["attacks"], aa["n_target_classes"]) == (P.aa_version, P.aa_attacks, P.aa_targets)
    assert aa["version"] == ("custom" if profile == "quick" else "standard")


def test_worst_case_takes_autoattack_into_account_on_the_examples_it_ran_on():
    P = type(get_profile("comparison", "quick"))({**get_profile("comparison", "quick"), "aa_n": 2})
    T, F = True, False
    res = lambda **c: RobustResult({k: torch.tensor(v) for k, v in c.items()}, {}, "")
    results = {"l_inf 0.1": res(clean=[T, T, T, T], pgd=[T, T, F, T]),
               aa_name(P): res(clean=[T, T], AutoAttack=[F, T]),
               "l_inf 0.3": res(clean=[T, T, T, T], pgd=[F, F, F, T]),
               "l_2 2": res(clean=[T, F, T, T], pgd=[T, T, T, T])}
    assert {t: v.mean().item() for t, v in worst_case(P, results).items()} == {"l_inf 0.1": 0.5, "l_inf 0.3": 0.25,
                                                                               "l_2 2": 0.75}


def test_fewer_draws_shares_the_weights_and_checks_its_arguments():
    base = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    smoothed = SmoothedClassifier(base, 0.25, draws=16)
    attacker = fewer_draws(smoothed, 4)
    assert attacker.draws == 4 and smoothed.draws == 16 and attacker.base is base
    with pytest.raises(ValueError, match="draws and median_draws must be >= 1"):
        fewer_draws(smoothed, 0)


def test_train_ensembles_refuses_an_unknown_loss_name(tmp_path, monkeypatch):
    monkeypatch.setenv("DEFENSES_RUNS", str(tmp_path))
    P = get_profile("ensembles", "quick")
    data = torch.utils.data.TensorDataset(torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,)))
    with pytest.raises(ValueError, match="names must be one of"):
        train_ensembles(type(P)({**P, "epochs_pretrain": 0}), data, names=("nope",))


def test_comparison_paper_profile_runs_a_few_steps(data_root, paper_profile):
    """CIFAR-10 and ResNet-18 with every chapter's paper recipe: one training step per model, then the
    chapter's evaluation, certificates, sanity checks and costs on two test images with short attacks."""
    few = dict(batch_size=10)
    P, data = paper_profile(
        "comparison", n_train=10, eval_steps=2, attack_draws=2, score_repeats=1, aa_n=1, aa_version="custom",
        aa_attacks=("apgd-ce",), aa_targets=None, square_queries=5, overrides={
            "foundations": dict(epochs_at=1, train_steps=2),
            "ensembles": dict(few, epochs_pretrain=1, epochs_finetune=1),
            "purification": dict(few, epochs_classifier=1, epochs_pretrain=1, epochs_finetune=1, eot_draws=2),
            "smoothing": dict(few, sigmas=(0.25,), epochs=1, train_draws=2, smooth_draws=2, n0=4, n=8,
                              selector_draws=20, median_draws=3, attack_median_draws=3),
            "armor": dict(few, epochs=1),
            "drsl": dict(few, epochs=1)})
    x, y = load_dataset(P.dataset, "test", data_root).select(torch.arange(2)).tensors()
    defenses = build_defenses(P, data)
    assert list(defenses) == list(ORDER)
    assert all(h["examples"] == 10 for d in defenses.values() for r in d.trainings for h in r["history"])
    std_train, std_forward = standard_costs(defenses["standard"].model, x, y)
    for name, d in defenses.items():
        res = evaluate_defense(P, d, x, y)
        assert set(res) == {threat_name(t) for t in P.threats} | {aa_name(P)}, name
        assert 0 <= worst_case(P, res)[threat_name(P.aa_threat)].mean() <= 1
        assert training_cost(d, std_train, P.n_train)["standard epochs"] > 0
        assert inference_cost(d, x, std_forward, repeat=1)["forward passes"] >= 1 - 1e-6
        if d.certify is not None:
            assert d.certify(x).radius.shape == (2,)
    report = sanity_report(P, defenses["variational smoothing"], x, y)
    assert len(report.checks) == 5 and all(c.passed is not None for c in report.checks)   # all five apply: randomized

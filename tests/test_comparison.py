"""Chapter 6's plumbing and the defense interface: every defense comes from the registry, recipes
are the chapters' own on common data, costs are in the stated units, the attacks are the same for
every defense, and a sixth defense joins through the public interface alone."""

from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from defenses_lib import comparison
from defenses_lib.attacks import EOT
from defenses_lib.comparison import (COMMON, aa_description, build_defenses, costs, detail_table, evaluate_defense,
                                     inference_cost, is_chapters_own, recipe_profile, sanity_report,
                                     standard_costs, summary_table, threat_attacks, threat_name, training_cost)
from defenses_lib.data import load_dataset
from defenses_lib.defenses import REGISTRY, build, register
from defenses_lib.defenses.base import Defense
from defenses_lib.defenses.baselines import CrossEntropy
from defenses_lib.defenses.smoothing import SmoothedClassifier, fewer_draws
from defenses_lib.evaluation import FixedRandomness, RobustResult
from defenses_lib.profiles import PROFILES, Comparison, Profile, get_profile, register_profiles, setting
from defenses_lib.runtime import count_flops
from defenses_lib.training import fit, train_each


@pytest.mark.parametrize("name", ["quick", "reference", "paper"])
def test_recipe_profiles_take_only_the_common_and_attack_settings(name):
    P = get_profile("comparison", name)
    for chapter in ("foundations", "ensembles", "purification", "smoothing", "armor", "drsl"):
        Q, own = recipe_profile(P, chapter), get_profile(chapter, name)
        assert all(getattr(Q, k) == getattr(P, k) for k in COMMON)
        allowed = set(COMMON) | set(comparison.ATTACK_SETTINGS) | set(P.overrides.get(chapter, {}))
        assert set(Q.changes(own)) <= allowed, chapter


def test_chapters_0_1_2_4_5_recipes_are_the_chapters_own_in_the_quick_profile():
    """So their checkpoints (named by the recipe's hash) are shared with those chapters."""
    P = get_profile("comparison", "quick")
    assert [c for c in PROFILES if c != "comparison" and is_chapters_own(P, c)] == [
        "foundations", "ensembles", "purification", "armor", "drsl"]


def test_a_fit_with_the_same_recipe_in_the_same_chapter_folder_is_loaded(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DEFENSES_RUNS", str(tmp_path))
    data = torch.utils.data.TensorDataset(torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,)))

    def net():
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    kw = dict(chapter="drsl", name="CE", recipe={"data": "x"}, epochs=1, batch_size=8, show_progress=False)
    torch.manual_seed(0)
    first = fit(net(), data, CrossEntropy(), **kw)
    second = fit(net(), data, CrossEntropy(), **kw)
    assert "finished run loaded" in capsys.readouterr().out.splitlines()[-1]
    assert torch.equal(first.model[1].weight, second.model[1].weight)
    assert second.record["how"] == "finished run loaded"


def test_flop_count_of_a_linear_layer_forward_and_backward():
    b, i, o = 5, 7, 3
    layer = nn.Linear(i, o)
    x = torch.rand(b, i, requires_grad=True)
    assert count_flops(lambda: layer(x)) == 2 * b * i * o
    # backward: the input's gradient and the weight's gradient, one matrix product each
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * b * i * o
    # a gradient with respect to the input only (what attacks take) is counted too
    assert count_flops(lambda: torch.autograd.grad(layer(x).sum(), x)) == 2 * 2 * b * i * o


def test_training_costs_are_counted_when_asked_and_in_standard_units(tmp_path, monkeypatch):
    monkeypatch.setenv("DEFENSES_RUNS", str(tmp_path))
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,)))
    x, y = data.tensors
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    t = fit(model, data, CrossEntropy(), chapter="t", name="CE", recipe={}, epochs=2, batch_size=16,
            show_progress=False)
    assert "flops_per_example" not in t.record["history"][0]   # training counts nothing by itself
    assert t.flops_per_example(x, y) == 2 * 2 * 64 * 10         # forward and weight gradient
    std_train, std_forward = standard_costs(model, x, y)
    assert std_forward == 2 * 64 * 10 and std_train == t.flops_per_example(x, y)
    standard = Defense("standard", model, [t])
    assert training_cost(standard, std_train, len(data), x, y)["standard epochs"] == pytest.approx(2.0)
    assert inference_cost(standard, x, std_forward, repeat=1)["forward passes"] == pytest.approx(1.0)
    eot = Defense("EOT", EOT(model, 4), [t])
    assert inference_cost(eot, x, std_forward, repeat=1)["forward passes"] == pytest.approx(4.0)


def test_every_defense_meets_the_same_attacks_at_every_threat():
    P = get_profile("comparison", "quick")
    for t in P.threats:
        assert list(threat_attacks(P, t)) == [f"CE-PGD-{P.eval_steps}", f"margin-PGD-{P.eval_steps}"]
    assert threat_name(("linf", 0.1)) == "l_inf 0.1" and threat_name(("l2", 2.0)) == "l_2 2"


@pytest.mark.parametrize("profile", ["quick", "paper"])
def test_autoattack_meets_a_randomized_defense_with_the_rand_versions_attacks(profile, monkeypatch):
    P = get_profile("comparison", profile, threats=(P_T := ("linf", 0.1),), aa_threat=P_T, aa_n=2)
    seen = {}

    def spy(model, x, y, attacks, batch_size, setting, attack_model, repeats):
        seen.update(attacks=attacks, attack_model=attack_model)
        return RobustResult({"clean": torch.ones(len(y), dtype=torch.bool),
                             **{k: torch.ones(len(y), dtype=torch.bool) for k in attacks}})

    monkeypatch.setattr("defenses_lib.defenses.base.evaluate", spy)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 10))
    x, y = torch.rand(2, 1, 2, 2), torch.tensor([0, 1])
    eot = EOT(net, 2)
    randomized = Defense("r", net, attack_model=eot, randomized=True, repeats=2, fixed_model=net)
    evaluate_defense(P, randomized, x, y)
    aa = seen["attacks"]["AutoAttack"].keywords
    assert (aa["version"], aa["attacks"]) == ("custom", ("apgd-ce", "apgd-dlr")) and seen["attack_model"] is eot
    assert f"through the {P.attack_draws}-draw average" in aa_description(P, True)
    evaluate_defense(P, Defense("d", net), x, y)
    aa = seen["attacks"]["AutoAttack"].keywords
    assert (aa["version"], aa["attacks"], aa["n_target_classes"]) == (P.aa_version, P.aa_attacks, P.aa_targets)
    assert aa["version"] == ("custom" if profile == "quick" else "standard")


def test_the_worst_case_takes_autoattack_into_account_on_the_examples_it_ran_on():
    T, F = True, False

    def res(**rows):
        return RobustResult({k: torch.tensor(v) for k, v in rows.items()})

    pgd_only = res(clean=[T, T, T, T], pgd=[T, T, F, T])
    merged = pgd_only.merge(res(clean=[T, F], AutoAttack=[F, T]))
    assert merged.n == 2 and merged.worst_case.tolist() == [F, T]   # the clean row is the first result's
    assert list(merged.outcomes()) == ["clean", "pgd", "AutoAttack", "worst case"]
    with pytest.raises(ValueError, match="both results have the rows"):
        pgd_only.merge(res(clean=[T], pgd=[T]))


def test_fewer_draws_shares_the_weights_and_checks_its_arguments():
    base = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    smoothed = SmoothedClassifier(base, 0.25, draws=16)
    attacker = fewer_draws(smoothed, 4)
    assert attacker.draws == 4 and smoothed.draws == 16 and attacker.base is base
    assert "draws=4" in repr(attacker) and "draws=16" in repr(smoothed)
    with pytest.raises(ValueError, match="draws and median_draws must be >= 1"):
        fewer_draws(smoothed, 0)


def test_the_registry_refuses_unknown_chapters_and_names(tmp_path, monkeypatch):
    monkeypatch.setenv("DEFENSES_RUNS", str(tmp_path))
    P = get_profile("ensembles", epochs_pretrain=0)
    data = torch.utils.data.TensorDataset(torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,)))
    with pytest.raises(ValueError, match="names must be among"):
        build("ensembles", P, data, names=("nope",))
    with pytest.raises(ValueError, match="chapter must be one of"):
        build("nope", P, data)
    with pytest.raises(ValueError, match="fixed_model"):
        Defense("random", nn.Identity(), randomized=True)


# --- a sixth defense, added through the public interface alone ---------------------------------


class GaussianAugmentation(nn.Module):
    """The toy defense's loss: cross-entropy on x + sigma * noise (no certificate)."""

    def __init__(self, sigma: float):
        super().__init__()
        self.sigma = sigma

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}"

    def forward(self, model, x, y):
        return nn.functional.cross_entropy(model(x + self.sigma * torch.randn_like(x)), y)


class NoisyPrediction(nn.Module):
    """Predicts on a noisy copy of the input: a randomized defense."""

    randomized = True

    def __init__(self, model: nn.Module, sigma: float):
        super().__init__()
        self.model, self.sigma = model, sigma

    def forward(self, x):
        return self.model(x + self.sigma * torch.randn_like(x))


@dataclass(frozen=True, kw_only=True)
class NoiseProfile(Profile):
    """The toy chapter's settings."""

    epochs: int = setting("training epochs", 1)
    sigma: float = setting("noise of training and prediction", 0.3)
    names: tuple[str, ...] = field(default=("noise",))


def build_noise(P, train_set, device=None, names=None):
    """The toy chapter's ``build``: one network trained and predicting with Gaussian noise."""
    t = train_each(P, train_set, {"noise": GaussianAugmentation(P.sigma)}, chapter="noise", epochs=P.epochs,
                   device=device)["noise"]
    model = NoisyPrediction(t.model, P.sigma)
    return {"noise": Defense("noise", EOT(model, 2), [t], attack_model=EOT(model, 1), randomized=True,
                             repeats=2, fixed_model=FixedRandomness(EOT(model, 1), P.seed), chapter="noise")}


def test_a_sixth_defense_joins_the_comparison_through_the_public_interface(tmp_path, monkeypatch, data_root):
    monkeypatch.setenv("DEFENSES_RUNS", str(tmp_path))
    monkeypatch.setenv("DEFENSES_DATA", str(data_root))
    monkeypatch.setitem(PROFILES, "noise", {})   # restored afterwards, like the registry below
    monkeypatch.setitem(REGISTRY, "noise", None)
    register_profiles("noise", quick=NoiseProfile(n_train=100, batch_size=50))
    register("noise", build_noise)               # the one registry line
    P = get_profile("comparison", n_train=100, n_test=10, aa_n=4, sanity_n=4, eval_steps=2, square_queries=5,
                    threats=(("linf", 0.1),), aa_threat=("linf", 0.1), sanity_threat=("linf", 0.1),
                    compared=(("standard", "foundations", "standard"), ("noise", "noise", "noise")),
                    overrides={"foundations": {"epochs_standard": 1}})
    train_set, x, y = comparison_data(P)
    defenses = build_defenses(P, train_set)
    assert list(defenses) == ["standard", "noise"] and defenses["noise"].randomized
    results = {n: evaluate_defense(P, d, x, y) for n, d in defenses.items()}
    detail = detail_table(results)
    aa_rows = {"l_inf 0.1 + AutoAttack (first 4): AutoAttack", "l_inf 0.1 + AutoAttack (first 4): worst case"}
    assert {"clean", "l_inf 0.1: CE-PGD-2", "l_inf 0.1: worst case"} | aa_rows <= set(detail["noise"])
    assert results["noise"]["l_inf 0.1"].n == 10, "AutoAttack on a prefix leaves the threat's own result whole"
    whole = evaluate_defense(P.replace(aa_n=10), defenses["standard"], x, y)
    assert list(whole) == ["l_inf 0.1"] and "AutoAttack" in whole["l_inf 0.1"].correct, "on every image: merged"
    spent = costs(P, defenses, x, y)
    summary = summary_table(results, {}, spent, P.cert_radii)
    assert summary["noise"]["certified, l_2 r = 0.25"] == "–" and spent["noise"]["forward passes"] == pytest.approx(2)
    report = sanity_report(P, defenses["noise"], x[:4], y[:4])
    assert len(report.checks) == 5 and report.checks[-1].passed is not None   # randomized: check 5 applies


def comparison_data(P):
    """The comparison chapter's data."""
    from defenses_lib.data import chapter_data
    return chapter_data(P)


def test_comparison_paper_profile_runs_a_few_steps(data_root, paper_profile):
    """CIFAR-10 and ResNet-18 with every chapter's paper recipe: one training step per model, then the
    chapter's evaluation, certificates, sanity checks and costs on two test images with short attacks."""
    paper_recipes_a_few_steps(data_root, paper_profile)


def paper_recipes_a_few_steps(data_root, paper_profile):
    """The body of the test above (the GPU smoke test runs it too)."""
    few = dict(batch_size=10)
    P, data = paper_profile(
        "comparison", n_train=10, eval_steps=2, attack_draws=2, score_repeats=1, aa_n=1, aa_version="custom",
        aa_attacks=("apgd-ce",), aa_targets=None, square_queries=5, overrides={
            "foundations": dict(few, epochs_standard=1, epochs_at=1, train_steps=2),
            "ensembles": dict(few, epochs_pretrain=1, epochs_finetune=1),
            "purification": dict(few, epochs_classifier=1, epochs_pretrain=1, epochs_finetune=1, eot_draws=2),
            "smoothing": dict(few, sigmas=(0.25,), epochs=1, train_draws=2, smooth_draws=2, cert_n0=4, cert_n=8,
                              selector_draws=20, median_draws=3, attack_median_draws=3),
            "armor": dict(few, epochs=1),
            "drsl": dict(few, epochs=1)})
    x, y = load_dataset(P.dataset, "test", data_root).select(torch.arange(2)).tensors()
    defenses = build_defenses(P, data)
    assert list(defenses) == [name for name, _, _ in P.compared]
    assert all(h["examples"] == 10 for d in defenses.values() for t in d.trainings for h in t.record["history"])
    spent = costs(P, defenses, x, y)
    for name, d in defenses.items():
        res = evaluate_defense(P, d, x, y)
        with_aa = f"{threat_name(P.aa_threat)} + AutoAttack (first 1)"   # aa_n = 1 of the 2 images
        assert set(res) == {threat_name(t) for t in P.threats} | {with_aa}, name
        assert "AutoAttack" in res[with_aa].correct and res[threat_name(P.aa_threat)].n == 2
        assert spent[name]["standard epochs"] > 0 and spent[name]["forward passes"] >= 1 - 1e-6
        if d.certify is not None:
            assert d.certify(x).radius.shape == (2,)
    report = sanity_report(P, defenses["variational smoothing"], x, y)
    assert len(report.checks) == 5 and all(c.passed is not None for c in report.checks)   # all five apply: randomized


def test_comparison_profile_type():
    assert isinstance(get_profile("comparison"), Comparison)


def test_cross_check_merges_autoattack_into_each_named_result(monkeypatch):
    from defenses_lib.defenses import cross_check
    T, F = True, False
    seen = []

    def fake_autoattack(self, x, y, eps, norm="linf", n=None, seed=0, **settings):
        seen.append((self.name, eps, n, settings))
        return RobustResult({"clean": torch.tensor([T, T]), "AutoAttack": torch.tensor([F, T])})

    monkeypatch.setattr(Defense, "autoattack", fake_autoattack)
    d = {"a": Defense("a", nn.Identity()), "b": Defense("b", nn.Identity())}
    pgd_only = RobustResult({"clean": torch.tensor([T, T, T]), "PGD": torch.tensor([T, F, T])})
    out = cross_check(d, {"a": pgd_only}, torch.rand(3, 1, 2, 2), torch.zeros(3, dtype=torch.long), 0.1, n=2,
                      version="custom")
    assert list(out) == ["a"] and seen == [("a", 0.1, 2, {"version": "custom"})]
    assert out["a"].worst_case.tolist() == [F, F]

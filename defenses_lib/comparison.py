"""Chapter 6: every defense of chapters 0-5 trained on the same data and network, under one threat model.

Nothing is re-implemented here. Each defense is built by its own chapter's library recipe
(``train_models``, ``train_ensembles``, ``train_purification``, ``train_smoothing``) from that
chapter's profile, in which only the data and the network (``COMMON``) and the comparison's few
recipe overrides are replaced. A checkpoint is named by a hash of its full recipe, so a model whose
recipe is the chapter's own (chapters 1, 2, 4 and 5 use the comparison's data and network already) is
the chapter's checkpoint: loaded if that chapter ran first with the same ``DEFENSES_RUNS``, trained
here otherwise (the cold path).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn

from .attacks import EOT, pgd
from .defenses.armor import armor_losses
from .defenses.drsl import drsl_losses
from .defenses.ensembles import train_ensembles
from .defenses.purification import train_purification
from .defenses.smoothing import SmoothedClassifier, certify, certify_variational, fewer_draws, train_smoothing
from .evaluation import FixedRandomness, autoattack, evaluate, predict, sanity_checks
from .profiles import Profile, get_profile
from .runtime import RECORDS, count_flops, records, timeit
from .training import CrossEntropy, TradesLoss, train_models

COMMON = ("dataset", "arch", "n_train", "seed")  # what every recipe takes from the comparison's profile


@dataclass
class Defense:
    """One defense as the comparison trains, attacks and prices it."""

    name: str
    chapter: str                        # the chapter that derives it
    model: nn.Module                    # what predicts (for a randomized defense, its expectation over draws)
    trainings: list[dict]               # the training records of every stage of its recipe
    attack_model: nn.Module | None = None   # what the attacker differentiates (None: the model itself)
    repeats: int = 1                    # predictions each example is scored by (randomized defenses)
    certify: Callable | None = None     # x -> Certificate, for a defense that certifies
    fixed_model: nn.Module | None = None    # the attack model with its randomness fixed (sanity check 5)
    checked_in_chapter: bool = False    # the chapter ran the sanity checks on this very model (same recipe)

    @property
    def randomized(self) -> bool:
        """Whether its prediction is random (such a defense has a fixed-randomness twin for sanity check 5)."""
        return self.fixed_model is not None


def recipe_profile(P, chapter: str) -> Profile:
    """``chapter``'s own profile of the same name as ``P``, with ``P``'s data, network and overrides for it."""
    base = get_profile(chapter, P.name)
    return Profile({**base, **{k: P[k] for k in COMMON}, **P.overrides.get(chapter, {})})


def _is_chapters_own(P, chapter: str) -> bool:
    """Whether the comparison's recipe for ``chapter`` is the chapter's own, so its models are the chapter's."""
    return recipe_profile(P, chapter) == get_profile(chapter, P.name)


def _trained(fn):
    """``fn()`` and the training records it made (one per ``fit``, loaded or trained)."""
    mark = len(RECORDS)
    return fn(), records("training", mark)


CHAPTERS = ("foundations", "ensembles", "purification", "smoothing", "armor", "drsl")
ORDER = ("standard", "PGD-AT", "TRADES", "DLC ensemble", "AToP", "Gaussian smoothing", "variational smoothing",
         "ARMOR_D (KL)", "DRSL")


def build_defenses(P, train_set, device=None) -> dict[str, Defense]:
    """Train (or load) every defense of the comparison with its chapter's recipe; see the module's docstring.

    Randomized defenses predict with their chapter's number of draws; the attacker differentiates
    ``P.attack_draws`` of them per step (EOT) and each example is scored by ``P.score_repeats`` predictions.
    """
    R = {c: recipe_profile(P, c) for c in CHAPTERS}
    built = {}
    for build in (_single_networks, _ensemble, _purification, _smoothing):
        built.update(build(P, R, train_set, device))
    return {name: built[name] for name in ORDER}


def _single_networks(P, R, train_set, device) -> dict[str, Defense]:
    """Chapter 0's baselines and the one-network defenses of chapters 4 and 5, on chapter 5's schedule
    (ARMOR_D on chapter 4's); chapter 5's "CE" and "PGD-AT" are chapter 0's standard training and PGD-AT."""
    d, f, a = R["drsl"], R["foundations"], R["armor"]
    losses = drsl_losses(d)
    trades = TradesLoss(f.train_eps, beta=f.trades_beta, steps=f.train_steps, alpha=f.train_alpha)
    jobs = [("standard", "drsl", "CE", losses["CE"], d, d.epochs, False),
            ("PGD-AT", "drsl", "PGD-AT", losses["PGD-AT"], d, d.epochs, False),
            ("TRADES", "foundations", "TRADES", trades, d, f.epochs_at, False),
            ("ARMOR_D (KL)", "armor", "ARMOR_D KL", armor_losses(a)["ARMOR_D KL"], a, a.epochs, True),
            ("DRSL", "drsl", "DRSL", losses["DRSL"], d, d.epochs, True)]
    out = {}
    for name, chapter, key, loss, Q, epochs, headline in jobs:   # headline: the defense its chapter checks
        models, tr = _trained(lambda: train_models(Q, train_set, {key: loss}, arch=P.arch, epochs=epochs,
                                                   chapter=chapter, device=device))
        out[name] = Defense(name, chapter, models[key], tr, checked_in_chapter=headline and _is_chapters_own(P, chapter))
    return out


def _ensemble(P, R, train_set, device) -> dict[str, Defense]:
    """Chapter 1's DLC ensemble (pre-trained members, then DLC fine-tuning)."""
    ens, tr = _trained(lambda: train_ensembles(R["ensembles"], train_set, device, names=("DLC",)))
    return {"DLC ensemble": Defense("DLC ensemble", "ensembles", ens["DLC"], tr,
                                    checked_in_chapter=_is_chapters_own(P, "ensembles"))}


def _purification(P, R, train_set, device) -> dict[str, Defense]:
    """Chapter 2's AToP pipeline, predicting as an EOT average over its random transforms."""
    p = R["purification"]
    pur, tr = _trained(lambda: train_purification(p, train_set, device))
    atop = pur["AToP"]
    return {"AToP": Defense("AToP", "purification", EOT(atop, p.eot_draws), tr, attack_model=EOT(atop, P.attack_draws),
                            repeats=P.score_repeats, fixed_model=atop.with_fixed_randomness(P.seed),
                            checked_in_chapter=_is_chapters_own(P, "purification"))}


def _smoothing(P, R, train_set, device) -> dict[str, Defense]:
    """Chapter 3's Gaussian smoothing (Cohen et al.) and variational smoothing at the same sigma, each with its certificate.

    The fifth sanity check attacks what the attacker differentiates with its noise frozen (``P.attack_draws``
    fixed draws, as chapter 2 freezes AToP's transform), not all the prediction's draws frozen: the check asks
    whether exact gradients break the deterministic machinery, and freezing all of a prediction's draws would
    multiply its cost by their ratio (16 / 2 in the quick profile).
    """
    s = R["smoothing"]
    sm, tr = _trained(lambda: train_smoothing(s, train_set, device))
    sigma = s.sigmas[len(s.sigmas) // 2]
    gen = lambda: torch.Generator().manual_seed(P.seed)
    base = sm[f"sigma={sigma:g}"]
    cohen = SmoothedClassifier(base, sigma, s.smooth_draws)
    var = sm["variational"].with_target(sigma)
    cohen_atk, var_atk = fewer_draws(cohen, P.attack_draws), fewer_draws(var, P.attack_draws, s.attack_median_draws)

    def certify_var(x):
        """The chapter's certificate for a sample-wise sigma, selector draws seeded."""
        torch.manual_seed(P.seed)
        return certify_variational(var, x, P.cert_radii, n0=s.n0, n=s.n, alpha=s.alpha,
                                   selector_draws=s.selector_draws, generator=gen())

    return {
        "Gaussian smoothing": Defense(
            "Gaussian smoothing", "smoothing", cohen, [r for r in tr if r["name"] == f"gaussian-{sigma:g}"],
            attack_model=cohen_atk, repeats=P.score_repeats,
            certify=lambda x: certify(base, x, sigma, n0=s.n0, n=s.n, alpha=s.alpha, generator=gen()),
            fixed_model=FixedRandomness(cohen_atk, P.seed)),
        "variational smoothing": Defense(
            "variational smoothing", "smoothing", var, [r for r in tr if r["name"] == "variational"],
            attack_model=var_atk, repeats=P.score_repeats, certify=certify_var, fixed_model=FixedRandomness(var_atk, P.seed)),
    }


def threat_attacks(P, threat: tuple[str, float]) -> dict:
    """The attacks every defense meets at ``threat`` = (norm, eps): PGD on the cross-entropy and on the margin loss.
    Against a randomized defense they run on its attack model (EOT) and never stop early."""
    norm, eps = threat
    kw = dict(eps=eps, steps=P.eval_steps, norm=norm)   # step 2.5 * eps / steps (Madry et al.), at every budget
    steps = f"PGD-{P.eval_steps}"
    return {f"CE-{steps}": partial(pgd, **kw), f"margin-{steps}": partial(pgd, loss="margin", **kw)}


def threat_name(threat) -> str:
    """'l_inf 0.1' for ("linf", 0.1)."""
    norm, eps = threat
    return f"l_{'inf' if norm == 'linf' else '2'} {eps:.3g}"


def aa_name(P) -> str:
    """The AutoAttack cross-check's column name (its attacks depend on the defense: see ``aa_settings``)."""
    return f"AutoAttack, {threat_name(P.aa_threat)}, first {P.aa_n}"


def aa_settings(P, randomized: bool) -> dict:
    """AutoAttack's version and attacks for a deterministic or a randomized defense.

    A randomized defense meets the attacks of AutoAttack's ``rand`` version (APGD-CE and APGD-DLR), run
    on its attack model, whose output already averages ``P.attack_draws`` draws: that average is the
    expectation over transformation the ``rand`` version takes with its own 20 draws per step, so
    running ``rand`` on it would multiply the draws. A deterministic one meets ``P.aa_version``.
    """
    if randomized:
        return dict(version="custom", attacks=P.aa_rand_attacks)
    return dict(version=P.aa_version, attacks=P.aa_attacks, n_target_classes=P.aa_targets)


def aa_description(P, randomized: bool) -> str:
    """What AutoAttack runs on such a defense, in words."""
    s = aa_settings(P, randomized)
    attacks = ", ".join(s["attacks"]) if s["attacks"] else f"the {s['version']} version"
    targets = f", {s['n_target_classes']} target classes" if s.get("n_target_classes") else ""
    eot = f", each step through the {P.attack_draws}-draw average" if randomized else ""
    return f"AutoAttack ({attacks}{targets}{eot}), {threat_name(P.aa_threat)}, first {P.aa_n} examples"


def evaluate_defense(P, defense: Defense, x: torch.Tensor, y: torch.Tensor) -> dict:
    """One defense's ``RobustResult`` at every threat (all of x), and AutoAttack's at ``P.aa_threat`` on the first
    ``P.aa_n`` examples (key ``aa_name(P)``, attacks by ``aa_settings``), each example scored as the defense predicts."""
    torch.manual_seed(P.seed)
    out = {threat_name(t): evaluate(defense.model, x, y, threat_attacks(P, t), setting=f"{defense.name}, {threat_name(t)}",
                                    attack_model=defense.attack_model, repeats=defense.repeats)
           for t in P.threats}
    norm, eps = P.aa_threat
    aa = partial(autoattack, eps=eps, norm=norm, seed=P.seed, **aa_settings(P, defense.randomized))
    out[aa_name(P)] = evaluate(defense.model, x[:P.aa_n], y[:P.aa_n], {"AutoAttack": aa},
                               setting=f"{defense.name}, {aa_name(P)}", attack_model=defense.attack_model,
                               repeats=defense.repeats)
    return out


def worst_case(P, results: dict) -> dict[str, torch.Tensor]:
    """Per threat, each example's worst case over every attack it met (AutoAttack included on the examples it
    ran on): right/wrong, or the smallest probability of being right for a randomized defense."""
    out = {}
    for t in P.threats:
        wc = results[threat_name(t)].worst_case.float().clone()
        if tuple(t) == tuple(P.aa_threat):
            aa = results[aa_name(P)].correct["AutoAttack"].float()
            wc[:len(aa)] = torch.minimum(wc[:len(aa)], aa)
        out[threat_name(t)] = wc
    return out


def training_cost(defense: Defense, standard_flops: float, n_train: int) -> dict:
    """Its recipe's training: epochs per stage, FLOPs in standard-training epochs, and wall time as recorded."""
    flops = sum(h["examples"] * (h.get("flops_per_example") or float("nan")) for r in defense.trainings for h in r["history"])
    return {"stages": ", ".join(f"{r['name']} {r['recipe']['epochs']}" for r in defense.trainings),
            "standard epochs": flops / (standard_flops * n_train),
            "seconds": sum(h["seconds"] for r in defense.trainings for h in r["history"])}


def inference_cost(defense: Defense, x: torch.Tensor, standard_forward: float, repeat: int = 3) -> dict:
    """FLOPs of one prediction in standard forward passes, and milliseconds per image (batch of ``len(x)``)."""
    flops = count_flops(lambda: predict(defense.model, x)) / len(x)
    return {"forward passes": flops / standard_forward,
            "ms per image": 1000 * timeit(lambda: predict(defense.model, x), repeat=repeat) / len(x)}


def standard_costs(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """FLOPs per example of one standard training step (forward and backward) and of one forward pass."""
    train = count_flops(lambda: CrossEntropy()(model, x, y).backward()) / len(x)
    model.zero_grad(set_to_none=True)
    forward = count_flops(lambda: predict(model, x)) / len(x)
    return train, forward


def sanity_report(P, defense: Defense, x: torch.Tensor, y: torch.Tensor):
    """The five gradient-masking checks of EVALUATION.md on the defense at ``P.sanity_threat``."""
    norm, eps = P.sanity_threat
    torch.manual_seed(P.seed)
    return sanity_checks(defense.model, x, y, eps=eps, norm=norm, steps=P.eval_steps, n_queries=P.square_queries,
                         fixed_model=defense.fixed_model, attack_model=defense.attack_model, repeats=defense.repeats)

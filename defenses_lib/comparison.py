"""Chapter 6: every defense of chapters 0-5 trained on the same data and network, under one threat model.

Nothing is re-implemented here: the comparison is a loop over the registry of
:mod:`defenses_lib.defenses`. Each defense is built by its own chapter's ``build`` from that
chapter's profile, in which only the data, the network and the seed (``COMMON``), the comparison's
attack settings and its few recipe overrides are replaced. A checkpoint is named by a hash of
everything that shapes its weights, so a model whose recipe is its chapter's own is that chapter's
checkpoint: loaded if the chapter ran first with the same ``DEFENSES_RUNS``, trained here otherwise.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
from torch import nn

from .attacks import pgd
from .defenses import build
from .defenses.base import Defense
from .defenses.baselines import CrossEntropy
from .evaluation import RobustResult, predict
from .profiles import Profile, get_profile
from .runtime import count_flops, progress, timeit
from .stats import Estimate, accuracy_interval, over_seeds

COMMON = ("dataset", "arch", "n_train", "seed", "augment", "forward_batch")   # what every recipe takes from it
ATTACK_SETTINGS = ("attack_draws", "score_repeats")     # how randomized defenses are attacked and scored
CHECKED = {"foundations": "PGD-AT", "ensembles": "DLC", "purification": "AToP", "armor": "ARMOR_D KL",
           "drsl": "DRSL"}  # the model each chapter runs the sanity checks on


def recipe_profile(P, chapter: str) -> Profile:
    """``chapter``'s own profile of ``P``'s name with ``P``'s data, network, seed, attack settings
    (where the chapter has them) and overrides for it."""
    own = get_profile(chapter, P.name)
    changes = {k: getattr(P, k) for k in COMMON}
    changes.update({k: getattr(P, k) for k in ATTACK_SETTINGS if hasattr(own, k)})
    return own.replace(**changes, **P.overrides.get(chapter, {}))


def is_chapters_own(P, chapter: str) -> bool:
    """Whether ``chapter``'s models here are the chapter's own (the same recipe, whatever the attacks)."""
    own = get_profile(chapter, P.name)
    same_attacks = {k: getattr(own, k) for k in ATTACK_SETTINGS if hasattr(own, k)}
    return recipe_profile(P, chapter).replace(**same_attacks) == own


def build_defenses(P, train_set, device=None) -> dict[str, Defense]:
    """Train (or load) every defense of ``P.compared`` through the registry, named as the tables name them."""
    wanted: dict[str, list[tuple[str, str]]] = {}
    for name, chapter, own_name in P.compared:
        wanted.setdefault(chapter, []).append((name, own_name))
    built = {}
    for chapter, pairs in wanted.items():
        got = build(chapter, recipe_profile(P, chapter), train_set, device, names=[n for _, n in pairs])
        built.update({name: dataclasses.replace(got[own], name=name) for name, own in pairs})
    return {name: built[name] for name, _, _ in P.compared}


def checked_in_chapter(P, defense: Defense) -> bool:
    """Whether the defense's chapter ran the sanity checks on this very model (same recipe)."""
    own = dict((n, o) for n, _, o in P.compared)[defense.name]
    return CHECKED.get(defense.chapter) == own and is_chapters_own(P, defense.chapter)


def threat_attacks(P, threat: tuple[str, float]) -> dict:
    """The attacks every defense meets at ``threat`` = (norm, eps): PGD on the cross-entropy and on the
    margin loss. Against a randomized defense they run on its attack model (EOT), never stopping early."""
    norm, eps = threat
    kw = dict(eps=eps, steps=P.eval_steps, norm=norm)   # step 2.5 * eps / steps (Madry et al.), at every budget
    steps = f"PGD-{P.eval_steps}"
    return {f"CE-{steps}": partial(pgd, **kw), f"margin-{steps}": partial(pgd, loss="margin", **kw)}


def threat_name(threat) -> str:
    """'l_inf 0.1' for ("linf", 0.1)."""
    norm, eps = threat
    return f"l_{'inf' if norm == 'linf' else '2'} {eps:.3g}"


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


def scored(P, defense: Defense, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images a defense is scored on: the first ``P.randomized_n`` for a randomized one
    (when set; its scoring costs many draws), all of them otherwise."""
    n = P.randomized_n if defense.randomized and P.randomized_n is not None else len(y)
    return x[:n], y[:n]


def common(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two per-example outcomes on the test images both were scored on (the first ``min(n)``), for a paired test."""
    n = min(len(a), len(b))
    return a[:n], b[:n]


def evaluate_defense(P, defense: Defense, x: torch.Tensor, y: torch.Tensor) -> dict[str, RobustResult]:
    """One defense's result at every threat on the images it is scored on (:func:`scored`); at
    ``P.aa_threat`` merged with AutoAttack's (so that threat's worst case is over every attack), for the
    seeds of ``P.aa_seeds``. When AutoAttack runs on fewer images (the first ``P.aa_n``), the merged result
    is a threat of its own, "<threat> + AutoAttack (first <n>)", and the threat's keeps every image."""
    torch.manual_seed(P.seed)
    x, y = scored(P, defense, x, y)
    out = {}
    for t in P.threats:
        out[threat_name(t)] = defense.evaluate(x, y, threat_attacks(P, t), setting=f"{defense.name}, {threat_name(t)}")
    if P.aa_seeds is not None and P.seed not in P.aa_seeds:
        return out
    norm, eps = P.aa_threat
    aa = defense.autoattack(x, y, eps, norm, n=P.aa_n, seed=P.seed, **aa_settings(P, defense.randomized))
    key = threat_name(P.aa_threat)
    if aa.n >= out[key].n:
        out[key] = out[key].merge(aa)
    else:   # AutoAttack on a prefix: beside the threat's own result, which keeps every image
        out[f"{key} + AutoAttack (first {aa.n})"] = out[key].merge(aa)
    return out


def certify_defense(P, defense: Defense, x: torch.Tensor, y: torch.Tensor) -> tuple:
    """A smoothed defense's certificates on the images it is scored on (the first ``P.certified_n``, if set),
    and per radius of ``P.cert_radii`` whether each image is certified there (correct, with a radius at
    least that)."""
    x, y = scored(P, defense, x, y)
    x, y = x[:P.certified_n], y[:P.certified_n]   # all of them when None
    cert = defense.certify(x)
    return cert, {r: cert.certified(y, r) for r in P.cert_radii}


def detail_table(results: dict[str, dict[str, RobustResult]]) -> dict[str, dict[str, Estimate]]:
    """{defense: {"clean", "<threat>: <attack>", ..., "<threat>: worst case"}} with 95% intervals."""
    table = {}
    for name, res in results.items():
        row = {"clean": next(iter(res.values())).intervals()["clean"]}
        for t, r in res.items():
            row.update({f"{t}: {a}": e for a, e in r.intervals().items() if a != "clean"})
        table[name] = row
    return table


def summary_table(results, certified: dict, costs: dict, radii) -> dict[str, dict]:
    """Per defense: clean, the worst case at each threat, certified accuracy (or '–') and the costs."""
    table = {}
    for name, res in results.items():
        row = {"clean": next(iter(res.values())).intervals()["clean"]}
        row.update({f"worst case, {t}": accuracy_interval(r.worst_case) for t, r in res.items()})
        row.update({f"certified, l_2 r = {r:g}": accuracy_interval(certified[name][r]) if name in certified
                    else "–" for r in radii})
        row["training (standard epochs)"] = costs[name]["standard epochs"]
        row["prediction (forward passes)"] = costs[name]["forward passes"]
        table[name] = row
    return table


def reference_table(runs, radii) -> dict[str, dict]:
    """:func:`summary_table`'s accuracies over the stored training seeds (``reference.load``): per defense,
    clean, the worst case at each threat and certified accuracy, each an OverSeeds on the images every
    seed scored."""
    table = {}
    for name in runs[0]["results"]:
        res = [run["results"][name] for run in runs]
        row = {"clean": over_seeds([next(iter(r.values())).correct["clean"] for r in res])}
        row.update({f"worst case, {t}": over_seeds([r[t].worst_case for r in res if t in r]) for t in res[0]})
        certified = [run.kept.get("certified", {}).get(name) for run in runs]
        row.update({f"certified, l_2 r = {r:g}": over_seeds([c[r] for c in certified]) if certified[0] else "–"
                    for r in radii})
        table[name] = row
    return table


def seed_outcomes(runs, names, threat: str, outcome: str = "worst case") -> dict[str, list[torch.Tensor]]:
    """Per defense of ``names``, each stored seed's per-example ``outcome`` ("worst case" or "clean") at
    ``threat``, cut to the test images every one of them was scored on: the inputs of a claim over seeds."""
    if outcome not in ("worst case", "clean"):
        raise ValueError(f"outcome must be 'worst case' or 'clean', got {outcome!r}")
    per = {}
    for n in names:
        missing = [run.seed for run in runs if threat not in run["results"].get(n, {})]
        if missing:
            raise KeyError(f"no result for {n!r} at {threat!r} in the stored seeds {missing}")
        res = [run["results"][n][threat] for run in runs]
        per[n] = [r.worst_case if outcome == "worst case" else r.correct["clean"] for r in res]
    k = min(len(t) for seeds in per.values() for t in seeds)
    return {n: [t[:k] for t in seeds] for n, seeds in per.items()}


def training_cost(defense: Defense, standard_flops: float, n_train: int, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Its recipe's training: epochs per stage, FLOPs in standard-training epochs (each stage's step
    counted on (x, y)), and wall time as recorded."""
    flops = sum(t.examples * t.flops_per_example(x, y) for t in defense.trainings)
    return {"stages": ", ".join(f"{t.record['name']} {t.record['recipe']['epochs']}" for t in defense.trainings),
            "standard epochs": flops / (standard_flops * n_train), "seconds": defense.training_seconds}


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


def costs(P, defenses: dict[str, Defense], x: torch.Tensor, y: torch.Tensor) -> dict[str, dict]:
    """Every defense's training and inference cost in units of the standard model's."""
    xb, yb = x[:P.cost_batch], y[:P.cost_batch]
    std_train, std_forward = standard_costs(defenses["standard"].model, xb, yb)
    return {name: {**training_cost(d, std_train, P.n_train, xb, yb), **inference_cost(d, x, std_forward)}
            for name, d in progress(defenses.items(), "costs")}


def sanity_report(P, defense: Defense, x: torch.Tensor, y: torch.Tensor):
    """The five gradient-masking checks on the defense at ``P.sanity_threat``."""
    norm, eps = P.sanity_threat
    return defense.sanity_checks(x, y, eps, norm, steps=P.eval_steps, n_queries=P.square_queries, seed=P.seed)

"""Every chapter's settings at each scale, as frozen, typed profiles with a line on each field.

``quick`` runs every chapter on real data on a 2-core CPU in minutes (what strict nbval
re-executes); ``reference`` is the quick recipes evaluated at a scale that resolves the chapters'
claims (1,000 test images, 500 for a randomized defense, the standard AutoAttack), run headless for
each of three training seeds and stored under ``results/<chapter>/reference/``; ``paper`` is the
papers' scale, for a GPU. Both are written as their changes from ``quick``.
A chapter reads its profile with ``get_profile("chapter")``; the profile's name comes from the
argument, else the ``DEFENSES_PROFILE`` environment variable, else ``quick``; ``DEFENSES_SEED``
(set by the runner's ``--seed``) replaces its seed. Any field can be changed for one run,
``get_profile("armor", seed=1)``; an unknown name or a value of the wrong type is an error.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
import warnings
from dataclasses import MISSING, dataclass, field, fields

from .checks import check_choice

PROFILE_ENV = "DEFENSES_PROFILE"
SEED_ENV = "DEFENSES_SEED"   # the training seed of a run (the runner's --seed)


def setting(doc: str, default=MISSING, factory=MISSING):
    """A profile field with its one-line description (``factory`` for a dict default)."""
    return field(default=default, default_factory=factory, metadata={"doc": doc})


def _matches(value, hint) -> bool:
    """Whether ``value`` has the (simple) type ``hint``: int, float, str, bool, tuples, dicts, unions."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Frozen, typed settings with a description per field; ``replace`` makes a changed copy."""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            if not _matches(value, hints[f.name]):
                expected = getattr(hints[f.name], "__name__", str(hints[f.name]))
                raise ValueError(f"{type(self).__name__}.{f.name} must be {expected}, got {value!r}")

    def replace(self, **changes):
        """A copy with ``changes``; an unknown name is an error that lists the known ones."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise ValueError(f"{type(self).__name__} has no setting {', '.join(unknown)}; "
                             f"its settings are {', '.join(f.name for f in fields(self))}")
        return dataclasses.replace(self, **changes)

    def changes(self, other: "Settings") -> dict:
        """The fields whose value differs from ``other``'s: {name: (other's, this one's)}."""
        return {f.name: (getattr(other, f.name), getattr(self, f.name)) for f in fields(self)
                if getattr(other, f.name) != getattr(self, f.name)}

    def docs(self) -> dict[str, str]:
        """Each field's one-line description."""
        return {f.name: f.metadata.get("doc", "") for f in fields(self)}

    def __str__(self) -> str:
        width = max(len(f.name) for f in fields(self))
        return "\n".join(f"{k:<{width}}  {getattr(self, k)!s:<24} {doc}" for k, doc in self.docs().items())


@dataclass(frozen=True, kw_only=True)
class Profile(Settings):
    """What every chapter sets: the data, the network, the training schedule and the evaluation's size."""

    name: str = setting("this profile's name", "quick")
    dataset: str = setting("the data set (see data.load_dataset)", "mnist")
    arch: str = setting("the network (see models.build_model)", "mnist_cnn")
    n_train: int = setting("training images, a class-balanced subset", 6_000)
    n_test: int = setting("test images the attacks are scored on", 200)
    seed: int = setting("seed of the subsets, the initial weights, the batch order and the attacks", 0)
    test_seed: int | None = setting("seed of the test subset (None: seed + 1)", None)
    batch_size: int = setting("training batch size", 128)
    optimizer: str = setting("'adam' or 'sgd'", "adam")
    lr: float = setting("learning rate", 1e-3)
    momentum: float = setting("SGD momentum", 0.0)
    weight_decay: float = setting("weight decay", 0.0)
    milestones: tuple[int, ...] = setting("epochs where lr is multiplied by 0.1", ())
    augment: str = setting("training augmentation: 'none' or 'crop-flip' (4-pixel crop, horizontal flip)", "none")
    forward_batch: int | None = setting("most images one forward pass of a randomized defense sees (None: all)",
                                        None)
    eval_steps: int = setting("PGD steps of the evaluation attacks", 40)
    aa_n: int = setting("test images AutoAttack runs on (the first ones)", 100)
    sanity_n: int = setting("test images of the gradient-masking sanity checks", 100)
    square_queries: int = setting("queries of the black-box Square attack (sanity check 4)", 300)

    def schedule(self) -> dict:
        """The training loop's keyword arguments (see ``training.train``)."""
        return dict(batch_size=self.batch_size, optimizer=self.optimizer, lr=self.lr, momentum=self.momentum,
                    weight_decay=self.weight_decay, milestones=self.milestones, seed=self.seed,
                    augment=self.augment)


@dataclass(frozen=True, kw_only=True)
class LinfEvaluation(Settings):
    """l_inf evaluation with PGD and AutoAttack at a few budgets."""

    eval_eps: tuple[float, ...] = setting("l_inf budgets of the tables", (0.1, 0.3))
    eval_step: float = setting("PGD step size of the evaluation attacks", 0.01)
    curve_eps: tuple[float, ...] = setting("l_inf budgets of the accuracy-vs-eps curves", (0.0, 0.1, 0.2, 0.3))
    aa_models: tuple[str, ...] = setting("models AutoAttack cross-checks", ())
    aa_version: str = setting("AutoAttack version: 'standard', 'rand' or 'custom'", "custom")
    aa_attacks: tuple[str, ...] | None = setting("AutoAttack's attacks for version 'custom'", ("apgd-ce", "apgd-t"))
    aa_targets: int | None = setting("target classes of APGD-T (None: the version's own, 9)", 2)

    def autoattack_settings(self) -> dict:
        """``evaluation.autoattack``'s version, attacks and target classes from this profile."""
        return dict(version=self.aa_version, attacks=self.aa_attacks, n_target_classes=self.aa_targets)


@dataclass(frozen=True, kw_only=True)
class Foundations(LinfEvaluation, Profile):
    """Chapter 0: standard training, PGD-AT and TRADES."""

    epochs_standard: int = setting("epochs of standard training", 2)
    epochs_at: int = setting("epochs of PGD-AT and TRADES", 2)
    train_eps: float = setting("l_inf budget of adversarial training", 0.1)
    train_steps: int = setting("PGD steps of adversarial training", 3)
    train_step: float = setting("PGD step size of adversarial training", 0.04)
    trades_weight: float = setting("TRADES' weight of the KL term (the paper's beta)", 3.0)


@dataclass(frozen=True, kw_only=True)
class Ensembles(LinfEvaluation, Profile):
    """Chapter 1: ensembles of low-curvature, dispersed members."""

    members: int = setting("sub-models per ensemble", 3)
    epochs_pretrain: int = setting("epochs of independent pre-training", 1)
    epochs_finetune: int = setting("epochs of fine-tuning with each loss", 1)
    gal_coeff: float = setting("GAL's weight of the gradient-alignment term", 0.5)
    dlc_curvature_weight: float = setting("DLC's weight of ||Hz||^2 (alpha in DLCLoss)", 4.0)
    dlc_dispersion_weight: float = setting("DLC's weight of the HVPs' |cos| (beta in DLCLoss)", 1.0)
    dlc_gradient_weight: float = setting("DLC's weight of the gradients' |cos| (gamma; 0: off)", 0.0)
    dlc_h: tuple[float, ...] = setting("finite-difference step h, one per epoch (the last repeats)", (1.0,))
    dlc_direction: str = setting("direction z of the HVP: 'sign' or 'random'", "sign")
    dlc_shared: bool = setting("one direction z for all members", True)
    dlc_abs: bool = setting("penalise |cos| rather than cos", True)
    hvp_n: int = setting("test images of the HVP-error study", 64)
    hvp_h_grid: tuple[float, ...] = setting("h values of the HVP-error study",
                                            (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0))
    timing_repeat: int = setting("timing rounds", 5)
    curvature_n: int = setting("test images of the curvature table", 100)
    transfer_eps: float = setting("l_inf budget of the transfer study", 0.1)
    transfer_steps: int = setting("PGD steps of the transfer study", 20)
    transfer_n: int = setting("test images of the transfer study", 100)
    explorer_n: int = setting("images in the transfer explorer", 4)
    explorer_eps: tuple[float, ...] = setting("budgets in the transfer explorer", (0.1, 0.2))


@dataclass(frozen=True, kw_only=True)
class AttackStrength(Settings):
    """The attack-strength sweep of a randomized defense (see ``strength.strength_sweep``)."""

    strength_n: int = setting("test images of the attack-strength sweep (the first ones)", 20)
    strength_draws: tuple[int, ...] = setting("EOT draws per step the sweep tries", (1, 2, 4, 8))
    strength_steps: tuple[int, ...] = setting("PGD steps the sweep tries (the draws at the first)", (40, 80))
    strength_tol: float = setting("how far above the strongest attack a plateau may sit", 0.03)


@dataclass(frozen=True, kw_only=True)
class Purification(AttackStrength, LinfEvaluation, Profile):
    """Chapter 2: AToP, a purifier behind random transforms, adversarially fine-tuned."""

    epochs_classifier: int = setting("epochs of the classifier's standard training", 2)
    purifier_width: int = setting("channels of the U-Net's first level", 16)
    epochs_pretrain: int = setting("epochs of the purifier's L1 pre-training", 3)
    epochs_finetune: int = setting("epochs of AToP fine-tuning", 1)
    lr_finetune: float = setting("learning rate of AToP fine-tuning", 1e-4)
    transform: str = setting("random transform: 'rt1', 'rt2' or 'rt3'", "rt2")
    block: int = setting("side of a masked block, pixels", 4)
    missing_rate: float = setting("fraction of blocks masked", 0.25)
    noise_sigma: float = setting("std of the transform's Gaussian noise", 0.25)
    n_masks: int = setting("masks of RT3", 4)
    ft_eps: float = setting("l_inf budget of the fine-tuning attack", 0.3)
    ft_ce_weight: float = setting("weight of the classifier's cross-entropy in AToP's loss (lambda)", 0.1)
    ft_attack: str = setting("fine-tuning attack: 'fgsm' or 'pgd'", "fgsm")
    ft_victim: str = setting("what it attacks: 'classifier' or 'pipeline'", "classifier")
    ft_l1_target: str = setting("the L1 term's target: 'clean' or 'adversarial'", "clean")
    eot_draws: int = setting("transform draws a prediction averages", 8)
    attack_draws: int = setting("transform draws the attacker averages per step (EOT)", 2)
    score_repeats: int = setting("predictions each example is scored by", 4)
    l2_eps: float = setting("l_2 budget of the unseen-threat attack", 2.0)
    classifier_steps: int = setting("PGD steps of the classifier-only attack", 40)
    explorer_rates: tuple[float, ...] = setting("missing rates in the explorer", (0.0, 0.25, 0.5))
    explorer_sigmas: tuple[float, ...] = setting("noise levels in the explorer", (0.0, 0.25, 0.5))


@dataclass(frozen=True, kw_only=True)
class Smoothing(AttackStrength, Profile):
    """Chapter 3: Gaussian smoothing and variational (sample-wise) smoothing, attacked and certified."""

    epochs: int = setting("training epochs of every model", 3)
    sigmas: tuple[float, ...] = setting("noise levels of the fixed-sigma models and the targets", (0.12, 0.25, 0.5))
    sigma_t_range: tuple[float, float] = setting("range the training targets sigma_t are drawn from", (0.12, 0.5))
    selector_width: int = setting("channels of the noise-level selector", 16)
    sigma_min: float = setting("smallest noise level the selector can output", 0.1)
    sigma_max: float = setting("largest noise level the selector can output", 0.6)
    levels: tuple[float, ...] = setting("levels the selected sigma is rounded to", (0.12, 0.25, 0.5))
    sigma_h: float = setting("noise of the selector's median smoothing", 0.25)
    train_draws: int = setting("noise draws per training image", 4)
    selector_weight: float = setting("weight pulling log sigma(x) to log sigma_t (the loss's beta)", 1.0)
    selector_jitter: float = setting("std of the log-normal factor on sigma(x) in training (tau)", 0.1)
    median_draws: int = setting("selector draws of the median at prediction", 32)
    smooth_draws: int = setting("noise draws a prediction averages", 16)
    cert_n0: int = setting("CERTIFY's draws to pick the class (Cohen's n0)", 100)
    cert_n: int = setting("CERTIFY's draws to bound its probability (Cohen's n)", 1_000)
    cert_failure_prob: float = setting("each certificate's failure probability (Cohen's alpha)", 0.001)
    selector_draws: int = setting("selector draws bounding its percentiles in the certificate", 2_000)
    radii: tuple[float, ...] = setting("l_2 radii of the certified-accuracy curves",
                                       (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5))
    l2_eps: tuple[float, ...] = setting("l_2 budgets of the attacks", (1.0, 2.0))
    linf_eps: tuple[float, ...] = setting("l_inf budgets of the attacks", (0.1,))
    attack_draws: int = setting("noise draws the attacker averages per step (EOT)", 4)
    attack_median_draws: int = setting("selector draws of the attacker's median", 8)
    score_repeats: int = setting("predictions each example is scored by", 4)


@dataclass(frozen=True, kw_only=True)
class ArmorVariant(Settings):
    """One ARMOR_D loss: the divergence, its budget, the transport cost and the inner ascent."""

    divergence: str = setting("'kl' or 'alpha'", "kl")
    order: float = setting("order of the alpha-divergence (> 1)", 2.0)
    budget: float = setting("the divergence budget eps", 3e-3)
    cost_weight: float = setting("transport cost's weight L", 0.01)
    cost_norm: float = setting("transport cost's norm p", 2.0)
    cost_power: float = setting("transport cost's power q", 1.0)
    natural_weight: float = setting("weight t of the natural cross-entropy in the mix", 0.5)
    dual_lr: float = setting("Adam learning rate of lambda and nu", 2e-3)
    softplus_beta: float = setting("beta of the softplus that resets a negative lambda", 1.0)
    ascent_steps: int = setting("steps of the inner ascent", 3)
    ascent_step: float = setting("step size of the inner ascent", 0.0667)


@dataclass(frozen=True, kw_only=True)
class BinaryFeatures(Settings):
    """Chapter 4's binary-feature study (binarised MNIST, a stand-in for malware features)."""

    arch: str = setting("the network", "mlp")
    threshold: float = setting("pixel threshold of the binarisation", 0.5)
    n_train: int = setting("training images", 6_000)
    n_test: int = setting("test images", 500)
    epochs: int = setting("training epochs", 3)
    optimizer: str = setting("'adam' or 'sgd'", "adam")
    lr: float = setting("learning rate", 1e-3)
    train_steps: int = setting("rFGSM^k steps in training", 10)
    train_step: float = setting("rFGSM^k step size in training", 0.02)
    attack_steps: int = setting("rFGSM^k steps of the evaluation attack", 50)
    attack_step: float = setting("rFGSM^k step size of the evaluation attack", 0.004)
    attack_draws: int = setting("random restarts of the evaluation attack (the best is kept)", 5)
    armor: ArmorVariant = setting("ARMOR_D on binary features (its ascent: train_steps, train_step)",
                                  ArmorVariant())


@dataclass(frozen=True, kw_only=True)
class Armor(LinfEvaluation, Profile):
    """Chapter 4: ARMOR_D, distributionally robust training with OT-regularized divergences."""

    epochs: int = setting("training epochs of every model", 2)
    models: tuple[str, ...] = setting("the models trained, in order",
                                      ("natural", "FGSM-AT", "PGD-AT", "ARMOR_D KL", "ARMOR_D alpha"))
    train_eps: float = setting("l_inf budget of FGSM-AT and PGD-AT", 0.1)
    train_steps: int = setting("PGD steps of PGD-AT", 3)
    train_step: float = setting("PGD step size of PGD-AT", 0.04)
    matched_eps: float = setting("l_inf budget of 'PGD-AT matched': the radius ARMOR_D's ascent reaches", 0.2)
    armor_clip: bool = setting("keep transported pixels in [0, 1]", False)
    armor_positivity: str = setting("how lambda stays positive: 'softplus' or 'reset'", "softplus")
    armor: dict = setting("the ARMOR_D variants, by model name", factory=dict)
    sanity_model: str = setting("the model the sanity checks run on", "ARMOR_D KL")
    weights_n: int = setting("training images of the implicit-weights study", 500)
    binary: BinaryFeatures = setting("the binary-feature study", BinaryFeatures())


@dataclass(frozen=True, kw_only=True)
class Drsl(LinfEvaluation, Profile):
    """Chapter 5: DRSL, suppressing the spread of the wrong-class outputs."""

    epochs: int = setting("training epochs of every model", 2)
    ce_weight: float = setting("weight a of the cross-entropy", 1.0)
    spread_weight: float = setting("weight b of the wrong-class spread", 1.152)
    spread_weight_sweep: tuple[float, ...] = setting("values of b trained for the trade-off", (0.1, 1.152, 10.0))
    space: str = setting("spread of the 'logit' or the 'prob' values", "logit")
    reduction: str = setting("'mean' (per sample) or 'batch_sum' (the authors')", "mean")
    center: str = setting("centre of the spread: 'wrong' or 'authors'", "wrong")
    train_eps: float = setting("l_inf budget of the PGD-AT baseline", 0.1)
    train_steps: int = setting("PGD steps of the PGD-AT baseline", 3)
    train_step: float = setting("PGD step size of the PGD-AT baseline", 0.04)
    corr_n: int = setting("test images of the correlation study", 1_000)
    corr_eps: float = setting("l_inf budget of the correlation study's attack", 0.1)
    corr_boot: int = setting("bootstrap draws of the correlation intervals", 1_000)
    targets: int = setting("target classes of the targeted attack", 2)
    timing_repeat: int = setting("timing rounds", 15)
    explorer_n: int = setting("images in the softmax explorer", 4)


@dataclass(frozen=True, kw_only=True)
class Comparison(Profile):
    """Chapter 6: every defense on the same data and network, under one threat model."""

    compared: tuple[tuple[str, str, str], ...] = setting(
        "(name in the tables, chapter, the chapter's name for it), in order", (
            ("standard", "foundations", "standard"), ("PGD-AT", "foundations", "PGD-AT"),
            ("TRADES", "foundations", "TRADES"), ("DLC ensemble", "ensembles", "DLC"),
            ("AToP", "purification", "AToP"), ("Gaussian smoothing", "smoothing", "sigma = 0.25"),
            ("variational smoothing", "smoothing", "variational, sigma_t = 0.25"),
            ("ARMOR_D (KL)", "armor", "ARMOR_D KL"), ("DRSL", "drsl", "DRSL")))
    overrides: dict = setting("recipe settings changed in a chapter's profile, by chapter",
                              factory=lambda: {"smoothing": {"sigmas": (0.25,)}})
    threats: tuple[tuple[str, float], ...] = setting("(norm, eps) of each threat",
                                                     (("linf", 0.1), ("linf", 0.3), ("l2", 2.0)))
    attack_draws: int = setting("draws a randomized defense's attacker averages per step", 2)
    score_repeats: int = setting("predictions each example of a randomized defense is scored by", 2)
    randomized_n: int | None = setting("test images a randomized defense is scored and certified on (None: all)",
                                       None)
    certified_n: int | None = setting("test images certified (the first; None: all a defense is scored on)", None)
    aa_threat: tuple[str, float] = setting("(norm, eps) of the AutoAttack cross-check", ("linf", 0.1))
    aa_seeds: tuple[int, ...] | None = setting("training seeds whose models meet AutoAttack (None: every seed)",
                                               None)
    aa_version: str = setting("AutoAttack version on deterministic defenses", "custom")
    aa_attacks: tuple[str, ...] | None = setting("its attacks for version 'custom'", ("apgd-ce", "apgd-t"))
    aa_targets: int | None = setting("APGD-T's target classes (None: 9)", 2)
    aa_rand_attacks: tuple[str, ...] = setting("AutoAttack's attacks on randomized defenses", ("apgd-ce", "apgd-dlr"))
    cert_radii: tuple[float, ...] = setting("l_2 radii of the certified accuracy", (0.25, 0.5))
    sanity_threat: tuple[str, float] = setting("(norm, eps) of the sanity checks", ("linf", 0.1))
    cost_batch: int = setting("batch of the FLOP counts", 128)


_KL = ArmorVariant(divergence="kl", budget=3e-3, cost_weight=0.01, cost_norm=2.0, cost_power=1.0,
                   natural_weight=0.5, dual_lr=2e-3, ascent_steps=3, ascent_step=0.0667)
_ALPHA = _KL.replace(divergence="alpha", order=3.0, budget=0.07, cost_weight=0.2, cost_norm=float("inf"),
                     cost_power=1.5, dual_lr=1.6e-3)

QUICK: dict[str, Profile] = {
    "foundations": Foundations(n_test=400, aa_models=("PGD-AT",), sanity_n=100,
                               square_queries=500),
    "ensembles": Ensembles(aa_models=("independent", "DLC"), aa_n=60, sanity_n=60, square_queries=500),
    "purification": Purification(n_test=100, curve_eps=(0.0, 0.1, 0.3), aa_n=30, aa_attacks=("apgd-ce", "apgd-dlr"),
                                 aa_targets=None, sanity_n=50,
                                 square_queries=200),
    "smoothing": Smoothing(arch="tiny_cnn", n_train=12_000, n_test=100, lr=2e-3, aa_n=30, sanity_n=40,
                           square_queries=200),
    "armor": Armor(batch_size=100, aa_models=("PGD-AT", "ARMOR_D KL"), armor={"ARMOR_D KL": _KL,
                                                                           "ARMOR_D alpha": _ALPHA},
                   binary=BinaryFeatures(armor=_KL)),
    "drsl": Drsl(aa_models=("CE", "DRSL")),
    "comparison": Comparison(n_test=50, aa_n=50, sanity_n=50),
}

# CIFAR-10 as the papers train on it: all 50,000 images, random crops and flips; EOT and smoothing's
# draws go through the network 2,048 images at a time, so an attack's memory stays bounded.
_STRENGTH = dict(strength_n=100, strength_draws=(1, 2, 4, 8, 16, 32), strength_steps=(40, 100, 200))
_CIFAR = dict(name="paper", dataset="cifar10", n_train=50_000, augment="crop-flip", forward_batch=2_048)
PAPER: dict[str, Profile] = {
    "foundations": QUICK["foundations"].replace(
        name="paper", n_train=60_000, n_test=10_000, epochs_standard=10, epochs_at=30, train_eps=0.3,
        train_steps=40, train_step=0.01, trades_weight=6.0, eval_steps=100,
        curve_eps=(0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4), aa_models=("PGD-AT", "TRADES"),
        aa_n=1_000, aa_version="standard", aa_attacks=None, aa_targets=None, sanity_n=1_000,
        square_queries=5_000),
    "ensembles": QUICK["ensembles"].replace(
        **_CIFAR, arch="resnet20", n_test=1_000, epochs_pretrain=100, epochs_finetune=20,
        dlc_h=(0.025, 0.1, 0.2, 0.45, 0.75), hvp_n=128, timing_repeat=10, curvature_n=1_000,
        transfer_eps=8 / 255, transfer_n=1_000, eval_eps=(2 / 255, 8 / 255), eval_steps=100,
        eval_step=0.5 / 255, curve_eps=(0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255),
        aa_models=("independent", "GAL", "DLC"), aa_n=1_000, aa_version="standard", aa_attacks=None,
        aa_targets=None, sanity_n=500, square_queries=5_000, explorer_n=6,
        explorer_eps=(2 / 255, 4 / 255, 8 / 255)),
    "purification": QUICK["purification"].replace(
        **_CIFAR, arch="resnet18", n_test=510, epochs_classifier=100, purifier_width=64,
        epochs_pretrain=100, epochs_finetune=20, ft_eps=8 / 255, ft_ce_weight=0.05, eot_draws=20,
        attack_draws=20, eval_steps=200, eval_eps=(4 / 255, 8 / 255),
        curve_eps=(0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255), l2_eps=0.5, classifier_steps=100,
        aa_n=510, aa_version="rand", aa_attacks=None, sanity_n=200, square_queries=5_000, **_STRENGTH),
    "smoothing": QUICK["smoothing"].replace(
        **_CIFAR, arch="resnet18", n_test=500, lr=1e-3, epochs=90, sigmas=(0.12, 0.25, 0.5, 1.0),
        sigma_t_range=(0.12, 1.0), selector_width=32, sigma_max=1.2, levels=(0.12, 0.25, 0.5, 1.0),
        train_draws=8, median_draws=100, smooth_draws=32, cert_n=100_000, selector_draws=10_000,
        l2_eps=(0.25, 0.5), linf_eps=(2 / 255, 8 / 255), eval_steps=100, attack_draws=20,
        attack_median_draws=32, aa_n=500, sanity_n=200, square_queries=5_000, **_STRENGTH),
    "armor": QUICK["armor"].replace(
        name="paper", n_train=60_000, n_test=10_000, optimizer="sgd", lr=0.1, epochs=10, milestones=(5,),
        armor={"ARMOR_D KL": _KL.replace(ascent_steps=20, ascent_step=0.01),
               "ARMOR_D alpha": _ALPHA.replace(ascent_steps=40, ascent_step=0.01)},
        train_steps=20, train_step=0.01, curve_eps=(0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4),
        aa_models=("PGD-AT", "ARMOR_D KL", "ARMOR_D alpha"), aa_n=1_000, aa_version="standard",
        aa_attacks=None, aa_targets=None, sanity_n=1_000, square_queries=5_000, weights_n=5_000,
        binary=QUICK["armor"].binary.replace(n_train=60_000, n_test=10_000, epochs=10, train_steps=50,
                                             train_step=0.004, attack_draws=10)),
    "drsl": QUICK["drsl"].replace(
        **_CIFAR, arch="resnet18", n_test=1_000, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4,
        milestones=(100, 150), epochs=200, train_eps=8 / 255, train_steps=10, train_step=2 / 255,
        corr_n=10_000, corr_eps=2 / 255, eval_eps=(2 / 255, 8 / 255), eval_steps=100,
        eval_step=0.5 / 255, targets=9, curve_eps=(0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255),
        aa_models=("CE", "DRSL", "PGD-AT"), aa_n=1_000, aa_version="standard", aa_attacks=None,
        aa_targets=None, sanity_n=500, square_queries=5_000, timing_repeat=50, explorer_n=6),
    "comparison": QUICK["comparison"].replace(
        **_CIFAR, arch="resnet18", n_test=1_000, threats=(("linf", 2 / 255), ("linf", 8 / 255), ("l2", 0.5)),
        eval_steps=100, attack_draws=20, score_repeats=4, aa_threat=("linf", 8 / 255), aa_version="standard",
        aa_attacks=None, aa_targets=None, aa_n=1_000, sanity_threat=("linf", 8 / 255), sanity_n=500,
        square_queries=5_000),
}

# The quick recipes at a scale that resolves the claims, for each of three training seeds on the same
# test images (test_seed 1, the quick run's): 1,000 test images, 500 for a randomized defense's costly
# scoring, the standard AutoAttack; randomized defenses attacked at the plateau chapters 2 and 3 measured.
_REF = dict(name="reference", test_seed=1)
_REF_AA = dict(aa_version="standard", aa_attacks=None, aa_targets=None, square_queries=5_000)
REFERENCE: dict[str, Profile] = {
    "foundations": QUICK["foundations"].replace(**_REF, **_REF_AA, n_test=1_000, aa_n=1_000, sanity_n=500),
    "ensembles": QUICK["ensembles"].replace(**_REF, **_REF_AA, n_test=1_000, aa_n=1_000, sanity_n=500,
                                            curvature_n=1_000, transfer_n=1_000),
    "purification": QUICK["purification"].replace(**_REF, n_test=500, aa_n=500, sanity_n=200, square_queries=5_000,
                                                  strength_n=100),
    "smoothing": QUICK["smoothing"].replace(**_REF, n_test=500, cert_n=10_000, selector_draws=10_000, aa_n=500,
                                            sanity_n=200, square_queries=5_000, strength_n=100),
    "armor": QUICK["armor"].replace(**_REF, **_REF_AA, n_test=1_000, aa_n=1_000, sanity_n=500, models=(
        *QUICK["armor"].models, "ARMOR_D KL uniform", "PGD-AT matched")),
    "drsl": QUICK["drsl"].replace(**_REF, **_REF_AA, n_test=1_000, aa_n=1_000, sanity_n=500),
    "comparison": QUICK["comparison"].replace(**_REF, **_REF_AA, n_test=1_000, randomized_n=500, certified_n=200,
                                              aa_n=100, aa_seeds=(0,), sanity_n=200),
}

PROFILES: dict[str, dict[str, Profile]] = {c: {"quick": QUICK[c], "reference": REFERENCE[c], "paper": PAPER[c]}
                                           for c in QUICK}


def register_profiles(chapter: str, **profiles: Profile) -> None:
    """Add a new chapter's profiles (``quick=..., paper=...``), for a defense added to the book."""
    if "quick" not in profiles:
        raise ValueError(f"a chapter needs at least a 'quick' profile, got {sorted(profiles)}")
    PROFILES[chapter] = dict(profiles)


def get_profile(chapter: str, name: str | None = None, **changes) -> Profile:
    """``chapter``'s profile ``name`` (default: $DEFENSES_PROFILE, else 'quick'), with ``changes``
    (the seed, unless given, from $DEFENSES_SEED when it is set)."""
    name = name or os.environ.get(PROFILE_ENV, "quick")
    check_choice("chapter", chapter, sorted(PROFILES))
    check_choice("profile", name, sorted(PROFILES[chapter]))
    if os.environ.get(SEED_ENV):
        changes.setdefault("seed", _seed_from_env())
    if name == "paper":
        _warn_on_a_cpu(chapter)
    return PROFILES[chapter][name].replace(**changes)


def _seed_from_env() -> int:
    """The training seed $DEFENSES_SEED names (a non-negative integer)."""
    value = os.environ[SEED_ENV]
    if not value.isdigit():
        raise ValueError(f"{SEED_ENV} must be a non-negative integer, got {value!r}")
    return int(value)


def _warn_on_a_cpu(chapter: str) -> None:
    """Warn that a paper profile is meant for a GPU, with the stored estimate of what it costs here."""
    from . import estimate
    from .runtime import pick_device, stored_results

    if estimate.active() or pick_device().type != "cpu":
        return
    stored = stored_results("estimates", key="chapter").get(chapter)
    cost = (f"estimated at {estimate.duration(stored['summary']['CPU seconds'])} on a 2-core CPU and "
            f"{estimate.duration(stored['summary']['GPU seconds'])} on one GPU (results/estimates/{chapter}.json)"
            if stored else "not estimated yet")
    warnings.warn(f"the paper profile of {chapter} is meant for a GPU and this machine has none: a whole run is "
                  f"{cost}; `python -m defenses_lib.run {chapter} --profile paper --estimate` measures it here",
                  stacklevel=3)

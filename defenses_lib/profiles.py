"""The two scales of every chapter: ``quick`` (real data, a 2-core CPU, minutes) and ``paper`` (a GPU).

A chapter picks its settings with ``get_profile("chapter")``; the profile's name comes from the
argument, else the ``DEFENSES_PROFILE`` environment variable, else ``quick``.
"""

from __future__ import annotations

import os

from .checks import check_choice

PROFILE_ENV = "DEFENSES_PROFILE"


class Profile(dict):
    """A chapter's settings for one profile, readable as attributes (``P.epochs``)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"profile {self.get('name')!r} has no setting {key!r}") from None

    def __str__(self) -> str:
        width = max(map(len, self))
        return "\n".join(f"{k:<{width}}  {v}" for k, v in self.items())


PROFILES: dict[str, dict[str, dict]] = {
    "foundations": {
        "quick": dict(
            dataset="mnist", arch="mnist_cnn", n_train=12_000, n_test=400, batch_size=128, lr=1e-3,
            epochs_standard=2, epochs_at=2, train_eps=0.1, train_steps=3, train_alpha=0.04, trades_beta=3.0,
            eval_eps=(0.1, 0.3), eval_steps=40, eval_alpha=0.01, curve_eps=(0.0, 0.1, 0.2, 0.3),
            aa_models=("PGD-AT",), aa_n=100, aa_version="custom", aa_attacks=("apgd-ce", "apgd-t"), aa_targets=2,
            sanity_n=100, square_queries=500, seed=0,
        ),
        "paper": dict(
            dataset="mnist", arch="mnist_cnn", n_train=60_000, n_test=10_000, batch_size=128, lr=1e-3,
            epochs_standard=10, epochs_at=30, train_eps=0.3, train_steps=40, train_alpha=0.01, trades_beta=6.0,
            eval_eps=(0.1, 0.3), eval_steps=100, eval_alpha=0.01, curve_eps=(0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4),
            aa_models=("PGD-AT", "TRADES"), aa_n=1000, aa_version="standard", aa_attacks=None, aa_targets=None,
            sanity_n=1000, square_queries=5000, seed=0,
        ),
    },
    "ensembles": {
        "quick": dict(
            dataset="mnist", arch="mnist_cnn", members=3, n_train=6_000, n_test=200, batch_size=128, lr=1e-3,
            epochs_pretrain=1, epochs_finetune=1, gal_coeff=0.5,
            dlc_alpha=4.0, dlc_beta=1.0, dlc_h=(1.0,), dlc_direction="sign", dlc_shared=True, dlc_abs=True, dlc_gamma=0.0,
            hvp_n=64, hvp_h_grid=(1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0), timing_repeat=5,
            curvature_n=100, transfer_eps=0.1, transfer_steps=20, transfer_n=100,
            eval_eps=(0.1, 0.3), eval_steps=40, eval_alpha=0.01, curve_eps=(0.0, 0.1, 0.2, 0.3),
            aa_models=("independent", "DLC"), aa_n=60, aa_version="custom", aa_attacks=("apgd-ce", "apgd-t"), aa_targets=2,
            sanity_n=60, square_queries=500, explorer_n=4, explorer_eps=(0.1, 0.2), seed=0,
        ),
        "paper": dict(
            dataset="cifar10", arch="resnet20", members=3, n_train=50_000, n_test=1_000, batch_size=128, lr=1e-3,
            epochs_pretrain=100, epochs_finetune=20, gal_coeff=0.5,
            dlc_alpha=4.0, dlc_beta=1.0, dlc_h=(0.025, 0.1, 0.2, 0.45, 0.75), dlc_direction="sign", dlc_shared=True,
            dlc_abs=True, dlc_gamma=0.0,
            hvp_n=128, hvp_h_grid=(1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0), timing_repeat=10,
            curvature_n=1_000, transfer_eps=8 / 255, transfer_steps=20, transfer_n=1_000,
            eval_eps=(2 / 255, 8 / 255), eval_steps=100, eval_alpha=0.5 / 255,
            curve_eps=(0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255),
            aa_models=("independent", "GAL", "DLC"), aa_n=1_000, aa_version="standard", aa_attacks=None,
            aa_targets=None, sanity_n=500, square_queries=5_000, explorer_n=6, explorer_eps=(2 / 255, 4 / 255, 8 / 255), seed=0,
        ),
    },
    "purification": {
        "quick": dict(
            dataset="mnist", arch="mnist_cnn", n_train=6_000, n_test=100, batch_size=128, lr=1e-3,
            epochs_classifier=2, purifier_width=16, epochs_pretrain=3, epochs_finetune=1,
            transform="rt2", block=4, missing_rate=0.25, sigma=0.25, n_masks=4,
            ft_eps=0.3, ft_lambda=0.1, ft_attack="fgsm", ft_victim="classifier", ft_l1_target="clean",
            lr_finetune=1e-4, eot_draws=8, attack_draws=2, score_repeats=4, eval_steps=40, eval_eps=(0.1, 0.3), curve_eps=(0.0, 0.1, 0.3),
            l2_eps=2.0,
            classifier_steps=40, aa_n=30, aa_version="custom", aa_attacks=("apgd-ce", "apgd-dlr"), sanity_n=50,
            square_queries=200, explorer_rates=(0.0, 0.25, 0.5), explorer_sigmas=(0.0, 0.25, 0.5), seed=0,
        ),
        "paper": dict(
            dataset="cifar10", arch="resnet18", n_train=50_000, n_test=512, batch_size=128, lr=1e-3,
            epochs_classifier=100, purifier_width=64, epochs_pretrain=100, epochs_finetune=20,
            transform="rt2", block=4, missing_rate=0.25, sigma=0.25, n_masks=4,
            ft_eps=8 / 255, ft_lambda=0.05, ft_attack="fgsm", ft_victim="classifier", ft_l1_target="clean",
            lr_finetune=1e-4, eot_draws=20, attack_draws=20, score_repeats=4, eval_steps=200, eval_eps=(4 / 255, 8 / 255),
            curve_eps=(0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255), l2_eps=0.5, classifier_steps=100, aa_n=512,
            aa_version="rand", aa_attacks=None, sanity_n=200, square_queries=5_000, explorer_rates=(0.0, 0.25, 0.5),
            explorer_sigmas=(0.0, 0.25, 0.5), seed=0,
        ),
    },
    "smoothing": {
        "quick": dict(
            dataset="mnist", arch="tiny_cnn", n_train=12_000, n_test=100, batch_size=128, lr=2e-3, epochs=3,
            sigmas=(0.12, 0.25, 0.5), sigma_t_range=(0.12, 0.5), selector_width=16, sigma_min=0.1, sigma_max=0.6,
            levels=(0.12, 0.25, 0.5), sigma_h=0.25, train_draws=4, beta=1.0, tau=0.1, median_draws=32,
            smooth_draws=16, n0=100, n=1_000, alpha=0.001, selector_draws=2_000,
            radii=(0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5), l2_eps=(1.0, 2.0), linf_eps=(0.1,), eval_steps=40,
            attack_draws=4, attack_median_draws=8, score_repeats=4, aa_n=30, sanity_n=40, square_queries=200, seed=0,
        ),
        "paper": dict(
            dataset="cifar10", arch="resnet18", n_train=50_000, n_test=500, batch_size=128, lr=1e-3, epochs=90,
            sigmas=(0.12, 0.25, 0.5, 1.0), sigma_t_range=(0.12, 1.0), selector_width=32, sigma_min=0.1, sigma_max=1.2,
            levels=(0.12, 0.25, 0.5, 1.0), sigma_h=0.25, train_draws=8, beta=1.0, tau=0.1, median_draws=100,
            smooth_draws=32, n0=100, n=100_000, alpha=0.001, selector_draws=10_000,
            radii=(0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5), l2_eps=(0.25, 0.5), linf_eps=(2 / 255, 8 / 255), eval_steps=100,
            attack_draws=20, attack_median_draws=32, score_repeats=4, aa_n=500, sanity_n=200, square_queries=5_000, seed=0,
        ),
    },
    "armor": {
        "quick": dict(
            dataset="mnist", arch="mnist_cnn", n_train=6_000, n_test=200, batch_size=100, optimizer="adam", lr=1e-3,
            momentum=0.0, epochs=2, milestones=(),
            models=("natural", "FGSM-AT", "PGD-AT", "ARMOR_D KL", "ARMOR_D alpha"), train_eps=0.1, pgd_steps=3,
            pgd_alpha=0.04, armor_clip=False, armor_positivity="softplus",
            armor={
                "ARMOR_D KL": dict(divergence="kl", eps=3e-3, L=0.01, p=2, q=1.0, t=0.5, lr=2e-3, beta=1.0,
                                   steps=3, step_size=0.0667),
                "ARMOR_D alpha": dict(divergence="alpha", alpha=3.0, eps=0.07, L=0.2, p=float("inf"), q=1.5, t=0.5,
                                      lr=1.6e-3, beta=1.0, steps=3, step_size=0.0667),
            },
            eval_eps=(0.1, 0.3), eval_steps=40, eval_alpha=0.01, curve_eps=(0.0, 0.1, 0.2, 0.3),
            aa_models=("PGD-AT", "ARMOR_D KL"), aa_n=100, aa_version="custom", aa_attacks=("apgd-ce", "apgd-t"),
            aa_targets=2, sanity_model="ARMOR_D KL", sanity_n=100, square_queries=300, weights_n=500,
            binary=dict(arch="mlp", threshold=0.5, n_train=6_000, n_test=500, epochs=3, optimizer="adam", lr=1e-3,
                        train_steps=10, train_step_size=0.02, attack_steps=50, attack_step_size=0.004, attack_draws=5,
                        armor=dict(divergence="kl", eps=3e-3, L=0.01, p=2, q=1.0, t=0.5, lr=2e-3, beta=1.0)),
            seed=0,
        ),
        "paper": dict(
            dataset="mnist", arch="mnist_cnn", n_train=60_000, n_test=10_000, batch_size=100, optimizer="sgd", lr=0.1,
            momentum=0.0, epochs=10, milestones=(5,), models=("natural", "FGSM-AT", "PGD-AT", "ARMOR_D KL", "ARMOR_D alpha"), train_eps=0.1,
            pgd_steps=20, pgd_alpha=0.01, armor_clip=False, armor_positivity="softplus",
            armor={
                "ARMOR_D KL": dict(divergence="kl", eps=3e-3, L=0.01, p=2, q=1.0, t=0.5, lr=2e-3, beta=1.0,
                                   steps=20, step_size=0.01),
                "ARMOR_D alpha": dict(divergence="alpha", alpha=3.0, eps=0.07, L=0.2, p=float("inf"), q=1.5, t=0.5,
                                      lr=1.6e-3, beta=1.0, steps=40, step_size=0.01),
            },
            eval_eps=(0.1, 0.3), eval_steps=40, eval_alpha=0.01,
            curve_eps=(0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4),
            aa_models=("PGD-AT", "ARMOR_D KL", "ARMOR_D alpha"), aa_n=1_000, aa_version="standard", aa_attacks=None,
            aa_targets=None, sanity_model="ARMOR_D KL", sanity_n=1_000, square_queries=5_000, weights_n=5_000,
            binary=dict(arch="mlp", threshold=0.5, n_train=60_000, n_test=10_000, epochs=10, optimizer="adam",
                        lr=1e-3, train_steps=50, train_step_size=0.004, attack_steps=50, attack_step_size=0.004,
                        attack_draws=10,
                        armor=dict(divergence="kl", eps=3e-3, L=0.01, p=2, q=1.0, t=0.5, lr=2e-3, beta=1.0)),
            seed=0,
        ),
    },
    "drsl": {
        "quick": dict(
            dataset="mnist", arch="mnist_cnn", n_train=6_000, n_test=200, batch_size=128, optimizer="adam", lr=1e-3,
            momentum=0.0, milestones=(), epochs=2, a=1.0, b=1.152, space="logit", reduction="mean", center="wrong",
            b_sweep=(0.1, 1.152, 10.0), train_eps=0.1, pgd_steps=3, pgd_alpha=0.04,
            corr_n=1_000, corr_eps=0.1, corr_boot=1_000, eval_eps=(0.1, 0.3), eval_steps=40, eval_alpha=0.01,
            targets=2, curve_eps=(0.0, 0.1, 0.2, 0.3), aa_models=("CE", "DRSL"), aa_n=100, aa_version="custom",
            aa_attacks=("apgd-ce", "apgd-t"), aa_targets=2, sanity_n=100, square_queries=300, timing_repeat=15,
            explorer_n=4, seed=0,
        ),
        "paper": dict(
            dataset="cifar10", arch="resnet18", n_train=50_000, n_test=1_000, batch_size=128, optimizer="sgd", lr=0.1,
            momentum=0.9, milestones=(100, 150), epochs=200, a=1.0, b=1.152, space="logit", reduction="mean",
            center="wrong", b_sweep=(0.1, 1.152, 10.0), train_eps=8 / 255, pgd_steps=10, pgd_alpha=2 / 255,
            corr_n=10_000, corr_eps=2 / 255, corr_boot=1_000, eval_eps=(2 / 255, 8 / 255), eval_steps=100,
            eval_alpha=0.5 / 255, targets=9, curve_eps=(0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255),
            aa_models=("CE", "DRSL", "PGD-AT"), aa_n=1_000, aa_version="standard", aa_attacks=None, aa_targets=None, sanity_n=500, square_queries=5_000,
            timing_repeat=50, explorer_n=6, seed=0,
        ),
    },
    "comparison": {
        "quick": dict(
            dataset="mnist", arch="mnist_cnn", n_train=6_000, n_test=50, overrides={"smoothing": {"sigmas": (0.25,)}},
            threats=(("linf", 0.1), ("linf", 0.3), ("l2", 2.0)), eval_steps=40, attack_draws=2, score_repeats=2,
            aa_threat=("linf", 0.1), aa_version="custom", aa_attacks=("apgd-ce", "apgd-t"), aa_targets=2, aa_n=50,
            aa_rand_attacks=("apgd-ce", "apgd-dlr"),
            cert_radii=(0.25, 0.5), sanity_threat=("linf", 0.1), sanity_n=50, square_queries=300, cost_batch=128, seed=0,
        ),
        "paper": dict(
            dataset="cifar10", arch="resnet18", n_train=50_000, n_test=1_000, overrides={"smoothing": {"sigmas": (0.25,)}},
            threats=(("linf", 2 / 255), ("linf", 8 / 255), ("l2", 0.5)), eval_steps=100, attack_draws=20, score_repeats=4,
            aa_threat=("linf", 8 / 255), aa_version="standard", aa_attacks=None, aa_targets=None, aa_n=1_000,
            aa_rand_attacks=("apgd-ce", "apgd-dlr"),
            cert_radii=(0.25, 0.5), sanity_threat=("linf", 8 / 255), sanity_n=500, square_queries=5_000, cost_batch=128,
            seed=0,
        ),
    },
}


def get_profile(chapter: str, name: str | None = None) -> Profile:
    """The settings of ``chapter`` for profile ``name`` (default: $DEFENSES_PROFILE, else 'quick')."""
    name = name or os.environ.get(PROFILE_ENV, "quick")
    check_choice("chapter", chapter, sorted(PROFILES))
    check_choice("profile", name, sorted(PROFILES[chapter]))
    return Profile(name=name, **PROFILES[chapter][name])

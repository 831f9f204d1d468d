"""Adversarial training on purification (AToP, Lin et al. 2024): random transforms, an inpainting
purifier, and the defended model ``classifier(purifier(transform(x)))`` as one module.

* ``RandomTransform``: RT1 (random block mask), RT2 (Gaussian noise, then the mask) and RT3 (noise,
  then ``n_masks`` non-overlapping masks whose completions are combined).
* ``InpaintingUNet``: a small U-Net that completes a masked, noisy image (a CPU-sized stand-in for
  the paper's DeepFillv2 generator).
* ``PurifiedClassifier``: the whole defense, so every attack differentiates through all of it.
* ``PurifierPretrainLoss`` (L1 reconstruction on clean data) and ``AToPLoss`` (the same plus
  lambda x the frozen classifier's cross-entropy on the purified adversarial example).
* ``build``: chapter 2's recipe, the classifier alone, the pre-trained purifier and AToP as defenses.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from ..attacks import EOT, check_eps, check_inputs, fgsm, pgd
from ..checks import check_choice
from ..config import Configured
from ..models import build_model
from ..runtime import draw, generator_for, seed_everything
from ..training import fit
from .base import Defense, select
from .baselines import CrossEntropy

KINDS = ("rt1", "rt2", "rt3")


class RandomTransform(Configured, nn.Module):
    """AToP's random transforms of images in [0, 1]; masks are drawn per image unless ``shared_mask``.

    ``block`` is the side of a square block in pixels, ``missing_rate`` the fraction of blocks masked
    (RT1, RT2; RT3 masks 1 / ``n_masks`` of them per copy), ``sigma`` the Gaussian noise level (RT2,
    RT3). ``generator`` fixes the randomness for tests; ``fixed_seed`` re-seeds it at every call, which
    turns the transform into a deterministic one (the sanity check with the randomness fixed).
    """

    def __init__(self, kind: str = "rt2", block: int = 4, missing_rate: float = 0.25, sigma: float = 0.25,
                 n_masks: int = 4, shared_mask: bool = False, generator: torch.Generator | None = None,
                 fixed_seed: int | None = None):
        super().__init__()
        check_choice("kind", kind, KINDS)
        if block < 1 or not 0 <= missing_rate <= 1 or sigma < 0 or n_masks < 2:
            raise ValueError("need block >= 1, 0 <= missing_rate <= 1, sigma >= 0 and n_masks >= 2, got "
                             f"block={block}, "
                             f"missing_rate={missing_rate}, sigma={sigma}, n_masks={n_masks}")
        self.kind, self.block, self.missing_rate, self.sigma, self.n_masks = kind, block, missing_rate, sigma, n_masks
        self.shared_mask, self.generator, self.fixed_seed = shared_mask, generator, fixed_seed

    def replace(self, **changes) -> "RandomTransform":
        """A copy with some settings changed (e.g. ``fixed_seed``, ``sigma``); this transform is left as it is."""
        unknown = sorted(set(changes) - set(self._config))
        if unknown:
            raise ValueError(f"RandomTransform has no setting {', '.join(unknown)}; its settings are "
                             f"{', '.join(self._config)}")
        return RandomTransform(**{**self._config, **changes})

    def _generator(self, x: torch.Tensor) -> torch.Generator | None:
        """The generator of this call: a freshly seeded one on x's device when the randomness is fixed."""
        return generator_for(x.device, self.fixed_seed) if self.fixed_seed is not None else self.generator

    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        """The block grid of x's images (their sides must be multiples of ``block``)."""
        h, w = x.shape[-2:]
        if h % self.block or w % self.block:
            raise ValueError(f"image sides must be multiples of block={self.block}, got {h}x{w}")
        return h // self.block, w // self.block

    def sample(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(noisy image, masks): masks of shape (K, N, 1, H, W), 1 where a pixel is missing (K = 1, or n_masks: RT3)."""
        check_inputs(x)
        g = self._generator(x)
        gh, gw = self._grid(x)
        n_img = 1 if self.shared_mask else len(x)
        ranks = draw("rand", (n_img, gh * gw), x.device, g).argsort(1).argsort(1)  # a random order of the blocks
        if self.kind == "rt3":  # block b goes to mask (rank of b) mod n_masks: a random partition
            groups = [ranks % self.n_masks == k for k in range(self.n_masks)]
        else:
            groups = [ranks < round(self.missing_rate * gh * gw)]
        masks = torch.stack([m.view(n_img, 1, gh, gw).float() for m in groups])
        masks = masks.repeat_interleave(self.block, -2).repeat_interleave(self.block, -1)
        masks = masks.expand(-1, len(x), -1, -1, -1)
        noisy = x
        if self.kind != "rt1" and self.sigma > 0:
            noisy = (x + self.sigma * draw("randn", x.shape, x.device, g)).clamp(0, 1)
        return noisy, masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The transformed image with the missing pixels set to 0 (the first mask for RT3)."""
        noisy, masks = self.sample(x)
        return noisy * (1 - masks[0])


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution and ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.ReLU())


class InpaintingUNet(Configured, nn.Module):
    """A small U-Net: (masked image, mask) -> the completed, denoised image in [0, 1]."""

    def __init__(self, channels: int = 1, width: int = 32):
        super().__init__()
        w = width
        self.enc1 = nn.Sequential(_conv(channels + 1, w), _conv(w, w))
        self.enc2 = nn.Sequential(_conv(w, 2 * w, 2), _conv(2 * w, 2 * w))
        self.mid = nn.Sequential(_conv(2 * w, 2 * w, 2), _conv(2 * w, 2 * w))
        self.dec2 = nn.Sequential(_conv(4 * w, 2 * w), _conv(2 * w, 2 * w))
        self.dec1 = nn.Sequential(_conv(3 * w, w), _conv(w, w))
        self.out = nn.Conv2d(w, channels, 1)

    def forward(self, x_masked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(torch.cat([x_masked, mask], 1))
        e2 = self.enc2(e1)
        m = self.mid(e2)
        d2 = self.dec2(torch.cat([F.interpolate(m, size=e2.shape[-2:]), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=e1.shape[-2:]), e1], 1))
        # A correction of the input in logit space: smooth, in (0, 1), and never a dead (clamped) output.
        return torch.sigmoid(torch.logit(x_masked.clamp(1e-3, 1 - 1e-3)) + self.out(d1))


class PurifiedClassifier(Configured, nn.Module):
    """The AToP defense as one module: classifier(purifier(transform(x))); the classifier is frozen.

    The purifier's whole output is used (it denoises the kept pixels as well as completing the
    missing ones). With RT3 each of the ``n_masks`` copies is completed and every pixel is taken
    from the copy in which it was missing.
    """

    def __init__(self, classifier: nn.Module, purifier: nn.Module, transform: RandomTransform):
        super().__init__()
        self.classifier, self.purifier, self.transform = classifier, purifier, transform
        self.classifier.requires_grad_(False)
        self.classifier.eval()

    @property
    def randomized(self) -> bool:
        """Whether two calls can differ: noise or masks, not fixed by a seed (attacks then skip early stopping)."""
        t = self.transform
        return t.fixed_seed is None and ((t.kind != "rt1" and t.sigma > 0) or t.missing_rate > 0 or t.kind == "rt3")

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        """purifier(transform(x)), differentiable in x and in the purifier."""
        noisy, masks = self.transform.sample(x)
        if len(masks) == 1:
            return self.purifier(noisy * (1 - masks[0]), masks[0])
        return sum(m * self.purifier(noisy * (1 - m), m) for m in masks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.purify(x))

    def train(self, mode: bool = True):
        """Train mode for the purifier only: the frozen classifier stays in eval mode."""
        super().train(mode)
        self.classifier.eval()
        return self

    def with_fixed_randomness(self, seed: int = 0) -> "PurifiedClassifier":
        """The same defense (shared weights) whose transform draws the same noise and masks at every call."""
        return PurifiedClassifier(self.classifier, self.purifier, self.transform.replace(fixed_seed=seed))


class PurifierPretrainLoss(Configured, nn.Module):
    """Pre-training: mean |x - purifier(transform(x))| on clean images."""

    def forward(self, model: PurifiedClassifier, x, y):
        return (model.purify(x) - x).abs().mean()


class AToPLoss(Configured, nn.Module):
    """AToP fine-tuning: |target - g(t(x'))|_1 + lam * CE(f(g(t(x'))), y) with x' an adversarial example.

    Named options: ``attack`` ('fgsm', as the paper; or 'pgd' with ``steps``), ``victim`` (the
    adversarial example is made against the 'classifier' alone, as the authors' code does, or
    against the whole 'pipeline'), ``l1_target`` ('clean' x, as in one of the authors' notebooks,
    or 'adversarial' x', as in the other and in the rebuttal's formula).
    """

    def __init__(self, eps: float, lam: float = 0.1, attack: str = "fgsm", steps: int = 10,
                 victim: str = "classifier", l1_target: str = "clean"):
        super().__init__()
        check_eps(eps)
        for name, value, allowed in (("attack", attack, ("fgsm", "pgd")),
                                     ("victim", victim, ("classifier", "pipeline")),
                                     ("l1_target", l1_target, ("clean", "adversarial"))):
            check_choice(name, value, allowed)
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.eps, self.lam, self.attack, self.steps = eps, lam, attack, steps
        self.victim, self.l1_target = victim, l1_target

    def adversarial(self, model: PurifiedClassifier, x, y) -> torch.Tensor:
        """The adversarial example x' the purifier learns to undo."""
        victim = model.classifier if self.victim == "classifier" else model
        if self.attack == "fgsm":
            return fgsm(victim, x, y, self.eps)
        return pgd(victim, x, y, self.eps, steps=self.steps, early_stop=False)

    def forward(self, model: PurifiedClassifier, x, y):
        x_adv = self.adversarial(model, x, y)
        purified = model.purify(x_adv)
        target = x if self.l1_target == "clean" else x_adv
        ce = F.cross_entropy(model.classifier(purified), y)
        return (purified - target).abs().mean() + self.lam * ce


def make_transform(P, kind: str | None = None, **overrides) -> RandomTransform:
    """The profile's random transform (``kind`` and keyword overrides change it, e.g. for the explorer)."""
    settings = dict(kind=kind or P.transform, block=P.block, missing_rate=P.missing_rate, sigma=P.noise_sigma,
                    n_masks=P.n_masks)
    return RandomTransform(**{**settings, **overrides})


def _randomized(P, name: str, pipeline: PurifiedClassifier, stages) -> Defense:
    """A purification pipeline as a defense: predicts with ``P.eot_draws`` draws, attacked through
    ``P.attack_draws`` per step (EOT), its randomness fixed for sanity check 5."""
    return Defense(name, EOT(pipeline, P.eot_draws, P.forward_batch), stages,
                   attack_model=EOT(pipeline, P.attack_draws, P.forward_batch),
                   randomized=True, repeats=P.score_repeats, fixed_model=pipeline.with_fixed_randomness(P.seed),
                   chapter="purification")


def build(P, train_set, device=None, names=None) -> dict[str, Defense]:
    """Chapter 2's recipe: a standard classifier ("no defense"), a purifier pre-trained behind the
    transform ("purifier": f(g(t(.)))), then AToP fine-tuning ("AToP"); the classifier is frozen."""
    chosen = select(dict.fromkeys(("no defense", "purifier", "AToP")), names)
    recipe = dict(dataset=P.dataset, n_train=len(train_set), data_seed=P.seed)
    kw = dict(P.schedule(), device=device)
    seed_everything(P.seed)
    clf = fit(build_model(P.arch, P.dataset), train_set, CrossEntropy(), chapter="purification",
              name="classifier", recipe=recipe, epochs=P.epochs_classifier, **kw)
    seed_everything(P.seed)
    channels = train_set[0][0].shape[0]
    pipeline = PurifiedClassifier(clf.model, InpaintingUNet(channels, P.purifier_width), make_transform(P))
    recipe = dict(recipe, classifier=Path(clf.record["checkpoint"]).name)
    pre = fit(pipeline, train_set, PurifierPretrainLoss(), chapter="purification", name="purifier",
              recipe=recipe, epochs=P.epochs_pretrain, **kw)
    out = {"no defense": Defense("no defense", clf.model, [clf], chapter="purification"),
           "purifier": _randomized(P, "purifier", pre.model, [clf, pre])}
    if "AToP" in chosen:
        loss = AToPLoss(P.ft_eps, lam=P.ft_ce_weight, attack=P.ft_attack, victim=P.ft_victim,
                        l1_target=P.ft_l1_target)
        recipe = dict(recipe, pretrained=Path(pre.record["checkpoint"]).name)
        atop = fit(copy.deepcopy(pre.model), train_set, loss, chapter="purification", name="AToP",
                   recipe=recipe, epochs=P.epochs_finetune, **dict(kw, seed=P.seed + 1, lr=P.lr_finetune))
        out["AToP"] = _randomized(P, "AToP", atop.model, [clf, pre, atop])
    return {n: out[n] for n in chosen}

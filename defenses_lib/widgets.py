"""Explorers built from ipywidgets that also work in the static HTML book.

Every view is computed up front and the controls are linked in the browser (``jslink``), so the
widgets respond without a running kernel: in Jupyter, in Colab and in the built book alike.
"""

from __future__ import annotations

import itertools

import ipywidgets as W
import torch

from .attacks import pgd
from .evaluation import predict
from .plots import figure_png, show_adversarial, show_softmax, show_stages, show_transfer


def linked_views(views: list[list[bytes]], item_labels: list[str], step_labels: list[str], step_name: str) -> W.VBox:
    """A chooser over items and a slider over steps, showing ``views[item][step]`` (PNG bytes)."""
    chooser = W.Dropdown(options=[(label, i) for i, label in enumerate(item_labels)], description="show",
                         layout=W.Layout(width="340px"))
    slider = W.SelectionSlider(options=step_labels, description=step_name, continuous_update=True,
                               layout=W.Layout(width="420px"))
    inner = [W.Stack([W.Image(value=png, format="png") for png in row], selected_index=0) for row in views]
    outer = W.Stack(inner, selected_index=0)
    W.jslink((chooser, "index"), (outer, "selected_index"))
    for stack in inner:
        W.jslink((slider, "index"), (stack, "selected_index"))
    return W.VBox([W.HBox([chooser, slider]), outer])


def eps_explorer(models: dict, x: torch.Tensor, y: torch.Tensor, eps_grid, attack=pgd, classes=None,
                 **attack_kwargs) -> W.VBox:
    """Pick a model and an image, move eps; see the image, its adversarial version and both predictions.

    ``models`` maps names to models; each view attacks the chosen model with ``attack`` at that eps.
    """
    eps_grid = [float(e) for e in eps_grid]
    name = (lambda k: classes[int(k)]) if classes else (lambda k: str(int(k)))
    views, labels = [], []
    for model_name, model in models.items():
        pred = predict(model, x)
        rows = [[] for _ in range(len(x))]
        for e in eps_grid:
            x_adv = x if e == 0 else attack(model, x, y, eps=e, **attack_kwargs)
            pred_adv = predict(model, x_adv)
            for i in range(len(x)):
                fig = show_adversarial(x[i:i + 1], x_adv[i:i + 1], pred[i:i + 1], pred_adv[i:i + 1], y[i:i + 1],
                                       classes, title=f"{model_name}, eps = {e:.3f}")
                rows[i].append(figure_png(fig))
        views += rows
        labels += [f"{model_name}: test image #{i} (a {name(y[i])})" for i in range(len(x))]
    return linked_views(views, labels, [f"{e:.3f}" for e in eps_grid], "eps")


def transfer_explorer(ensembles: dict, x: torch.Tensor, y: torch.Tensor, eps_grid, attack=pgd, classes=None,
                      **attack_kwargs) -> W.VBox:
    """Pick an ensemble and a (source, target) pair of its members, move eps: examples made on one, shown to the other.

    ``ensembles`` maps names to lists of member models. Each view attacks the source member alone
    with ``attack`` and shows which of the images fool the source and which also fool the target.
    """
    eps_grid = [float(e) for e in eps_grid]
    views, labels = [], []
    for ens_name, members in ensembles.items():
        adv = {(s, e): attack(members[s], x, y, eps=e, **attack_kwargs) for s in range(len(members)) for e in eps_grid}
        for s, t in itertools.permutations(range(len(members)), 2):
            row = []
            for e in eps_grid:
                preds = {f"member {s + 1}": predict(members[s], adv[s, e]),
                         f"member {t + 1}": predict(members[t], adv[s, e])}
                fooled = [int((p != y).sum()) for p in preds.values()]
                title = (f"{ens_name}, eps = {e:.3f}: made on member {s + 1}; fools it on {fooled[0]}/{len(y)}, "
                         f"transfers to member {t + 1} on {fooled[1]}/{len(y)}")
                row.append(figure_png(show_transfer(adv[s, e], y, preds, classes, title)))
            views.append(row)
            labels.append(f"{ens_name}: member {s + 1} -> member {t + 1}")
    return linked_views(views, labels, [f"{e:.3f}" for e in eps_grid], "eps")


def purification_explorer(model, x: torch.Tensor, y: torch.Tensor, missing_rates, sigmas, seed: int = 0) -> W.VBox:
    """Pick a missing rate, move the noise level: the transformed images, their purification and the prediction.

    ``model`` is a ``PurifiedClassifier``; its purifier and classifier are kept and its transform's
    missing rate and sigma are replaced (with the randomness fixed by ``seed`` so views compare).
    """
    from .defenses.purification import PurifiedClassifier

    views = []
    for rate in missing_rates:
        row = []
        for sigma in sigmas:
            t = model.transform.replace(missing_rate=float(rate), sigma=float(sigma), fixed_seed=seed)
            variant = PurifiedClassifier(model.classifier, model.purifier, t)
            with torch.no_grad():
                noisy, masks = t.sample(x)
                purified = variant.purify(x)
            pred = predict(model.classifier, purified)
            notes = [f"pred {int(p)} ({'right' if p == c else 'wrong'})" for p, c in zip(pred, y)]
            row.append(figure_png(show_stages({"clean": x, "transformed": noisy * (1 - masks[0]), "purified": purified},
                                              {"purified": notes}, f"missing rate {rate:g}, sigma {sigma:g}")))
        views.append(row)
    return linked_views(views, [f"missing rate {r:g}" for r in missing_rates], [f"{s:g}" for s in sigmas], "sigma")


def smoothing_explorer(variational: dict, fixed: dict, y: torch.Tensor, radii) -> W.VBox:
    """Move sigma_t: the variational model's certified accuracy against the radius beside the fixed-sigma
    curves, and how often it chose each noise level.

    ``variational`` maps sigma_t to its ``Certificate``; ``fixed`` maps names to the fixed-sigma ones.
    """
    import matplotlib.pyplot as plt

    from .plots import plot_eps_curves

    curves = {name: cert.certified_accuracy(y, radii) for name, cert in fixed.items()}
    views = []
    for t, cert in variational.items():
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [2, 1]})
        plot_eps_curves({**curves, f"variational, sigma_t = {t:g}": cert.certified_accuracy(y, radii)},
                        title="certified accuracy", xlabel=r"$\ell_2$ radius", chance=None, ax=ax[0])
        levels, counts = cert.sigma.unique(return_counts=True)
        ax[1].bar([f"{v:g}" for v in levels.tolist()], counts.tolist())
        ax[1].set(xlabel="noise level used", ylabel="test images", title=f"sigma_t = {t:g}")
        views.append(figure_png(fig))
    return linked_views([views], ["variational"], [f"{t:g}" for t in variational], "sigma_t")


def softmax_explorer(models: dict, x: torch.Tensor, y: torch.Tensor, step_name: str = "b", classes=None) -> W.VBox:
    """Pick an image, move through ``models`` (one per setting, e.g. DRSL's b): its softmax over the classes,
    the wrong ones on a log scale, with their spread (the variance of their log-probabilities) in the title."""
    from .defenses.drsl import wrong_class_spread

    views = [[] for _ in range(len(x))]
    for label, model in models.items():
        with torch.no_grad():
            logits = model(x)
        spread = wrong_class_spread(logits, y)
        for i, p in enumerate(logits.softmax(1)):
            title = f"{step_name} = {label}: wrong-class log-softmax variance {spread[i]:.2f}"
            views[i].append(figure_png(show_softmax(x[i], p, int(y[i]), classes, title)))
    name = (lambda k: classes[int(k)]) if classes else (lambda k: str(int(k)))
    return linked_views(views, [f"test image #{i} (a {name(y[i])})" for i in range(len(x))], list(models), step_name)

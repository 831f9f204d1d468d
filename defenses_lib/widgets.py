"""Explorers built from ipywidgets that also work in the static HTML book.

Every view is computed up front and the controls are linked in the browser (``jslink``), so the
widgets respond without a running kernel: in Jupyter, in Colab and in the built book alike.
"""

from __future__ import annotations

import ipywidgets as W
import torch

from .attacks import pgd
from .evaluation import predict
from .plots import figure_png, show_adversarial


def linked_views(views: list[list[bytes]], item_labels: list[str], step_labels: list[str], step_name: str) -> W.VBox:
    """A chooser over items and a slider over steps, showing ``views[item][step]`` (PNG bytes)."""
    chooser = W.Dropdown(options=[(label, i) for i, label in enumerate(item_labels)], description="image")
    slider = W.SelectionSlider(options=step_labels, description=step_name, continuous_update=True,
                               layout=W.Layout(width="420px"))
    inner = [W.Stack([W.Image(value=png, format="png") for png in row], selected_index=0) for row in views]
    outer = W.Stack(inner, selected_index=0)
    W.jslink((chooser, "index"), (outer, "selected_index"))
    for stack in inner:
        W.jslink((slider, "index"), (stack, "selected_index"))
    return W.VBox([W.HBox([chooser, slider]), outer])


def eps_explorer(model, x: torch.Tensor, y: torch.Tensor, eps_grid, attack=pgd, classes=None, **attack_kwargs) -> W.VBox:
    """Pick an image and an eps; see the image, its adversarial version and both predictions."""
    eps_grid = [float(e) for e in eps_grid]
    pred = predict(model, x)
    views = [[] for _ in range(len(x))]
    for e in eps_grid:
        x_adv = x if e == 0 else attack(model, x, y, eps=e, **attack_kwargs)
        pred_adv = predict(model, x_adv)
        for i in range(len(x)):
            fig = show_adversarial(x[i:i + 1], x_adv[i:i + 1], pred[i:i + 1], pred_adv[i:i + 1], y[i:i + 1],
                                   classes, title=f"eps = {e:.3f}")
            views[i].append(figure_png(fig))
    labels = [f"#{i} (label {classes[int(y[i])] if classes else int(y[i])})" for i in range(len(x))]
    return linked_views(views, labels, [f"{e:.3f}" for e in eps_grid], "eps")

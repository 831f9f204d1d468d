"""The figures the chapters share: accuracy-vs-eps curves and image grids with predictions."""

from __future__ import annotations

import io

import matplotlib.pyplot as plt
import numpy as np
import torch


def plot_eps_curves(curves: dict[str, dict[float, float]], title: str = "", xlabel: str = r"$\epsilon$ ($\ell_\infty$)",
                    chance: float | None = 0.1, ax=None):
    """Accuracy (%) against eps, one line per model."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, curve in curves.items():
        ax.plot(list(curve), [100 * a for a in curve.values()], marker="o", label=name)
    if chance is not None:
        ax.axhline(100 * chance, color="grey", ls=":", lw=1, label="chance")
    ax.set(xlabel=xlabel, ylabel="accuracy (%)", ylim=(-2, 102), title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def plot_heatmaps(matrices: dict[str, torch.Tensor], labels, title: str = "", xlabel: str = "target",
                  ylabel: str = "source", vmax: float = 100.0):
    """Side-by-side annotated heatmaps (values in %), one per named matrix, on one colour scale."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(3.4 * len(matrices), 3.2), squeeze=False)
    for ax, (name, m) in zip(axes[0], matrices.items()):
        vals = 100 * m.detach().cpu().numpy()
        im = ax.imshow(vals, vmin=0, vmax=vmax, cmap="viridis")
        for i, j in np.ndindex(vals.shape):
            ax.text(j, i, f"{vals[i, j]:.0f}", ha="center", va="center",
                    color="white" if vals[i, j] < vmax / 2 else "black", fontsize=9)
        ax.set(xticks=range(len(labels)), yticks=range(len(labels)), xticklabels=labels, yticklabels=labels,
               xlabel=xlabel, ylabel=ylabel if ax is axes[0, 0] else "", title=name)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy (%)")
    if title:
        fig.suptitle(title)
    return fig


def _imshow(ax, img: torch.Tensor, title: str = "", cmap=None):
    """Show a CHW image in [0, 1] (or a signed perturbation with cmap='seismic') without axes."""
    arr = img.detach().cpu()
    if arr.shape[0] == 1:
        arr = arr[0]
    else:
        arr = arr.permute(1, 2, 0)
    if cmap == "seismic":
        m = float(arr.abs().max()) or 1.0
        ax.imshow((arr if arr.dim() == 2 else arr.mean(-1)).numpy(), cmap=cmap, vmin=-m, vmax=m)
    else:
        ax.imshow(arr.clamp(0, 1).numpy(), cmap="gray" if arr.dim() == 2 else None, vmin=0, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def show_adversarial(x: torch.Tensor, x_adv: torch.Tensor, pred: torch.Tensor, pred_adv: torch.Tensor,
                     y: torch.Tensor, classes=None, title: str = ""):
    """Rows of (clean, perturbation, adversarial) images with the model's predictions."""
    name = (lambda k: classes[int(k)]) if classes is not None else (lambda k: str(int(k)))
    fig, axes = plt.subplots(len(x), 3, figsize=(5.4, 1.9 * len(x)), squeeze=False)
    for i in range(len(x)):
        ok = "right" if pred[i] == y[i] else "wrong"
        ok_adv = "right" if pred_adv[i] == y[i] else "wrong"
        _imshow(axes[i, 0], x[i], f"clean: {name(pred[i])} ({ok})")
        _imshow(axes[i, 1], x_adv[i] - x[i], f"perturbation, max {float((x_adv[i] - x[i]).abs().max()):.2f}", cmap="seismic")
        _imshow(axes[i, 2], x_adv[i], f"adversarial: {name(pred_adv[i])} ({ok_adv})")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def show_transfer(x_adv: torch.Tensor, y: torch.Tensor, preds: dict[str, torch.Tensor], classes=None, title: str = ""):
    """One row of adversarial images, each titled with every named model's prediction (wrong ones in red)."""
    name = (lambda k: classes[int(k)]) if classes is not None else (lambda k: str(int(k)))
    fig, axes = plt.subplots(1, len(x_adv), figsize=(1.45 * len(x_adv), 1.9), squeeze=False)
    for i, ax in enumerate(axes[0]):
        _imshow(ax, x_adv[i], f"label {name(y[i])}")
        lines = [(f"{who}: {name(p[i])}", "black" if p[i] == y[i] else "red") for who, p in preds.items()]
        for k, (text, colour) in enumerate(lines):
            ax.text(0.5, -0.08 - 0.16 * k, text, transform=ax.transAxes, ha="center", va="top", fontsize=8, color=colour)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def show_stages(stages: dict[str, torch.Tensor], notes: dict[str, list[str]] | None = None, title: str = ""):
    """A grid with one column per named stage of a pipeline (clean, transformed, purified, ...) and one row per image."""
    n = len(next(iter(stages.values())))
    fig, axes = plt.subplots(n, len(stages), figsize=(1.6 * len(stages), 1.75 * n), squeeze=False)
    for j, (stage, imgs) in enumerate(stages.items()):
        for i in range(n):
            note = (notes or {}).get(stage)
            _imshow(axes[i, j], imgs[i], (stage if i == 0 else "") + (f"\n{note[i]}" if note else ""))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def show_softmax(x: torch.Tensor, probs: torch.Tensor, y: int, classes=None, title: str = ""):
    """An image beside the bar chart of its softmax probabilities: the true class in green, the wrong ones in grey,
    on a log scale so that the spread of the small wrong-class values shows."""
    name = (lambda k: classes[int(k)]) if classes is not None else (lambda k: str(int(k)))
    fig, ax = plt.subplots(1, 2, figsize=(6.4, 2.4), gridspec_kw={"width_ratios": [1, 3]})
    _imshow(ax[0], x, f"label {name(y)}")
    colours = ["tab:green" if k == y else "tab:grey" for k in range(len(probs))]
    ax[1].bar([name(k) for k in range(len(probs))], probs.clamp_min(1e-12).tolist(), color=colours)
    ax[1].set(yscale="log", ylim=(1e-8, 1.5), ylabel="softmax", title=title)
    fig.tight_layout()
    return fig


def figure_png(fig, dpi: int = 80) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()

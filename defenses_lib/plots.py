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
        delta = x_adv[i] - x[i]
        _imshow(axes[i, 1], delta, f"perturbation, max {float(delta.abs().max()):.2f}", cmap="seismic")
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
            ax.text(0.5, -0.08 - 0.16 * k, text, transform=ax.transAxes, ha="center", va="top", fontsize=8,
                    color=colour)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def show_stages(stages: dict[str, torch.Tensor], notes: dict[str, list[str]] | None = None, title: str = ""):
    """A grid with a column per stage of a pipeline (clean, transformed, purified, ...) and a row per image."""
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


def hvp_error_figure(errors: dict[str, list[float]], h_grid, h_train: float, costs: dict[str, float],
                     rounds: int):
    """Chapter 1: the finite-difference HVP's relative error against h, beside the cost of each product."""
    fig, ax = plt.subplots(1, 2, figsize=(11.5, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    for name, errs in errors.items():
        ax[0].loglog(h_grid, errs, marker="o", label=name)
    ax[0].axvline(h_train, color="grey", ls=":", label=f"training h = {h_train:g}")
    ax[0].set(xlabel="h (pixel units, $\\ell_2$)", ylabel="relative error vs exact HVP",
              title="finite-difference HVP error")
    ax[0].grid(alpha=0.3, which="both")
    ax[0].legend(fontsize=8)
    ax[1].barh(list(costs), [1000 * t for t in costs.values()], color=["grey", "C0", "C1"][:len(costs)])
    ax[1].set(xlabel=f"ms per batch (fastest of {rounds} rounds)", title="cost, one member")
    fig.tight_layout()
    return fig


def selector_figure(levels: dict[float, torch.Tensor], images: torch.Tensor, target: float, k: int = 4):
    """Chapter 3: histograms of the raw selector output per target, and the images with the smallest
    and largest output at ``target``."""
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.4))
    for t, s in levels.items():
        ax[0].hist(s.numpy(), bins=30, alpha=0.6, label=f"sigma_t = {t:g}")
    ax[0].set(xlabel="selector output sigma_s(x)", ylabel="test images", title="raw selector output")
    ax[0].legend()
    order = levels[target].argsort()
    pick = torch.cat([order[:k], order[-k:]])
    ax[1].imshow(torch.cat([images[i, 0] for i in pick], 1).numpy(), cmap="gray")
    ax[1].set(title=f"smallest (left {k}) and largest (right {k}) sigma_s at sigma_t = {target:g}",
              xticks=[], yticks=[])
    return fig


def transport_figure(diag, title: str = "ARMOR_D (KL)"):
    """Chapter 4: the implicit weights against the transported loss, and how far samples moved."""
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].scatter(diag.loss_after, diag.weights, s=8, alpha=0.6)
    ax[0].set(xscale="log", yscale="log", xlabel="loss of the transported sample",
              ylabel="implicit weight (mean 1)", title=f"{title}: implicit weights, lambda = {diag.lam:.2f}")
    moved = diag.moved
    linf = moved.abs().amax(1)
    ax[1].hist(moved.norm(dim=1), bins=30)
    ax[1].set(xlabel=r"$\|x' - x\|_2$", ylabel="samples",
              title=rf"distance moved ($\ell_\infty$ {linf.min():.2f} to {linf.max():.2f})")
    fig.tight_layout()
    return fig


def success_figure(scores: dict[str, torch.Tensor], success: torch.Tensor, title: str = ""):
    """Chapter 5: the softmax variance against the clean margin, coloured by attack success, and the
    log-softmax variance's histogram for the two groups."""
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    groups = ((0, "tab:blue", "attack failed"), (1, "tab:red", "attack succeeded"))
    for ok, colour, label in groups:
        sel = success == ok
        ax[0].scatter(scores["clean margin"][sel], scores["softmax variance"][sel], s=6, alpha=0.5,
                      color=colour, label=label)
    ax[0].set(yscale="log", xlabel="clean margin (true logit - best wrong logit)",
              ylabel="wrong-class softmax variance", title="the CE model's test images")
    ax[0].legend()
    spread = scores["log-softmax variance"]
    ax[1].hist([spread[success == ok].numpy() for ok, _, _ in groups], bins=30, density=True,
               label=["failed", "succeeded"], color=[c for _, c, _ in groups])
    ax[1].set(xlabel="wrong-class log-softmax variance", ylabel="density", title=title)
    ax[1].legend()
    fig.tight_layout()
    return fig


def tradeoff_figure(accuracy: dict[str, list[float]], spread: list[float], labels: list[str], ax,
                    title: str = "the a / b trade-off (a = 1)", ylabel: str = "accuracy (%)"):
    """Chapter 5: accuracies (%) against b, with the mean wrong-class spread on a log right axis."""
    for k, v in accuracy.items():
        ax.plot(labels, v, marker="o", label=k)
    ax.set(xlabel="b (0 = cross-entropy)", ylabel=ylabel, ylim=(-2, 102), title=title)
    right = ax.twinx()
    right.plot(labels, spread, color="grey", ls="--", marker="s", label="wrong-class spread (right axis)")
    right.set(yscale="log", ylabel="mean wrong-class log-softmax variance")
    ax.legend(loc="center left", fontsize=8)
    right.legend(loc="lower left", fontsize=8)
    return ax


def _bars_with_intervals(ax, summary: dict[str, dict], columns: list[str]) -> None:
    """Horizontal bars (%) with 95% interval whiskers, one group per row of ``summary``."""
    names, width = list(summary), 0.8 / len(columns)
    for i, c in enumerate(columns):
        est = [summary[n][c] if not isinstance(summary[n][c], str) else None for n in names]
        vals = [100 * e.value if e else 0 for e in est]
        # a value a rounding error outside its interval would give a negative whisker: clamp at 0
        err = [[max(100 * (e.value - e.low), 0) if e else 0 for e in est],
               [max(100 * (e.high - e.value), 0) if e else 0 for e in est]]
        ax.barh([k + i * width for k in range(len(names))], vals, height=width, label=c, xerr=err,
                error_kw={"elinewidth": 0.8, "capsize": 1.5, "ecolor": "0.3"})
    ax.set_yticks([k + 0.4 - width / 2 for k in range(len(names))], names)
    ax.invert_yaxis()
    ax.set(xlabel="accuracy (%), with 95% intervals", xlim=(0, 100),
           title="accuracy: clean, worst case under attack, certified")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3)


def _robustness_against_cost(ax, summary: dict[str, dict], costs: dict[str, dict], column: str) -> None:
    """A point per defense: training cost (log scale) against ``column``, with its interval."""
    from matplotlib.ticker import LogLocator, NullLocator, ScalarFormatter

    placed = []
    for n, row in summary.items():
        c, e = costs[n], row[column]
        xy = (c["standard epochs"], 100 * e.value)
        ax.scatter(*xy, s=30 + 12 * c["forward passes"] ** 0.5, alpha=0.7)
        ax.errorbar(*xy, yerr=[[100 * (e.value - e.low)], [100 * (e.high - e.value)]], fmt="none",
                    ecolor="0.7", lw=0.8)
        below = sum(0.7 < xy[0] / p[0] < 1.4 and abs(xy[1] - p[1]) < 3 for p in placed)  # overlapping labels
        ax.annotate(n, xy, fontsize=8, xytext=(4, 3 - 10 * below), textcoords="offset points")
        placed.append(xy)
    ax.set(xscale="log", xlabel="training cost (standard epochs, FLOPs)", ylabel=f"{column} (%), 95% interval",
           title="robustness against training cost\n(marker area grows with the cost of a prediction)")
    ax.xaxis.set_major_locator(LogLocator(base=2))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.grid(alpha=0.3)


def comparison_figure(summary: dict[str, dict], costs: dict[str, dict], column: str, max_columns: int = 5):
    """Chapter 6: every defense's clean, worst-case and certified accuracy, and robustness against cost."""
    first = next(iter(summary.values()))
    cols = [c for c in first if c == "clean" or c.startswith(("worst case", "certified"))][:max_columns]
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    _bars_with_intervals(ax[0], summary, cols)
    _robustness_against_cost(ax[1], summary, costs, column)
    fig.tight_layout()
    return fig


def reference_figure(table: dict[str, dict], columns: list[str], title: str = ""):
    """Chapter 6's reference run: per defense (a row) and column (a panel), the accuracy pooled over the
    training seeds with its 95% interval, and each seed's own accuracy as a small open marker."""
    names = list(table)
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns) + 1.5, 0.42 * len(names) + 1.4),
                             sharey=True, squeeze=False)
    for ax, c in zip(axes[0], columns):
        for k, n in enumerate(names):
            cell = table[n][c]
            if isinstance(cell, str):   # "–": the defense does not have this column
                continue
            e = cell.pooled
            ax.errorbar(100 * e.value, k, xerr=[[max(100 * (e.value - e.low), 0)], [max(100 * (e.high - e.value), 0)]],
                        fmt="o", color="C0", ms=5, capsize=2.5, lw=1.2)
            ax.scatter([100 * v for v in cell.per_seed], [k] * len(cell.per_seed), s=18, facecolors="none",
                       edgecolors="C1", zorder=3, lw=0.9)
        ax.set(title=c, xlim=(0, 100), xlabel="accuracy (%)")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(names)), names)
    axes[0][0].invert_yaxis()
    fig.suptitle(title or "pooled over the seeds with 95% interval (blue); each seed (orange circles)", fontsize=10)
    fig.tight_layout()
    return fig


def strength_figure(sweeps: dict, used: tuple[int, int] | None = None, tol: float = 0.03, title: str = ""):
    """Accuracy (%, 95% intervals) against the attack's EOT draws per step and against its steps, one
    line per :class:`~defenses_lib.strength.StrengthSweep`; each arm's plateau ringed, ``used`` (the
    tables' draws and steps) dotted."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    for ax, along in zip(axes, ("draws", "steps")):
        for name, sweep in sweeps.items():
            est = sweep.intervals(along)
            k, v = list(est), [100 * e.value for e in est.values()]
            err = [[max(100 * (e.value - e.low), 0) for e in est.values()],
                   [max(100 * (e.high - e.value), 0) for e in est.values()]]
            line = ax.errorbar(k, v, yerr=err, marker="o", capsize=2, label=name)
            p = sweep.plateau(along, tol)
            ax.plot([p], [v[k.index(p)]], "o", ms=12, mfc="none", color=line[0].get_color())
        if used is not None:
            ax.axvline(used[0] if along == "draws" else used[1], color="grey", ls=":", lw=1, label="the tables' attack")
        fixed = f"at {sweep.steps[0]} steps" if along == "draws" else f"at {sweep.draws[-1]} draws per step"
        ax.set(xscale="log", xlabel=f"PGD's {'EOT draws per step' if along == 'draws' else 'steps'} ({fixed})",
               title=f"by {along}")
        ax.set_xticks(k, [str(i) for i in k])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy under attack (%)")
    axes[1].legend(fontsize=8, loc="lower right")
    ring = f"rings: the plateau, the fewest not shown to be over {100 * tol:g} points weaker than the strongest"
    fig.suptitle(title or f"attack strength ({ring})")
    fig.tight_layout()
    return fig

"""The figures of the report: training curves, latent interpolations and the latent scatter, as PNG bytes marked as
elbox's own (elbox.io.atomic). matplotlib is imported when a figure is drawn."""

from __future__ import annotations

import io
import math

import torch

from elbox.core.extras import require
from elbox.io.atomic import PNG_SOFTWARE
from elbox.io.plots import grid_png

# curves with this many points or fewer get markers: a line through one point draws nothing
FEW_POINTS = 20


def is_number(value: object) -> bool:
    """A finite int or float (not a bool): a metrics value that can be drawn or printed."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def pyplot():
    """matplotlib.pyplot, drawing to files (the Agg backend); ElboxError with the pip line when matplotlib is
    missing (the report extra)."""
    require("matplotlib", "drawing figures").use("Agg")
    return require("matplotlib.pyplot", "drawing figures")


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, metadata={"Software": PNG_SOFTWARE})  # elbox's own (elbox.io.atomic)
    pyplot().close(figure)
    return buffer.getvalue()


def grid_png_of(images: torch.Tensor, nrow: int | None = None, row_labels: tuple[str, ...] = ()) -> bytes:
    return grid_png(images.clamp(0, 1).cpu(), nrow=nrow, row_labels=row_labels)


def _markers(n: int) -> dict:
    """Plot options: a marker on each point of a curve of few points (a short run's line may have only one)."""
    return {"marker": "o", "markersize": 3} if n <= FEW_POINTS else {}


def curves_png(records: list[dict], bits: float) -> bytes:
    return _png(curves_figure(records, bits))


def curves_figure(records: list[dict], bits: float):
    """Two panels, so that neither squeezes the other: the bound (-ELBO of training batches and of validation, and
    -reconstruction) in nats per example with bits/dim on the right axis; the KL terms (validation, per latent
    group, and of training batches) in nats per example, on a log axis only when they span more than 100x."""
    plt = pyplot()

    train = [r for r in records if r.get("kind") == "train"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    fig, (ax, kl_ax) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        steps = [r["step"] for r in train]
        ax.plot(steps, [-r["elbo"] for r in train], label="-ELBO (training batches)", alpha=0.7, **_markers(len(train)))
        ax.plot(
            steps,
            [-r["reconstruction"] for r in train],
            label="-reconstruction (training batches)",
            alpha=0.7,
            **_markers(len(train)),
        )
    ax.plot([r["step"] for r in epochs], [-r["val_elbo"] for r in epochs], "o-", label="-ELBO (validation)")
    ax.set(xlabel="optimizer step", ylabel="nats per example", title="the bound (lower is better)")
    ax.secondary_yaxis("right", functions=(lambda n: n / bits, lambda b: b * bits)).set_ylabel("bits per dimension")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    kls = []
    for key in sorted({k for r in epochs for k in r if k.startswith("val_kl")}):
        kls += [r[key] for r in epochs if key in r]
        kl_ax.plot(
            [r["step"] for r in epochs], [r.get(key, math.nan) for r in epochs], "o-", label=key[4:] + " (validation)"
        )
    if train and all(is_number(r.get("kl")) for r in train):
        kls += [r["kl"] for r in train]
        kl_ax.plot(
            [r["step"] for r in train],
            [r["kl"] for r in train],
            alpha=0.7,
            label="kl (training batches)",
            **_markers(len(train)),
        )
    if kls and min(kls) > 0 and max(kls) > 100 * min(kls):
        kl_ax.set_yscale("log")
    kl_ax.set(xlabel="optimizer step", ylabel="nats per example", title="KL terms (the rate)")
    kl_ax.legend(fontsize=8)
    kl_ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


@torch.no_grad()
def interpolations_png(model, x: torch.Tensor, pairs: int = 4, steps: int = 8) -> bytes:
    """Decodings of z = (1 - a) E[z|x_i] + a E[z|x_j] for a in [0, 1], one row per pair of images (as many pairs as
    x holds, up to `pairs`)."""
    pairs = min(pairs, x.shape[0] // 2)
    z = model.encode(x[: 2 * pairs])
    a = torch.linspace(0, 1, steps, device=z.device)[None, :, None]
    path = (1 - a) * z[0::2, None] + a * z[1::2, None]  # [pairs, steps, d]
    images = model.likelihood.mean(model.decode(path.reshape(-1, z.shape[-1])))
    return grid_png_of(images, nrow=steps)


@torch.no_grad()
def scatter_png(model, x: torch.Tensor, labels: torch.Tensor | None) -> bytes:
    """Posterior means of x in the plane, coloured by label (one colour where the data have no labels)."""
    plt = pyplot()

    z = model.encode(x).cpu()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    if labels is None:
        ax.scatter(z[:, 0], z[:, 1], s=4, alpha=0.7)
    else:
        fig.colorbar(ax.scatter(z[:, 0], z[:, 1], c=labels.cpu(), cmap="tab10", s=4, alpha=0.7), ax=ax, label="label")
    ax.set_xlabel("E[z_1 | x]")
    ax.set_ylabel("E[z_2 | x]")
    ax.set_title("encodings (posterior means)")  # of which images: the section's caption says
    fig.tight_layout()
    return _png(fig)

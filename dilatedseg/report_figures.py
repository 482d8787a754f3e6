"""The figures of `dilatedseg report` (matplotlib, Agg backend): plain data in, PNG files out."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from dilatedseg.viz import colourise  # noqa: E402

DPI = 80


def save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return path


def training_curves(histories: dict[str, list[dict]], path: Path) -> Path:
    """Val mIoU and train / val loss per epoch of each run (label -> summary.json history)."""
    figure, (miou_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for index, (label, history) in enumerate(histories.items()):
        colour = f"C{index}"
        epochs = [row["epoch"] + 1 for row in history]
        miou_ax.plot(epochs, [row.get("val/mIoU") for row in history], "o-", color=colour,
                     label=label, markersize=3)
        loss_ax.plot(epochs, [row.get("train/loss") for row in history], "-", color=colour,
                     label=f"{label} (train)")
        loss_ax.plot(epochs, [row.get("val/loss") for row in history], "--", color=colour,
                     label=f"{label} (val)")
    miou_ax.set(xlabel="epoch", ylabel="val mIoU (%)", title="Validation mIoU")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="Loss (train: last batch)",
                yscale="log")
    miou_ax.legend(fontsize=8)
    loss_ax.legend(fontsize=7, ncol=2)
    for ax in (miou_ax, loss_ax):
        ax.grid(alpha=0.3)
    return save(figure, path)


def miou_vs_receptive_field(points: Sequence[dict], frontend_miou: float | None,
                            frontend_field: int, path: Path) -> Path:
    """Scatter of val mIoU against receptive field (px), one labelled point per schedule.

    ``points``: dicts with "label", "field_px" and "miou"."""
    figure, ax = plt.subplots(figsize=(7, 4))
    done = [p for p in points if p["miou"] is not None]
    done.sort(key=lambda p: p["field_px"])
    ax.plot([p["field_px"] for p in done], [p["miou"] for p in done], "o-", color="C0",
            label="front-end + basic context (identity init)")
    for point in done:
        ax.annotate(point["label"], (point["field_px"], point["miou"]), fontsize=7,
                    textcoords="offset points", xytext=(4, -10))
    if frontend_miou is not None:
        ax.scatter([frontend_field], [frontend_miou], marker="s", color="C3", zorder=3,
                   label="front-end alone")
    ax.set(xscale="log", xlabel="receptive field of one output (px, log scale)",
           ylabel="val mIoU (%)", title="Dilation schedule: mIoU against receptive field")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    return save(figure, path)


def receptive_fields(columns: Sequence[dict], image: np.ndarray, path: Path) -> Path:
    """One column per schedule: top, |d logit / d image| of the centre output over a val image
    (theoretical field as a square); bottom, |d output / d input| of the context module alone,
    in feature cells.

    ``columns``: dicts with "label", "image_map" (H, W), "field_px", "centre" (y, x) in pixels,
    "context_map" (h, w) and "field_cells"."""
    count = len(columns)
    figure, axes = plt.subplots(2, count, figsize=(2.2 * count, 4.8), squeeze=False)
    for column, ax_image, ax_context in zip(columns, axes[0], axes[1]):
        strength = column["image_map"] / max(float(column["image_map"].max()), 1e-12)
        ax_image.imshow(image, alpha=0.35)
        ax_image.imshow(np.sqrt(strength), cmap="magma", alpha=0.75)
        cy, cx = column["centre"]
        half = column["field_px"] / 2
        ax_image.add_patch(Rectangle((cx - half, cy - half), 2 * half, 2 * half, fill=False,
                                     edgecolor="cyan", linewidth=1))
        ax_image.plot([cx], [cy], "c+", markersize=6)
        ax_image.set_xlim(-0.5, image.shape[1] - 0.5)
        ax_image.set_ylim(image.shape[0] - 0.5, -0.5)
        ax_image.set_title(f"{column['label']}\nRF {column['field_px']} px", fontsize=8)
        for ax in (ax_image, ax_context):
            ax.set_xticks([])
            ax.set_yticks([])
        context_map = column["context_map"]
        if context_map is None:
            ax_context.axis("off")
            continue
        ax_context.imshow(np.log10(context_map / max(float(context_map.max()), 1e-30) + 1e-6),
                          cmap="viridis", vmin=-6, vmax=0)
        ax_context.set_title(f"context alone: {column['field_cells']} cells", fontsize=8)
    axes[0][0].set_ylabel("trained model,\n|grad| on the image", fontsize=8)
    axes[1][min(1, count - 1)].set_ylabel("identity init,\nlog10 |grad| (cells)", fontsize=8)
    return save(figure, path)


def predictions(images: Sequence[np.ndarray], truths: Sequence[np.ndarray],
                columns: dict[str, Sequence[np.ndarray]], palette, class_names: Sequence[str],
                path: Path) -> Path:
    """Rows of val images: image, ground truth, then each model's prediction (colourised)."""
    titles = ["image", "ground truth", *columns]
    rows = len(images)
    figure, axes = plt.subplots(rows, len(titles), figsize=(1.9 * len(titles), 1.9 * rows + 0.5),
                                squeeze=False)
    for row in range(rows):
        panels = [images[row], colourise(truths[row], palette)]
        panels += [colourise(masks[row], palette) for masks in columns.values()]
        for ax, panel, title in zip(axes[row], panels, titles):
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
    handles = [Patch(color=np.asarray(colour) / 255, label=name)
               for name, colour in zip(class_names, palette)]
    figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8,
                  frameon=False, bbox_to_anchor=(0.5, 0.0))
    return save(figure, path)

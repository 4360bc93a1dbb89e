"""Redraw the DEIM paper's Figure 4: MAL and VFL of one positive query against its confidence, at IoU 0.05 and 0.95.

    python docs/plot_mal_vs_vfl.py      # writes docs/mal_vs_vfl.png

Uses the library's own loss functions (deim_ultra/loss/mal.py) on a single matched logit, gamma 1.5 for MAL
(DEIM's default) and gamma 2, alpha 0.75 for VFL (RT-DETR / D-FINE).
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from deim_ultra.loss.mal import mal_loss, vfl_loss  # noqa: E402


def positive_loss(loss_fn, confidence: torch.Tensor, iou: float, **kwargs) -> torch.Tensor:
    """Loss of one query matched to a GT of class 0 (single class), for each confidence in `confidence`."""
    logits = torch.logit(confidence)[:, None, None]  # (N, 1 query, 1 class)
    onehot = torch.ones_like(logits)
    matched_iou = torch.full(logits.shape[:2], iou)
    return torch.stack([loss_fn(lg, oh, q, **kwargs) for lg, oh, q in zip(logits, onehot, matched_iou)])


def main() -> None:
    confidence = torch.linspace(0.01, 0.99, 197, dtype=torch.float64)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, iou in zip(axes, (0.05, 0.95)):
        ax.plot(confidence, positive_loss(mal_loss, confidence, iou, gamma=1.5), label="MAL (gamma 1.5)")
        ax.plot(confidence, positive_loss(vfl_loss, confidence, iou, gamma=2.0, alpha=0.75), label="VFL")
        ax.set(title=f"matched query, IoU = {iou}", xlabel="predicted confidence p")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss")
    axes[0].legend()
    fig.tight_layout()
    out = Path(__file__).with_name("mal_vs_vfl.png")
    fig.savefig(out, dpi=120)
    print(f"saved {out}")


if __name__ == "__main__":
    main()

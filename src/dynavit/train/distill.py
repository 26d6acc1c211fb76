"""Knowledge-distillation losses shared by every trainer that learns from a teacher's outputs.

``kd_loss`` is Hinton et al.'s ``T^2 * KL(softmax(t/T) || softmax(s/T))`` over dimension 1, averaged
over everything else: over images for (B, C) classification logits, over images and pixels for
(B, C, H, W) segmentation logits, so one loss serves both tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dynavit.errors import DynavitError


@dataclass(frozen=True)
class Distill:
    temperature: float = 2.0
    label_weight: float = 0.5  # w: share of the label cross-entropy when labels are used
    use_labels: bool = True

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise DynavitError(f"distillation temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.label_weight <= 1.0:
            raise DynavitError(f"label weight must be in [0, 1], got {self.label_weight}")


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(teacher || student)`` over dim 1 (classes), mean over the other dims."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True, reduction="none")
    return kl.sum(1).mean() * t * t


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None, d: Distill,
                 ignore_index: int = -100) -> torch.Tensor:
    """``(1 - w) * KD + w * CE`` when labels are used, else KD alone."""
    kd = kd_loss(student, teacher, d.temperature)
    if labels is None or not d.use_labels:
        return kd
    return (1 - d.label_weight) * kd + d.label_weight * F.cross_entropy(student, labels, ignore_index=ignore_index)


def attention_kd(early: torch.Tensor, late: torch.Tensor) -> torch.Tensor:
    """KL(late || early) between two (B, N) token-importance distributions (rows sum to 1), mean over B.

    SaiT's distillation for early token selection: the importance a pruning layer reads (its CLS
    attention) learns to agree with the importance the dense model's last layer assigns.
    """
    early = early / early.sum(1, keepdim=True).clamp_min(1e-12)
    late = late / late.sum(1, keepdim=True).clamp_min(1e-12)
    return F.kl_div(early.clamp_min(1e-12).log(), late, reduction="batchmean")


__all__ = ["Distill", "attention_kd", "distill_loss", "kd_loss"]

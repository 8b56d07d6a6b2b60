"""How two sets of logits for the same tokens are compared (pure numpy, float64).

KL(p_hf || p_maxtext) = Σ_v p_hf(v) · (log p_hf(v) − log p_maxtext(v)) at each position, with
p = softmax(logits) computed in float64: the per-position term of MaxText's checker
(`F.kl_div(log_softmax(mt), softmax(hf))`, maxtext-layout.md §12). The verdict uses its maximum over
every position of every prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KL_DEFINITION = ("KL(p_hf || p_maxtext) = sum_v p_hf * (log p_hf - log p_maxtext) per position, "
                 "p = softmax(logits) in float64")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_per_position(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """(T, V) logits twice -> (T,) KL(softmax(ref) || softmax(got))."""
    lp, lq = log_softmax(ref), log_softmax(got)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


def top_k(logits: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    """The k largest entries of a (V,) row, highest first (ties broken by lower id)."""
    k = min(k, logits.shape[-1])
    order = np.lexsort((np.arange(logits.shape[-1]), -logits.astype(np.float64)))[:k]
    return [int(i) for i in order], [float(logits[i]) for i in order]


@dataclass(frozen=True)
class PromptMetrics:
    """Every figure for one prompt; top-k figures are for its last position."""

    kl: np.ndarray                # (T,) per position
    max_abs_dlogit: float
    max_abs_dprob: float
    top1_agreement: float         # fraction of positions whose argmax ids agree
    hf_top_ids: list[int]
    hf_top_logits: list[float]
    mt_top_ids: list[int]
    mt_top_logits: list[float]

    @property
    def kl_max(self) -> float:
        return float(self.kl.max())

    @property
    def kl_mean(self) -> float:
        return float(self.kl.mean())

    @property
    def kl_argmax(self) -> int:
        return int(np.nanargmax(self.kl)) if np.isfinite(self.kl).any() else 0

    @property
    def top_k_overlap(self) -> int:
        return len(set(self.hf_top_ids) & set(self.mt_top_ids))

    @property
    def rank_agreement(self) -> float:
        """Fraction of ranks holding the same id in both top-k lists."""
        same = sum(a == b for a, b in zip(self.hf_top_ids, self.mt_top_ids, strict=True))
        return same / len(self.hf_top_ids) if self.hf_top_ids else 1.0

    @property
    def jaccard(self) -> float:
        a, b = set(self.hf_top_ids), set(self.mt_top_ids)
        return len(a & b) / len(a | b) if a | b else 1.0


def compare(ref: np.ndarray, got: np.ndarray, k: int) -> PromptMetrics:
    """Compare (T, V) reference (HF) logits with (T, V) MaxText logits of the same tokens."""
    if ref.shape != got.shape or ref.ndim != 2:
        raise ValueError(f"logits shapes differ: {ref.shape} vs {got.shape}")
    lp, lq = log_softmax(ref), log_softmax(got)
    p, q = np.exp(lp), np.exp(lq)
    kl = (p * (lp - lq)).sum(axis=-1)
    hf_ids, hf_logits = top_k(ref[-1], k)
    mt_ids, mt_logits = top_k(got[-1], k)
    return PromptMetrics(
        kl=kl,
        max_abs_dlogit=float(np.abs(ref.astype(np.float64) - got.astype(np.float64)).max()),
        max_abs_dprob=float(np.abs(p - q).max()),
        top1_agreement=float((ref.argmax(-1) == got.argmax(-1)).mean()),
        hf_top_ids=hf_ids, hf_top_logits=hf_logits, mt_top_ids=mt_ids, mt_top_logits=mt_logits,
    )

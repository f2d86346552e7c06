"""Partial labels: ``other`` as *unlabelled* rather than negative (positive-unlabelled learning).

IF-derived labels miss positives (weakly staining cells, thresholds, registration error), and
those cells land in ``other``. Treating ``other`` as negative teaches the model to miss them
too. With ``--partial-labels nnpu`` the labelled immune cells are the positives ``P`` and the
``other`` cells the unlabelled set ``U`` holding a fraction ``prior`` of hidden positives.

- :func:`nnpu_loss` — the non-negative PU risk (Kiryo et al., NeurIPS 2017) on the binary
  "immune vs other" logit ``s = logsumexp(z_immune) - z_other`` of a K-class model, plus
  cross-entropy among the immune classes for ``P``; when the estimated negative risk goes below
  zero its gradient is reversed (scaled by ``gamma``) instead of letting the model overfit.
- :func:`estimate_prior` — the hidden-positive fraction of ``U`` (Elkan & Noto, KDD 2008): a
  logistic regression labelled-vs-unlabelled ``g(x)``, ``c = mean g`` on held-out labelled cells,
  ``prior = mean over U of (1 - c) / c * g / (1 - g)`` (clipped to [0, 1]).
- :func:`crop_features` — the per-cell features that estimate uses when no model exists yet:
  colour inside/outside the mask, mask area, darkness; vectorised over crops.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F


def nnpu_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    other: int,
    prior: float,
    *,
    class_weight: torch.Tensor | None = None,
    gamma: float = 1.0,
) -> torch.Tensor:
    """Loss of a batch: ``logits`` ``(B, K)``, ``target`` ``(B,)`` class indices, where
    ``target == other`` marks the unlabelled cells. ``prior`` is the fraction of hidden
    positives among them."""
    pos = target != other
    unl = ~pos
    n = max(int(target.numel()), 1)
    keep = [k for k in range(logits.shape[1]) if k != other]
    s = torch.logsumexp(logits[:, keep], dim=1) - logits[:, other]
    loss = logits.new_zeros(())
    if pos.any():
        # which immune class, among the immune classes only
        remap = torch.full((logits.shape[1],), -1, dtype=torch.long, device=target.device)
        remap[keep] = torch.arange(len(keep), device=target.device)
        w = class_weight[keep] if class_weight is not None else None
        loss = loss + F.cross_entropy(logits[pos][:, keep], remap[target[pos]], weight=w) * (
            pos.sum() / n
        )
    if not (pos.any() and unl.any()):
        if unl.any():  # no positives in this batch: plain negatives
            loss = loss + F.softplus(s[unl]).mean() * (unl.sum() / n)
        if pos.any():
            loss = loss + F.softplus(-s[pos]).mean() * (pos.sum() / n)
        return loss
    w_p, w_u = pos.sum() / n, unl.sum() / n
    risk_p_pos = F.softplus(-s[pos]).mean()  # positives called positive
    risk_p_neg = F.softplus(s[pos]).mean()  # positives called negative
    risk_u_neg = F.softplus(s[unl]).mean()  # unlabelled called negative
    negative = risk_u_neg - prior * risk_p_neg
    positive = (w_p + w_u * prior) * risk_p_pos
    if negative.item() >= 0:
        return loss + positive + w_u * negative
    return loss + positive - gamma * w_u * negative


def _logistic(x: np.ndarray, y: np.ndarray, iters: int = 25, ridge: float = 1e-3) -> np.ndarray:
    """Weights (with intercept last) of a ridge logistic regression by Newton's method."""
    X = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(X.shape[1])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(X @ w, -30, 30)))
        grad = X.T @ (p - y) + ridge * w
        hess = (X * (p * (1 - p))[:, None]).T @ X + ridge * np.eye(X.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-6:
            break
    return w


def estimate_prior(
    features: np.ndarray, labelled: np.ndarray, *, seed: int = 0
) -> dict[str, float]:
    """Elkan–Noto estimate of the positive fraction among the unlabelled rows.

    ``features`` ``(N, F)``; ``labelled`` ``(N,)`` bool (True = a labelled positive). A random
    quarter of all rows is held out (labelled and unlabelled alike, so ``g`` sees the true
    labelling rate) and ``c = P(labelled | positive)`` is measured on its labelled rows.
    Returns ``prior`` (hidden positives / unlabelled), ``c`` and ``hidden`` (the estimated
    count)."""
    features = np.asarray(features, np.float64)
    labelled = np.asarray(labelled, bool)
    if labelled.sum() < 8 or (~labelled).sum() < 8:
        return {"prior": 0.0, "c": float("nan"), "hidden": 0.0}
    mu, sd = features.mean(0), features.std(0) + 1e-9
    z = (features - mu) / sd
    rng = np.random.default_rng(seed)
    fit = rng.random(len(z)) >= 0.25
    held = ~fit & labelled
    if held.sum() < 2:
        held = labelled
    # quadratic terms let the boundary curve (a linear g under-fits colour clusters)
    zz = np.hstack([z, z**2])
    w = _logistic(zz[fit], labelled[fit].astype(float))
    g = 1.0 / (1.0 + np.exp(-np.clip(np.hstack([zz, np.ones((len(zz), 1))]) @ w, -30, 30)))
    c = float(np.clip(g[held].mean(), 1e-3, 1.0))
    gu = np.clip(g[~labelled], 0.0, 1.0 - 1e-6)
    weight = np.clip((1.0 - c) / c * gu / (1.0 - gu), 0.0, 1.0)
    return {"prior": float(weight.mean()), "c": c, "hidden": float(weight.sum())}


def crop_features(he: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``(N, 9)`` features of crops ``he`` ``(N, 64, 64, 3)`` uint8 and ``mask`` ``(N, 64, 64)``:
    mean R, G, B inside the mask, mean R, G, B of the rest of the crop, mask area (px), the
    fraction of dark (grey < 100) mask pixels and the grey-level standard deviation inside."""
    m = (mask > 0).astype(np.float32)
    area = m.sum(axis=(1, 2))
    safe = np.maximum(area, 1.0)
    rest = np.maximum(64 * 64 - area, 1.0)
    rgb = he.astype(np.float32)
    inside = (rgb * m[..., None]).sum(axis=(1, 2)) / safe[:, None]
    outside = (rgb * (1 - m)[..., None]).sum(axis=(1, 2)) / rest[:, None]
    grey = rgb.mean(axis=3)
    dark = ((grey < 100) * m).sum(axis=(1, 2)) / safe
    mean_g = (grey * m).sum(axis=(1, 2)) / safe
    var_g = ((grey - mean_g[:, None, None]) ** 2 * m).sum(axis=(1, 2)) / safe
    return np.column_stack([inside, outside, area, dark, np.sqrt(var_g)]).astype(np.float32)

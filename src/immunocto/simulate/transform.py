"""The true H&E -> IF mapping of a simulated slide pair.

``he_to_if(p) = A p + w(p) + s(fov)``: a global affine ``A`` (3x3, H&E level-0 ``(x, y, 1)``
to IF level-0 pixels), a smooth warp ``w`` (a sum of low-frequency sinusoids, a few
pixels), and a constant shift per field of view of the IF scan (stitching error, which
makes registration worst at FOV edges). Everything is stored in ``registration.json`` so
validation can reproduce the mapping exactly.

A smooth warp is partly affine over a finite slide, so "the affine" of a warped mapping is
only defined by a convention. Ours, the one a registration can estimate: ``A`` is the
least-squares affine fit of the whole mapping over the slide, and the local part
``w + s`` has no affine component (the warp carries a compensating linear term).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from immunocto._grid import linear_matrix

#: Local (non-affine) displacement above which a cell is flagged ``art_misregistration``.
MISREGISTRATION_FLAG_PX = 2.0


def _fit_affine(x: np.ndarray, y: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """(2, 3) least-squares affine of displacements ``(dx, dy)`` at ``(x, y)``."""
    design = np.stack([x, y, np.ones_like(x)], axis=1)
    coef, *_ = np.linalg.lstsq(design, np.stack([dx, dy], axis=1), rcond=None)
    return coef.T


@dataclass
class TruthTransform:
    """H&E level-0 ``(x, y)`` -> IF level-0 ``(u, v)`` pixels, and its inverse.

    Attributes
    ----------
    affine : (3, 3) ndarray
    warp_amp : (K, 2) ndarray
        Amplitude (px) of each sinusoid along x and y.
    warp_freq : (K, 2) ndarray
        Spatial frequency (cycles/px) of each sinusoid along x and y.
    warp_phase : (K,) ndarray
    warp_linear : (2, 3) ndarray
        Linear term subtracted from the sinusoids (``w(p) = sum(...) - warp_linear @ (x, y, 1)``).
    fov_size : int
        Edge of a field of view of the IF scan, in IF pixels.
    fov_shift : (ny, nx, 2) ndarray
        Shift (du, dv) of each FOV in IF pixels.
    """

    affine: np.ndarray = field(default_factory=lambda: np.eye(3))
    warp_amp: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    warp_freq: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    warp_phase: np.ndarray = field(default_factory=lambda: np.zeros(0))
    warp_linear: np.ndarray = field(default_factory=lambda: np.zeros((2, 3)))
    fov_size: int = 1024
    fov_shift: np.ndarray = field(default_factory=lambda: np.zeros((1, 1, 2)))

    # ------------------------------------------------------------------ pieces
    def warp(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Smooth displacement ``w(x, y)`` in IF pixels (arrays of the shape of ``x``)."""
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        lin = self.warp_linear
        dx = -(lin[0, 0] * x + lin[0, 1] * y + lin[0, 2])
        dy = -(lin[1, 0] * x + lin[1, 1] * y + lin[1, 2])
        for amp, freq, phase in zip(self.warp_amp, self.warp_freq, self.warp_phase, strict=True):
            s = np.sin(2 * np.pi * (freq[0] * x + freq[1] * y) + phase)
            dx = dx + amp[0] * s
            dy = dy + amp[1] * s
        return dx, dy

    def fov_offset(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stitching shift of the FOV containing IF pixel ``(u, v)``."""
        ny, nx = self.fov_shift.shape[:2]
        iu = np.clip(np.floor(np.asarray(u) / self.fov_size).astype(np.int64), 0, nx - 1)
        iv = np.clip(np.floor(np.asarray(v) / self.fov_size).astype(np.int64), 0, ny - 1)
        return self.fov_shift[iv, iu, 0], self.fov_shift[iv, iu, 1]

    def affine_only(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a = self.affine
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        return a[0, 0] * x + a[0, 1] * y + a[0, 2], a[1, 0] * x + a[1, 1] * y + a[1, 2]

    # ------------------------------------------------------------------ mappings
    def he_to_if(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """IF level-0 position of H&E level-0 points ``(x, y)``."""
        u, v = self.affine_only(x, y)
        dx, dy = self.warp(x, y)
        u = u + dx
        v = v + dy
        su, sv = self.fov_offset(u, v)
        return u + su, v + sv

    def if_to_he(
        self, u: np.ndarray, v: np.ndarray, iterations: int = 6
    ) -> tuple[np.ndarray, np.ndarray]:
        """H&E level-0 position seen at IF pixel ``(u, v)`` (fixed-point inverse)."""
        su, sv = self.fov_offset(u, v)
        qu = np.asarray(u, np.float64) - su
        qv = np.asarray(v, np.float64) - sv
        inv = np.linalg.inv(self.affine)
        x = inv[0, 0] * qu + inv[0, 1] * qv + inv[0, 2]
        y = inv[1, 0] * qu + inv[1, 1] * qv + inv[1, 2]
        if len(self.warp_amp) or np.any(self.warp_linear):
            for _ in range(iterations):
                dx, dy = self.warp(x, y)
                x = inv[0, 0] * (qu - dx) + inv[0, 1] * (qv - dy) + inv[0, 2]
                y = inv[1, 0] * (qu - dx) + inv[1, 1] * (qv - dy) + inv[1, 2]
        return x, y

    def if_to_he_grid(
        self, u0: int, v0: int, width: int, height: int, step: int = 16
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`if_to_he` for every pixel of the IF window ``[v0:v0+height, u0:u0+width]``.

        The smooth part is solved on a grid every ``step`` pixels and interpolated (its
        curvature is tiny); inside one FOV the shift is constant, so each FOV piece of the
        window is a shifted regular grid and is interpolated separably. FOV seams stay sharp.

        Returns
        -------
        x, y : (height, width) float32 ndarrays of H&E level-0 coordinates
        """
        pad = float(np.abs(self.fov_shift).max()) + 2 * step
        gu = np.arange(u0 - pad, u0 + width + pad + step, step)
        gv = np.arange(v0 - pad, v0 + height + pad + step, step)
        smooth = dataclasses.replace(self, fov_shift=np.zeros((1, 1, 2)))
        gx, gy = smooth.if_to_he(*np.meshgrid(gu, gv))
        gx = gx.astype(np.float32)
        gy = gy.astype(np.float32)
        x = np.empty((height, width), np.float32)
        y = np.empty((height, width), np.float32)
        ny, nx = self.fov_shift.shape[:2]
        fs = self.fov_size
        # FOV boundaries inside the window (FOV indices are clipped at the scan's edges).
        cuts_u = [u0] + [k * fs for k in range(1, nx) if u0 < k * fs < u0 + width] + [u0 + width]
        cuts_v = [v0] + [k * fs for k in range(1, ny) if v0 < k * fs < v0 + height] + [v0 + height]
        for va, vb in itertools.pairwise(cuts_v):
            for ua, ub in itertools.pairwise(cuts_u):
                su, sv = self.fov_offset(np.array(ua), np.array(va))
                cols = (np.arange(ua, ub, dtype=np.float64) - float(su) - gu[0]) / step
                rows = (np.arange(va, vb, dtype=np.float64) - float(sv) - gv[0]) / step
                wx = linear_matrix(cols, len(gu))
                wy = linear_matrix(rows, len(gv))
                block = (slice(va - v0, vb - v0), slice(ua - u0, ub - u0))
                x[block] = wy @ gx @ wx.T
                y[block] = wy @ gy @ wx.T
        return x, y

    def local_displacement(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``he_to_if`` minus the affine part: the non-affine misregistration at ``(x, y)``."""
        u, v = self.he_to_if(x, y)
        ua, va = self.affine_only(x, y)
        return u - ua, v - va

    def with_least_squares_affine(self, size: int) -> TruthTransform:
        """The same mapping, re-split so that ``affine`` is its least-squares affine over the
        ``size`` x ``size`` slide and the local part has no affine component."""
        g = np.linspace(0.0, size, 96)
        x, y = (a.ravel() for a in np.meshgrid(g, g))
        u, v = self.he_to_if(x, y)
        ua, va = self.affine_only(x, y)
        lin = _fit_affine(x, y, u - ua, v - va)
        affine = self.affine.copy()
        affine[:2] += lin
        return dataclasses.replace(self, affine=affine, warp_linear=self.warp_linear + lin)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "convention": "affine maps H&E level-0 (x, y, 1) to IF level-0 pixels (x = column, y = row); "
            "he_to_if = affine + warp + fov shift",
            "affine": np.asarray(self.affine).round(12).tolist(),
            "warp": {
                "model": "d = sum_k amp_k * sin(2 pi (fx_k x + fy_k y) + phase_k) - linear_px @ (x, y, 1)",
                "amp_px": np.asarray(self.warp_amp).round(9).tolist(),
                "linear_px": np.asarray(self.warp_linear).round(12).tolist(),
                "freq_cycles_per_px": np.asarray(self.warp_freq).round(12).tolist(),
                "phase": np.asarray(self.warp_phase).round(12).tolist(),
            },
            "fov": {
                "size_px": int(self.fov_size),
                "shift_px": np.asarray(self.fov_shift).round(9).tolist(),
                "model": "IF pixel (u, v) in FOV (floor(v / size), floor(u / size)) is shifted by shift_px[row][col]",
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TruthTransform:
        warp = data.get("warp", {})
        fov = data.get("fov", {})
        return cls(
            affine=np.asarray(data["affine"], np.float64),
            warp_amp=np.asarray(warp.get("amp_px", []), np.float64).reshape(-1, 2),
            warp_freq=np.asarray(warp.get("freq_cycles_per_px", []), np.float64).reshape(-1, 2),
            warp_phase=np.asarray(warp.get("phase", []), np.float64).reshape(-1),
            warp_linear=np.asarray(warp.get("linear_px", np.zeros((2, 3))), np.float64).reshape(
                2, 3
            ),
            fov_size=int(fov.get("size_px", 1024)),
            fov_shift=np.asarray(fov.get("shift_px", [[[0.0, 0.0]]]), np.float64),
        )


def make_transform(size: int, strength: float, rng: np.random.Generator) -> TruthTransform:
    """Draw a misregistration of the given strength (0 = identity) for a ``size``-px slide."""
    # Draw everything regardless of strength so other streams do not shift.
    z = rng.uniform(-1.0, 1.0, 6)
    n_terms = 3
    amp = rng.uniform(0.5, 1.0, (n_terms, 2)) * rng.choice([-1.0, 1.0], (n_terms, 2))
    wavelength = rng.uniform(700.0, 2600.0, n_terms)
    direction = rng.uniform(0, 2 * np.pi, n_terms)
    phase = rng.uniform(0, 2 * np.pi, n_terms)
    fov_size = 1024
    n_fov = -(-size // fov_size)
    fov_shift = rng.standard_normal((n_fov, n_fov, 2))
    s = float(strength)
    angle = np.deg2rad(0.25 * s * z[0])
    scale = 1.0 + 0.002 * s * z[1]
    shear = 0.001 * s * z[2]
    centre = size / 2.0
    rot = np.array(
        [
            [scale * np.cos(angle), -scale * np.sin(angle) + shear],
            [scale * np.sin(angle), scale * np.cos(angle)],
        ]
    )
    shift = np.array([14.0 * s * z[3], 14.0 * s * z[4]])
    affine = np.eye(3)
    affine[:2, :2] = rot
    # Rotate about the slide centre, then shift.
    affine[:2, 2] = centre - rot @ np.array([centre, centre]) + shift
    freq = np.stack([np.cos(direction), np.sin(direction)], axis=1) / wavelength[:, None]
    t = TruthTransform(
        affine=affine,
        warp_amp=1.2 * s * amp,
        warp_freq=freq,
        warp_phase=phase,
        fov_size=fov_size,
        fov_shift=0.9 * s * fov_shift,
    )
    return t.with_least_squares_affine(size)

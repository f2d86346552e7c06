"""Model folders: ``RUN/models/<name>/model.pt`` (state dict), ``config.json`` (architecture,
classes, input channels and their normalisation, training settings) and ``metrics.json``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from immunocto._fs import atomic_path, atomic_write_text
from immunocto.errors import ImmunoctoError
from immunocto.models.arch import build_model
from immunocto.models.channels import InputSpec, normalise, raw_input


def models_dir(run: str | os.PathLike[str]) -> Path:
    return Path(run) / "models"


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> the first CUDA device when there is one, else the CPU; ``cuda`` without a
    GPU falls back to the CPU with a warning in the log."""
    import logging

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger(__name__).warning("no CUDA device here; running on the CPU")
        return torch.device("cpu")
    return torch.device(name)


#: Cells per forward pass when classifying (expand, predict): 128 beat 512 on 2 CPU cores
#: (4096² slide, 2 workers: expand 11.6 vs 12.2 s, 1.08 vs 1.75 GB per process: the
#: activations of a 512-crop batch alone are ~1 GB).
INFERENCE_BATCH = 128


@dataclass
class Classifier:
    """A loaded model with its input spec; :meth:`predict_proba` takes raw batches."""

    model: nn.Module
    spec: InputSpec
    classes: tuple[str, ...]
    config: dict[str, Any]
    device: torch.device

    @torch.no_grad()
    def predict_proba(
        self, he: torch.Tensor, mask: torch.Tensor, if_: torch.Tensor | None
    ) -> torch.Tensor:
        """Calibrated class probabilities ``(B, K)`` (float32, CPU) of raw crops (``he`` ``(B, 3, 64, 64)``
        uint8, ``mask`` ``(B, 1, 64, 64)``, ``if_`` ``(B, C, 64, 64)`` counts)."""
        self.model.eval()
        x = normalise(raw_input(he, mask, if_).to(self.device), self.spec)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = self.model(x)
        else:
            logits = self.model(x)
        return torch.softmax(logits.float() / self.temperature, dim=1).cpu()

    @property
    def temperature(self) -> float:
        """Calibration temperature fitted on the validation cells (1.0 if none)."""
        return float(self.config.get("temperature", 1.0))


@dataclass
class HEModel:
    """A loaded H&E-only model (``kind`` he or he-regression); :meth:`predict` takes raw
    batches: ``he`` ``(B, 3, 64, 64)`` uint8, ``mask`` ``(B, 1, 64, 64)``, ``context``
    ``(B, 3, 64, 64)`` uint8 (or ``None`` for a model without context)."""

    model: nn.Module
    spec: InputSpec
    classes: tuple[str, ...]  # classes, or markers for he-regression
    config: dict[str, Any]
    device: torch.device

    @property
    def kind(self) -> str:
        return str(self.config["kind"])

    @property
    def uses_context(self) -> bool:
        return bool(self.config.get("context", False))

    @torch.no_grad()
    def predict(
        self, he: torch.Tensor, mask: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Calibrated probabilities ``(B, K)`` (kind he: logits + the recorded
        ``logit_adjustment`` that undoes the class weighting, / ``temperature``) or ``log1p``
        marker means ``(B, C)`` (kind he-regression), float32 on the CPU."""
        self.model.eval()
        x = normalise(raw_input(he, mask, None).to(self.device), self.spec)
        c = None
        if self.uses_context:
            if context is None:
                raise ValueError("this model needs the context windows")
            rgb = InputSpec(if_markers=(), mean=self.spec.mean[:3], std=self.spec.std[:3])
            c = normalise(context.float().div(255.0).to(self.device), rgb)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
            c = None if c is None else c.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                z = self.model(x, c)
        else:
            z = self.model(x, c)
        z = z.float().cpu()
        if self.kind == "he-regression":
            t = self.config["targets"]
            return z * torch.tensor(t["std"]) + torch.tensor(t["mean"])
        adjust = self.config.get("logit_adjustment")
        if adjust is not None:
            z = z + torch.tensor(adjust, dtype=z.dtype)
        return torch.softmax(z / float(self.config.get("temperature", 1.0)), dim=1)


def save_model(
    folder: Path, model: nn.Module, config: dict[str, Any], metrics: dict[str, Any]
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "model.pt") as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    atomic_write_text(folder / "config.json", json.dumps(config, indent=1) + "\n")
    atomic_write_text(folder / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    return folder


def load_model(folder: str | os.PathLike[str], device: str = "auto") -> Classifier | HEModel:
    folder = Path(folder)
    for name in ("model.pt", "config.json"):
        if not (folder / name).exists():
            raise ImmunoctoError(
                f"{folder / name}: missing; train a model first (`immunocto train`)"
            )
    try:
        config = json.loads((folder / "config.json").read_text())
        spec = InputSpec.from_dict(config["input"])
        classes = tuple(config["classes"])
        kind = config.get("kind", "bootstrap")
    except (ValueError, KeyError) as err:
        raise ImmunoctoError(
            f"{folder / 'config.json'}: not an immunocto model config ({err}); retrain"
        ) from None
    if kind in ("he", "he-regression"):
        from immunocto.models.arch import HENet

        model = HENet(config["arch"], len(classes), context=bool(config.get("context")))
    else:
        model = build_model(config["arch"], len(spec.channels), len(classes))
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ImmunoctoError(
            f"{folder / 'model.pt'}: does not match its config.json ({str(err).splitlines()[0]})"
        ) from None
    dev = pick_device(device)
    model.to(dev)
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    model.eval()
    if kind in ("he", "he-regression"):
        return HEModel(model, spec, classes, config, dev)
    return Classifier(model, spec, classes, config, dev)

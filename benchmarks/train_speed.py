"""Training and inference cells/s of the bootstrap classifier: our data path against the raw
model step on random tensors (same model, batch, device, precision) in the same run.

- raw: `model(x)` (+ loss, backward, AdamW step when training) on a random `(B, 12, 64, 64)`
  tensor already on the device — the ceiling;
- ours (train): `ShuffledCrops` batches from the crop store -> flips + HED jitter -> 12-channel
  input -> normalise -> the same step;
- ours (inference): `CropDataset`-free stream of stored crops -> input -> `predict_proba`.

On a GPU: bf16 autocast + channels_last (as `train` uses them). Ratio = ours / raw.

    python benchmarks/train_speed.py --run RUN --archs small resnet18 resnet50 --batch 256 --steps 10
    python benchmarks/train_speed.py --run RUN --batch 2048 --device cuda     # on a GPU machine
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from _results import record
from immunocto.db.datasets import ShuffledCrops, hed_jitter, random_flips
from immunocto.models.arch import build_model
from immunocto.models.channels import InputSpec, normalise, raw_input
from immunocto.models.checkpoint import pick_device


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _step(model, opt, x, y, dev, train: bool):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        out = model(x.contiguous(memory_format=torch.channels_last) if dev.type == "cuda" else x)
    if train:
        loss = nn.functional.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def raw_rate(model, opt, batch, dev, steps, train):
    x = torch.randn(batch, 12, 64, 64, device=dev)
    y = torch.randint(0, 5, (batch,), device=dev)
    _step(model, opt, x, y, dev, train)  # warm-up
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        _step(model, opt, x, y, dev, train)
    _sync(dev)
    return batch * steps / (time.perf_counter() - t0)


def ours_rate(model, opt, run, batch, dev, steps, train, workers):
    spec = InputSpec(mean=[0.0] * 12, std=[1.0] * 12)
    ds = ShuffledCrops(run, split=None, with_if=True, batch_size=batch)
    loader = DataLoader(
        ds,
        batch_size=None,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=dev.type == "cuda",
    )
    gen = torch.Generator().manual_seed(0)
    done, n, t0 = 0, 0, None
    while done < steps + 1:
        for b in loader:
            if len(b["label"]) < batch:
                continue
            he, mask, ifs = b["he"], b["mask"], b["if"].to(torch.int32)
            if train:
                he, mask, ifs = random_flips(he, mask, ifs, generator=gen)
                he = hed_jitter(he, generator=gen)
            x = normalise(raw_input(he, mask, ifs).to(dev, non_blocking=True), spec)
            y = b["label"].to(dev, non_blocking=True)
            if train:
                _step(model, opt, x, y, dev, True)
            else:
                with torch.no_grad():
                    _step(model, opt, x, y, dev, False)
            done += 1
            if done == 1:
                _sync(dev)
                t0 = time.perf_counter()
            else:
                n += len(y)
            if done >= steps + 1:
                break
    _sync(dev)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--run",
        type=Path,
        required=True,
        help="A run with a crop store with IF (immunocto build-db).",
    )
    ap.add_argument("--archs", nargs="+", default=["small", "resnet18", "resnet50"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    dev = pick_device(args.device)
    rows = []
    for arch in args.archs:
        model = build_model(arch, 12, 5).to(dev)
        if dev.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for train in (True, False):
            model.train(train)
            with torch.set_grad_enabled(train):
                raw = raw_rate(model, opt, args.batch, dev, args.steps, train)
            ours = ours_rate(model, opt, args.run, args.batch, dev, args.steps, train, args.workers)
            rows.append({"arch": arch, "mode": "train" if train else "inference", "device": str(dev), "batch": args.batch,
                         "raw_cells_per_s": round(raw, 1), "ours_cells_per_s": round(ours, 1), "ratio": round(ours / raw, 3),
                         "torch_threads": torch.get_num_threads()})  # fmt: skip
            print(rows[-1], flush=True)
    record(
        "train_speed", rows, echo=False, extra={"cpu_count": int(np.int64(torch.get_num_threads()))}
    )


if __name__ == "__main__":
    main()

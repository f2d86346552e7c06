"""The prepared device check: run it whenever the `device` tool lends a GPU (≤ 5 minutes).

Three measurements, each against its baseline in the same run, on the device it finds
(CUDA when there, else CPU):

1. SAM, `grid` (Immunocto's 64 x 64 prompts per 1024 px tile) vs `guided` (one prompt per
   IF nucleus): tiles/s and prompts per tile. Random weights (no checkpoint can be had here):
   timing and prompt counts only, masks meaningless.
2. The H&E nucleus network: Mpx/s of 0.25 µm/px input through `NucleusModel.segment`, fp32 vs
   bf16 autocast (network + post-processing; the forward pass alone too).
3. The bootstrap classifier: cells/s of our data path (crop store -> augmentation -> 12-channel
   input -> step) vs the raw ResNet50 step on random tensors (`benchmarks/train_speed.py`).

    python benchmarks/gpu.py                  # on the device machine (vit_h, 1024 px tiles)
    python benchmarks/gpu.py --tiny           # anywhere, on CPU in seconds (vit_t, 256 px)

On the device machine the project's dependencies that its image lacks (pydantic, zarr,
tiffslide, segment-anything, duckdb, ...) travel as wheels: `make device-wheels` here puts them in
`.whl/`, and the command there starts with the README's install line for `.whl` (see
`/work/.library/device/README.md`), then `PYTHONPATH=src python3 benchmarks/gpu.py --out $OUT`.
Rows are printed, appended to benchmarks/results/gpu.jsonl, and written to `--out`/gpu.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from _results import record


def device_name() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def prepare_run(workdir: Path, tiny: bool) -> Path:
    """A simulated slide pair, registered, segmented, quantified, gated, with its crop store."""
    from immunocto.pipeline import run_pipeline
    from immunocto.simulate.dataset import simulate_dataset

    run = workdir / "run"
    simulate_dataset(run, size=512 if tiny else 2048, slides=1, seed=3, tile=256 if tiny else 512)
    run_pipeline(run / "immunocto.yaml", workers=1, until="build-db")
    return run


def sam_rows(run: Path, tiny: bool, device: str, n_tiles: int) -> list[dict]:
    """Grid vs guided SAM on the same tissue tiles."""
    from immunocto.config import SamParams, load_config
    from immunocto.io.open import open_pair
    from immunocto.register.model import RegistrationModel
    from immunocto.register.stage import registration_path
    from immunocto.segment.base import SlideContext
    from immunocto.segment.registry import make_backend
    from immunocto.segment.sam import SamBackend
    from immunocto.segment.tiled import plan_tiles, segment_tile

    cfg = load_config(run)
    slide = cfg.slides[0]
    tile = 256 if tiny else 1024
    rows = []
    he, if_ = open_pair(cfg, 0)
    try:
        reg = RegistrationModel.load(registration_path(cfg, slide.id))
        for mode in ("grid", "guided"):
            params = SamParams(
                model="vit_t" if tiny else "vit_h",
                random_weights=True,
                mode=mode,
                points_per_side=8 if tiny else 64,
                points_per_batch=64 if tiny else 256,
                device=device,
            )
            guide = make_backend("if-nuclear", cfg.segmentation, has_if=True)
            backend = SamBackend(params, guide=guide if mode == "guided" else None)
            ctx = SlideContext(slide.id, he, if_, reg, cfg.registration.nuclear_channel)
            todo = plan_tiles(ctx, backend, tile=tile, halo=64)[:n_tiles]
            segment_tile(ctx, backend, todo[0])  # warm-up (weights on the device, kernels)
            backend.decoded_prompts.clear()
            _sync()
            t0 = time.perf_counter()
            for t in todo:
                segment_tile(ctx, backend, t)
            _sync()
            seconds = time.perf_counter() - t0
            rows.append({
                "check": "sam", "mode": mode, "model": params.model, "device": device,
                "tile_px": tile, "tiles": len(todo), "tiles_per_s": round(len(todo) / seconds, 3),
                "prompts_per_tile": round(float(np.mean(backend.decoded_prompts)), 1),
            })  # fmt: skip
    finally:
        he.close()
        if if_ is not None:
            if_.close()
    grid, guided = rows
    guided["prompts_ratio_grid_over_guided"] = round(
        grid["prompts_per_tile"] / max(guided["prompts_per_tile"], 1e-9), 2
    )
    guided["speedup_over_grid"] = round(guided["tiles_per_s"] / grid["tiles_per_s"], 2)
    return rows


def nucleus_rows(run: Path, tiny: bool, device: str) -> list[dict]:
    """The shipped nucleus network on a simulated H&E region at 0.25 µm/px: fp32 vs bf16."""
    import torch

    from immunocto.io import open_slide
    from immunocto.segment.learned import NucleusModel

    size = 512 if tiny else 4096
    with open_slide(run / "slides/sim000/he.ome.tif") as he:
        rgb = he.read_region(0, 0, min(size, he.width), min(size, he.height))
    # the simulator is at 0.325 µm/px; declare 0.25 so the network sees a 40x-like input
    rgb = np.tile(rgb, (max(1, size // rgb.shape[0]), max(1, size // rgb.shape[1]), 1))[
        :size, :size
    ]
    base = NucleusModel.load(None)
    rows = []
    for precision in ("fp32", "bf16"):
        model = dataclasses.replace(base, precision=precision, device=device)
        model.segment(rgb[:512, :512], 0.25)  # warm-up
        _sync()
        t0 = time.perf_counter()
        labels = model.segment(rgb, 0.25)[0]
        _sync()
        whole = time.perf_counter() - t0
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
        t0 = time.perf_counter()
        model._run(torch.nn.functional.interpolate(x, scale_factor=0.5, mode="bilinear"))
        _sync()
        forward = time.perf_counter() - t0
        rows.append({
            "check": "nucleus network", "precision": precision, "device": device,
            "input_px": list(rgb.shape[:2]), "nuclei": int(labels.max()),
            "mpx_per_s": round(rgb.shape[0] * rgb.shape[1] / 1e6 / whole, 2),
            "forward_mpx_per_s": round(rgb.shape[0] * rgb.shape[1] / 1e6 / forward, 2),
        })  # fmt: skip
    return rows


def bootstrap_rows(run: Path, tiny: bool, device: str) -> list[dict]:
    """Our training data path vs the raw ResNet50 step (train_speed's two functions)."""
    import torch

    from immunocto.models.arch import build_model
    from train_speed import ours_rate, raw_rate

    dev = torch.device(device)
    arch = "small" if tiny else "resnet50"
    batch = 32 if tiny else 512
    steps = 3 if tiny else 20
    model = build_model(arch, 12, 5).to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    raw = raw_rate(model, opt, batch, dev, steps, True)
    ours = ours_rate(model, opt, run, batch, dev, steps, True, workers=0 if tiny else 4)
    return [{
        "check": "bootstrap training", "arch": arch, "device": device, "batch": batch,
        "raw_cells_per_s": round(raw, 1), "ours_cells_per_s": round(ours, 1),
        "ours_over_raw": round(ours / raw, 3),
    }]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tiny", action="store_true", help="CPU-sized settings (a test)")
    ap.add_argument("--tiles", type=int, default=None, help="SAM tiles per mode")
    ap.add_argument("--skip", nargs="*", default=[], choices=["sam", "nuclei", "bootstrap"])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="also write OUT/gpu.jsonl")
    args = ap.parse_args()
    device = device_name()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    t0 = time.perf_counter()
    run = prepare_run(workdir, args.tiny)
    rows: list[dict] = [
        {"check": "setup", "device": device, "seconds": round(time.perf_counter() - t0, 1)}
    ]
    if "sam" not in args.skip:
        rows += sam_rows(run, args.tiny, device, args.tiles or (2 if args.tiny else 6))
    if "nuclei" not in args.skip:
        rows += nucleus_rows(run, args.tiny, device)
    if "bootstrap" not in args.skip:
        rows += bootstrap_rows(run, args.tiny, device)
    rows.append({"check": "total", "seconds": round(time.perf_counter() - t0, 1)})
    record("gpu", rows)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()

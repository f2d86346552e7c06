"""Typed run config, loaded from ``immunocto.yaml``.

The run folder is the folder holding ``immunocto.yaml``; every stage writes under it and
relative paths in the file are relative to it. Unknown keys and wrong types are rejected
with the key path in the message (``immunocto.yaml: slides[0].mpp: ...``).

Example::

    slides:
      - id: sim000
        he: slides/sim000/he.ome.tif
        if: slides/sim000/if.ome.tif
        markers: slides/sim000/markers.csv
        mpp: 0.325
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from immunocto._fs import atomic_write_text, local_path
from immunocto.errors import ConfigError, ImmunoctoError

CONFIG_NAME = "immunocto.yaml"


class _Section(BaseModel):
    """A config section: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


class SlideConfig(_Section):
    """One co-registered slide pair.

    ``he`` is the brightfield H&E image; ``if`` the multiplexed IF image ``(c, y, x)`` whose
    channel names come from its OME metadata or from ``markers`` (a CSV with a
    ``marker_name`` column). ``mpp`` is the H&E level-0 pixel size in microns (it overrides
    the file's, with a warning when they differ); ``if_mpp`` the IF's (default: what the IF file
    says, else the H&E's). Both images keep their own frames: cell ``x, y`` are H&E level-0
    pixels, ``x_if, y_if`` IF level-0 pixels (through the registration).
    """

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    he: Path
    if_: Path | None = Field(default=None, alias="if")
    markers: Path | None = None
    mpp: float = Field(gt=0.0, le=100.0)
    if_mpp: float | None = Field(None, gt=0.0, le=100.0)  # IF level-0 µm/px (default: the file's)
    patient: str | None = None  # slides of one patient always land in the same split


class SimulationRecord(_Section):
    """How a simulated run was made; only validation reads ``truth`` (ground truth)."""

    seed: int
    size: int = Field(gt=0)
    slides: int = Field(gt=0)
    artifacts: str
    artifact_strengths: dict[str, float] = Field(default_factory=dict)
    truth: Path = Path("truth")


class RegisterParams(_Section):
    """``registration:`` — H&E -> IF registration parameters (``immunocto register``)."""

    tile_px: int = Field(512, ge=128, le=8192)  # level-0 tile edge of the fine stage
    coarse_mpp: float = Field(8.0, gt=0.0, le=100.0)  # pixel size of the coarse stage
    max_rotation_deg: float = Field(3.0, ge=0.0, le=45.0)  # coarse rotation search range
    max_residual_px: float = Field(3.0, gt=0.0)  # tiles above this are flagged
    min_match: float = Field(0.25, ge=0.0, le=1.0)  # correlation below which a tile is not used
    max_tiles: int = Field(4000, ge=10)  # at most this many tiles are matched
    nuclear_channel: str = "Hoechst"
    nuclear_confirm_fraction: float = Field(0.3, gt=0.0, le=5.0)  # Immunocto: 30% of Otsu


class SamParams(_Section):
    """``segmentation.sam:`` — segment-anything settings."""

    model: Literal["vit_h", "vit_l", "vit_b", "vit_t"] = "vit_h"
    checkpoint: Path | None = None  # the user's SAM weights (.pth); required unless random_weights
    random_weights: bool = False  # timing/plumbing only: no checkpoint, meaningless masks
    mode: Literal["grid", "guided"] = "guided"
    points_per_side: int = Field(64, ge=1, le=256)  # grid mode, per 1024 px (Immunocto: 64)
    points_per_batch: int = Field(64, ge=1, le=4096)  # decoded masks per batch (memory)
    # seeds of guided mode; if-nuclear+he: both, a second guide's prompt only where the first
    # has none within dedupe x the nucleus diameter
    guide: Literal["if-nuclear", "he", "he-classical", "if-nuclear+he", "he+if-nuclear"] = (
        "he+if-nuclear"
    )
    dedupe: float = Field(0.35, ge=0.0, le=5.0)
    pred_iou_thresh: float = Field(0.7, ge=0.0, le=1.0)
    device: str = "auto"  # auto = cuda when available, else cpu


class SegmentParams(_Section):
    """``segmentation:`` — candidate segmentation (``immunocto segment``)."""

    backend: Literal[
        "auto", "if-nuclear", "if-learned", "he", "he-classical", "sam", "cellpose", "stardist"
    ] = "auto"
    tile_px: int = Field(1024, ge=128, le=8192)
    halo_px: int = Field(64, ge=0, le=1024)  # objects must be smaller than this (see io.tiling)
    workers: int = Field(0, ge=0, le=256)  # processes; 0 = one per CPU
    sam: SamParams = Field(default_factory=SamParams)
    model_path: Path | None = None  # cellpose / stardist model
    nucleus_model: Path | None = None  # `he`: a nucleus model folder (default: the shipped one)
    # `if-learned`: a fluorescence nucleus model folder (default: the shipped one)
    if_nucleus_model: Path | None = None
    # `if-nuclear`: typical nucleus diameter in µm (every length scales with it), or `auto`:
    # measured per slide from its single nuclei
    nucleus_diameter_um: float | Literal["auto"] = Field("auto", union_mode="left_to_right")

    @model_validator(mode="after")
    def _diameter_range(self) -> SegmentParams:
        d = self.nucleus_diameter_um
        if not isinstance(d, str) and not 3.0 <= d <= 60.0:
            raise ValueError(f"nucleus_diameter_um must be `auto` or 3-60 µm (got {d:g})")
        return self


class QuantifyParams(_Section):
    """``quantification:`` — per-cell IF statistics (``immunocto quantify``)."""

    tile_px: int = Field(1024, ge=128, le=8192)
    halo_px: int = Field(64, ge=0, le=1024)  # must cover the mask plus ring_um + background
    ring_um: float = Field(2.0, gt=0.0, le=20.0)  # membrane/cytoplasm ring around the mask
    cell_um: float = Field(5.0, gt=0.0, le=30.0)  # mask grown by this: whole-cell proxy
    background_inner_um: float = Field(4.0, gt=0.0)  # local background annulus, from ...
    background_outer_um: float = Field(10.0, gt=0.0)  # ... to
    workers: int = Field(0, ge=0, le=256)


class GateParams(_Section):
    """``gating:`` — decision tree and thresholds (``immunocto gate``)."""

    tree: str = "builtin:crc"  # builtin:crc, a .yaml tree, or scimap's phenotype .csv
    method: Literal["otsu", "otsu3", "gmm", "manual"] = "otsu"
    # Per-marker overrides. Myeloid cytoplasmic markers spill onto neighbours: cut above it.
    methods: dict[str, Literal["otsu", "otsu3", "gmm", "manual"]] = Field(
        default_factory=lambda: {"CD68": "otsu3", "CD163": "otsu3"}
    )
    manual_thresholds: dict[str, float] = Field(default_factory=dict)  # marker -> intensity
    iterative: bool = True  # re-estimate inside each parent population until labels settle
    max_iterations: int = Field(10, ge=1, le=100)
    feature: str = "ring"  # statistic gating membrane/cytoplasm markers (see quantify.STATS)
    nuclear_feature: str = "mean"  # statistic gating nuclear markers (Ki67, FOXP3, ...)
    # Per-marker statistic: CD45 on the whole-cell proxy (reaches macrophage membranes),
    # myeloid markers on the ring median (ignores one-sided spill from a neighbour).
    features: dict[str, str] = Field(
        default_factory=lambda: {"CD45": "cell", "CD68": "ringmed", "CD163": "ringmed"}
    )
    nuclear_confirmation: bool = True  # fail -> unlabeled (registration.nuclear_confirm_fraction)
    sensitivity_factors: list[float] = Field(
        default_factory=lambda: [0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3]
    )


class TrainParams(_Section):
    """``training:`` — the bootstrap classifier (``immunocto train``) and expansion
    (``immunocto expand``)."""

    # V0: review_label; gate_label; gate-margin = gate labels with gate_margin >= min_margin;
    # auto = review when reviews were exported, else gate-margin
    labels: Literal["auto", "gate", "gate-margin", "review"] = "auto"
    min_margin: float = Field(0.25, ge=0.0, le=100.0)  # robust SDs from the threshold
    arch: Literal["small", "resnet18", "resnet50"] = "small"
    epochs: int = Field(20, ge=1, le=1000)
    batch_size: int = Field(256, ge=8, le=8192)
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0)
    label_smoothing: float = Field(0.05, ge=0.0, lt=1.0)
    patience: int = Field(4, ge=1, le=100)  # epochs without a better validation loss
    device: str = "auto"  # auto (cuda when available), cpu, cuda, cuda:1
    init: Path | None = None  # local weights to start from (never downloaded)
    min_prob: float = Field(0.95, gt=0.0, le=1.0)  # expansion keeps predictions >= this
    # V1: expand = V0 kept, conflicts ambiguous, additions need IF support; model = Immunocto's
    # classifier-everywhere rule (immunocto.models.v1)
    v1_rule: Literal["expand", "model"] = "expand"
    v1_support: float = Field(0.7, ge=0.0, le=10.0)  # x the gate threshold, per positive marker
    v1_keep: float = Field(0.5, ge=0.0, le=1.0)  # a V0 label stays if the model gives it >= this
    seed: int = 0


class HETrainParams(_Section):
    """``he_training:`` — the H&E-only model (``immunocto train --kind he|he-regression``)."""

    labels: Literal["v1", "v0", "gate", "store"] = "v1"  # v1_label, review_label, gate_label, index
    # nuclei: the nucleus network's encoder (random, or the shipped weights with init: nuclei)
    arch: Literal["small", "resnet18", "resnet50", "nuclei"] = "small"
    context: bool = True  # second branch on the 256 x 256 window around the cell
    collapse_lymphocytes: bool = False  # lymphocyte / macrophage / other
    partial_labels: Literal["ignore", "nnpu"] = "ignore"
    pu_prior: float | None = Field(
        None, ge=0.0, lt=1.0
    )  # hidden positives among `other`; None: estimate
    epochs: int = Field(20, ge=1, le=1000)
    batch_size: int = Field(256, ge=8, le=8192)
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0)
    label_smoothing: float = Field(0.05, ge=0.0, lt=1.0)
    patience: int = Field(4, ge=1, le=100)
    device: str = "auto"
    init: Path | None = None  # a state dict, a nucleus model folder, or `nuclei` (shipped)
    seed: int = 0


class RunConfig(_Section):
    """The whole run config. Stage sections are added by the stages that use them."""

    slides: list[SlideConfig] = Field(min_length=1)
    simulation: SimulationRecord | None = None
    registration: RegisterParams = Field(default_factory=RegisterParams)
    segmentation: SegmentParams = Field(default_factory=SegmentParams)
    quantification: QuantifyParams = Field(default_factory=QuantifyParams)
    gating: GateParams = Field(default_factory=GateParams)
    training: TrainParams = Field(default_factory=TrainParams)
    he_training: HETrainParams = Field(default_factory=HETrainParams)

    _run_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @model_validator(mode="after")
    def _unique_slide_ids(self) -> RunConfig:
        seen: set[str] = set()
        for i, slide in enumerate(self.slides):
            if slide.id in seen:
                raise ValueError(
                    f"slides[{i}].id: duplicate slide id {slide.id!r}; ids must be unique"
                )
            seen.add(slide.id)
        return self

    @property
    def run_dir(self) -> Path:
        """The folder holding ``immunocto.yaml``; stages write under it."""
        return self._run_dir

    def resolve(self, path: Path | str) -> Path:
        """Absolute path for ``path`` (a path or ``file://`` URL), taken relative to the run
        folder when relative."""
        path = local_path(path).expanduser()
        return path if path.is_absolute() else (self._run_dir / path)

    def slide(self, slide_id: str) -> SlideConfig:
        """The slide with id ``slide_id`` (``ConfigError`` naming the known ids otherwise)."""
        for slide in self.slides:
            if slide.id == slide_id:
                return slide
        known = ", ".join(s.id for s in self.slides)
        raise ConfigError(f"no slide with id {slide_id!r} in the config (known: {known})")

    def select_slides(self, ids: list[str] | None = None) -> list[SlideConfig]:
        """The slides with these ids, in config order; all slides for ``None`` or ``[]``.
        An id not in the config is a ``ConfigError`` naming the unknown and the known ids
        (a stage never silently skips a slide the user asked for)."""
        if not ids:
            return list(self.slides)
        unknown = sorted(set(ids) - {s.id for s in self.slides})
        if unknown:
            known = ", ".join(s.id for s in self.slides)
            raise ConfigError(f"unknown slide id(s) {', '.join(unknown)} (known: {known})")
        return [s for s in self.slides if s.id in set(ids)]


# --------------------------------------------------------------------------------------
# loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of keeping the last one."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in mapping:
            line = key_node.start_mark.line + 1
            raise ConfigError(f"duplicate key {key!r} at line {line}; keep one of them")
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _loc_to_str(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _section_keys(loc: tuple[Any, ...]) -> list[str] | None:
    """Allowed keys of the section that contains the key at ``loc`` (for error hints)."""
    model: Any = RunConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        candidates = getattr(annotation, "__args__", (annotation,))
        inner = [a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            for a in candidates:  # list[SlideConfig]
                inner += [
                    b
                    for b in getattr(a, "__args__", ())
                    if isinstance(b, type) and issubclass(b, BaseModel)
                ]
        if not inner:
            return None
        model = inner[0]
    return [f.alias or name for name, f in model.model_fields.items()]


def format_validation_error(err: ValidationError, source: str) -> str:
    """One message per problem, each starting with the file and the key path."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = _loc_to_str(loc)
        if e["type"] == "extra_forbidden":
            allowed = _section_keys(loc)
            hint = f" (allowed here: {', '.join(allowed)})" if allowed else ""
            lines.append(f"{source}: {where}: unknown key{hint}")
        elif e["type"] == "missing":
            lines.append(f"{source}: {where}: required key is missing")
        else:
            msg = e["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            got = e.get("input")
            got_s = "" if isinstance(got, dict | list) else f" (got {got!r})"
            lines.append(f"{source}: {where}: {msg}{got_s}")
    return "; ".join(lines)


def parse_config(data: Any, *, run_dir: Path, source: str = CONFIG_NAME) -> RunConfig:
    """Validate a parsed YAML mapping into a :class:`RunConfig` rooted at ``run_dir``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with a 'slides' list at the top level")
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
    cfg._run_dir = Path(run_dir).resolve()
    return cfg


def load_config(path: str | os.PathLike[str], *, check_files: bool = True) -> RunConfig:
    """Load and validate ``immunocto.yaml`` (or a folder containing it).

    Parameters
    ----------
    path : path-like
        The config file, or the run folder holding ``immunocto.yaml``.
    check_files : bool
        Also check that every slide's input files exist.

    Raises
    ------
    ConfigError
        With the file, the key path and the problem.
    """
    path = local_path(path, "config").expanduser()
    if path.is_dir():
        path = path / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(
            f"{path}: config not found; give the path of an immunocto.yaml "
            "(`immunocto simulate OUT` writes one)"
        )
    text = read_text(path, "config")
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}".replace("\n", " ")) from None
    cfg = parse_config(data, run_dir=path.parent, source=str(path))
    if check_files:
        check_slide_files(cfg, source=str(path))
    return cfg


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file's content, or a :class:`ConfigError` naming it (binary, unreadable)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not a UTF-8 text file (byte {err.start}); give the {what} as YAML text"
        ) from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the {what} ({err.strerror})") from None


def check_slide_files(cfg: RunConfig, *, source: str = CONFIG_NAME) -> None:
    """Raise :class:`ConfigError` naming the first slide input that does not exist."""
    for i, slide in enumerate(cfg.slides):
        for key, value in (("he", slide.he), ("if", slide.if_), ("markers", slide.markers)):
            if value is None:
                continue
            try:
                full = cfg.resolve(value)
            except ImmunoctoError as err:
                raise ConfigError(f"{source}: slides[{i}].{key}: {err}") from None
            if not full.exists():
                raise ConfigError(
                    f"{source}: slides[{i}].{key}: file not found: {full} "
                    f"(relative paths are taken from {cfg.run_dir})"
                )


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def dump_config(cfg: RunConfig) -> str:
    """YAML text of ``cfg`` with paths relative to its run folder where possible."""
    data = cfg.model_dump(mode="json", by_alias=True, exclude_none=True)
    root = cfg.run_dir
    for slide in data["slides"]:
        for key in ("he", "if", "markers"):
            if key in slide:
                slide[key] = _relative(cfg.resolve(slide[key]), root)
    return yaml.safe_dump(data, sort_keys=False)


def write_config(cfg: RunConfig, path: str | os.PathLike[str] | None = None) -> Path:
    """Write ``cfg`` atomically to ``path`` (default: ``RUN/immunocto.yaml``)."""
    path = Path(path) if path is not None else cfg.run_dir / CONFIG_NAME
    header = (
        "# immunocto run config (README section 'Run config'); paths are relative to this folder\n"
    )
    return atomic_write_text(path, header + dump_config(cfg))

"""Gating trees: YAML (ours), scimap's phenotype-workflow CSV, and the built-in CRC tree.

A tree is a set of nodes, each with a parent (``root`` = every candidate) and a rule on
marker positivity; a node with a ``label`` ends the path. A cell walks down from the root:
at each node it enters the one child whose rule it satisfies. None or several: the cell stops
there as ``ambiguous`` (with the reason). Rules combine, all of them must hold:

============  ==========================================================
``pos``        every listed marker positive
``neg``        every listed marker negative
``allpos``     every listed marker positive (scimap's name)
``allneg``     every listed marker negative
``anypos``     at least one listed marker positive
``anyneg``     at least one listed marker negative
============  ==========================================================

YAML format (``features``, optional: the statistic gating a marker, see
``phenotype.stage.marker_features``)::

    name: crc-immunocto
    features: {CD45: cell}
    nodes:
      - {name: immune, parent: root, rule: {pos: [CD45]}}
      - {name: other, parent: root, rule: {neg: [CD45]}, label: other}
      - {name: t_cell, parent: immune, rule: {pos: [CD3e]}}
      - {name: cd4_t, parent: t_cell, rule: {pos: [CD4], neg: [CD8a]}, label: cd4_t}
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from immunocto.errors import ConfigError

RULE_KINDS = ("pos", "neg", "allpos", "allneg", "anypos", "anyneg")
ROOT = "root"


@dataclass(frozen=True)
class Node:
    name: str
    parent: str
    rule: dict[str, tuple[str, ...]]
    label: str | None = None

    @property
    def markers(self) -> tuple[str, ...]:
        out: list[str] = []
        for kind in RULE_KINDS:
            for m in self.rule.get(kind, ()):
                if m not in out:
                    out.append(m)
        return tuple(out)

    def describe(self) -> str:
        parts = []
        for kind in RULE_KINDS:
            ms = self.rule.get(kind, ())
            if not ms:
                continue
            if kind in ("pos", "allpos"):
                parts += [f"{m}+" for m in ms]
            elif kind in ("neg", "allneg"):
                parts += [f"{m}-" for m in ms]
            elif kind == "anypos":
                parts.append("(" + " or ".join(f"{m}+" for m in ms) + ")")
            else:
                parts.append("(" + " or ".join(f"{m}-" for m in ms) + ")")
        return " ".join(parts)


@dataclass
class GateTree:
    name: str
    nodes: list[Node] = field(default_factory=list)
    # marker -> quantify statistic (e.g. {Ki67: mean}); the tree's own choice, below the
    # config's gating.features and above the compartment default
    features: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [n.name for n in self.nodes]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(
                f"gating tree {self.name!r}: duplicate node name(s) {', '.join(sorted(dup))}"
            )
        if ROOT in names:
            raise ConfigError(
                f"gating tree {self.name!r}: {ROOT!r} is reserved for the whole population"
            )
        known = {ROOT, *names}
        for n in self.nodes:
            if n.parent not in known:
                raise ConfigError(
                    f"gating tree {self.name!r}: node {n.name!r} has unknown parent {n.parent!r}"
                )
            if not n.markers:
                raise ConfigError(f"gating tree {self.name!r}: node {n.name!r} has an empty rule")
            if n.label is not None and self.children(n.name):
                raise ConfigError(
                    f"gating tree {self.name!r}: node {n.name!r} has a label and children; label leaves only"
                )

    def children(self, parent: str) -> list[Node]:
        return [n for n in self.nodes if n.parent == parent]

    @property
    def markers(self) -> list[str]:
        out: list[str] = []
        for n in self.nodes:
            for m in n.markers:
                if m not in out:
                    out.append(m)
        return out

    @property
    def labels(self) -> list[str]:
        out: list[str] = []
        for n in self.nodes:
            if n.label and n.label not in out:
                out.append(n.label)
        return out

    def internal(self) -> list[str]:
        """Populations whose children decide something: ``root`` and every non-leaf node."""
        return [p for p in [ROOT, *[n.name for n in self.nodes]] if self.children(p)]

    def leaf_paths(self) -> dict[str, list[list[str]]]:
        """label -> the node-name paths (``root`` first) of every leaf carrying it."""
        parent = {n.name: n.parent for n in self.nodes}
        out: dict[str, list[list[str]]] = {}
        for n in self.nodes:
            if n.label:
                path, cur = [n.name], n.name
                while parent.get(cur, ROOT) != ROOT:
                    cur = parent[cur]
                    path.append(cur)
                out.setdefault(n.label, []).append([ROOT, *reversed(path)])
        return out

    def deciding_markers(self, parent: str) -> list[str]:
        """Markers used by the rules of ``parent``'s children."""
        out: list[str] = []
        for child in self.children(parent):
            for m in child.markers:
                if m not in out:
                    out.append(m)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            **({"features": dict(self.features)} if self.features else {}),
            "nodes": [
                {
                    "name": n.name,
                    "parent": n.parent,
                    "rule": {k: list(v) for k, v in n.rule.items()},
                    **({"label": n.label} if n.label else {}),
                }
                for n in self.nodes
            ],
        }


def tree_from_dict(data: dict[str, Any], *, source: str = "gating tree") -> GateTree:
    """Validate a tree given as a mapping (the YAML format of the module docstring)."""
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
        raise ConfigError(f"{source}: expected a mapping with a 'nodes' list")
    nodes = []
    for i, raw in enumerate(data["nodes"]):
        where = f"{source}: nodes[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping with name, parent, rule")
        unknown = set(raw) - {"name", "parent", "rule", "label"}
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(sorted(unknown))} (allowed: name, parent, rule, label)"
            )
        for key in ("name", "parent", "rule"):
            if key not in raw:
                raise ConfigError(f"{where}.{key}: required key is missing")
        rule = raw["rule"]
        if not isinstance(rule, dict):
            raise ConfigError(f"{where}.rule: expected a mapping like {{pos: [CD45]}}")
        bad = set(rule) - set(RULE_KINDS)
        if bad:
            raise ConfigError(
                f"{where}.rule: unknown kind(s) {', '.join(sorted(bad))} (allowed: {', '.join(RULE_KINDS)})"
            )
        parsed = {}
        for kind, markers in rule.items():
            markers = [markers] if isinstance(markers, str) else markers
            if not isinstance(markers, list) or not all(isinstance(m, str) for m in markers):
                raise ConfigError(f"{where}.rule.{kind}: expected a list of marker names")
            parsed[kind] = tuple(markers)
        nodes.append(Node(str(raw["name"]), str(raw["parent"]), parsed, raw.get("label")))
    unknown = set(data) - {"name", "nodes", "features"}
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(sorted(unknown))} (allowed: name, nodes, features)"
        )
    features = data.get("features") or {}
    if not isinstance(features, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in features.items()
    ):
        raise ConfigError(f"{source}: features: expected a mapping like {{Ki67: mean}}")
    from immunocto.quantify.features import STATS

    bad = {k: v for k, v in features.items() if v not in STATS}
    if bad:
        k, v = next(iter(bad.items()))
        raise ConfigError(
            f"{source}: features.{k}: {v!r} is not a statistic (choose one of {', '.join(STATS)})"
        )
    try:
        return GateTree(str(data.get("name", Path(source).stem)), nodes, dict(features))
    except ConfigError as err:  # the tree's own checks name the tree; say which file too
        raise ConfigError(f"{source}: {err}") from None


def tree_from_scimap_csv(path: str | os.PathLike[str]) -> GateTree:
    """Import scimap's phenotype-workflow CSV.

    Layout: first column = parent population (``all`` = root), second = phenotype name, then
    one column per marker holding ``pos``, ``neg``, ``anypos``, ``anyneg``, ``allpos`` or
    ``allneg`` (blank = not used). Phenotypes that are nobody's parent become labels.
    """
    import io

    from immunocto.config import read_text

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: gating tree not found")
    try:
        rows = list(csv.reader(io.StringIO(read_text(path, "gating tree").lstrip("\ufeff"))))
    except csv.Error as err:
        raise ConfigError(f"{path}: not a readable CSV ({err}); save it as plain CSV") from None
    if len(rows) < 2 or len(rows[0]) < 3:
        raise ConfigError(
            f"{path}: expected a header (parent, phenotype, markers...) and one row per phenotype"
        )
    markers = [m.strip() for m in rows[0][2:]]
    nodes = []
    names = []
    for r, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < 2:
            raise ConfigError(f"{path}: row {r}: expected a parent and a phenotype column")
        parent = row[0].strip() or "all"
        name = row[1].strip()
        rule: dict[str, list[str]] = {}
        for marker, value in zip(markers, row[2:], strict=False):
            value = value.strip().lower()
            if not value:
                continue
            if value not in RULE_KINDS:
                raise ConfigError(
                    f"{path}: row {r}, column {marker!r}: {value!r} is not one of {', '.join(RULE_KINDS)}"
                )
            rule.setdefault(value, []).append(marker)
        nodes.append(
            {"name": name, "parent": ROOT if parent.lower() == "all" else parent, "rule": rule}
        )
        names.append(name)
    parents = {n["parent"] for n in nodes}
    for n in nodes:
        if n["name"] not in parents:
            n["label"] = n["name"]
    return tree_from_dict({"name": path.stem, "nodes": nodes}, source=str(path))


#: Immunocto's classes for colorectal cancer (the issue's default tree).
CRC_TREE: dict[str, Any] = {
    "name": "crc-immunocto",
    "nodes": [
        {"name": "immune", "parent": ROOT, "rule": {"pos": ["CD45"]}},
        {"name": "other", "parent": ROOT, "rule": {"neg": ["CD45"]}, "label": "other"},
        {"name": "t_cell", "parent": "immune", "rule": {"pos": ["CD3e"]}},
        {"name": "non_t", "parent": "immune", "rule": {"neg": ["CD3e"]}},
        {
            "name": "cd4_t",
            "parent": "t_cell",
            "rule": {"pos": ["CD4"], "neg": ["CD8a"]},
            "label": "cd4_t",
        },
        {
            "name": "cd8_t",
            "parent": "t_cell",
            "rule": {"pos": ["CD8a"], "neg": ["CD4"]},
            "label": "cd8_t",
        },
        {"name": "b_cell", "parent": "non_t", "rule": {"pos": ["CD20"]}, "label": "b_cell"},
        {
            "name": "macrophage",
            "parent": "non_t",
            "rule": {"neg": ["CD20"], "anypos": ["CD68", "CD163"]},
            "label": "macrophage",
        },
    ],
}


def load_tree(spec: str, *, base: Path | None = None) -> GateTree:
    """A tree from ``builtin:crc``, a YAML file, or a scimap CSV (relative to ``base``)."""
    if spec == "builtin:crc":
        return tree_from_dict(CRC_TREE, source="builtin:crc")
    path = Path(spec).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.exists():
        raise ConfigError(
            f"{path}: gating tree not found; give builtin:crc, a .yaml tree or a scimap .csv"
        )
    if path.suffix.lower() == ".csv":
        return tree_from_scimap_csv(path)
    from immunocto.config import read_text

    text = read_text(path, "gating tree")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}".replace("\n", " ")) from None
    return tree_from_dict(data, source=str(path))

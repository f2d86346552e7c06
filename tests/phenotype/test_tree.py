from __future__ import annotations

import numpy as np
import pytest

from immunocto.errors import ConfigError
from immunocto.phenotype import CRC_TREE, load_tree, tree_from_dict, tree_from_scimap_csv
from immunocto.phenotype.gate import _rule_mask
from immunocto.phenotype.tree import Node


def test_builtin_crc_tree():
    tree = load_tree("builtin:crc")
    assert tree.labels == ["other", "cd4_t", "cd8_t", "b_cell", "macrophage"]
    assert tree.markers == ["CD45", "CD3e", "CD4", "CD8a", "CD20", "CD68", "CD163"]
    assert tree.deciding_markers("non_t") == ["CD20", "CD68", "CD163"]
    assert tree.internal() == ["root", "immune", "t_cell", "non_t"]


def test_rule_kinds():
    pos = {"A": np.array([1, 1, 0, 0], bool), "B": np.array([1, 0, 1, 0], bool)}

    def mask(rule):
        return _rule_mask(Node("n", "root", {k: tuple(v) for k, v in rule.items()}), pos).tolist()

    assert mask({"pos": ["A", "B"]}) == [True, False, False, False]
    assert mask({"allpos": ["A", "B"]}) == [True, False, False, False]
    assert mask({"neg": ["A", "B"]}) == [False, False, False, True]
    assert mask({"allneg": ["A", "B"]}) == [False, False, False, True]
    assert mask({"anypos": ["A", "B"]}) == [True, True, True, False]
    assert mask({"anyneg": ["A", "B"]}) == [False, True, True, True]
    assert mask({"pos": ["A"], "neg": ["B"]}) == [False, True, False, False]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["nodes"][0].update(parent="nowhere"), "unknown parent 'nowhere'"),
        (lambda d: d["nodes"][0].update(rule={}), "empty rule"),
        (lambda d: d["nodes"][0].update(rule={"sometimes": ["CD45"]}), "unknown kind"),
        (lambda d: d["nodes"][2].update(label="t"), "has a label and children"),
        (lambda d: d["nodes"].append(dict(d["nodes"][0])), "duplicate node name"),
        (lambda d: d["nodes"][0].update(colour="red"), "unknown key"),
    ],
)
def test_tree_errors_name_the_problem(change, message):
    import copy

    data = copy.deepcopy(CRC_TREE)
    change(data)
    with pytest.raises(ConfigError, match=message):
        tree_from_dict(data)


def test_scimap_phenotype_csv(tmp_path):
    path = tmp_path / "phenotype.csv"
    path.write_text(
        ",phenotype,CD45,CD3e,CD4,CD8a,CD20,CD68,CD163\n"
        "all,Immune,pos,,,,,,\n"
        "all,Other,neg,,,,,,\n"
        "Immune,T cells,,pos,,,,,\n"
        "T cells,CD4 T,,,pos,neg,,,\n"
        "T cells,CD8 T,,,neg,pos,,,\n"
        "Immune,Myeloid,,neg,,,neg,anypos,anypos\n"
    )
    tree = tree_from_scimap_csv(path)
    assert tree.labels == ["Other", "CD4 T", "CD8 T", "Myeloid"]
    myeloid = next(n for n in tree.nodes if n.name == "Myeloid")
    assert myeloid.rule == {"neg": ("CD3e", "CD20"), "anypos": ("CD68", "CD163")}
    assert load_tree(str(path)).labels == tree.labels
    path.write_text(",phenotype,CD45\nall,Immune,maybe\n")
    with pytest.raises(ConfigError, match="'maybe' is not one of"):
        tree_from_scimap_csv(path)


def test_yaml_tree_for_any_panel(tmp_path):
    path = tmp_path / "tree.yaml"
    path.write_text(
        "name: epithelium\nnodes:\n"
        "  - {name: tumour, parent: root, rule: {pos: [Pan-CK]}, label: tumour}\n"
        "  - {name: stroma, parent: root, rule: {neg: [Pan-CK], anypos: [SMA, CD31]}, label: stroma}\n"
    )
    tree = load_tree("tree.yaml", base=tmp_path)
    assert tree.labels == ["tumour", "stroma"] and tree.markers == ["Pan-CK", "SMA", "CD31"]
    with pytest.raises(ConfigError, match="gating tree not found"):
        load_tree("missing.yaml", base=tmp_path)

"""The tree ckpt plans for every registered model name equals MaxText 0.2.5's own, scanned and unscanned.

The facts are `../shared/maxtext-0.2.5-trees/NAME.{scan,noscan}.json` (path -> [shape, dtype(, collection)]),
made by tracing MaxText 0.2.5's model initialisation abstractly. Paths and shapes must agree exactly: nothing
missing, nothing extra. dtypes are compared only where MaxText fixes one other than its default weight dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ckpt_cli import registry
from ckpt_cli.dtypes import output_dtype
from ckpt_cli.families import detect_family
from ckpt_cli.plan import build_to_maxtext

TREES = Path(__file__).resolve().parents[1].parent / "shared" / "maxtext-0.2.5-trees"


def _trees_dir() -> Path:
    if not TREES.is_dir():
        pytest.skip("../shared/maxtext-0.2.5-trees is not beside this checkout")
    return TREES


def maxtext_tree(name: str, scan: bool) -> dict[str, tuple[int, ...]] | None:
    path = _trees_dir() / f"{name}.{'scan' if scan else 'noscan'}.json"
    if not path.exists():
        return None
    return {key: tuple(value[0]) for key, value in json.loads(path.read_text()).items()}


def maxtext_collections(name: str, scan: bool) -> dict[str, str]:
    """The leaves MaxText keeps outside the `params` collection, with their collection."""
    path = _trees_dir() / f"{name}.{'scan' if scan else 'noscan'}.json"
    return {key: value[2] for key, value in json.loads(path.read_text()).items() if len(value) > 2}


def planned_plan(name: str, scan: bool):
    cfg = registry.reference_config(name)
    return build_to_maxtext(detect_family(cfg), cfg, scan, output_dtype(registry.lookup(name).dtype or "bf16"))


def _diff(want: dict, got: dict) -> str:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    shapes = sorted(f"{k}: planned {got[k]}, MaxText {want[k]}" for k in set(want) & set(got) if want[k] != got[k])
    lines = [f"missing {k} {want[k]}" for k in missing[:20]] + [f"extra {k} {got[k]}" for k in extra[:20]] + shapes[:20]
    return "\n".join(lines)


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "noscan"])
@pytest.mark.parametrize("name", sorted(registry.MODELS))
def test_planned_tree_equals_maxtext_0_2_5(name, scan):
    want = maxtext_tree(name, scan)
    if want is None:
        assert scan and maxtext_tree(name, False) is not None, f"no MaxText 0.2.5 tree for {name}"
        pytest.skip(f"MaxText 0.2.5 defines no {'scanned' if scan else 'unscanned'} tree for {name}")
    plan = planned_plan(name, scan)
    got = {t.target: tuple(t.shape) for t in plan.tensors}
    assert got == want, f"{name} ({'scan' if scan else 'noscan'}):\n{_diff(want, got)}"
    # non-parameter variables (e.g. DeepSeek-V3's router bias, MoEBiasVar) are the table's, with MaxText's collection
    assert {t.target: t.collection for t in plan.tensors if t.collection} == maxtext_collections(name, scan)


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "noscan"])
@pytest.mark.parametrize("name", sorted(n for n, s in registry.MODELS.items() if s.dtype == "fp8"))
def test_fp8_names_plan_maxtexts_dtypes_leaf_by_leaf(name, scan):
    """A -fp8 name's tree fixes every dtype (MaxText's weight_dtype float8_e4m3fn, compute dtype bfloat16 for the
    unquantized modules, float32 block scales): the planned tree has them all."""
    path = _trees_dir() / f"{name}.{'scan' if scan else 'noscan'}.json"
    want = {key: value[1] for key, value in json.loads(path.read_text()).items()}
    got = {t.target: np.dtype(t.dtype).name for t in planned_plan(name, scan).tensors}
    assert got == want
    assert {"float8_e4m3fn", "float32", "bfloat16"} == set(got.values())


def test_every_tree_file_names_a_registered_model_or_a_known_gap():
    """Every model name MaxText 0.2.5 defines a tree for is either registered or listed here as not yet done."""
    not_yet: set[str] = set()      # none left: every name MaxText 0.2.5 has a tree for is registered
    names = {p.name.split(".scan.json")[0].split(".noscan.json")[0] for p in _trees_dir().glob("*.json")}
    registered = set(registry.MODELS)
    assert names - registered - not_yet == set(), "MaxText 0.2.5 names neither registered nor listed as a gap"
    assert registered - names == set(), "registered names with no MaxText 0.2.5 tree"
    assert not_yet & registered == set(), "registered now: take these off the not-yet list"

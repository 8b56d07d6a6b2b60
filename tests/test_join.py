"""`Join` (families/base.py), family-free: a MaxText leaf assembled from row ranges of several HF tensors, and back.

A toy family: leaf `x/kernel` (E, G*(A/G + B/G)) per layer from `l.{layer}.a` (A, E) and `l.{layer}.b` (B, E), grouped
in G groups ([a_g, b_g] per group), transposed; planned, executed by the engine both ways on in-memory arrays.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ckpt_cli import engine
from ckpt_cli.families.base import Family, Join, row, uniform_blocks
from ckpt_cli.plan import build_to_hf, build_to_maxtext, check_coverage
from tests.families.test_deepseek import DictWriter

DIMS = {"E": 3, "G": 2, "A": 4, "B": 6, "A+B": 10, "L": 3}
JOINED = row("x/kernel", "l.{layer}.a", "E,A+B", "A+B,E", "transpose",
             join=Join("G", (("l.{layer}.a", "A"), ("l.{layer}.b", "B"))))


def toy_family(rules=(JOINED,)) -> Family:
    return Family(name="toy", model_types=("toy",), dims=lambda cfg: dict(DIMS), top_rules=lambda d, cfg: (),
                  blocks=lambda d, cfg, scan, features: uniform_blocks(tuple(rules), d["L"], scan))


class DictReader:
    """HF tensors or MaxText leaves from a dict, read as the engine's readers do (index on axes, a row range)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def describe(self, name):
        return self.arrays[name].shape, self.arrays[name].dtype

    def read(self, source):
        x = self.arrays[source.name]
        idx: list = [slice(None)] * x.ndim
        for axis, i in zip(source.axes, source.index, strict=True):
            idx[axis] = i
        if source.rows is not None:
            idx[source.rows_axis] = slice(*source.rows)
        return np.ascontiguousarray(x[tuple(idx)])

    def order_key(self, source):
        return (source.name, source.index, source.rows or ())


def hf_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"l.{i}.{n}": rng.standard_normal((rows, 3)).astype(np.float32)
            for i in range(3) for n, rows in (("a", 4), ("b", 6))}


@pytest.mark.parametrize("scan", [True, False])
def test_joined_leaf_is_grouped_ranges_and_comes_back_bit_exact(scan):
    hf = hf_arrays()
    fwd = build_to_maxtext(toy_family(), {}, scan, np.dtype(np.float32))
    writer = DictWriter()
    engine.validate(fwd, DictReader(hf))
    engine.execute(fwd, DictReader(hf), writer)
    for i in range(3):
        x = writer.arrays["decoder/layers/x/kernel"][:, i] if scan else writer.arrays[f"decoder/layers_{i}/x/kernel"]
        a, b = hf[f"l.{i}.a"], hf[f"l.{i}.b"]
        # group g: a's rows [2g, 2g+2) then b's rows [3g, 3g+3), each transposed into columns
        want = np.concatenate([a[0:2].T, b[0:3].T, a[2:4].T, b[3:6].T], axis=1)
        np.testing.assert_array_equal(x, want)
    back = build_to_hf(toy_family(), {}, scan, np.dtype(np.float32))
    assert sorted(t.target for t in back.tensors) == sorted(hf)
    assert {t.target: t.shape for t in back.tensors} == {k: v.shape for k, v in hf.items()}
    out = DictWriter()
    engine.validate(back, DictReader(writer.arrays))
    engine.execute(back, DictReader(writer.arrays), out)
    for name, x in hf.items():
        assert out.arrays[name].tobytes() == x.tobytes(), name


def test_every_row_is_read_once_and_priced_so():
    fwd = build_to_maxtext(toy_family(), {}, True, np.dtype(np.float32))
    t = fwd.tensor("decoder/layers/x/kernel")
    assert sum(t.read_elements(task) for task in t.tasks) == 3 * 10 * 3   # every HF element once
    assert [(task.source.name, task.source.rows, task.span) for task in t.tasks if task.index == (1,)] == [
        ("l.1.a", (0, 2), (0, 2)), ("l.1.b", (0, 3), (2, 5)), ("l.1.a", (2, 4), (5, 7)), ("l.1.b", (3, 6), (7, 10))]
    back = build_to_hf(toy_family(), {}, True, np.dtype(np.float32))
    b = back.tensor("l.2.b")
    assert [(task.source.rows, task.span, task.source.index) for task in b.tasks] == [((2, 5), (0, 3), (2,)),
                                                                                     ((7, 10), (3, 6), (2,))]


def test_coverage_catches_a_dropped_range():
    fwd = build_to_maxtext(toy_family(), {}, False, np.dtype(np.float32))
    t = fwd.tensors[0]
    with pytest.raises(AssertionError, match="exactly once|do not tile"):
        check_coverage([dataclasses.replace(t, tasks=t.tasks[:-1]), *fwd.tensors[1:]])


def test_a_wrong_source_shape_is_one_line_before_anything_is_written():
    from ckpt_cli.errors import ShapeMismatchError

    hf = hf_arrays() | {"l.0.b": np.zeros((5, 3), np.float32)}
    fwd = build_to_maxtext(toy_family(), {}, True, np.dtype(np.float32))
    with pytest.raises(ShapeMismatchError, match=r"l\.0\.b: expected shape \(6, 3\)"):
        engine.validate(fwd, DictReader(hf))

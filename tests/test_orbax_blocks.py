"""BlockReader: layer slices (and row pieces) served from blocks of layers equal direct slice reads."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tensorstore as ts

from ckpt_cli.io import orbax_blocks
from ckpt_cli.io.orbax_blocks import BlockReader
from ckpt_cli.plan import SourceSlice


class FakeCheckpoint:
    """The part of OrbaxCheckpoint BlockReader uses, over in-memory zarr3 arrays."""

    items = "memory"

    def __init__(self, arrays: dict[str, np.ndarray], chunks: dict[str, tuple[int, ...]]):
        self.data = arrays
        self.arrays = {}
        for name, x in arrays.items():
            spec = {"driver": "zarr3", "kvstore": "memory://", "create": True,
                    "metadata": {"shape": list(x.shape), "data_type": "float32",
                                 "chunk_grid": {"name": "regular",
                                                "configuration": {"chunk_shape": list(chunks[name])}}}}
            self.arrays[name] = ts.open(spec).result()
            self.arrays[name].write(x).result()
        self.direct_reads = 0

    def array(self, name: str):
        return self.arrays[name]

    def describe(self, name: str):
        return self.data[name].shape, self.data[name].dtype

    def order_key(self, source: SourceSlice) -> tuple:
        return (source.name, source.index)

    def read(self, source: SourceSlice) -> np.ndarray:
        self.direct_reads += 1
        return expected(self.data[source.name], source)


def expected(x: np.ndarray, source: SourceSlice) -> np.ndarray:
    idx: list = [slice(None)] * x.ndim
    for a, i in zip(source.axes, source.index, strict=True):
        idx[a] = i
    if source.rows is not None:
        idx[source.rows_axis] = slice(*source.rows)
    return x[tuple(idx)]


@pytest.fixture
def ckpt():
    rng = np.random.default_rng(0)
    arrays = {"scanned": rng.standard_normal((8, 5, 6), dtype=np.float32),          # (E, L, F)
              "experts": rng.standard_normal((4, 5, 3, 6), dtype=np.float32),       # (X, L, E, M)
              "per_layer": rng.standard_normal((8, 5, 6), dtype=np.float32)}
    chunks = {"scanned": (4, 5, 6), "experts": (2, 5, 3, 6), "per_layer": (8, 1, 6)}
    return FakeCheckpoint(arrays, chunks)


@pytest.mark.parametrize("block_layers", [1, 2, 3, 5])
def test_blocked_reads_equal_direct_reads(ckpt, monkeypatch, block_layers):
    reader = BlockReader(ckpt, block_bytes=block_layers * 8 * 6 * 4)
    for layer in range(5):
        src = SourceSlice("scanned", index=(layer,), axes=(1,))
        np.testing.assert_array_equal(reader.read(src), expected(ckpt.data["scanned"], src))
        for rows in ((0, 3), (3, 8)):
            src = SourceSlice("scanned", index=(layer,), axes=(1,), rows=rows, rows_axis=0)
            np.testing.assert_array_equal(reader.read(src), expected(ckpt.data["scanned"], src))
        src = SourceSlice("scanned", index=(layer,), axes=(1,), rows=(2, 5), rows_axis=2)
        np.testing.assert_array_equal(reader.read(src), expected(ckpt.data["scanned"], src))
    if block_layers == 1:
        assert reader.blocks_read == 0                       # nothing to gain: read directly
    else:
        assert reader.blocks_read == -(-5 // block_layers)   # each block read once, in layer order


def test_expert_and_layer_axes(ckpt):
    reader = BlockReader(ckpt, block_bytes=2 * 3 * 6 * 4)
    for e, layer in itertools.product(range(4), range(5)):
        src = SourceSlice("experts", index=(e, layer), axes=(0, 1))
        np.testing.assert_array_equal(reader.read(src), expected(ckpt.data["experts"], src))
    assert reader.blocks_read == 4 * 3


def test_one_layer_chunks_and_unstacked_reads_go_direct(ckpt):
    reader = BlockReader(ckpt)
    for layer in range(5):
        reader.read(SourceSlice("per_layer", index=(layer,), axes=(1,)))
    reader.read(SourceSlice("scanned", rows=(0, 2)))
    assert reader.blocks_read == 0 and ckpt.direct_reads == 6


def test_at_most_two_blocks_held(ckpt):
    reader = BlockReader(ckpt, block_bytes=2 * 8 * 6 * 4)
    for layer in range(5):
        reader.read(SourceSlice("scanned", index=(layer,), axes=(1,)))
    assert len(reader._blocks) <= orbax_blocks.MAX_BLOCKS

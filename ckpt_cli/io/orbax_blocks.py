"""Layer-slice reads from checkpoints whose chunks span many layers, without decoding each chunk per layer.

MaxText saves a scanned tensor chunked by its device sharding (e.g. `(E/16, L, F)`), so every chunk holds
all layers. Reading one layer slice at a time would decode every chunk once per layer (L times in all).
`BlockReader` reads such a tensor a block of consecutive layers at a time (as many as fit in a byte
budget), keeps at most two blocks, and serves the engine's per-layer (and row-piece) reads from them.
Checkpoints chunked one layer per chunk (ckpt's own) are read directly, with no block held.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from concurrent.futures import Future

import numpy as np

from ckpt_cli.io.orbax import read_error
from ckpt_cli.plan import SourceSlice

BLOCK_BYTES = 384 * 1024 * 1024
MAX_BLOCKS = 2


class BlockReader:
    """Wraps an OrbaxCheckpoint (the engine's Reader protocol): blocked reads where chunks span layers."""

    def __init__(self, ckpt, block_bytes: int = BLOCK_BYTES):
        self.ckpt = ckpt
        self.block_bytes = block_bytes
        self._lock = threading.Lock()
        self._blocks: OrderedDict[tuple, Future] = OrderedDict()
        self.blocks_read = 0

    def describe(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        return self.ckpt.describe(name)

    def order_key(self, source: SourceSlice) -> tuple:
        return self.ckpt.order_key(source)

    def read(self, source: SourceSlice) -> np.ndarray:
        if not source.axes:
            return self.ckpt.read(source)
        arr = self.ckpt.array(source.name)
        axis = source.axes[-1]                        # the layer axis (experts, when present, come first)
        layers = arr.shape[axis]
        span = arr.chunk_layout.read_chunk.shape[axis]
        itemsize = arr.dtype.numpy_dtype.itemsize
        slice_bytes = math.prod(s for a, s in enumerate(arr.shape) if a not in source.axes) * itemsize
        per_block = min(layers, max(1, self.block_bytes // max(1, slice_bytes)))
        if span <= 1 or per_block <= 1:
            return self.ckpt.read(source)
        layer = source.index[-1]
        start = layer - layer % per_block
        stop = min(layers, start + per_block)
        block = self._block((source.name, source.index[:-1], start), source, start, stop)
        idx: list = [slice(None)] * block.ndim
        idx[0] = layer - start
        if source.rows is not None:
            # block axes: (layer, remaining axes of the source in order)
            rest = [a for a in range(arr.rank) if a not in source.axes]
            idx[1 + rest.index(source.rows_axis)] = slice(*source.rows)
        return block[tuple(idx)]

    def _block(self, key: tuple, source: SourceSlice, start: int, stop: int) -> np.ndarray:
        """Layers [start, stop) of one stacked tensor (other stacked axes fixed), read once and shared."""
        with self._lock:
            future = self._blocks.get(key)
            owner = future is None
            if owner:
                future = Future()
                self._blocks[key] = future
                while len(self._blocks) > MAX_BLOCKS:
                    self._blocks.popitem(last=False)
            else:
                self._blocks.move_to_end(key)
        if owner:
            try:
                future.set_result(self._read_block(source, start, stop))
                self.blocks_read += 1
            except BaseException as exc:
                with self._lock:
                    self._blocks.pop(key, None)
                future.set_exception(exc)
                raise
        return future.result()

    def _read_block(self, source: SourceSlice, start: int, stop: int) -> np.ndarray:
        """Read layers [start, stop) as an array with the layer axis first, then the slice's axes."""
        arr = self.ckpt.array(source.name)
        axis = source.axes[-1]
        idx: list = [slice(None)] * arr.rank
        for a, i in zip(source.axes[:-1], source.index[:-1], strict=True):
            idx[a] = i
        idx[axis] = slice(start, stop)
        try:
            block = arr[tuple(idx)].read().result()
        except ValueError as exc:
            raise read_error(self.ckpt.items, source.name, exc) from None
        # After integer indexing of the leading stacked axes, the layer axis sits at `axis - len(axes[:-1])`.
        return np.moveaxis(block, axis - (len(source.axes) - 1), 0)

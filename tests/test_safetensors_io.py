"""Our pread reader and streaming writer agree with the safetensors library, and catch broken files."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file
from safetensors.numpy import save_file as st_save

from ckpt_cli.errors import SourceError
from ckpt_cli.io.safetensors import SafetensorsFolder, read_header, save_file

rng = np.random.default_rng(0)
TENSORS = {"a": rng.standard_normal((3, 5)).astype(np.float32),
           "b": rng.standard_normal((7,)).astype(ml_dtypes.bfloat16),
           "c": np.arange(12, dtype=np.int64).reshape(2, 6)}


def test_reader_matches_library(tmp_path):
    st_save(TENSORS, str(tmp_path / "model.safetensors"))
    folder = SafetensorsFolder(tmp_path)
    for name, arr in TENSORS.items():
        got = folder.read(name)
        assert got.dtype == arr.dtype and np.array_equal(got.view(np.uint8), arr.view(np.uint8))
    assert np.array_equal(folder.read_rows("a", 1, 3), TENSORS["a"][1:3])


def test_writer_output_loads_in_library(tmp_path):
    save_file(tmp_path / "x.safetensors", TENSORS, {"format": "pt"})
    back = load_file(str(tmp_path / "x.safetensors"))
    for name, arr in TENSORS.items():
        assert np.array_equal(back[name].view(np.uint8), arr.view(np.uint8))


def test_truncated_file_is_a_clear_error(tmp_path):
    st_save(TENSORS, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(SourceError, match="truncated"):
        read_header(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").write_bytes(data[:5])
    with pytest.raises(SourceError, match="truncated"):
        read_header(tmp_path / "model.safetensors")


def test_index_naming_missing_shard(tmp_path):
    st_save(TENSORS, str(tmp_path / "model-00001-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "z": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(SourceError, match="model-00002-of-00002.safetensors.*missing"):
        SafetensorsFolder(tmp_path)


def test_empty_folder(tmp_path):
    with pytest.raises(SourceError, match="no safetensors"):
        SafetensorsFolder(tmp_path)

"""HF -> MaxText for Qwen3 (tied, untied), Qwen3 MoE, Llama 3.1, Mixtral and Gemma3: restored with Orbax's own API,
checked leaf by leaf against expectations written from the layout spec."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from ckpt_cli.convert import ToMaxTextOptions, hf_to_maxtext
from ckpt_cli.io.orbax import StorageOptions
from tests.conftest import read_config
from tests.expectations import assert_bits_equal, cast, expected_tree, flatten, stored_dtype


def load_hf(folder) -> dict:
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def restore(out) -> dict:
    import orbax.checkpoint as ocp

    return ocp.PyTreeCheckpointer().restore(str(out / "0" / "items"))


CASES = [
    # kind, source dtype, sharded, scan, output dtype
    ("qwen3", "float32", False, True, "f32"),
    ("qwen3", "float32", True, False, "f32"),
    ("qwen3", "bfloat16", True, True, "bf16"),
    ("qwen3", "bfloat16", False, False, "bf16"),
    ("qwen3-tied", "bfloat16", False, True, "bf16"),
    ("qwen3-tied", "float32", True, False, "bf16"),
    ("llama", "float32", False, True, "f32"),
    ("llama", "float32", True, False, "bf16"),
    ("llama", "bfloat16", True, True, "bf16"),
    ("llama", "bfloat16", False, False, "f32"),
    ("qwen3-moe", "float32", True, True, "f32"),
    ("qwen3-moe", "float32", False, False, "f32"),
    ("qwen3-moe", "bfloat16", True, False, "bf16"),
    ("qwen3-moe", "bfloat16", False, True, "bf16"),
    ("mixtral", "float32", True, True, "f32"),
    ("mixtral", "float32", False, False, "f32"),
    ("mixtral", "bfloat16", True, False, "bf16"),
    ("mixtral", "bfloat16", False, True, "bf16"),
    ("gemma3", "float32", False, True, "f32"),
    ("gemma3", "float32", True, False, "f32"),
    ("gemma3", "bfloat16", True, True, "bf16"),
    ("gemma3", "bfloat16", False, False, "bf16"),
    ("gemma3-e48", "bfloat16", False, True, "bf16"),
    ("gemma3-e48", "float32", True, False, "f32"),
    ("gpt-oss", "float32", True, True, "f32"),
    ("gpt-oss", "float32", False, False, "f32"),
    ("gpt-oss", "bfloat16", False, True, "bf16"),
    ("gpt-oss", "bfloat16", True, False, "bf16"),
]
FAMILY = {"llama": "llama", "qwen3-moe": "qwen3_moe", "mixtral": "mixtral", "gemma3": "gemma3",
          "gemma3-e48": "gemma3", "gpt-oss": "gpt_oss"}   # the others: qwen3


@pytest.mark.parametrize("kind,src_dtype,sharded,scan,dtype", CASES)
def test_converted_tree_matches_spec(hf_models, tmp_path, kind, src_dtype, sharded, scan, dtype):
    src = hf_models(kind, src_dtype, sharded)
    out = tmp_path / "mt"
    hf_to_maxtext(str(src), out, ToMaxTextOptions(scan_layers=scan, dtype=dtype))
    restored = restore(out)
    assert int(restored["step"]) == 0
    assert restored["opt_state"] == {} or restored["opt_state"] is None
    got = flatten(restored["params"]["params"])
    family = FAMILY.get(kind, "qwen3")
    want = expected_tree(load_hf(src), read_config(src), family, scan)
    assert set(got) == set(want)
    for path, expected in want.items():
        assert_bits_equal(got[path], cast(expected, stored_dtype(path, family, dtype)), path)
    if kind == "qwen3-moe":
        # §8.2 with X=4 experts, L=2, E=64, M=32: experts on axis 0, the layer axis (scanned) at 1
        pre = "decoder/layers/moe_block/" if scan else "decoder/layers_1/moe_block/"
        shapes = {"gate/kernel": (64, 2, 4), "wi_0": (4, 2, 64, 32), "wi_1": (4, 2, 64, 32), "wo": (4, 2, 32, 64)}
        for leaf, shape in shapes.items():
            assert got[pre + leaf].shape == (shape if scan else shape[:1] + shape[2:]), leaf
        assert not any("/mlp/" in path for path in got)
    if kind == "mixtral":
        # §11.2 with X=4 experts, L=2, E=64, M=32: MoeBlock_0, experts on axis 0, the layer axis (scanned) at 1
        pre = "decoder/layers/MoeBlock_0/" if scan else "decoder/layers_1/MoeBlock_0/"
        shapes = {"gate/kernel": (64, 2, 4), "wi_0": (4, 2, 64, 32), "wi_1": (4, 2, 64, 32), "wo": (4, 2, 32, 64)}
        for leaf, shape in shapes.items():
            assert got[pre + leaf].shape == (shape if scan else shape[:1] + shape[2:]), leaf
        assert not any("/mlp/" in path or "query_norm" in path for path in got)
    if kind == "gpt-oss":
        # §10.2 with X=4, L=4 (scan length 2), E=64, M=32, N=4, K=2, D=16: layer axis at 1, experts keep axis 0
        shapes = {"GptOssMlp/wi_0": (4, 2, 64, 32), "GptOssMlp/wi_1_bias": (4, 2, 32), "GptOssMlp/wo": (4, 2, 32, 64),
                  "GptOssMlp/gate/bias": (4, 2), "GptOssAttention/query/bias": (4, 2, 16),
                  "GptOssAttention/sinks": (4, 2)}
        for leaf, shape in shapes.items():
            for b in range(2):
                path = f"decoder/layers/layers_{b}/{leaf}" if scan else f"decoder/layers_{b + 2}/{leaf}"
                assert got[path].shape == (shape if scan else shape[:1] + shape[2:]), path


def test_step_metadata_and_provenance(hf_models, tmp_path):
    src = hf_models("qwen3", "bfloat16")
    out = tmp_path / "mt"
    hf_to_maxtext(str(src), out, ToMaxTextOptions(scan_layers=False))
    meta = json.loads((out / "0" / "_CHECKPOINT_METADATA").read_text())
    assert meta["custom_metadata"]["scan_layers"] is False
    prov = meta["custom_metadata"]["ckpt"]
    assert prov["family"] == "qwen3" and prov["dtype"] == "bfloat16"
    assert prov["hf_config"]["hidden_size"] == read_config(src)["hidden_size"]
    assert (out / "0" / "commit_success.txt").exists()
    assert not (tmp_path / "mt.partial").exists()

    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(str(out))
    assert manager.all_steps() == [0]
    assert manager.metadata(0).custom_metadata["scan_layers"] is False


@pytest.mark.parametrize("ocdbt,zarr3", [(False, True), (True, False), (False, False)])
def test_storage_variants_restore(hf_models, tmp_path, ocdbt, zarr3):
    src = hf_models("llama", "bfloat16")
    out = tmp_path / "mt"
    hf_to_maxtext(str(src), out, ToMaxTextOptions(storage=StorageOptions(use_ocdbt=ocdbt, use_zarr3=zarr3,
                                                                         compression="none")))
    meta = json.loads((out / "0" / "items" / "_METADATA").read_text())
    assert meta["use_ocdbt"] is ocdbt and meta["use_zarr3"] is zarr3
    got = flatten(restore(out)["params"]["params"])
    want = expected_tree(load_hf(src), read_config(src), "llama", True)
    for path, expected in want.items():
        assert_bits_equal(got[path], cast(expected, "bf16"), path)


def test_restore_with_jax_abstract_targets(hf_models, tmp_path):
    """MaxText restores into an abstract tree of jax arrays with a sharding and float32 dtype; that must work."""
    import jax
    import orbax.checkpoint as ocp

    src = hf_models("qwen3", "bfloat16")
    out = tmp_path / "mt"
    hf_to_maxtext(str(src), out, ToMaxTextOptions())
    items = out / "0" / "items"
    ckptr = ocp.PyTreeCheckpointer()
    meta = ckptr.metadata(str(items))
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
    params_meta = tree["params"]
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restore_args = jax.tree_util.tree_map(
        lambda m: ocp.ArrayRestoreArgs(sharding=sharding, dtype=np.float32, global_shape=m.shape), params_meta)
    restored = ckptr.restore(str(items), args=ocp.args.PyTreeRestore(
        item={"params": params_meta}, restore_args={"params": restore_args}, partial_restore=True))
    q = restored["params"]["params"]["decoder"]["layers"]["self_attention"]["query"]["kernel"]
    assert isinstance(q, jax.Array) and q.dtype == np.float32 and q.shape == (64, 2, 4, 16)


@pytest.mark.parametrize("kind,scan", [("llama", True), ("qwen3-tied", False)])
def test_large_tensors_move_in_row_pieces(hf_models, tmp_path, monkeypatch, kind, scan):
    """Large 2-D tensors (embedding, lm_head, MLP) are read and written in row pieces; output unchanged."""
    import ckpt_cli.plan as plan_mod

    monkeypatch.setattr(plan_mod, "PIECE_BYTES", 4096)
    src = hf_models(kind, "bfloat16", sharded=True)
    out = tmp_path / "mt"
    result = hf_to_maxtext(str(src), out, ToMaxTextOptions(scan_layers=scan))
    emb = result.plan.tensor("token_embedder/embedding")
    assert emb.span_axis == 0 and len(emb.tasks) > 1 and emb.chunk_shape[0] == emb.tasks[0].span[1]
    wo = next(t for t in result.plan.tensors if t.target.endswith("mlp/wo/kernel"))
    assert wo.span_axis == len(wo.shape) - 1 and all(task.source.rows for task in wo.tasks)
    got = flatten(restore(out)["params"]["params"])
    family = "llama" if kind == "llama" else "qwen3"
    for path, expected in expected_tree(load_hf(src), read_config(src), family, scan).items():
        assert_bits_equal(got[path], cast(expected, "bf16"), path)

"""`ckpt inspect`: every target kind from metadata only, stable --json key sets, and --against / --model
comparisons in MaxText path space that name what is missing, extra or mis-shaped."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from ckpt_cli import inspect as I
from ckpt_cli import registry
from ckpt_cli.cli.app import app
from ckpt_cli.convert import ToMaxTextOptions, hf_to_maxtext
from ckpt_cli.io.safetensors import read_header

runner = CliRunner()

COMMON = {"command", "kind", "target", "family", "maxtext_models", "totals", "tensors", "notes"}
HF_KEYS = COMMON | {"config", "source", "shards", "fetched"}
ORBAX_KEYS = COMMON | {"items_dir", "scan_layers", "storage", "provenance", "disk_bytes", "stored_outside_params"}
MODEL_KEYS = COMMON | {"model", "repo_id", "scan_layers", "dtype"}
COMPARE_KEYS = {"command", "kind", "a", "b", "scan_layers", "identical", "counts", "missing", "extra", "mismatched",
                "dtype_differs", "unmapped", "notes"}
TOTALS_KEYS = {"tensors", "parameters", "bytes", "by_dtype"}
HF_TENSOR_KEYS = {"name", "shape", "dtype", "bytes", "shard"}
MT_TENSOR_KEYS = {"path", "shape", "dtype", "bytes", "chunk_shape", "read_chunk"}


def run_json(*args: str, code: int = 0) -> dict:
    r = runner.invoke(app, ["inspect", *args, "--json"])
    assert r.exit_code == code, r.output
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def converted(hf_models, tmp_path_factory):
    """(HF folder, its scanned conversion, its unscanned conversion)."""
    src = hf_models("qwen3", "bfloat16")
    root = tmp_path_factory.mktemp("inspect")
    hf_to_maxtext(str(src), root / "scanned", ToMaxTextOptions())
    hf_to_maxtext(str(src), root / "unscanned", ToMaxTextOptions(scan_layers=False))
    return src, root / "scanned", root / "unscanned"


def test_hf_folder(converted):
    src, _, _ = converted
    data = run_json(str(src))
    assert set(data) == HF_KEYS and set(data["totals"]) == TOTALS_KEYS
    assert set(data["config"]) == set(I.CONFIG_KEYS)
    assert data["kind"] == "hf" and data["family"] == "qwen3" and data["maxtext_models"] == []
    assert data["fetched"] is None and data["source"]["folder"] == str(src)
    headers = read_header(src / "model.safetensors")
    assert {t["name"] for t in data["tensors"]} == set(headers)
    assert all(set(t) == HF_TENSOR_KEYS for t in data["tensors"])
    assert data["totals"]["bytes"] == sum(i.nbytes for i in headers.values())
    assert data["totals"]["parameters"] == sum(int(np.prod(i.shape)) for i in headers.values())
    assert data["totals"]["by_dtype"]["bfloat16"]["tensors"] == len(headers)
    assert data["shards"] == [{"file": "model.safetensors", "bytes": (src / "model.safetensors").stat().st_size,
                               "tensors": len(headers)}]
    # a single file works too; --summary drops the listing, --filter narrows the totals
    one = run_json(str(src / "model.safetensors"), "--summary", "--filter", "*mlp*")
    assert one["tensors"] == [] and one["totals"]["tensors"] == 6 and one["family"] is None


def test_orbax_checkpoint(converted):
    _, scanned, unscanned = converted
    data = run_json(str(scanned), "--filter", "decoder/layers/*")
    assert set(data) == ORBAX_KEYS and all(set(t) == MT_TENSOR_KEYS for t in data["tensors"])
    assert data["scan_layers"] is True and data["family"] == "qwen3"
    assert data["storage"] == {"use_ocdbt": True, "use_zarr3": True}
    assert data["provenance"]["tool"] == "ckpt" and data["provenance"]["scan_layers"] is True
    q = {t["path"]: t for t in data["tensors"]}["decoder/layers/self_attention/query/kernel"]
    assert q["shape"] == [64, 2, 4, 16] and q["chunk_shape"] == [64, 1, 4, 16] and q["dtype"] == "bfloat16"
    assert data["disk_bytes"] > data["totals"]["bytes"] > 0
    assert data["stored_outside_params"] == {}
    # run dir, step dir and items dir all open; the unscanned one says so
    for path in (scanned / "0", scanned / "0" / "items"):
        assert run_json(str(path))["items_dir"] == str(scanned / "0" / "items")
    flat = run_json(str(unscanned))
    assert flat["scan_layers"] is False
    assert "decoder/layers_1/mlp/wo/kernel" in {t["path"] for t in flat["tensors"]}


def test_model_tree_matches_the_golden_shapes():
    data = run_json("--model", "qwen3-0.6b")
    assert set(data) == MODEL_KEYS and data["kind"] == "maxtext-model" and data["maxtext_models"] == ["qwen3-0.6b"]
    shapes = {t["path"]: tuple(t["shape"]) for t in data["tensors"]}
    assert shapes["decoder/layers/self_attention/query/kernel"] == (1024, 28, 16, 128)
    assert shapes["decoder/layers/mlp/wo/kernel"] == (3072, 28, 1024)
    assert "decoder/logits_dense/kernel" not in shapes            # tied
    assert data["totals"]["parameters"] == 596049920
    flat = run_json("--model", "qwen3-8b", "--no-scan", "--filter", "decoder/layers_35/*")
    assert {tuple(t["shape"]) for t in flat["tensors"] if t["path"].endswith("query/kernel")} == {(4096, 32, 128)}
    assert flat["totals"]["tensors"] == 11


def test_matching_models_from_config():
    # Qwen3-8B and its -Base release share every reference hyperparameter: both are named
    assert I.matching_models(registry.reference_config("qwen3-8b")) == ["qwen3-8b", "qwen3-8b-base"]
    assert I.matching_models(registry.reference_config("llama3.1-8b")) == ["llama3.1-8b", "llama3.1-8b-Instruct"]
    assert I.matching_models({"model_type": "mistral"}) == []


def test_hf_against_its_own_conversion_is_identical(converted):
    src, scanned, unscanned = converted
    data = run_json(str(src), "--against", str(scanned))
    assert set(data) == COMPARE_KEYS and data["identical"] is True
    assert data["counts"]["matched"] == data["counts"]["b"] == 14
    # the HF side follows the Orbax side's layout
    assert run_json(str(src), "--against", str(unscanned))["identical"] is True
    r = runner.invoke(app, ["inspect", str(scanned), "--against", str(src)])
    assert r.exit_code == 0 and "same structure" in r.stdout and "identical" not in r.stdout


def test_against_reports_a_planted_mismatch(converted, tmp_path):
    src, scanned, _ = converted
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    state = load_file(bad / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"]
    state["model.layers.0.self_attn.q_proj.weight"] = state["model.layers.0.self_attn.q_proj.weight"][:32]
    state["model.layers.9.extra.weight"] = np.zeros(4, dtype=np.float32)
    save_file(state, bad / "model.safetensors")
    data = run_json(str(bad), "--against", str(scanned), code=1)
    assert data["identical"] is False
    assert data["missing"] == [{"path": "decoder/layers/mlp/wo/kernel", "shape": [128, 2, 64],
                                "reason": "HF tensor model.layers.1.mlp.down_proj.weight is absent"}]
    assert [m["path"] for m in data["mismatched"]] == ["decoder/layers/self_attention/query/kernel"]
    assert "model.layers.0.self_attn.q_proj.weight is (32, 64), expected (64, 64)" in data["mismatched"][0]["reason"]
    assert data["extra"] == [] and data["unmapped"] == ["model.layers.9.extra.weight"]
    assert data["counts"] == {"a": 14, "b": 14, "matched": 12, "missing": 1, "extra": 0, "mismatched": 1,
                              "dtype_differs": 0}
    r = runner.invoke(app, ["inspect", str(bad), "--against", str(scanned)], env={"COLUMNS": "250"})
    assert r.exit_code == 1
    assert "DIFFERENT" in r.stdout and "12/14" in r.stdout and "down_proj.weight is absent" in r.stdout


def test_against_a_model_and_across_layouts(converted):
    src, scanned, unscanned = converted
    data = run_json(str(scanned), "--model", "qwen3-0.6b", code=1)
    assert data["b"] == {"target": "qwen3-0.6b", "kind": "maxtext-model"}
    assert data["counts"]["matched"] == 0 and data["extra"][0]["path"] == "decoder/logits_dense/kernel"
    assert any("configs differ" in n and "hidden_size 64 vs 1024" in n for n in data["notes"])
    cross = run_json(str(unscanned), "--against", str(scanned), code=1)
    assert cross["counts"]["matched"] == 3          # embedding, final norm, head
    assert any("A is unscanned and B is scanned" in n for n in cross["notes"])
    dtypes = run_json(str(src), "--against", str(scanned), "--dtype", "f32")
    assert dtypes["identical"] is True and dtypes["counts"]["dtype_differs"] == 14


def test_human_output_and_bad_input(converted):
    src, scanned, _ = converted
    r = runner.invoke(app, ["inspect", str(src), "--tensors"])
    assert r.exit_code == 0, r.output
    assert "model.layers.1.mlp.down_proj.weight" in r.stdout and "parameters" in r.stdout
    r = runner.invoke(app, ["inspect", str(scanned)])
    assert r.exit_code == 0 and "scan_layers" in r.stdout and "written by" in r.stdout
    r = runner.invoke(app, ["inspect"])
    assert r.exit_code == 2 and "give a TARGET" in r.stderr
    r = runner.invoke(app, ["inspect", "no-such-thing"])
    assert r.exit_code == 2 and "no such folder" in r.stderr
    r = runner.invoke(app, ["inspect", "--model", "qwen3-7b"])
    assert r.exit_code == 2 and "unknown model 'qwen3-7b'" in r.stderr

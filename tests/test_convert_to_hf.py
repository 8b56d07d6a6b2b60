"""MaxText -> HF: exact round trips, logits through transformers, checkpoints written the way MaxText writes
them (orbax CheckpointManager, 16-way sharded jax.Arrays, optimizer state), shards, tokenizers, bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from ckpt_cli import registry
from ckpt_cli.convert import ToHFOptions, ToMaxTextOptions, hf_to_maxtext, maxtext_to_hf
from ckpt_cli.io.safetensors import read_header
from tests.cli_helpers import error_line, run
from tests.conftest import read_config
from tests.expectations import assert_bits_equal, gemma3_embedding_factor
from tests.hub_server import fake_hub  # noqa: F401 - pytest fixture

ROOT = Path(__file__).resolve().parent.parent
SRC_DTYPE = {"bf16": "bfloat16", "f32": "float32"}


def load_hf(folder: Path) -> dict[str, np.ndarray]:
    state: dict[str, np.ndarray] = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def nothing_published(out: Path) -> bool:
    """No output folder with weights or config, and no .partial sibling."""
    partial = out.with_name(out.name + ".partial")
    return not (out / "config.json").exists() and not list(out.glob("*.safetensors")) and not partial.exists()


def to_maxtext(src: Path, out: Path, scan: bool, dtype: str) -> Path:
    hf_to_maxtext(str(src), out, ToMaxTextOptions(scan_layers=scan, dtype=dtype))
    return out


def bits(x: np.ndarray) -> np.ndarray:
    """Signed integer view of the bit patterns (adjacent floats of one sign differ by 1)."""
    return np.ascontiguousarray(x).view(np.int16 if x.dtype.itemsize == 2 else np.int32).astype(np.int64)


# ------------------------------------------------------------------------------------------------------------
# HF -> MaxText -> HF

ROUND_TRIPS = [(kind, scan, dtype)
               for kind in ("qwen3", "qwen3-tied", "llama", "llama-d24", "qwen3-moe", "mixtral", "gemma3",
                            "gemma3-e48", "gpt-oss")
               for scan in (True, False) for dtype in ("bf16", "f32")]


@pytest.mark.parametrize("kind,scan,dtype", ROUND_TRIPS)
def test_round_trip_is_exact(hf_models, tmp_path, kind, scan, dtype):
    """Same names; every tensor bit-identical, except the Llama and Mixtral query kernels, whose 1/sqrt(D) factor
    is undone.

    For q_proj, with s = f32(1/sqrt(D)) and out() = rounding to the stored dtype, we assert (a) the bits equal
    `out(f32(out(f32(x) * s)) / s)` (import multiplies by s, export divides by the same s, each in float32),
    and (b) every element is the original or an adjacent value of the stored dtype (bit patterns differ by
    at most 1: one bf16 ulp in bf16, one f32 ulp in f32, the least a non-power-of-two scale allows since it
    is not injective). In f32 most elements come back bit-identical. With D = 16 the factor is a power of two
    and (a) means bit-identical.

    Gemma3's embedding is the same argument with s = bf16(sqrt(E)): exact for E = 64 (s = 8), one ulp at most for
    E = 48 (s = 6.9375). Its norm weights go through `f32(x) + 1`, stored float32 whatever the dtype (§3.4), and
    `- 1` on export: we assert the bits equal `out(f32(f32(x) + 1) - 1)`, and (bf16) bit-identity wherever
    2^-15 <= |x| < 2^23 (x has 8 significant bits, so x + 1 needs at most 24 and is exact in float32, and so is
    the subtraction), (f32) at most one ulp wherever |x| >= 0.5 (only the rounding of x + 1 can move it, by
    half an ulp of x + 1 <= 3|x|, i.e. at most one ulp of x; the subtraction is then exact).
    """
    src = hf_models(kind, SRC_DTYPE[dtype])
    mt = to_maxtext(src, tmp_path / "mt", scan, dtype)
    out = tmp_path / "hf"
    result = maxtext_to_hf(str(mt), out, ToHFOptions(dtype=dtype))
    want, got = load_hf(src), load_hf(out)
    assert sorted(got) == sorted(want)
    assert result.plan.scan_layers is scan
    assert result.stats.extra["blocks_read"] == 0   # ckpt's own chunks are one layer each: read directly
    cfg = read_config(src)
    head_dim = cfg["head_dim"]
    store = ml_dtypes.bfloat16 if dtype == "bf16" else np.float32
    moved = 0
    for name, x in want.items():
        if kind.startswith(("llama", "mixtral")) and name.endswith("q_proj.weight"):
            s = np.float32(1 / math.sqrt(head_dim))
            down = (x.astype(np.float32) * s).astype(store)
            expected = (down.astype(np.float32) / s).astype(store)
            assert_bits_equal(got[name], expected, name)
            assert np.abs(bits(got[name]) - bits(x)).max() <= 1, name
            n_moved = int(np.count_nonzero(bits(got[name]) != bits(x)))
            if dtype == "f32":
                assert n_moved <= x.size // 4, f"{name}: {n_moved} of {x.size} moved by one ulp"
            moved += n_moved
        elif kind.startswith("gemma3") and name == "model.embed_tokens.weight":
            s = gemma3_embedding_factor(cfg["hidden_size"])
            down = (x.astype(np.float32) * s).astype(store)
            assert_bits_equal(got[name], (down.astype(np.float32) / s).astype(store), name)
            assert np.abs(bits(got[name]) - bits(x)).max() <= 1, name
            moved += int(np.count_nonzero(bits(got[name]) != bits(x)))
        elif kind.startswith("gemma3") and name.endswith("norm.weight"):
            one = np.float32(1.0)
            assert_bits_equal(got[name], ((x.astype(np.float32) + one) - one).astype(store), name)
            mag = np.abs(x.astype(np.float32))
            proven = (mag >= 2.0**-15) & (mag < 2.0**23) if dtype == "bf16" else mag >= 0.5
            assert proven.any(), name
            assert np.abs(bits(got[name]) - bits(x))[proven].max() <= (0 if dtype == "bf16" else 1), name
        else:
            assert_bits_equal(got[name], x, name)
    if kind == "gemma3":
        assert moved == 0   # E = 64: bf16(sqrt(E)) = 8, a power of two, exact both ways
    if kind == "gemma3-e48" and dtype == "bf16":
        assert moved > 0    # s = 6.9375: bf16 rounding moves some embedding elements by one ulp
    if kind in ("llama", "mixtral"):
        assert moved == 0   # D = 16: the scale is a power of two, exact both ways
    if kind == "llama-d24" and dtype == "bf16":
        assert moved > 0    # the check above is not vacuous: bf16 rounding does move some elements
    meta = safe_open(str(out / "model.safetensors"), "np").metadata()
    assert meta == {"format": "pt"}
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == SRC_DTYPE[dtype] and config["architectures"] == cfg["architectures"]


@pytest.mark.parametrize("kind,scan", [("qwen3", True), ("qwen3-tied", False), ("llama", False),
                                       ("llama-d24", True), ("qwen3-moe", True), ("mixtral", True),
                                       ("mixtral", False), ("gemma3", True), ("gemma3-e48", False),
                                       ("gpt-oss", True), ("gpt-oss", False)])
def test_round_trip_logits_match_transformers(hf_models, tmp_path, kind, scan):
    """The output folder loads with AutoModelForCausalLM and gives the original model's logits (float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    src = hf_models(kind, "float32")
    mt = to_maxtext(src, tmp_path / "mt", scan, "f32")
    out = tmp_path / "hf"
    maxtext_to_hf(str(mt), out, ToHFOptions())    # dtype from the carried config: float32
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    logits = []
    for folder in (src, out):
        model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        assert next(model.parameters()).dtype == torch.float32
        with torch.no_grad():
            logits.append(model(tokens).logits)
    # gemma3-e48: its embedding (x 6.9375 then / 6.9375) and norms (+1 then -1) come back within one f32 ulp, not
    # bit-identical (test_round_trip_is_exact), which 14 layers turn into logit differences of about 1e-5
    assert float((logits[0] - logits[1]).abs().max()) < (1e-4 if kind == "gemma3-e48" else 1e-5)


def test_large_tensors_written_in_row_pieces(hf_models, tmp_path, monkeypatch):
    """Row-piece tasks (embedding, lm_head, MLP) land at their offsets: output unchanged, across shards."""
    import ckpt_cli.plan as plan_mod

    src = hf_models("llama", "bfloat16")
    mt = to_maxtext(src, tmp_path / "mt", True, "bf16")
    monkeypatch.setattr(plan_mod, "PIECE_BYTES", 4096)
    result = maxtext_to_hf(str(mt), tmp_path / "hf", ToHFOptions(shard_size=40_000))
    emb = result.plan.tensor("model.embed_tokens.weight")
    assert emb.span_axis == 0 and len(emb.tasks) > 1
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    want, got = load_hf(src), load_hf(tmp_path / "hf")
    for name in want:
        if not name.endswith("q_proj.weight"):
            assert_bits_equal(got[name], want[name], name)


@pytest.mark.parametrize("kind,scan", [("v2", False), ("v3", True)])
def test_deepseek_round_trip_finds_the_mtp_layer(tmp_path, kind, scan):
    """DeepSeek (MLA, experts, dense/moe groups) back to HF with no flag; V3's MTP layer is found in the tree.

    MaxText keeps no copy of the MTP layer's embed_tokens / shared_head.head (it reuses the main ones), so those
    two are not written back; everything else (shared_head.norm is MaxText 0.2.5's mtp_1_final_norm) returns
    bit-identical.
    """
    from tests.conftest import save_model
    from tests.families.test_deepseek import add_mtp_layer, make_model

    src = save_model(make_model(kind, "bfloat16"), tmp_path / "src", False)
    if kind == "v3":
        add_mtp_layer(src)
    hf_to_maxtext(str(src), tmp_path / "mt", ToMaxTextOptions(scan_layers=scan, mtp=kind == "v3"))
    result = maxtext_to_hf(str(tmp_path / "mt"), tmp_path / "hf", ToHFOptions())
    assert result.plan.features == (frozenset({"mtp"}) if kind == "v3" else frozenset())
    want, got = load_hf(src), load_hf(tmp_path / "hf")
    L = read_config(src)["num_hidden_layers"]
    shared = {f"model.layers.{L}.{n}" for n in ("embed_tokens.weight", "shared_head.head.weight")} if (
        kind == "v3") else set()
    assert set(got) == set(want) - shared
    for name, x in got.items():
        assert_bits_equal(x, want[name], name)


def test_output_config():
    from ckpt_cli.to_hf import output_config

    cfg = {"model_type": "llama", "torch_dtype": "bfloat16", "quantization_config": {"quant_method": "fp8"}}
    out = output_config(cfg, np.dtype(np.float32))
    assert out["dtype"] == out["torch_dtype"] == "float32" and "quantization_config" not in out
    assert out["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" in cfg   # the input is not modified


# ------------------------------------------------------------------------------------------------------------
# Checkpoints written the way MaxText writes them

MAXTEXT_SAVE = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=16"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors.numpy import load_file
from tests.expectations import cast, expected_tree

assert len(jax.devices()) == 16
mesh = Mesh(np.array(jax.devices()), ("checkpoint_sharding_axis",))


def shard(x):
    # MaxText's shard_jax_weights: axis 0 if divisible by the device count, else axis 1, else replicated.
    n = len(jax.devices())
    if x.ndim and x.shape[0] % n == 0:
        spec = PartitionSpec("checkpoint_sharding_axis")
    elif x.ndim > 1 and x.shape[1] % n == 0:
        spec = PartitionSpec(None, "checkpoint_sharding_axis")
    else:
        spec = PartitionSpec()
    return jax.device_put(x, NamedSharding(mesh, spec))


def nest(flat):
    tree = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


for job in json.loads(sys.argv[1]):
    hf = load_file(os.path.join(job["src"], "model.safetensors"))
    cfg = json.load(open(os.path.join(job["src"], "config.json")))
    flat = {k: cast(v, job["dtype"]) for k, v in expected_tree(hf, cfg, job["family"], job["scan"]).items()}
    params = jax.tree_util.tree_map(shard, nest(flat))
    opt_state = {"count": np.int32(job["step"]), "mu": jax.tree_util.tree_map(jnp.zeros_like, params),
                 "nu": jax.tree_util.tree_map(jnp.ones_like, params)}
    state = {"step": job["step"], "params": {"params": params}, "opt_state": opt_state}
    manager = ocp.CheckpointManager(
        job["out"], item_names=("items",),
        item_handlers={"items": ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True)},
        options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False))
    custom = {"scan_layers": job["scan"]} if job["scan_metadata"] else {}
    manager.save(job["step"], args=ocp.args.Composite(items=ocp.args.PyTreeSave(item=state)), custom_metadata=custom)
    manager.wait_until_finished()
    manager.close()
"""


@pytest.fixture(scope="module")
def maxtext_written(hf_models, tmp_path_factory):
    """Two checkpoints saved by orbax itself in a subprocess with 16 simulated devices, carrying no config:
    qwen3 f32 scanned at step 1000 with scan_layers metadata; llama bf16 unscanned at step 0 without it."""
    root = tmp_path_factory.mktemp("maxtext-written")
    jobs = [
        {"name": "qwen3", "src": str(hf_models("qwen3", "float32")), "family": "qwen3", "scan": True,
         "dtype": "f32", "step": 1000, "scan_metadata": True, "out": str(root / "qwen3")},
        {"name": "llama", "src": str(hf_models("llama", "bfloat16")), "family": "llama", "scan": False,
         "dtype": "bf16", "step": 0, "scan_metadata": False, "out": str(root / "llama")},
    ]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", MAXTEXT_SAVE, json.dumps(jobs)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {j["name"]: j for j in jobs}


def test_maxtext_written_checkpoint_is_what_maxtext_writes(maxtext_written):
    """Sanity of the fixture: optimizer state and a real step on disk, arrays chunked 16 ways."""
    from ckpt_cli.io.orbax import OrbaxCheckpoint

    job = maxtext_written["qwen3"]
    ckpt = OrbaxCheckpoint(Path(job["out"]))
    assert ckpt.items == Path(job["out"]) / "1000" / "items" and ckpt.provenance == {}
    meta = json.loads((ckpt.items / "_METADATA").read_text())["tree_metadata"]
    assert any(k.startswith("('opt_state', 'mu'") for k in meta)
    assert (ckpt.items / "_sharding").exists()
    emb = ckpt.array("token_embedder/embedding")
    assert emb.shape == (128, 64)
    codec = emb.spec().to_json()["metadata"]["codecs"][0]
    assert codec["name"] == "sharding_indexed" and codec["configuration"]["chunk_shape"] == [128 // 16, 64]


@pytest.mark.parametrize("name,where", [("qwen3", "run"), ("qwen3", "step"), ("llama", "items")])
def test_maxtext_written_converts_with_hf_config(maxtext_written, tmp_path, name, where):
    job = maxtext_written[name]
    step = "1000" if name == "qwen3" else "0"
    source = {"run": Path(job["out"]), "step": Path(job["out"]) / step,
              "items": Path(job["out"]) / step / "items"}[where]
    out = tmp_path / "hf"
    result = maxtext_to_hf(str(source), out, ToHFOptions(hf_config=Path(job["src"]) / "config.json",
                                                         dtype=job["dtype"]))
    assert result.plan.scan_layers is job["scan"]   # qwen3 from metadata, llama inferred from the tree
    # MaxText's chunks hold every layer: scanned tensors are read a block of layers at a time, not per layer.
    assert (result.stats.extra["blocks_read"] > 0) is job["scan"]
    want, got = load_hf(Path(job["src"])), load_hf(out)
    assert sorted(got) == sorted(want)
    for key, x in want.items():
        assert_bits_equal(got[key], x, key)   # f32, or a power-of-two query scale: exact both ways


def test_maxtext_written_without_config_asks_for_one(maxtext_written, tmp_path):
    out = tmp_path / "hf"
    r = run("convert", "maxtext-to-hf", maxtext_written["qwen3"]["out"], "--out", out)
    assert r.exit_code == 2
    line = error_line(r)
    assert "carries no config.json" in line and "--model" in line and "--hf-config" in line
    assert nothing_published(out)


def test_model_flag_checks_shapes(maxtext_written, tmp_path, monkeypatch):
    """--model uses the registry's reference config; tiny checkpoints mismatch a real model on the first
    tensor, and convert with a registered tiny model."""
    job = maxtext_written["qwen3"]
    out = tmp_path / "hf"
    r = run("convert", "maxtext-to-hf", job["out"], "--out", out, "--model", "qwen3-0.6b")
    assert r.exit_code == 2
    assert error_line(r) == ("error: token_embedder/embedding: expected shape (151936, 1024), "
                             "found (128, 64)")
    assert nothing_published(out)
    r = run("convert", "maxtext-to-hf", job["out"], "--out", out, "--model", "llama3.1-8b")
    assert r.exit_code == 2
    assert error_line(r) == ("error: token_embedder/embedding: expected shape (128256, 4096), "
                             "found (128, 64)")

    tiny = registry.ModelSpec("qwen3-tiny", "qwen3", "none/none", read_config(Path(job["src"])))
    monkeypatch.setitem(registry.MODELS, "qwen3-tiny", tiny)
    r = run("convert", "maxtext-to-hf", job["out"], "--out", out, "--model", "qwen3-tiny", "--dtype", "f32",
            "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["config_origin"] == "--model qwen3-tiny"
    want, got = load_hf(Path(job["src"])), load_hf(out)
    for key, x in want.items():
        assert_bits_equal(got[key], x, key)


def edited_config(src: Path, tmp_path: Path, **changes) -> Path:
    cfg = read_config(src) | changes
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("name,changes,message", [
    ("qwen3", {"intermediate_size": 96}, "decoder/layers/mlp/wi_0/kernel: expected shape (64, 2, 96), "
                                          "found (64, 2, 128)"),
    ("llama", {"num_hidden_layers": 3}, "decoder/layers_2/pre_self_attention_layer_norm/scale: missing from the "
                                         "checkpoint"),
    ("qwen3", {"tie_word_embeddings": True}, "decoder/logits_dense/kernel: in the checkpoint but not in the "
                                             "qwen3 config"),
])
def test_config_that_does_not_match_names_the_tensor(maxtext_written, tmp_path, name, changes, message):
    job = maxtext_written[name]
    out = tmp_path / "hf"
    cfg = edited_config(Path(job["src"]), tmp_path, **changes)
    r = run("convert", "maxtext-to-hf", job["out"], "--out", out, "--hf-config", cfg)
    assert r.exit_code == 2
    assert message in error_line(r)
    assert nothing_published(out)


def test_real_process_json(maxtext_written, tmp_path):
    """One real `python -m ckpt_cli` run: plain JSON on stdout, nothing on stderr but notes."""
    job = maxtext_written["llama"]
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "ckpt_cli", "convert", "maxtext-to-hf", job["out"], "--out",
                           str(out), "--hf-config", job["src"], "--json"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["direction"] == "maxtext-to-hf" and data["scan_layers"] is False and data["dtype"] == "bfloat16"
    assert data["files"] == ["config.json", "generation_config.json", "model.safetensors"]
    cfg = read_config(Path(job["src"]))
    assert json.loads((out / "generation_config.json").read_text()) == {
        "_from_model_config": True, "bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}
    assert data["stats"]["bytes_written"] == sum(t["bytes"] for t in data["tensors"])


# ------------------------------------------------------------------------------------------------------------
# Shards

def test_shard_size_limit(hf_models, tmp_path):
    src = hf_models("qwen3", "float32")
    mt = to_maxtext(src, tmp_path / "mt", True, "f32")
    out = tmp_path / "hf"
    limit = 50_000
    r = run("convert", "maxtext-to-hf", mt, "--out", out, "--shard-size", "50KB", "-q")
    assert r.exit_code == 0, r.output
    files = sorted(out.glob("*.safetensors"))
    n = len(files)
    assert n > 2 and [f.name for f in files] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = {}
    for f in files:
        header = read_header(f)
        data = sum(t.nbytes for t in header.values())
        header_bytes = min(t.begin for t in header.values())
        assert data <= limit and f.stat().st_size == header_bytes + data
        for name, info in header.items():
            tensors[name] = info
            assert index["weight_map"][name] == f.name
    assert set(index["weight_map"]) == set(tensors) == set(load_hf(src))
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    names = sorted(tensors)
    order = [index["weight_map"][k] for k in names]
    assert order == sorted(order)   # greedy over sorted names: shards hold consecutive names
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out))


def test_single_shard_and_oversized_tensor(hf_models, tmp_path):
    src = hf_models("qwen3-tied", "bfloat16")
    mt = to_maxtext(src, tmp_path / "mt", False, "bf16")
    one = tmp_path / "one"
    maxtext_to_hf(str(mt), one, ToHFOptions())
    assert sorted(p.name for p in one.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert "lm_head.weight" not in load_hf(one)   # tied: no head
    # 10 KB shards: the 16 KB embedding gets a shard of its own, noted.
    many = tmp_path / "many"
    result = maxtext_to_hf(str(mt), many, ToHFOptions(shard_size=10_000))
    assert any("larger than the shard size" in n and "model.embed_tokens.weight" in n for n in result.notes)
    weight_map = json.loads((many / "model.safetensors.index.json").read_text())["weight_map"]
    emb_file = weight_map["model.embed_tokens.weight"]
    assert [k for k, f in weight_map.items() if f == emb_file] == ["model.embed_tokens.weight"]


# ------------------------------------------------------------------------------------------------------------
# Tokenizer and generation config

def fake_tokenizer(folder: Path, decoys: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                 "merges.txt"):
        (folder / name).write_text(json.dumps({"name": name}))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    if decoys:
        (folder / "model.safetensors").write_bytes(b"not copied")
        (folder / "README.md").write_text("not copied")
    return folder


TOKENIZER_FILES = ["merges.txt", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
                   "vocab.json"]


def test_tokenizer_from_local_folder(maxtext_written, tmp_path):
    job = maxtext_written["llama"]
    tok = fake_tokenizer(tmp_path / "tok")
    out = tmp_path / "hf"
    result = maxtext_to_hf(job["out"], out, ToHFOptions(hf_config=Path(job["src"]), tokenizer=str(tok)))
    assert result.files == sorted(["config.json", "generation_config.json", "model.safetensors", *TOKENIZER_FILES])
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (tok / name).read_bytes()
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}


def test_tokenizer_from_carried_source_folder(hf_models, tmp_path):
    """No flag: the source folder named in the checkpoint's provenance still has the tokenizer."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(hf_models("qwen3", "bfloat16"), src)
    fake_tokenizer(src, decoys=False)
    mt = to_maxtext(src, tmp_path / "mt", True, "bf16")
    out = tmp_path / "hf"
    result = maxtext_to_hf(str(mt), out, ToHFOptions())
    assert set(TOKENIZER_FILES) <= set(result.files)
    assert f"tokenizer files copied from {src}: {', '.join(TOKENIZER_FILES)}" in result.notes
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


def test_tokenizer_from_hub_repo(maxtext_written, tmp_path, fake_hub):  # noqa: F811 - the fixture
    hub, _ = fake_hub
    hub.add_repo("tiny-org/tok", fake_tokenizer(tmp_path / "repo"))
    job = maxtext_written["llama"]
    out = tmp_path / "hf"
    result = maxtext_to_hf(job["out"], out, ToHFOptions(hf_config=Path(job["src"]), tokenizer="tiny-org/tok"))
    assert set(TOKENIZER_FILES) <= set(result.files) and "generation_config.json" in result.files
    assert not (out / "README.md").exists()
    r = run("convert", "maxtext-to-hf", job["out"], "--out", tmp_path / "o2", "--hf-config", job["src"],
            "--tokenizer", "tiny-org/missing")
    assert r.exit_code == 4 and "not found" in error_line(r)
    assert nothing_published(tmp_path / "o2")


# ------------------------------------------------------------------------------------------------------------
# CLI output modes and the bad-input corpus

@pytest.fixture(scope="module")
def carried(hf_models, tmp_path_factory) -> Path:
    return to_maxtext(hf_models("llama", "bfloat16"), tmp_path_factory.mktemp("carried") / "mt", True, "bf16")


def test_show_tensors_summary_and_quiet(carried, tmp_path):
    r = run("convert", "maxtext-to-hf", carried, "--out", tmp_path / "a", "--show-tensors", "--wide")
    assert r.exit_code == 0, r.output
    assert "model.layers.1.self_attn.q_proj.weight" in r.stdout and "decoder/layers/self_attention/query" in r.stdout
    assert "config carried in the checkpoint" in r.stdout and "peak RSS" in r.stdout
    r = run("convert", "maxtext-to-hf", carried, "--out", tmp_path / "b", "-q")
    assert r.exit_code == 0 and r.stdout == "" and r.stderr == ""


@pytest.mark.parametrize("make,args,code,message", [
    (lambda p: p, [], 2, "no such checkpoint directory"),
    (lambda p: p.mkdir() or p, [], 2, "not an Orbax checkpoint"),
    (None, ["--model", "qwen3-7b"], 2, "unknown model 'qwen3-7b'"),
    (None, ["--model", "qwen3-8b"], 2, "qwen3-8b is a qwen3 model, but the carried config describes a llama3.1"),
    (None, ["--model", "llama3.1-8b"], 2, "hidden_size = 64, but llama3.1-8b has 4096"),
    (None, ["--shard-size", "lots"], 2, "cannot read size 'lots'"),
    (None, ["--hf-config", "/nonexistent/config.json"], 2, "no such file"),
])
def test_bad_input(carried, tmp_path, make, args, code, message):
    source = make(tmp_path / "src") if make else carried
    out = tmp_path / "out"
    r = run("convert", "maxtext-to-hf", source, "--out", out, *args)
    assert r.exit_code == code, r.output
    assert message in error_line(r)
    assert nothing_published(out)


def test_output_exists_and_overwrite(carried, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = run("convert", "maxtext-to-hf", carried, "--out", out)
    assert r.exit_code == 3 and "not empty" in error_line(r)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    r = run("convert", "maxtext-to-hf", carried, "--out", out, "--overwrite", "-q")     # not a checkpoint: kept
    assert r.exit_code == 3 and "holds keep.txt" in error_line(r) and (out / "keep.txt").exists()
    (out / "keep.txt").unlink()
    assert run("convert", "maxtext-to-hf", carried, "--out", out, "-q").exit_code == 0
    r = run("convert", "maxtext-to-hf", carried, "--out", out, "--overwrite", "-q")     # a checkpoint: replaced
    assert r.exit_code == 0 and (out / "model.safetensors").exists()
    r = run("convert", "maxtext-to-hf", carried, "--out", carried.parent, "--overwrite")
    assert r.exit_code == 3 and "contains the source" in error_line(r)
    assert (carried / "0" / "items" / "_METADATA").exists()


def test_not_enough_disk(carried, tmp_path, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    out = tmp_path / "out"
    r = run("convert", "maxtext-to-hf", carried, "--out", out)
    assert r.exit_code == 3 and "not enough free disk" in error_line(r)
    assert nothing_published(out)


def test_interrupt_mid_write_leaves_nothing(carried, tmp_path, monkeypatch):
    """Ctrl-C after some tensors were written: exit 130, no output folder, no .partial."""
    from ckpt_cli.io import hf_writer

    real = hf_writer.HFFolderWriter.write
    calls = {"n": 0}

    def interrupted(self, target, index, array):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, target, index, array)

    monkeypatch.setattr(hf_writer.HFFolderWriter, "write", interrupted)
    out = tmp_path / "out"
    r = run("convert", "maxtext-to-hf", carried, "--out", out, "--shard-size", "20KB")
    assert r.exit_code == 130 and "interrupted" in r.stderr
    assert not out.exists() and not out.with_name("out.partial").exists()

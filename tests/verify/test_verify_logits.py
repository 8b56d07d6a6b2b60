"""verify-logits end to end: converted tiny models pass, real conversion mistakes fail, golden files round-trip.

Each run goes through the CLI (typer's CliRunner, --json) unless it tests the plain function; one run
is a real `python -m ckpt_cli` subprocess with torch and transformers made unimportable.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ckpt_cli.cli.app import app
from ckpt_cli.convert import ToMaxTextOptions, hf_to_maxtext
from ckpt_cli.families import detect_family, llama3, mixtral, qwen3
from ckpt_cli.io.orbax import OrbaxCheckpoint
from ckpt_cli.io.safetensors import SafetensorsFolder
from ckpt_cli.plan import SourceSlice
from ckpt_cli.verify import reference
from ckpt_cli.verify.params import OrbaxParams
from ckpt_cli.verify.prompts import DEFAULT_LENGTHS, Prompt, parse_token_lists
from tests.conftest import make_hf_model, read_config, save_model
from tests.expectations import expected_layer
from tests.test_convert_to_maxtext import load_hf

runner = CliRunner()
KINDS = ["qwen3", "qwen3-tied", "llama"]
REPO = Path(__file__).resolve().parents[2]


def verify(*args: str):
    return runner.invoke(app, ["verify-logits", *map(str, args)])


def verify_json(*args: str, code: int = 0) -> dict:
    r = verify(*args, "--json")
    assert r.exit_code == code, r.output
    assert "\x1b[" not in r.stdout
    return json.loads(r.stdout)


def error_line(result) -> str:
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def converted(hf_models, tmp_path_factory):
    """(kind, scan, dtype) -> (HF folder, MaxText checkpoint converted from it), built once per module."""
    cache: dict[tuple, tuple[Path, Path]] = {}

    def get(kind: str, scan: bool = True, dtype: str = "f32") -> tuple[Path, Path]:
        key = (kind, scan, dtype)
        if key not in cache:
            src = hf_models(kind, "float32")
            out = tmp_path_factory.mktemp("mt") / f"{kind}-{'scan' if scan else 'noscan'}-{dtype}"
            hf_to_maxtext(str(src), out, ToMaxTextOptions(scan_layers=scan, dtype=dtype))
            cache[key] = (src, out)
        return cache[key]

    return get


def convert_with(monkeypatch, module, table, src: Path, out: Path) -> Path:
    """Convert with a family's layer table replaced (a deliberate mistake), then restore the table."""
    with monkeypatch.context() as m:
        m.setattr(module, "LAYER", table)
        hf_to_maxtext(str(src), out, ToMaxTextOptions(dtype="f32"))
    return out


def with_steps(table: tuple, leaf: str, steps: str) -> tuple:
    """A copy of a family layer table with one row's transform steps replaced."""
    assert any(r.maxtext == leaf for r in table)
    return tuple(dataclasses.replace(r, steps=tuple(steps.split(","))) if r.maxtext == leaf else r for r in table)


def leaf(out: Path, path: str) -> np.ndarray:
    return OrbaxCheckpoint(out).read(SourceSlice(path))


# ------------------------------------------------------------------------------------------------------------
# Correct conversions pass


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
@pytest.mark.parametrize("kind", KINDS)
def test_converted_f32_models_match_transformers(converted, kind, scan):
    src, out = converted(kind, scan)
    data = verify_json("--maxtext", out, "--hf", src)
    s = data["summary"]
    assert data["passed"] and data["scan_layers"] is scan and data["config_source"] == "checkpoint"
    assert data["family"] == ("llama3.1" if kind == "llama" else "qwen3")
    assert [p["length"] for p in data["prompts"]] == list(DEFAULT_LENGTHS)
    assert s["kl_max"] < 1e-6 and s["max_abs_dlogit"] < 1e-4, s
    assert s["top1_agreement"] == 1.0
    assert all(p["top_k"]["rank_agreement"] == 1.0 and p["top_k"]["overlap"] == 10 for p in data["prompts"])
    assert data["peak_rss"] > 0 and data["maxtext_bytes_read"] > 0
    assert data["reference"]["kind"] == "hf" and data["reference"]["load"] == "full"


# The MoE kinds: (family name, MaxText MoE block, transformers class)
MOE_KINDS = {"qwen3-moe": ("qwen3_moe", "moe_block", "Qwen3MoeForCausalLM"),
             "mixtral": ("mixtral", "MoeBlock_0", "MixtralForCausalLM")}


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
@pytest.mark.parametrize("kind", list(MOE_KINDS))
def test_converted_moe_models_match_transformers(converted, kind, scan):
    """Qwen3 MoE and Mixtral (every layer routed, top-2 of 4 experts) in float32: the MaxText forward equals
    transformers'."""
    src, out = converted(kind, scan)
    data = verify_json("--maxtext", out, "--hf", src)
    s = data["summary"]
    assert data["passed"] and data["family"] == MOE_KINDS[kind][0] and data["scan_layers"] is scan
    assert s["kl_max"] < 1e-6 and s["max_abs_dlogit"] < 1e-4, s
    assert s["top1_agreement"] == 1.0
    assert data["reference"]["load"] == "full" and data["maxtext_bytes_read"] > 0


@pytest.mark.parametrize("kind", list(MOE_KINDS))
def test_moe_swapped_experts_fail(converted, tmp_path, kind):
    """Experts 0 and 1 exchanged in every layer (the router left alone): tokens reach the wrong experts."""
    src, good = converted(kind, True)
    out = tmp_path / "swapped-experts"
    shutil.copytree(good, out)
    ckpt = OrbaxCheckpoint(out)
    for name in ("wi_0", "wi_1", "wo"):
        arr = ckpt.array(f"decoder/layers/{MOE_KINDS[kind][1]}/{name}")
        first, second = arr[0].read().result(), arr[1].read().result()
        assert not np.array_equal(first, second)
        arr[0].write(second).result()
        arr[1].write(first).result()
    data = verify_json("--maxtext", out, "--hf", src, "--max-kl", "1e-6", code=1)
    assert not data["passed"] and data["summary"]["kl_max"] > 1e-3


@pytest.mark.parametrize("kind", ["qwen3-moe", "mixtral", "gemma3"])
def test_fused_expert_and_gemma3_hf_models_stream_layer_by_layer(converted, monkeypatch, kind):
    """Qwen3 MoE and Mixtral (transformers 5 fuses each layer's per-expert file tensors into experts.gate_up_proj /
    down_proj, Mixtral's block_sparse_moe is renamed mlp) and Gemma3 (embedding scale in a non-persistent buffer):
    when the whole model does not fit, auto streams it, with the same figures as the whole model."""
    src, out = converted(kind, True)
    full = verify_json("--maxtext", out, "--hf", src, "--hf-load", "full", "--max-kl", "1e-6")
    est = reference.estimate_memory(src, read_config(src), [Prompt((1,) * 40)] * 3, "f32")
    assert est.stream < est.full
    room = int((est.stream + est.full) / 2 / reference.FIT_FRACTION)
    monkeypatch.setattr(reference, "available_memory", lambda: room)
    streamed = verify_json("--maxtext", out, "--hf", src, "--max-kl", "1e-6")
    assert full["reference"]["load"] == "full" and streamed["reference"]["load"] == "stream"
    assert streamed["passed"] and streamed["summary"]["kl_max"] < 1e-6, streamed["summary"]
    assert streamed["prompts"] == full["prompts"]   # identical logits, so identical figures


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("kind,stored", [("qwen3-moe", "bfloat16"), ("mixtral", "float32"), ("gemma3-e48", "bfloat16")])
def test_streamed_logits_equal_whole_model_logits_bit_for_bit(hf_models, kind, stored, dtype):
    """The streamed model is transformers' own module with the tensors from_pretrained would give it: same logits,
    bit for bit, in both compute dtypes (gemma3-e48: the bf16 embedding scale sqrt(48) is not exact)."""
    src = hf_models(kind, stored, sharded=kind == "mixtral")
    prompts = [Prompt(tuple(range(1, 9))), Prompt(tuple(range(3, 43)))]
    full, a = reference.hf_logits(src, read_config(src), prompts, dtype, "full")
    streamed, b = reference.hf_logits(src, read_config(src), prompts, dtype, "stream")
    assert (a["load"], b["load"]) == ("full", "stream")
    for x, y in zip(full, streamed, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kind", ["qwen3-moe", "mixtral"])
def test_stream_estimate_counts_a_group_of_experts_twice(hf_models, monkeypatch, kind):
    """Streamed, a layer's non-expert tensors are held once and its routed experts a group at a time; while a group's
    per-expert file tensors are stacked into transformers' fused ones, both coexist (plus slack): EXPERT_COPIES times
    the group's bytes."""
    src = hf_models(kind, "float32")
    cfg, prompts = read_config(src), [Prompt((1,) * 40)] * 3
    est = reference.estimate_memory(src, cfg, prompts, "f32")
    files = SafetensorsFolder(src).tensors
    expert = sum(int(np.prod(info.shape)) * 4 for name, info in files.items()
                 if name.startswith("model.layers.0.") and ".experts.0." in name)
    assert est.experts == 4 and est.expert_bytes == expert
    copies = reference.EXPERT_COPIES
    assert copies >= 2   # at least the tensors read and the stacked copies
    assert est.stream == est.stream_with(1) == est.stream_fixed + copies * expert
    assert est.stream_with(None) == est.stream_with(4) == est.stream_fixed + copies * 4 * expert
    monkeypatch.setattr(reference, "ROUTED_EXPERTS", re.compile(r"(?!)"))   # as if the experts were plain tensors
    assert reference.estimate_memory(src, cfg, prompts, "f32").stream_fixed - est.stream_fixed == 4 * expert
    assert est.stream_with(None) < est.full


def test_expert_layout_transformers_cannot_build_is_refused_in_one_line(converted, tmp_path):
    """A Qwen3 MoE whose files name the experts the Mixtral way (w1/w3/w2): transformers' qwen3_moe conversion
    cannot make experts.gate_up_proj from them, and --hf-load stream says so instead of running random weights."""
    from safetensors.numpy import load_file, save_file

    src, out = converted("qwen3-moe", True)
    folder = tmp_path / "mixtral-named-experts"
    shutil.copytree(src, folder)
    names = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    for f in folder.glob("*.safetensors"):
        tensors = load_file(f)
        renamed = {re.sub(r"\.(gate_proj|up_proj|down_proj)\.weight$", lambda m: f".{names[m[1]]}.weight", k)
                   if ".experts." in k else k: v for k, v in tensors.items()}
        assert renamed != tensors
        save_file(renamed, f, metadata={"format": "pt"})
    r = verify("--maxtext", out, "--hf", folder, "--hf-load", "stream")
    assert r.exit_code == 2, r.output
    assert error_line(r) == ("error: cannot stream Qwen3MoeForCausalLM: transformers holds "
                             "model.layers.0.mlp.experts.gate_up_proj, which it cannot build from the weight files; "
                             "use --hf-load full, or --golden")


def test_a_buffer_the_model_does_not_initialize_is_refused(converted, monkeypatch):
    """Gemma3's embedding scale comes from the model's own initializer; a non-persistent buffer it leaves unset
    (here: the initializer made a no-op) is refused in one line rather than run as garbage."""
    from transformers.models.gemma3 import modeling_gemma3

    src, out = converted("gemma3", True)
    monkeypatch.setattr(modeling_gemma3.Gemma3PreTrainedModel, "_init_weights", lambda self, module: None)
    r = verify("--maxtext", out, "--hf", src, "--hf-load", "stream")
    assert r.exit_code == 2, r.output
    assert error_line(r) == ("error: model.embed_tokens: a buffer not in the weight files; cannot stream, "
                             "use --hf-load full")


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_converted_gpt_oss_matches_transformers(converted, scan):
    """GPT-OSS in float32 (sinks, biases, sliding window 4 on the local layers, YaRN, clamped SwiGLU experts),
    default prompts of 8, 16 and 40 tokens: the MaxText forward equals transformers' eager model."""
    src, out = converted("gpt-oss", scan)
    data = verify_json("--maxtext", out, "--hf", src, "--max-kl", "1e-6")
    s = data["summary"]
    assert data["passed"] and data["family"] == "gpt_oss" and data["scan_layers"] is scan
    assert max(len(p["tokens"]) for p in data["prompts"]) > 4   # longer than the sliding window
    assert s["kl_max"] < 1e-6 and s["max_abs_dlogit"] < 1e-4, s
    assert s["top1_agreement"] == 1.0


def test_gpt_oss_hf_model_streams_layer_by_layer(converted):
    """transformers holds GPT-OSS's experts as the files do (fused gate_up_proj): --hf-load stream works."""
    src, out = converted("gpt-oss", True)
    data = verify_json("--maxtext", out, "--hf", src, "--hf-load", "stream", "--max-kl", "1e-6")
    assert data["passed"] and data["reference"]["load"] == "stream"


def test_gpt_oss_swapped_gate_and_up_fail(converted, tmp_path):
    """wi_0 and wi_1 exchanged in the checkpoint (the de-interleave done backwards): the verdict is FAIL."""
    src, good = converted("gpt-oss", True)
    out = tmp_path / "swapped-gate-up"
    shutil.copytree(good, out)
    ckpt = OrbaxCheckpoint(out)
    for block in ("layers_0", "layers_1"):
        for a, b in (("wi_0", "wi_1"), ("wi_0_bias", "wi_1_bias")):
            x, y = (ckpt.array(f"decoder/layers/{block}/GptOssMlp/{n}") for n in (a, b))
            xa, ya = x.read().result(), y.read().result()
            x.write(ya).result()
            y.write(xa).result()
    data = verify_json("--maxtext", out, "--hf", src, "--max-kl", "1e-6", code=1)
    assert not data["passed"] and data["summary"]["kl_max"] > 1e-5   # the right tree: ~1e-14


@pytest.mark.parametrize("kind", ["qwen3", "qwen3-moe", "mixtral", "gemma3", "gpt-oss"])
def test_orbax_params_serve_each_layer_scanned_and_unscanned(converted, kind):
    """layer(i) of both layouts equals the spec's per-layer tensors (tests/expectations.py); for Gemma3 every one
    of the 14 layers (scanned: layer i is scan index i // 6 of layers_<i mod 6>, or layers_remainder/layers_<i-12>)."""
    src, scanned = converted(kind, True)
    _, unscanned = converted(kind, False)
    cfg, hf = read_config(src), load_hf(src)
    family = detect_family(cfg)
    a = OrbaxParams(OrbaxCheckpoint(scanned), family, cfg, True)
    b = OrbaxParams(OrbaxCheckpoint(unscanned), family, cfg, False)
    assert a.scan_layers and not b.scan_layers
    assert a.num_layers == b.num_layers == cfg["num_hidden_layers"]
    for i in range(cfg["num_hidden_layers"] if kind in ("gemma3", "gpt-oss") else 2):
        want = expected_layer(hf, cfg, kind.replace("-", "_"), i)
        for got in (a.layer(i), b.layer(i)):
            assert set(got) == set(want)
            for name, arr in want.items():
                np.testing.assert_array_equal(got[name], arr, err_msg=name)
    assert a.has_top("decoder/logits_dense/kernel") is (kind != "gemma3") and not a.has_top("decoder/nope")


# ------------------------------------------------------------------------------------------------------------
# Conversion mistakes fail (exit 1, one-line FAIL verdict) at the default --max-kl


def assert_fails(out: Path, src: Path) -> dict:
    r = verify("--maxtext", out, "--hf", src, "--json")
    assert r.exit_code == 1, r.output
    assert error_line(r).startswith("error: FAIL: max KL ")
    data = json.loads(r.stdout)
    assert not data["passed"] and data["summary"]["kl_max"] > 0.015
    return data


def test_swapped_layers_fail(converted, tmp_path):
    src, good = converted("qwen3", True)
    out = tmp_path / "swapped"
    shutil.copytree(good, out)
    ckpt = OrbaxCheckpoint(out)
    layer_paths = [p for p in ckpt.paths if p.startswith("decoder/layers/")]
    for path in layer_paths:  # swap layer 0 and layer 1 of every stacked array, in place
        arr = ckpt.array(path)
        first, second = arr[:, 0].read().result(), arr[:, 1].read().result()
        arr[:, 0].write(second).result()
        arr[:, 1].write(first).result()
    q = "decoder/layers/self_attention/query/kernel"
    np.testing.assert_array_equal(leaf(out, q)[:, 0], leaf(good, q)[:, 1])
    assert_fails(out, src)


@pytest.fixture(scope="module")
def sharp_llama(tmp_path_factory) -> Path:
    """The tiny Llama with q/k weights x4: attention sharp enough (as in trained models) for RoPE/scale
    mistakes to move the logits; the fixture models' 0.05-scale q/k give near-uniform attention."""
    model = make_hf_model("llama")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(4.0)
    return save_model(model, tmp_path_factory.mktemp("sharp-llama"), False)


MISTAKES = {
    "rope-permutation-left-out": (
        ("self_attention/query/kernel", "transpose,query-scale"), ("self_attention/key/kernel", "transpose")),
    "query-scale-applied-twice": (
        ("self_attention/query/kernel", "transpose,rope-interleave,query-scale,query-scale"),),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_llama_transform_mistakes_fail(sharp_llama, tmp_path, monkeypatch, mistake):
    table = llama3.LAYER
    for leaf_path, steps in MISTAKES[mistake]:
        table = with_steps(table, leaf_path, steps)
    bad = convert_with(monkeypatch, llama3, table, sharp_llama, tmp_path / "bad")
    good = convert_with(monkeypatch, llama3, llama3.LAYER, sharp_llama, tmp_path / "good")
    q = "decoder/layers/self_attention/query/kernel"
    assert not np.array_equal(leaf(bad, q), leaf(good, q))  # the monkeypatch really changed the conversion
    assert verify_json("--maxtext", good, "--hf", sharp_llama)["summary"]["kl_max"] < 1e-6
    assert_fails(bad, sharp_llama)


@pytest.fixture(scope="module")
def sharp_mixtral(tmp_path_factory) -> Path:
    """The tiny Mixtral with q/k weights x4 (see sharp_llama)."""
    model = make_hf_model("mixtral")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(4.0)
    return save_model(model, tmp_path_factory.mktemp("sharp-mixtral"), False)


MIXTRAL_MISTAKES = {
    "query-scale-left-out": (("self_attention/query/kernel", "transpose"),),
    "llama-rope-permutation": (("self_attention/query/kernel", "transpose,rope-interleave,query-scale"),
                               ("self_attention/key/kernel", "transpose,rope-interleave")),
}


@pytest.mark.parametrize("mistake", list(MIXTRAL_MISTAKES))
def test_mixtral_transform_mistakes_fail(sharp_mixtral, tmp_path, monkeypatch, mistake):
    """Mixtral needs the folded 1/sqrt(D) but not Llama 3.1's q/k permutation: either mistake fails."""
    table = mixtral.LAYER
    for leaf_path, steps in MIXTRAL_MISTAKES[mistake]:
        table = with_steps(table, leaf_path, steps)
    bad = convert_with(monkeypatch, mixtral, table, sharp_mixtral, tmp_path / "bad")
    good = convert_with(monkeypatch, mixtral, mixtral.LAYER, sharp_mixtral, tmp_path / "good")
    q = "decoder/layers/self_attention/query/kernel"
    assert not np.array_equal(leaf(bad, q), leaf(good, q))  # the monkeypatch really changed the conversion
    assert verify_json("--maxtext", good, "--hf", sharp_mixtral)["summary"]["kl_max"] < 1e-6
    assert_fails(bad, sharp_mixtral)


def test_norm_weight_off_by_one_fails(hf_models, tmp_path, monkeypatch):
    src = hf_models("qwen3", "float32")
    norm = "post_self_attention_layer_norm/scale"
    bad = convert_with(monkeypatch, qwen3, with_steps(qwen3.LAYER, norm, "offset+1"), src, tmp_path / "bad")
    hf_norm = load_hf(src)["model.layers.1.post_attention_layernorm.weight"]
    np.testing.assert_allclose(leaf(bad, f"decoder/layers/{norm}")[:, 1], hf_norm + 1, rtol=1e-6)
    assert_fails(bad, src)


def test_a_different_random_model_fails(converted, tmp_path):
    _, out = converted("qwen3", True)
    other = save_model(make_hf_model("qwen3", seed=1), tmp_path / "other-seed", False)
    data = assert_fails(out, other)
    assert data["summary"]["top1_agreement"] < 0.5


def test_llama_reference_for_a_qwen3_checkpoint_is_refused(converted, hf_models):
    _, out = converted("qwen3", True)
    r = verify("--maxtext", out, "--hf", hf_models("llama", "float32"))
    assert r.exit_code == 2
    assert "model_type = llama in" in error_line(r) and "converted from a model with model_type = qwen3" in r.stderr


# ------------------------------------------------------------------------------------------------------------
# bf16


@pytest.mark.parametrize("compute", ["f32", "bf16"])
def test_bf16_conversion_passes_default_threshold(converted, compute):
    src, out = converted("llama", True, "bf16")
    data = verify_json("--maxtext", out, "--hf", src, "--dtype", compute)
    s = data["summary"]
    assert data["passed"] and data["max_kl_threshold"] == 0.015 and data["dtype"] == compute
    assert 0 < s["kl_max"] < 0.015
    print(f"\nbf16 checkpoint, --dtype {compute}: max KL {s['kl_max']:.3g}, mean KL {s['kl_mean']:.3g}, "
          f"max |dlogit| {s['max_abs_dlogit']:.3g}, max |dprob| {s['max_abs_dprob']:.3g}, "
          f"top-1 agreement {s['top1_agreement']:.3f}")


# ------------------------------------------------------------------------------------------------------------
# Golden files


@pytest.mark.parametrize("suffix", [".npz", ".jsonl"])
def test_save_golden_then_golden_gives_identical_figures(converted, tmp_path, suffix):
    src, out = converted("qwen3-tied", False)
    golden = tmp_path / f"golden{suffix}"
    live = verify_json("--maxtext", out, "--hf", src, "--tokens", "5,6,7;1,2,3,4,5,6,7,8,9", "--save-golden", golden)
    assert live["reference"]["saved_golden"] == str(golden) and golden.exists()
    replay = verify_json("--maxtext", out, "--golden", golden)
    assert replay["reference"]["kind"] == "golden" and replay["reference"]["hf_dtype"] == "f32"
    assert replay["prompts"] == live["prompts"] and replay["summary"] == live["summary"]
    # The golden logits are transformers' own, bit for bit.
    model = reference._load_full(src, "f32")
    with torch.no_grad():
        want = model(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9]])).logits[0].numpy()
    if suffix == ".npz":
        with np.load(golden) as data:
            got = data["logits_1"]
            assert list(data["tokens_0"]) == [5, 6, 7]
    else:
        records = [json.loads(line) for line in golden.read_text().splitlines()]
        assert [r["tokens"] for r in records] == [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
        got = np.asarray(records[1]["logits"], dtype=np.float32)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


BLOCKER = textwrap.dedent("""
    import sys

    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers"):
                with open({log!r}, "a") as fh:
                    fh.write(name + "\\n")
                raise ImportError("blocked by the test: " + name)
            return None

    sys.meta_path.insert(0, _Block())
""")


def test_golden_subprocess_runs_without_torch_or_transformers(converted, tmp_path):
    """A real `python -m ckpt_cli verify-logits --golden` with torch and transformers unimportable."""
    src, out = converted("llama", False)
    golden = tmp_path / "golden.npz"
    live = verify_json("--maxtext", out, "--hf", src, "--save-golden", golden)
    site = tmp_path / "site"
    site.mkdir()
    log = tmp_path / "blocked-imports.txt"
    (site / "sitecustomize.py").write_text(BLOCKER.format(log=str(log)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "ckpt_cli", "verify-logits", "--maxtext", str(out), "--golden",
                           str(golden), "--json"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not log.exists(), f"torch/transformers import attempted: {log.read_text()}"
    data = json.loads(proc.stdout)
    assert data["summary"] == live["summary"] and data["passed"]


# ------------------------------------------------------------------------------------------------------------
# CLI parsing, prompts, output modes, memory guard


def test_parse_token_lists():
    assert parse_token_lists(["1,2,3", "4, 5;6,7,8", "9;"]) == [(1, 2, 3), (4, 5), (6, 7, 8), (9,)]


@pytest.mark.parametrize("args,message", [
    (["--tokens", "1,x"], "error: --tokens '1,x': token ids are integers"),
    (["--tokens", "1,500"], "error: prompt 1: token id 500 is outside the vocabulary [0, 128)"),
    (["--save-golden", "golden.pkl"], "golden file ends in .npz"),
])
def test_bad_arguments_exit_2(converted, args, message):
    src, out = converted("qwen3", True)
    r = verify("--maxtext", out, "--hf", src, *args)
    assert r.exit_code == 2
    assert message in error_line(r)


def test_needs_a_reference_and_golden_excludes_prompts(converted, tmp_path):
    _, out = converted("qwen3", True)
    r = verify("--maxtext", out)
    assert r.exit_code == 2 and "give --hf PATH_OR_REPO" in error_line(r)
    r = verify("--maxtext", out, "--golden", tmp_path / "none.npz")
    assert r.exit_code == 2 and "no such golden file" in error_line(r)
    r = verify("--maxtext", tmp_path / "missing", "--hf", "x")
    assert r.exit_code == 2 and "no such checkpoint directory" in error_line(r)
    assert verify("--hf", "x").exit_code == 2  # --maxtext is required (usage error)


def test_tokens_repeatable_and_human_report(converted):
    src, out = converted("qwen3", True)
    tokens = ("--tokens", "1,2,3", "--tokens", "4,5;6,7,8")   # one batch shape: the JAX layer compiles once
    data = verify_json("--maxtext", out, "--hf", src, *tokens, "--top-k", "3")
    assert [p["tokens"] for p in data["prompts"]] == [[1, 2, 3], [4, 5], [6, 7, 8]]
    assert all(len(p["top_k"]["last_position"]) == 3 for p in data["prompts"])
    assert data["kl_definition"].startswith("KL(p_hf || p_maxtext) = sum_v p_hf")
    r = verify("--maxtext", out, "--hf", src, *tokens)
    assert r.exit_code == 0, r.output
    assert "top-10 at the last position" in r.stdout and "rank agreement 100%" in r.stdout
    assert "peak RSS" in r.stdout and r.stdout.strip().splitlines()[-1].startswith("PASS: max KL ")
    assert verify("--maxtext", out, "--hf", src, *tokens, "-q").stdout == ""


def test_text_prompts_use_the_tokenizer_and_tables_show_token_text(converted, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    src, out = converted("qwen3", True)
    folder = tmp_path / "with-tokenizer"
    shutil.copytree(src, folder)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                               "unk_token": "w0"}))
    data = verify_json("--maxtext", out, "--hf", folder, "--prompt", "w5 w7 w100", "--prompt", "w1 w2")
    assert [(p["prompt"], p["tokens"]) for p in data["prompts"]] == [("w5 w7 w100", [5, 7, 100]), ("w1 w2", [1, 2])]
    top = data["prompts"][0]["top_k"]["last_position"][0]
    assert top["hf"]["token"] == f"w{top['hf']['id']}"
    r = verify("--maxtext", out, "--hf", folder, "--prompt", "w5 w7 w100")
    assert r.exit_code == 0 and "HF token" in r.stdout and "'w5 w7 w100'" in r.stdout
    r = verify("--maxtext", out, "--hf", src, "--prompt", "hello")
    assert r.exit_code == 2 and "no tokenizer files" in error_line(r)


def test_hf_model_is_streamed_when_it_does_not_fit_and_refused_when_even_that_does_not(converted, monkeypatch):
    src, out = converted("llama", True)
    full = verify_json("--maxtext", out, "--hf", src)
    est = reference.estimate_memory(src, read_config(src), [Prompt((1,) * 40)] * 3, "f32")
    assert est.stream < est.full
    room = int((est.stream + est.full) / 2 / reference.FIT_FRACTION)
    monkeypatch.setattr(reference, "available_memory", lambda: room)
    streamed = verify_json("--maxtext", out, "--hf", src)
    assert streamed["reference"]["load"] == "stream"
    assert streamed["prompts"] == full["prompts"]  # identical logits, so identical figures
    r = verify("--maxtext", out, "--hf", src, "--hf-load", "full")
    assert r.exit_code == 2
    assert "the Hugging Face model needs about" in error_line(r) and "--hf-load stream" in r.stderr
    monkeypatch.setattr(reference, "available_memory", lambda: 1 << 20)
    r = verify("--maxtext", out, "--hf", src)
    assert r.exit_code == 2 and "streamed layer by layer" in error_line(r) and "--golden FILE" in r.stderr


# ------------------------------------------------------------------------------------------------------------
# Gemma3 (maxtext-layout.md §9): blocks of six + remainder, sliding window 4 < prompt lengths, (1 + w) norms


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
@pytest.mark.parametrize("kind", ["gemma3", "gemma3-e48"])
def test_converted_gemma3_matches_transformers(converted, kind, scan):
    """14 layers (scanned: layers_0..5 of two, remainder of two), local/global attention, float32.

    E = 64: bf16(sqrt(E)) = sqrt(E) = 8, MaxText's math and transformers' agree: KL < 1e-6. E = 48: the stored table
    is x * 6.9375 (bf16(sqrt(48))) where transformers scales the lookup by sqrt(48) = 6.928..., and MaxText divides
    the logits by sqrt(48): a real 0.13% difference of MaxText's model (§9.4, "up to the bf16 rounding of the
    scale"), visible as KL ~1e-5; tests/verify/test_forward.py shows it is that factor and nothing else.
    """
    src, out = converted(kind, scan)
    data = verify_json("--maxtext", out, "--hf", src)
    s = data["summary"]
    assert data["passed"] and data["family"] == "gemma3" and data["scan_layers"] is scan
    assert min(p["length"] for p in data["prompts"]) > 4     # longer than the sliding window
    if kind == "gemma3":
        assert s["kl_max"] < 1e-6 and s["top1_agreement"] == 1.0, s
    else:
        assert 1e-7 < s["kl_max"] < 1e-4, s     # (a near tie of this random model may even flip one top-1)


def test_gemma3_norms_without_offset_fail(converted, monkeypatch, tmp_path):
    """The (1 + w) of HF's norms left out of the post-FFW norm: the forward sees it."""
    from ckpt_cli.families import gemma3

    src, _ = converted("gemma3", True)
    table = tuple(dataclasses.replace(r, steps=()) if r.maxtext == "post_ffw_norm/scale" else r for r in gemma3.LAYER)
    out = convert_with(monkeypatch, gemma3, table, src, tmp_path / "no-offset")
    data = verify_json("--maxtext", out, "--hf", src, "--max-kl", "1e-6", code=1)
    assert not data["passed"] and data["summary"]["kl_max"] > 1e-4


def test_gemma3_remainder_layers_swapped_fail(converted, tmp_path):
    """The two remainder layers (HF 12 and 13) exchanged in the scanned tree: the checkpoint no longer matches."""
    src, good = converted("gemma3", True)
    out = tmp_path / "swapped"
    shutil.copytree(good, out)
    ckpt = OrbaxCheckpoint(out)
    for name in ("self_attention/query/kernel", "mlp/wi_0/kernel"):
        a = ckpt.array(f"decoder/layers_remainder/layers_0/{name}")
        b = ckpt.array(f"decoder/layers_remainder/layers_1/{name}")
        first, second = a.read().result(), b.read().result()
        a.write(second).result()
        b.write(first).result()
    data = verify_json("--maxtext", out, "--hf", src, "--max-kl", "1e-6", code=1)
    assert not data["passed"] and data["summary"]["kl_max"] > 1e-4

"""GPT-OSS MXFP4 sources (the official openai/gpt-oss-* layout, maxtext-layout.md §10.5), built at run time.

The tiny gpt-oss model's expert weights are replaced by random FP4 nibbles and E8M0 scales stored as
`mlp.experts.{gate_up,down}_proj_{blocks,scales}` (uint8), with the scales in another shard than the blocks.
What the conversion must give is computed here independently, from the E2M1 bit layout, element by element.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from ckpt_cli import pricing
from ckpt_cli.convert import ToHFOptions, ToMaxTextOptions, hf_to_maxtext, maxtext_to_hf
from ckpt_cli.io import mxfp4
from ckpt_cli.io.hf import SafetensorsReader
from ckpt_cli.io.safetensors import save_file
from ckpt_cli.machine import Machine, Rates
from tests.cli_helpers import error_line, run
from tests.conftest import read_config
from tests.expectations import assert_bits_equal, cast, expected_tree, flatten, stored_dtype
from tests.hub_server import fake_hub  # noqa: F401 (fixture)
from tests.test_convert_to_maxtext import load_hf, restore

EXPERTS = ("gate_up_proj", "down_proj")
# The 16 FP4 E2M1 values by code (OCP MX spec v1.0, table 5): sign bit 3, exponent bits 2..1, mantissa bit 0.
E2M1_TABLE = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def e2m1(code: int) -> float:
    """One E2M1 code decoded from its bits: exponent bias 1, exponent 0 subnormal (mantissa x 0.5)."""
    sign = -1.0 if code & 0b1000 else 1.0
    exp, man = (code >> 1) & 0b11, code & 1
    return sign * (man * 0.5 if exp == 0 else (1 + man / 2) * 2.0 ** (exp - 1))


def expected_dequant(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """blocks (X, out, G, 16), scales (X, out, G) -> (X, in, out) float32, written from the spec one value a time
    (in float64): in-index c = 32 g + k takes byte k // 2 of group g, its low nibble when k is even."""
    X, rows, groups, _ = blocks.shape
    out = np.empty((X, groups * 32, rows), np.float64)
    for x in range(X):
        for r in range(rows):
            for c in range(groups * 32):
                g, k = divmod(c, 32)
                byte = int(blocks[x, r, g, k // 2])
                code = byte & 0xF if k % 2 == 0 else byte >> 4
                out[x, c, r] = E2M1_TABLE[code] * 2.0 ** (int(scales[x, r, g]) - 127)
    return out.astype(np.float32)


def random_pair(rng, X: int, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Every nibble and a spread of exponents: 2^-127 (float32 subnormal results) up to 2^8, mostly near 2^0."""
    blocks = rng.integers(0, 256, (X, rows, cols // 32, 16), dtype=np.uint8)
    scales = rng.integers(118, 131, (X, rows, cols // 32), dtype=np.uint8)
    scales.flat[:4] = [0, 1, 135, 127]
    return blocks, scales


def make_mxfp4_folder(src: Path, dest: Path, seed: int = 0) -> tuple[Path, dict[str, np.ndarray]]:
    """The tiny model at `src` as an official-style MXFP4 repo at `dest`: expert weights replaced by random
    blocks + scales (scales in the second shard), config with quantization_config. Returns (folder,
    {logical expert weight name: its expected dequantized float32 (X, in, out)})."""
    rng = np.random.default_rng(seed)
    state = load_hf(src)
    cfg = read_config(src)
    E, M, X = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
    first, second, want = {}, {}, {}
    for name, value in state.items():
        stem = name.rsplit(".", 1)[-1]
        if stem not in EXPERTS:
            first[name] = value
            continue
        rows, cols = (2 * M, E) if stem == "gate_up_proj" else (E, M)
        assert value.shape == (X, cols, rows)
        blocks, scales = random_pair(rng, X, rows, cols)
        first[name + "_blocks"], second[name + "_scales"] = blocks, scales
        want[name] = expected_dequant(blocks, scales)
    dest.mkdir()
    weight_map = {}
    for i, part in enumerate((first, second)):
        fname = f"model-0000{i}-of-00002.safetensors"
        save_file(dest / fname, part)
        weight_map |= dict.fromkeys(part, fname)
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest, want


@pytest.fixture(scope="module")
def mxfp4_source(hf_models, tmp_path_factory):
    return make_mxfp4_folder(hf_models("gpt-oss", "bfloat16"), tmp_path_factory.mktemp("mx") / "src")


def expected_hf(src: Path, want: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The source's tensors as a BF16 checkpoint would hold them: the packed pairs replaced by their values."""
    state = {k: v for k, v in load_hf(src).items() if not k.endswith(("_blocks", "_scales"))}
    return state | want


# ------------------------------------------------------------------------------------------------------------
# Dequantization


def test_e2m1_table_matches_the_bit_layout():
    assert [e2m1(c) for c in range(16)] == E2M1_TABLE
    assert [math.copysign(1, e2m1(c)) for c in (0, 8)] == [1.0, -1.0]
    assert np.array_equal(mxfp4.E2M1.view(np.uint32), np.array(E2M1_TABLE, np.float32).view(np.uint32))


def test_dequantize_matches_the_spec_nibble_by_nibble():
    rng = np.random.default_rng(1)
    blocks, scales = random_pair(rng, 2, 3, 64)
    assert_bits_equal(mxfp4.dequantize(blocks, scales), expected_dequant(blocks, scales), "dequantize")
    # one expert at a time gives the same, and bf16 holds every value exactly
    for x in range(2):
        assert_bits_equal(np.ascontiguousarray(mxfp4.dequantize(blocks[x], scales[x])),
                          expected_dequant(blocks, scales)[x], f"expert {x}")
    bf16 = mxfp4.dequantize(blocks, scales, np.dtype(ml_dtypes.bfloat16))
    assert np.array_equal(bf16.astype(np.float32), expected_dequant(blocks, scales))
    # low nibble first; 255 is NaN
    one = mxfp4.dequantize(np.array([[[0x71] + [0] * 15]], np.uint8), np.array([[128]], np.uint8))
    assert one.shape == (32, 1) and one[0, 0] == 1.0 and one[1, 0] == 12.0
    assert np.isnan(mxfp4.dequantize(np.full((1, 1, 16), 0x22, np.uint8), np.array([[255]], np.uint8))).all()


def test_dequantize_agrees_with_transformers():
    torch = pytest.importorskip("torch")
    integration = pytest.importorskip("transformers.integrations.mxfp4")
    rng = np.random.default_rng(2)
    blocks = rng.integers(0, 256, (3, 40, 4, 16), dtype=np.uint8)
    scales = rng.integers(100, 150, (3, 40, 4), dtype=np.uint8)
    theirs = integration.convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                                    dtype=torch.float32).numpy()
    assert theirs.shape == (3, 128, 40)
    assert_bits_equal(np.ascontiguousarray(mxfp4.dequantize(blocks, scales)), theirs, "vs transformers")


def test_reader_reads_one_expert_of_the_pair_at_a_time(mxfp4_source, monkeypatch):
    from ckpt_cli.plan import SourceSlice

    src, want = mxfp4_source
    reader = SafetensorsReader(src)
    name = "model.layers.1.mlp.experts.gate_up_proj"
    assert reader.describe(name) == ((4, 64, 64), np.dtype(np.float32))
    assert reader.consumed_with(name) == [name + "_blocks", name + "_scales"]
    reads = []
    original = reader.files.read
    monkeypatch.setattr(reader.files, "read", lambda n, rows=None: reads.append((n, rows)) or original(n, rows))
    got = reader.read(SourceSlice(name, index=(2,), axes=(0,)))
    assert reads == [(name + "_blocks", (2, 3)), (name + "_scales", (2, 3))]
    assert_bits_equal(np.ascontiguousarray(got), want[name][2], name)


# ------------------------------------------------------------------------------------------------------------
# Conversion


@pytest.mark.parametrize("scan,dtype", [(True, "bf16"), (False, "f32")])
def test_converted_experts_match_the_spec(mxfp4_source, tmp_path, scan, dtype):
    src, want = mxfp4_source
    out = tmp_path / "mt"
    r = run("convert", "hf-to-maxtext", src, "--out", out, "--dtype", dtype, "--scan" if scan else "--no-scan",
            "--json")
    assert r.exit_code == 0, r.output
    notes = json.loads(r.stdout)["notes"]
    assert any("8 MXFP4 weight(s)" in n for n in notes), notes
    assert not any("not used" in n for n in notes), notes           # every _blocks / _scales consumed
    got = flatten(restore(out)["params"]["params"])
    expected = expected_tree(expected_hf(src, want), read_config(src), "gpt_oss", scan)
    assert set(got) == set(expected)
    experts = [p for p in expected if "/GptOssMlp/w" in p and not p.endswith("_bias")]
    assert len(experts) == (6 if scan else 12)
    for path, value in expected.items():
        assert_bits_equal(got[path], cast(value, stored_dtype(path, "gpt_oss", dtype)), path)
    # the random nibbles reach every expert leaf (not zeros, not a copy of another expert)
    for path in experts:
        assert len({got[path][x].tobytes() for x in range(4)}) == 4 and np.count_nonzero(got[path]) > 0


def test_maxtext_to_hf_writes_plain_weights(mxfp4_source, tmp_path):
    src, want = mxfp4_source
    mt, hf = tmp_path / "mt", tmp_path / "hf"
    hf_to_maxtext(str(src), mt, ToMaxTextOptions(dtype="f32"))
    result = maxtext_to_hf(str(mt), hf, ToHFOptions(dtype="bf16"))   # the f32 checkpoint exported as the release's bf16
    assert any("drops quantization_config" in n for n in result.notes)
    cfg = json.loads((hf / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    state = load_hf(hf)
    assert not any(n.endswith(("_blocks", "_scales")) for n in state)
    for name, value in expected_hf(src, want).items():
        assert_bits_equal(state[name], value.astype(ml_dtypes.bfloat16), name)
    # the plain checkpoint converts back to the same MaxText tree
    again = tmp_path / "again"
    hf_to_maxtext(str(hf), again, ToMaxTextOptions(dtype="f32"))
    a, b = flatten(restore(mt)["params"]["params"]), flatten(restore(again)["params"]["params"])
    for path in a:
        assert_bits_equal(b[path], a[path], path)


def test_streamed_from_a_repo_equals_local(mxfp4_source, fake_hub, tmp_path):  # noqa: F811
    """A hub repo: headers first, then the shards fetched as tasks need them (blocks and scales in different
    shards): the same checkpoint as from the local folder."""
    from ckpt_cli.io.orbax import OrbaxCheckpoint

    hub, _ = fake_hub
    hub.add_repo("openai/tiny-gpt-oss", mxfp4_source[0])
    hf_to_maxtext(str(mxfp4_source[0]), tmp_path / "local", ToMaxTextOptions())
    result = hf_to_maxtext("openai/tiny-gpt-oss", tmp_path / "remote", ToMaxTextOptions())
    assert result.stats.extra["download"]["downloaded_bytes"] == sum(
        f.stat().st_size for f in mxfp4_source[0].glob("*.safetensors"))
    a, b = OrbaxCheckpoint(tmp_path / "local"), OrbaxCheckpoint(tmp_path / "remote")
    assert sorted(a.paths) == sorted(b.paths)
    for path in a.paths:
        x, y = a.array(path).read().result(), b.array(path).read().result()
        assert x.dtype == y.dtype and np.array_equal(x.view(np.uint8), y.view(np.uint8)), path


def test_transformers_load_method_failing_to_import_is_one_line(mxfp4_source, tmp_path, monkeypatch):
    """transformers' own MXFP4 loading needs extra packages (accelerate, kernels): a missing one is a
    one-line error, not a traceback (the safetensors reader needs none)."""
    import transformers

    def refuse(*args, **kwargs):
        raise ImportError("Using mxfp4 requires Accelerate: `pip install accelerate`")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    out = tmp_path / "mt"
    r = run("convert", "hf-to-maxtext", mxfp4_source[0], "--out", out, "--load-method", "transformers")
    assert r.exit_code == 2, r.output
    assert error_line(r).endswith("Using mxfp4 requires Accelerate: `pip install accelerate`")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------------------
# inspect and plan


def test_inspect_shows_the_pairs(mxfp4_source, tmp_path):
    src, _ = mxfp4_source
    r = run("inspect", src, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    tensors = {t["name"]: t for t in data["tensors"]}
    blocks = tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"]
    assert blocks["dtype"] == "uint8" and blocks["shape"] == [4, 64, 2, 16]
    assert tensors["model.layers.0.mlp.experts.down_proj_scales"]["shape"] == [4, 64, 1]
    assert tensors["model.layers.0.mlp.experts.down_proj_bias"]["dtype"] == "bfloat16"
    assert data["family"] == "gpt_oss" and any("8 MXFP4 weight(s)" in n for n in data["notes"])
    assert run("inspect", src).exit_code == 0
    # against its own conversion: every path matched through the dequantized shapes, nothing unmapped
    mt = tmp_path / "mt"
    hf_to_maxtext(str(src), mt, ToMaxTextOptions())
    r = run("inspect", src, "--against", mt, "--json")
    data = json.loads(r.stdout)
    assert data["identical"] is True and data["unmapped"] == [], data
    assert data["counts"]["matched"] == data["counts"]["b"] > 0


def test_inspect_against_compares_stacked_experts_per_expert(hf_models, tmp_path):
    """The plain BF16 layout too: gate_up_proj (X, E, 2M) is read one index of axis 0 at a time, so its
    shape is compared per expert (it was reported mis-shaped against the per-expert source shape)."""
    src = hf_models("gpt-oss", "bfloat16")
    hf_to_maxtext(str(src), tmp_path / "mt", ToMaxTextOptions())
    data = json.loads(run("inspect", src, "--against", tmp_path / "mt", "--json").stdout)
    assert data["identical"] is True and data["counts"]["mismatched"] == 0, data["mismatched"][:2]


def test_plan_prices_packed_reads_and_the_float32_temporary(mxfp4_source, tmp_path):
    src, _ = mxfp4_source
    opts = ToMaxTextOptions()
    plan, source, _ = pricing.plan_hf_to_maxtext(str(src), opts)
    packed = {t.source.name for p in plan.tensors for t in p.tasks if t.source.name.endswith(EXPERTS)}
    assert len(packed) == 8 and packed <= source.fp8
    headers = SafetensorsReader(src).files.tensors
    want = 0
    for p in plan.tensors:
        for task in p.tasks:
            name = task.source.name
            if name in packed:      # one expert's blocks and scales, once per part that reads it
                want += (headers[name + "_blocks"].nbytes + headers[name + "_scales"].nbytes) // 4
            else:
                want += p.read_elements(task) * headers[name].dtype.itemsize
    figures = pricing.price(plan, source, Rates(1.0, 0.3, 0.5, {}), Machine(24 * 10**9, 10**13, "/", 2))
    assert figures["bytes"]["read"] == want
    # the costliest running task is an expert's gate_up: its packed bytes, float32 values and gather temporary
    running = max(f.running for f in pricing.task_figures(plan, source))
    gate_up = 64 * 64
    assert running >= gate_up * (17 / 32 + 8)
    r = run("plan", "hf-to-maxtext", src, "--out", tmp_path / "mt", "--json", "--read-gbps", "1", "--write-gbps", "1")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["bytes"]["read"] == want


# ------------------------------------------------------------------------------------------------------------
# Malformed sources: one line, exit 2, nothing written


def _damaged(src: Path, dest: Path, change) -> Path:
    """A copy of `src` with `change` applied to each shard's tensors (a dict it may edit)."""
    shutil.copytree(src, dest)
    for f in sorted(dest.glob("*.safetensors")):
        state = load_file(f)
        change(state)
        save_file(f, state)
    return dest


NAME = "model.layers.2.mlp.experts.down_proj"


@pytest.mark.parametrize("change,message", [
    (lambda s: s.pop(NAME + "_scales", None), f"error: tensor {NAME}_blocks (MXFP4) has no {NAME}_scales"),
    (lambda s: s.pop(NAME + "_blocks", None), f"error: tensor {NAME}_scales (MXFP4) has no {NAME}_blocks"),
    (lambda s: s.update({NAME + "_blocks": s[NAME + "_blocks"][..., :8]}) if NAME + "_blocks" in s else None,
     f"error: MXFP4 tensors {NAME}_blocks (4, 64, 1, 8) / {NAME}_scales (4, 64, 1): expected blocks"),
    (lambda s: s.update({NAME + "_scales": s[NAME + "_scales"][:, :32]}) if NAME + "_scales" in s else None,
     f"error: MXFP4 tensors {NAME}_blocks (4, 64, 1, 16) / {NAME}_scales (4, 32, 1): expected blocks"),
    (lambda s: s.update({n: s[n][:, :32] for n in (NAME + "_blocks", NAME + "_scales") if n in s}),
     f"error: tensor {NAME}: expected shape (32, 64) for "),
])
def test_malformed_pairs_are_one_line_errors(mxfp4_source, tmp_path, change, message):
    src = _damaged(mxfp4_source[0], tmp_path / "src", change)
    out = tmp_path / "mt"
    r = run("convert", "hf-to-maxtext", src, "--out", out)
    assert r.exit_code == 2, r.output
    assert error_line(r).startswith(message), error_line(r)
    assert not out.exists() and not out.with_name("mt.partial").exists()

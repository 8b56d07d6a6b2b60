"""DeepSeek-V3's router bias, a non-parameter variable in MaxText 0.2.5 (collection MoEBiasVar).

Scanned, MaxText 0.2.5 stacks it `(Lm, X)` (layers on axis 0, unlike parameters); ckpt writes it there, under
`params/params`. `maxtext-to-hf`, `inspect` and verify-logits also read it where other writers put it: the
`(X, Lm)` layout earlier ckpt versions wrote, MaxText's pure-NNX training checkpoints (`nnx_aux/model/...`)
and its converter's / Linen train states' own collection (`params/MoEBiasVar/...`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from ckpt_cli import engine
from ckpt_cli.convert import ToHFOptions, ToMaxTextOptions, hf_to_maxtext, maxtext_to_hf
from ckpt_cli.dtypes import output_dtype
from ckpt_cli.families import detect_family
from ckpt_cli.io.orbax import OrbaxCheckpoint
from ckpt_cli.plan import build_to_hf
from tests.cli_helpers import run
from tests.expectations import assert_bits_equal
from tests.families.test_deepseek import DictWriter, load_hf, restore

BIAS = "decoder/moe_layers/DeepSeekMoeBlock_0/MoeBlock_0/gate/bias"
HF_BIAS = "model.layers.{}.mlp.gate.e_score_correction_bias"


def resave(src: Path, out: Path, change: Callable[[dict, np.ndarray], None]) -> Path:
    """Save a ckpt-written checkpoint again the way MaxText 0.2.5 saves (Orbax v1 `training.Checkpointer`,
    checkpointable `items`, jax arrays, `scan_layers` custom metadata), after `change(state, bias)` has put the
    router bias (taken out of params/params) where a writer puts it."""
    import jax
    import orbax.checkpoint as ocp
    from orbax.checkpoint import v1

    state = ocp.PyTreeCheckpointer().restore(str(src / "0" / "items"))
    gate = state["params"]["params"]["decoder"]["moe_layers"]["DeepSeekMoeBlock_0"]["MoeBlock_0"]["gate"]
    change(state, gate.pop("bias"))
    state["opt_state"] = [None, {"count": np.int32(3)}]
    custom = json.loads((src / "0" / "_CHECKPOINT_METADATA").read_text())["custom_metadata"]
    checkpointer = v1.training.Checkpointer(out)
    checkpointer.save_checkpointables(3, {"items": jax.tree_util.tree_map(jax.numpy.asarray, state)},
                                      custom_metadata=custom)
    checkpointer.close()
    return out


def nest(path: str, value) -> dict:
    for key in reversed(path.split("/")):
        value = {key: value}
    return value


def old_layout(state: dict, bias: np.ndarray) -> None:
    """What earlier ckpt versions wrote: under params/params, layers on axis 1, (X, Lm)."""
    state["params"]["params"]["decoder"]["moe_layers"]["DeepSeekMoeBlock_0"]["MoeBlock_0"]["gate"]["bias"] = (
        np.ascontiguousarray(bias.T))


def nnx_training(state: dict, bias: np.ndarray) -> None:
    """MaxText 0.2.5's pure-NNX training save (train_state_nnx.to_checkpoint_dict): non-Param variables and the
    RNG streams go to `nnx_aux`, the weights under their path below `model`."""
    state["nnx_aux"] = {"model": nest(BIAS, bias) | {"rngs": {"params": {"count": np.array(7, np.uint32)}}}}


def linen_collection(state: dict, bias: np.ndarray) -> None:
    """MaxText 0.2.5's to_maxtext converter and Linen train states: the variable's own collection beside params."""
    state["params"]["MoEBiasVar"] = nest(BIAS, bias)


@pytest.fixture(scope="module")
def v3_scanned(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny DeepSeek-V3 (f32) and its scanned f32 conversion."""
    from tests.families.test_deepseek import make_model

    root = tmp_path_factory.mktemp("ds-bias")
    make_model("v3", "float32").save_pretrained(root / "hf")
    hf_to_maxtext(str(root / "hf"), root / "mt", ToMaxTextOptions(scan_layers=True, dtype="f32"))
    return root / "hf", root / "mt"


def test_scanned_bias_is_layers_by_experts(v3_scanned):
    """(Lm, X): row i holds MoE layer i's (HF layer first_k_dense_replace + i) e_score_correction_bias."""
    src, mt = v3_scanned
    cfg = json.loads((src / "config.json").read_text())
    hf = load_hf(src)
    bias = restore(mt)[BIAS]
    first, layers, experts = cfg["first_k_dense_replace"], cfg["num_hidden_layers"], cfg["n_routed_experts"]
    assert bias.shape == (layers - first, experts) and layers - first != experts
    for i in range(layers - first):
        assert_bits_equal(bias[i], hf[HF_BIAS.format(first + i)], f"row {i}")
    assert OrbaxCheckpoint(mt).stored_at(BIAS) == "params/params/" + BIAS


def test_bias_stays_float32_in_a_bf16_checkpoint(v3_scanned, tmp_path):
    """The released bias is float32 and picks the experts: a bf16 conversion keeps it float32, bit for bit."""
    src, _ = v3_scanned
    hf_to_maxtext(str(src), tmp_path / "mt", ToMaxTextOptions(scan_layers=True, dtype="bf16"))
    got = restore(tmp_path / "mt")
    hf = load_hf(src)
    assert got[BIAS].dtype == np.float32 and got[BIAS.replace("bias", "kernel")].dtype != np.float32
    for i in range(got[BIAS].shape[0]):
        assert_bits_equal(got[BIAS][i], hf[HF_BIAS.format(1 + i)], f"row {i}")
    assert not np.array_equal(hf[HF_BIAS.format(1)].astype("bfloat16").astype(np.float32), hf[HF_BIAS.format(1)])


def test_scanned_bias_round_trips_exactly(v3_scanned, tmp_path):
    src, mt = v3_scanned
    out = tmp_path / "hf"
    result = maxtext_to_hf(str(mt), out, ToHFOptions())
    assert not any("earlier ckpt" in n for n in result.notes)
    want, got = load_hf(src), load_hf(out)
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert_bits_equal(got[name], value, name)


def test_old_layout_converts_with_a_note(v3_scanned, tmp_path):
    """A checkpoint holding the bias (X, Lm), as ckpt wrote it before, converts bit-exactly and says so."""
    src, mt = v3_scanned
    old = resave(mt, tmp_path / "old", old_layout)
    assert OrbaxCheckpoint(old).describe(BIAS)[0] == (4, 2)
    r = run("convert", "maxtext-to-hf", old, "--out", tmp_path / "hf", "--json")
    assert r.exit_code == 0, r.output
    notes = [n for n in json.loads(r.stdout)["notes"] if "earlier ckpt versions" in n]
    assert len(notes) == 1 and BIAS in notes[0] and "(4, 2)" in notes[0] and "(2, 4)" in notes[0]
    want, got = load_hf(src), load_hf(tmp_path / "hf")
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert_bits_equal(got[name], value, name)


@pytest.mark.parametrize("change,stored", [(nnx_training, "nnx_aux/model/"), (linen_collection, "params/MoEBiasVar/")])
def test_bias_where_maxtext_saves_it(v3_scanned, tmp_path, change, stored):
    """MaxText 0.2.5's own checkpoints keep the bias outside params/params: found there by maxtext-to-hf and inspect."""
    src, mt = v3_scanned
    saved = resave(mt, tmp_path / "saved", change)
    ckpt = OrbaxCheckpoint(saved)
    assert ckpt.stored_at(BIAS) == stored + BIAS and ckpt.describe(BIAS)[0] == (2, 4)
    assert not any("rngs" in p for p in ckpt.paths)       # NNX's RNG state is not a weight
    cfg = ckpt.provenance["hf_config"]
    plan = build_to_hf(detect_family(cfg), cfg, True, output_dtype("f32"))
    writer = DictWriter()
    engine.validate(plan, ckpt)
    engine.execute(plan, ckpt, writer)
    for name, value in load_hf(src).items():
        assert_bits_equal(writer.arrays[name], value, name)
    r = run("inspect", saved, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["stored_outside_params"] == {BIAS: stored + BIAS}
    assert {x["path"]: x["shape"] for x in report["tensors"]}[BIAS] == [2, 4]
    assert any(stored + BIAS in n for n in report["notes"])


def test_legacy_layout_only_where_shapes_tell():
    """(X, Lm) is read transposed only when it differs from (Lm, X); parameters are never reinterpreted."""
    from ckpt_cli import registry
    from ckpt_cli.plan import build_to_maxtext
    from ckpt_cli.to_hf import legacy_layout

    cfg = registry.reference_config("deepseek3-671b")
    plan = build_to_maxtext(detect_family(cfg), cfg, True, output_dtype("bf16"))
    bias, kernel = plan.tensor(BIAS), plan.tensor(BIAS.replace("bias", "kernel"))
    assert bias.shape == (58, 256) and bias.collection == "MoEBiasVar" and kernel.collection is None
    assert legacy_layout(bias, (256, 58)) == (1, 0)
    assert legacy_layout(bias, (58, 256)) is None
    assert legacy_layout(kernel, (256, 58, 7168)) is None
    square = registry.reference_config("deepseek3-671b") | {"num_hidden_layers": 259}   # Lm = 256 = X
    plan = build_to_maxtext(detect_family(square), square, True, output_dtype("bf16"))
    assert plan.tensor(BIAS).shape == (256, 256) and legacy_layout(plan.tensor(BIAS), (256, 256)) is None

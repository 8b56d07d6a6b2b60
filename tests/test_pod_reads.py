"""Pod-ready output: hosts restoring ckpt's output each read about their slice (issue 18).

A Qwen3 just large enough for the read chunks to split (hidden 512, bf16) is converted, then hosts of simulated
CPU devices (tests/pod_reads.py: MaxText's default logical-axis rules, a jax mesh, Orbax restoring onto it)
read the slices their devices hold through tensorstore, several processes each standing for hosts; tensorstore's
own metrics count the bytes read. Total bytes read stay within 1.25x the array bytes under FSDP over all devices
and FSDP x tensor; a checkpoint chunked one layer slice per chunk (the layout before read chunks) does not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckpt_cli.convert import ToMaxTextOptions, hf_to_maxtext
from ckpt_cli.plan import TargetMesh
from ckpt_cli.tiny import TINY_QWEN3, write_tiny_model
from tests.cli_helpers import run
from tests.pod_reads import array_bytes, measure

CONFIG = dict(TINY_QWEN3, hidden_size=512, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
              intermediate_size=1536, vocab_size=4096)
BOUND = 1.25
FSDP = [(1, "fsdp=16"), (2, "fsdp=8"), (4, "fsdp=16"), (16, "fsdp=16")]          # hosts x devices: all on fsdp
FSDP_TENSOR = [(2, "fsdp=2,tensor=4"), (4, "fsdp=4,tensor=4"), (16, "fsdp=16,tensor=4"),
               (16, "fsdp=4,tensor=4")]                                           # the last: tensor across hosts


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("pod")
    src = write_tiny_model(root / "hf", CONFIG)
    outs = {}
    for name, mesh in (("default", None), ("one-chunk-per-slice", TargetMesh(1, 1))):
        outs[name] = root / name
        hf_to_maxtext(str(src), outs[name], ToMaxTextOptions(target_mesh=mesh))
    return root, {k: v / "0" / "items" for k, v in outs.items()}


def test_hosts_read_about_their_slice(checkpoints):
    root, items = checkpoints
    cases = FSDP + FSDP_TENSOR
    total = array_bytes(str(items["default"]))
    got = measure(items["default"], cases, root)
    for (hosts, _), (case, per_host) in zip(cases, got.items(), strict=True):
        assert len(per_host) == hosts
        read = sum(h["bytes_read"] for h in per_host)
        assert read <= BOUND * total, f"{case}: read {read / total:.2f}x the array bytes"
        for h in per_host:     # each host about its slice (plus metadata: manifest, B-tree, shard indices)
            assert h["bytes_read"] <= BOUND * h["needed"] + 64 * 1024, f"{case}: {h}"
        # inspect's estimate from the chunk shapes agrees (it leaves out metadata and shard indices)
        est = inspect_estimate(items["default"], case)
        assert est["total"] <= read / total + 0.01 and est["total"] <= 1.01, (case, est["total"], read / total)
    # The measure can fail: one chunk per layer slice makes every host read whole slices.
    before = measure(items["one-chunk-per-slice"], [(2, "fsdp=8"), (16, "fsdp=4,tensor=4")], root)
    for case, per_host in before.items():
        read = sum(h["bytes_read"] for h in per_host) / total
        assert read > 1.8, case
        assert inspect_estimate(items["one-chunk-per-slice"], case)["total"] == pytest.approx(read, rel=0.05), case


def inspect_estimate(items: Path, case: str) -> dict:
    """`ckpt inspect ITEMS --mesh M --hosts H --json`'s read amplification for a case named "HxM"."""
    hosts, mesh = case.split("x", 1)
    r = run("inspect", items, "--mesh", mesh, "--hosts", hosts, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)["read_amplification"]


def test_bad_target_mesh_is_a_usage_error(tmp_path):
    src = write_tiny_model(tmp_path / "hf")
    r = run("convert", "hf-to-maxtext", src, "--out", tmp_path / "mt", "--target-mesh", "fsdp=4,pipeline=2")
    assert r.exit_code == 2 and "pipeline" in r.output and not (tmp_path / "mt").exists()


def test_read_chunks_follow_the_target_mesh(checkpoints):
    """--target-mesh fsdp=64,tensor=4 cuts the fsdp dims 64 ways (as far as the byte floor allows) and tensor 4."""
    import numpy as np

    from ckpt_cli.families import family_named
    from ckpt_cli.plan import MIN_READ_CHUNK_BYTES, build_to_maxtext

    cfg = dict(CONFIG, hidden_size=2048, intermediate_size=4096)
    plan = build_to_maxtext(family_named("qwen3"), cfg, True, np.dtype(np.float32), mesh=TargetMesh.parse(
        "fsdp=64,tensor=4"))
    wi = plan.tensor("decoder/layers/mlp/wi_0/kernel")
    assert wi.chunk_shape == (2048, 1, 4096) and wi.read_chunk == (32, 1, 1024)
    default = build_to_maxtext(family_named("qwen3"), cfg, True, np.dtype(np.float32))
    assert default.tensor("decoder/layers/mlp/wi_0/kernel").read_chunk == (128, 1, 256)
    for t in default.tensors:
        if t.read_chunk:
            assert all(c % r == 0 for c, r in zip(t.chunk_shape, t.read_chunk, strict=True)), t.target
            assert np.prod(t.read_chunk) * t.dtype.itemsize >= MIN_READ_CHUNK_BYTES, t.target
    small = build_to_maxtext(family_named("qwen3"), CONFIG, True, np.dtype("bfloat16"))
    assert small.tensor("decoder/layers/pre_self_attention_layer_norm/scale").read_chunk is None   # not shredded
    with pytest.raises(ValueError, match="pipeline"):
        TargetMesh.parse("pipeline=4")


def test_inspect_prices_a_pod_beyond_the_default():
    """64 hosts on fsdp=256: the default read chunks (16 ways) make each host read 4x its slice of Qwen3-0.6B;
    chunked with --target-mesh fsdp=256 it reads about its slice (inspect's estimate, metadata only)."""
    def total(*extra):
        r = run("inspect", "--model", "qwen3-0.6b", "--mesh", "fsdp=256", "--hosts", "64", "--json", *extra)
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)["read_amplification"]["total"]

    assert total() == pytest.approx(4.0, rel=0.01)
    assert total("--target-mesh", "fsdp=256") < 1.01

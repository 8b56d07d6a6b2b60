"""`ckpt plan`: figures for every registered model with no data at all, figures that match what convert then
does on a real source, stable --json keys, and a go / no-go with its reason."""

from __future__ import annotations

import json
import math
import re

import pytest
from typer.testing import CliRunner

from ckpt_cli import pricing, registry
from ckpt_cli.cli.app import app
from ckpt_cli.convert import ToHFOptions, ToMaxTextOptions, hf_to_maxtext
from ckpt_cli.io.remote_stream import tree_bytes
from ckpt_cli.machine import Machine, Rates

runner = CliRunner()
RATES = Rates(read_gbps=1.0, write_gbps=0.3, cpu_gbps=0.5, basis={})
BIG_BOX = Machine(available_ram=24 * 10**9, free_disk=10**13, disk_path="/", cpus=2)
FAST = ("--read-gbps", "1", "--write-gbps", "0.5")
PLAN_KEYS = {"command", "direction", "source", "source_kind", "out", "family", "scan_layers", "dtype", "tensors",
             "tasks", "parameters", "memory", "bytes", "time", "rates", "largest_tensors", "machine", "go", "verdict",
             "notes"}
BYTES_KEYS = {"source", "download", "read", "written", "output_on_disk", "temporary_disk", "hub_cache"}
MEMORY_KEYS = {"peak_rss", "baseline", "engine_budget", "engine_window", "reader", "writer", "largest_slice"}


def plan_json(*args: str, code: int | None = 0) -> dict:
    r = runner.invoke(app, ["plan", *args, "--json"])
    if code is not None:
        assert r.exit_code == code, r.output
    data = json.loads(r.stdout)
    assert r.exit_code == (0 if data["go"] else 1)
    return data


def deepseek4_saved_bytes(plan, size: int) -> tuple[int, int]:
    """DeepSeek-V4-Flash as released: bytes saved against `size` bytes an element (routed experts fp4, two values a
    byte plus an e8m0 byte per 32; attention and shared-expert projections fp8, a byte plus an e8m0 byte per
    128x128 block; tid2eid int64), and its HF element count (MaxText's mhc_norm scales have no HF tensor)."""
    saved, seen = 0, set()
    fp4 = re.compile(r"layers\.\d+\.ffn\.experts\.\d+\.w[123]\.weight")
    fp8 = re.compile(r"layers\.\d+\.(attn\.(wq_a|wq_b|wkv|wo_a|wo_b|indexer\.wq_b)|ffn\.shared_experts\.w[123])"
                     r"\.weight")
    for t in plan.tensors:
        for task in t.tasks:
            hf = task.source.name
            if hf in seen or t.fill is not None:
                continue
            seen.add(hf)
            n = math.prod(t.source_shape)
            if fp4.fullmatch(hf):
                saved += n * size - (n // 2 + n // 32)
            elif fp8.fullmatch(hf):
                rows, cols = t.source_shape
                saved += n * size - (n + math.ceil(rows / 128) * math.ceil(cols / 128))
            elif hf.endswith(".tid2eid"):
                saved += n * (size - 8)
    constant = sum(math.prod(t.shape) for t in plan.tensors if t.fill is not None)
    return saved, sum(math.prod(t.shape) for t in plan.tensors) - constant


@pytest.mark.parametrize("name", sorted(registry.MODELS))
def test_every_registered_model_is_priced_without_data(name):
    scan = name not in ("gemma4-e2b", "gemma4-e4b")          # MaxText 0.2.5 builds these two unscanned only
    plan, src, notes = pricing.plan_hf_to_maxtext(None, ToMaxTextOptions(model=name, scan_layers=scan))
    figures = pricing.price(plan, src, RATES, BIG_BOX)
    params = sum(math.prod(t.shape) for t in plan.tensors)
    b, m = figures["bytes"], figures["memory"]
    if registry.lookup(name).dtype == "fp8":   # MaxText's -fp8 tree: the release's e4m3 weights kept (one byte),
        count = {d: sum(math.prod(t.shape) for t in plan.tensors if t.dtype.name == d)   # their float32 block
                 for d in ("float8_e4m3fn", "float32", "bfloat16")}                    # scales, the rest bf16
        assert count["float8_e4m3fn"] > params / 2 and sum(count.values()) == params
        kept = count["float8_e4m3fn"] + 4 * count["float32"] + 2 * count["bfloat16"]
        assert b["written"] == plan.output_bytes == kept == b["download"] == src.total_bytes == b["read"]
        if params < 10**11:    # and back: the same bytes, written as the release holds them
            back, back_src, _ = pricing.plan_maxtext_to_hf(None, ToHFOptions(model=name))
            back_bytes = pricing.price(back, back_src, RATES, BIG_BOX)["bytes"]
            assert back_bytes["written"] == back_bytes["read"] == back_src.total_bytes == kept
        return
    # Gemma / Gemma 2: MaxText's table has 128 zero rows more than the HF one (HF's 256000 -> 256128)
    hf_params = params - (128 * registry.reference_config(name)["hidden_size"]
                          if plan.family in ("gemma", "gemma2") else 0)
    size = 4 if registry.reference_config(name)["torch_dtype"] == "float32" else 2   # gemma2-2b's files are f32
    # the fp8 releases (DeepSeek-V3/V3.2, Kimi K2) store every attention and MLP projection as one e4m3 byte plus
    # a float32 scale per 128x128 block
    fp8, seen = 0, set()
    if (registry.reference_config(name).get("quantization_config", {}).get("quant_method") == "fp8"
            and plan.family != "deepseek4"):
        for t in plan.tensors:
            for task in t.tasks:      # row pieces of one HF tensor: its (full) source_shape counted once
                hf = task.source.name
                if re.search(r"\.(self_attn|mlp)\..*_proj(_with_mqa)?\.weight$", hf) and hf not in seen:
                    seen.add(hf)
                    rows, cols = t.source_shape
                    fp8 += rows * cols * 2 - (rows * cols + 4 * math.ceil(rows / 128) * math.ceil(cols / 128))
        assert fp8 > params / 3 and seen == src.fp8
    if plan.family == "deepseek4":      # its release: fp4 experts, fp8 projections, int64 tid2eid
        fp8, hf_params = deepseek4_saved_bytes(plan, size)
    assert size * hf_params - fp8 == b["download"] == src.total_bytes
    # bf16 out, but Gemma's (1 + w) norm scales (maxtext-layout.md §3.4) and DeepSeek-V3/V3.2's and Kimi K2's
    # router bias are stored float32
    f32 = sum(math.prod(t.shape) for t in plan.tensors if t.dtype.itemsize == 4)
    assert b["written"] == plan.output_bytes == 2 * params + 2 * f32
    assert (f32 > 0) is (plan.family in ("gemma", "gemma2", "gemma3")
                         or name.startswith(("deepseek3", "deepseek4", "kimi")))
    reread = 0
    if plan.family == "gpt_oss":   # gate/up are two parts of gate_up_proj (+ bias): each part reads all of it
        c = registry.reference_config(name)
        reread = 2 * c["num_hidden_layers"] * c["num_local_experts"] * 2 * c["intermediate_size"] * (
            c["hidden_size"] + 1)
    if plan.family == "llama4":    # so are Llama 4's gate and up halves of gate_up_proj, in its MoE layers
        c = registry.reference_config(name)
        reread = 2 * len(c["moe_layers"]) * c["num_local_experts"] * c["hidden_size"] * 2 * c["intermediate_size"]
    if plan.family == "gemma4" and registry.reference_config(name)["enable_moe_block"]:   # and Gemma 4's, every layer
        c = registry.reference_config(name)
        reread = 2 * c["num_hidden_layers"] * c["num_experts"] * c["hidden_size"] * 2 * c["moe_intermediate_size"]
    if plan.family == "deepseek4":   # each hyper-connection's fn, base and scale read whole by its 3 parts
        c = registry.reference_config(name)
        hc = 2 * c["hc_mult"] + c["hc_mult"] ** 2
        reread = 2 * 2 * c["num_hidden_layers"] * (hc * c["hc_mult"] * c["hidden_size"] + hc + 3) * size
    assert b["read"] == size * hf_params - fp8 + reread
    assert b["written"] <= b["output_on_disk"] <= 1.25 * b["written"]     # chunk grid: edge chunks stored whole
    assert BIG_BOX.available_ram > m["peak_rss"] > pricing.BASELINE_RSS
    if params > 10**10:                                        # flat in the model size, far below it
        assert m["peak_rss"] < b["written"] / 5
    assert figures["go"] is (figures["verdict"].startswith("go:")) and figures["verdict"]
    assert figures["time"]["estimate_s"] > b["written"] / (RATES.write_gbps * 1e9)
    if params > 10**11:
        return                                                 # the reverse plan of 671B takes seconds to build
    back, back_src, _ = pricing.plan_maxtext_to_hf(None, ToHFOptions(model=name))
    back_figures = pricing.price(back, back_src, RATES, BIG_BOX)
    assert back_figures["bytes"]["written"] == 2 * hf_params and back_figures["bytes"]["download"] == 0   # bf16 HF
    assert back_figures["bytes"]["read"] == back_src.total_bytes == 2 * params     # the padded rows are read
    assert back_figures["memory"]["writer"] == 0


def test_qwen3_8b_figures():
    data = plan_json("hf-to-maxtext", "--model", "qwen3-8b", *FAST, code=None)
    assert set(data) == PLAN_KEYS and set(data["bytes"]) == BYTES_KEYS and set(data["memory"]) == MEMORY_KEYS
    params = data["parameters"]
    assert params == 8_190_735_360
    assert abs(data["bytes"]["output_on_disk"] - 2 * params) < 0.05 * 2 * params
    assert data["memory"]["peak_rss"] < 1.5e9 < 2 * params / 10
    assert data["bytes"]["download"] == 2 * params and data["source_kind"] == "model"
    assert data["rates"]["basis"]["read"] == "flag" and data["rates"]["basis"]["write"] == "flag"
    assert data["largest_tensors"][0]["slice_bytes"] == data["memory"]["largest_slice"]
    assert data["verdict"].startswith("go: " if data["go"] else "no-go: ")


def test_plan_matches_what_convert_does(hf_models, tmp_path):
    src = hf_models("qwen3", "bfloat16", sharded=True)
    out = tmp_path / "mt"
    data = plan_json("hf-to-maxtext", str(src), "--out", str(out), "--no-scan")     # real probes
    # a 40 KB shard is too small to time reads on; the write and transform rates are probed
    assert data["rates"]["basis"] == {"read": "assumed", "write": "probe", "cpu": "probe", "net": "unknown"}
    assert data["source_kind"] == "local" and data["bytes"]["download"] == 0 and data["go"] is True
    result = hf_to_maxtext(str(src), out, ToMaxTextOptions(scan_layers=False))
    assert data["bytes"]["read"] == result.stats.bytes_read
    assert data["bytes"]["written"] == result.stats.bytes_written
    assert data["tasks"] == result.stats.tasks and data["tensors"] == result.stats.tensors
    on_disk = tree_bytes(out)
    assert math.isclose(data["bytes"]["output_on_disk"], on_disk, rel_tol=0.05), (data["bytes"], on_disk)
    # the reverse direction, priced from the checkpoint's metadata
    back = plan_json("maxtext-to-hf", str(out), *FAST)
    assert back["source_kind"] == "orbax" and back["scan_layers"] is False
    assert back["bytes"]["written"] == result.stats.bytes_written and back["memory"]["writer"] == 0


def test_no_go_names_the_reason(hf_models):
    plan, src, _ = pricing.plan_hf_to_maxtext(str(hf_models("qwen3", "bfloat16")), ToMaxTextOptions())
    small = Machine(available_ram=50 * 10**6, free_disk=1000, disk_path="/x", cpus=2)
    figures = pricing.price(plan, src, RATES, small)
    assert figures["go"] is False
    assert "of RAM, 50.00 MB available" in figures["verdict"] and "of disk at /x, 1.00 KB free" in figures["verdict"]


def test_human_output_and_errors(hf_models):
    r = runner.invoke(app, ["plan", "hf-to-maxtext", "--model", "qwen3-0.6b", *FAST])
    assert r.exit_code in (0, 1), r.output
    assert "peak RSS" in r.stdout and "largest slices" in r.stdout and ("go: " in r.stdout)
    r = runner.invoke(app, ["plan", "hf-to-maxtext", *FAST])
    assert r.exit_code == 2 and "--model NAME" in r.stderr
    r = runner.invoke(app, ["plan", "hf-to-maxtext", str(hf_models("qwen3", "bfloat16")), "--model", "qwen3-8b",
                            *FAST])
    assert r.exit_code == 2 and "hidden_size = 64, but qwen3-8b has 4096" in r.stderr

"""The CLI: parsing, output modes, and the bad-input corpus (exit code, one-line message, nothing published)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckpt_cli.io.safetensors import read_header
from tests.cli_helpers import error_line, run


def no_checkpoint_left(out: Path) -> bool:
    partial = out.with_name(out.name + ".partial")
    return not (out / "0" / "commit_success.txt").exists() and not partial.exists()


def test_json_output_is_plain_json(hf_models, tmp_path):
    src = hf_models("qwen3", "bfloat16")
    r = run("convert", "hf-to-maxtext", str(src), "--out", str(tmp_path / "mt"), "--json")
    assert r.exit_code == 0, r.output
    assert "\x1b[" not in r.stdout
    data = json.loads(r.stdout)
    assert data["family"] == "qwen3" and data["scan_layers"] is True and data["dtype"] == "bfloat16"
    paths = {t["target"]: t for t in data["tensors"]}
    q = paths["decoder/layers/self_attention/query/kernel"]
    assert q["shape"] == [64, 2, 4, 16] and q["stack_axes"] == [1] and q["chunk_shape"] == [64, 1, 4, 16]
    assert q["source_first"] == "model.layers.0.self_attn.q_proj.weight" and q["sources"] == 2
    assert data["stats"]["bytes_written"] == sum(t["bytes"] for t in data["tensors"])
    assert data["stats"]["peak_rss"] > 0


def test_show_tensors_and_summary(hf_models, tmp_path):
    src = hf_models("llama", "bfloat16")
    r = run("convert", "hf-to-maxtext", str(src), "--out", str(tmp_path / "mt"), "--no-scan", "--show-tensors",
            "--dtype", "f32")
    assert r.exit_code == 0, r.output
    assert "decoder/layers_1/self_attention/query/kernel" in r.stdout
    assert "rope-interleave" in r.stdout and "peak RSS" in r.stdout


def test_quiet_prints_nothing(hf_models, tmp_path):
    r = run("convert", "hf-to-maxtext", str(hf_models("qwen3", "bfloat16")), "--out", str(tmp_path / "mt"), "-q")
    assert r.exit_code == 0 and r.stdout == ""


def test_model_check_passes_and_fails(hf_models, tmp_path):
    src = hf_models("qwen3", "bfloat16")
    r = run("convert", "hf-to-maxtext", str(src), "--out", str(tmp_path / "a"), "--model", "qwen3-8b")
    assert r.exit_code == 2
    assert "hidden_size = 64, but qwen3-8b has 4096" in error_line(r)
    assert no_checkpoint_left(tmp_path / "a")
    r = run("convert", "hf-to-maxtext", str(src), "--out", str(tmp_path / "b"), "--model", "llama3.1-8b")
    assert r.exit_code == 2 and "is a llama3.1 model" in error_line(r)


@pytest.mark.parametrize("args,code,message", [
    (["--model", "qwen3-7b"], 2, "unknown model 'qwen3-7b'"),
])   # bad choices (--dtype fp8, --load-method pickle) are usage errors: tests/test_cli_ux.py
def test_bad_options(hf_models, tmp_path, args, code, message):
    r = run("convert", "hf-to-maxtext", str(hf_models("qwen3", "bfloat16")), "--out", str(tmp_path / "o"), *args)
    assert r.exit_code == code
    assert message in error_line(r)
    assert no_checkpoint_left(tmp_path / "o")


def test_missing_source(tmp_path):
    r = run("convert", "hf-to-maxtext", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "no such folder" in error_line(r)


def copy_source(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_shard(hf_models, tmp_path):
    src = copy_source(hf_models("qwen3", "bfloat16", sharded=True), tmp_path / "src")
    shard = sorted(src.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    r = run("convert", "hf-to-maxtext", str(src), "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "truncated" in error_line(r) and shard.name in error_line(r)
    assert no_checkpoint_left(tmp_path / "o")


def test_missing_shard_and_missing_tensor(hf_models, tmp_path):
    src = copy_source(hf_models("qwen3", "bfloat16", sharded=True), tmp_path / "src")
    victim = sorted(src.glob("*.safetensors"))[0]
    victim.unlink()
    r = run("convert", "hf-to-maxtext", str(src), "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and victim.name in error_line(r) and "missing" in error_line(r)
    # A single-file source lacking one tensor.
    src2 = copy_source(hf_models("qwen3", "bfloat16"), tmp_path / "src2")
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(src2 / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(src2 / "model.safetensors"))
    r = run("convert", "hf-to-maxtext", str(src2), "--out", str(tmp_path / "o2"))
    assert r.exit_code == 2 and "model.layers.1.mlp.up_proj.weight is missing" in error_line(r)


def test_wrong_shape_names_tensor_expected_and_found(hf_models, tmp_path):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    src = copy_source(hf_models("qwen3", "float32"), tmp_path / "src")
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    save_file(tensors, str(src / "model.safetensors"))
    r = run("convert", "hf-to-maxtext", str(src), "--out", str(tmp_path / "o"))
    line = error_line(r)
    assert r.exit_code == 2
    assert "model.layers.0.self_attn.k_proj.weight" in line and "(32, 64)" in line and "(16, 64)" in line
    assert no_checkpoint_left(tmp_path / "o")


def test_output_exists_and_overwrite(hf_models, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    src = str(hf_models("qwen3", "bfloat16"))
    r = run("convert", "hf-to-maxtext", src, "--out", str(out))
    assert r.exit_code == 3 and "not empty" in error_line(r)
    assert (out / "keep.txt").exists()
    r = run("convert", "hf-to-maxtext", src, "--out", str(out), "--overwrite", "-q")     # not a checkpoint: kept
    assert r.exit_code == 3 and "holds keep.txt" in error_line(r) and (out / "keep.txt").exists()
    (out / "keep.txt").unlink()
    assert run("convert", "hf-to-maxtext", src, "--out", str(out), "-q").exit_code == 0
    r = run("convert", "hf-to-maxtext", src, "--out", str(out), "--overwrite", "-q")     # a checkpoint: replaced
    assert r.exit_code == 0 and (out / "0" / "commit_success.txt").exists()


def test_not_enough_disk(hf_models, tmp_path, monkeypatch):
    import shutil as sh

    real = sh.disk_usage
    monkeypatch.setattr(sh, "disk_usage", lambda p: real(p)._replace(free=1000))
    r = run("convert", "hf-to-maxtext", str(hf_models("qwen3", "bfloat16")), "--out", str(tmp_path / "o"))
    assert r.exit_code == 3 and "not enough free disk" in error_line(r)
    assert no_checkpoint_left(tmp_path / "o")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    r = run("convert", "hf-to-maxtext", str(tmp_path / "bert"), "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "model_type 'bert'" in error_line(r)


def test_version_and_help():
    assert run("--version").stdout.startswith("ckpt ")
    r = run("convert", "hf-to-maxtext", "--help")
    assert r.exit_code == 0 and "Examples" in r.stdout


def test_demo_subprocess(tmp_path):
    """The README's first command, as a real process."""
    r = subprocess.run([sys.executable, "-m", "ckpt_cli", "demo", "--out", str(tmp_path), "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert (Path(data["maxtext"]) / "0" / "items" / "_METADATA").exists() and data["round_trip_identical"]


def test_ctrl_c_mid_write_leaves_nothing(tmp_path):
    """SIGINT while converting: exit 130, no output, no .partial."""
    from ckpt_cli.tiny import TINY_QWEN3, write_tiny_model

    cfg = TINY_QWEN3 | {"hidden_size": 1024, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 128,
                        "intermediate_size": 4096, "num_hidden_layers": 8, "vocab_size": 16000}
    src = write_tiny_model(tmp_path / "src", cfg)
    assert sum(t.nbytes for t in read_header(src / "model.safetensors").values()) > 300e6
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "ckpt_cli", "convert", "hf-to-maxtext", str(src), "--out", str(out),
                             "--workers", "1", "--dtype", "f32", "-q"], stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})
    partial = out.with_name("out.partial")
    deadline = time.time() + 60
    while not (partial / "0" / "items").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("conversion finished before the signal arrived")
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists() and not partial.exists()


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_are_current(shell):
    """completions/ holds exactly what `ckpt --show-completion SHELL` prints."""
    r = subprocess.run(["ckpt", "--show-completion", shell], capture_output=True, text=True,
                       env=os.environ | {"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}, timeout=120)
    assert r.returncode == 0, r.stderr
    script = (Path(__file__).resolve().parents[1] / "completions" / f"ckpt.{shell}").read_text()
    assert r.stdout.strip() == script.strip()


def test_bash_completion_lists_commands():
    env = os.environ | {"COMP_WORDS": "ckpt convert ", "COMP_CWORD": "2", "_CKPT_COMPLETE": "complete_bash"}
    r = subprocess.run(["ckpt"], capture_output=True, text=True, env=env, timeout=120)
    assert set(r.stdout.split()) == {"hf-to-maxtext", "maxtext-to-hf"}

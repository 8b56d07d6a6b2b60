"""Bad-input corpus (issue 11, items 6-12): hostile sources get one line and a non-zero exit, never a traceback.

Every case is built at run time from a tiny numpy model (ckpt_cli.tiny) and checks the exit code, the one
error line, that no traceback was printed, that the source is byte-for-byte untouched, and that nothing
looks published at --out. Cases that could hang or that must see the real process (a FIFO, a hub that never
answers, Ctrl-C while Python imports the CLI) run the `ckpt` script in a subprocess.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ckpt_cli.tiny import write_tiny_model
from tests.cli_helpers import run
from tests.hub_server import fake_hub, hub_env  # noqa: F401 - the fixture

INDEX = "model.safetensors.index.json"


# ------------------------------------------------------------------------------------------------ helpers


def tree_hash(root: Path) -> str:
    """Names, kinds and bytes of everything under `root` (links and FIFOs by what they are, never opened)."""
    h = hashlib.sha256()
    paths = [root] if not root.is_dir() or root.is_symlink() else sorted(root.rglob("*"))
    for p in paths:
        st = p.lstat()
        h.update(f"{p.relative_to(root) if p != root else '.'}:{stat.S_IFMT(st.st_mode)}".encode())
        if p.is_symlink():
            h.update(os.readlink(p).encode())
        elif stat.S_ISREG(st.st_mode):
            h.update(p.read_bytes())
    return h.hexdigest()


def nothing_published(out: Path) -> bool:
    partial = out.with_name(out.name + ".partial")
    return (not out.exists() or not any(out.iterdir())) and not partial.exists()


def refused(args: list, code: int, *pieces: str, source: Path, out: Path | None = None) -> str:
    """Run `ckpt ARGS` in this process and check the refusal; returns its error line."""
    before = tree_hash(source)
    r = run(*args)
    assert r.exit_code == code, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    line = last_line_error(r.stderr)
    for piece in pieces:
        assert piece in line, line
    assert tree_hash(source) == before
    if out is not None:
        assert nothing_published(out)
    return line


def ckpt_process(args: list, env: dict | None = None, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    t = time.perf_counter()
    r = subprocess.run([shutil.which("ckpt") or "ckpt", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=env)
    return r, time.perf_counter() - t


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def last_line_error(stderr: str) -> str:
    """The one `error: ` line, last on stderr (notes may come before it), and no traceback."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr
    assert [ln for ln in lines if ln.startswith("error: ")] == lines[-1:], stderr
    return lines[-1]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny Qwen3 (2 layers, bf16, one model.safetensors), written once; cases copy it."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen3")


def copy(model: Path, dest: Path, **config_changes) -> Path:
    shutil.copytree(model, dest)
    if config_changes:
        cfg = json.loads((dest / "config.json").read_text()) | config_changes
        (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def read_st(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(path: Path, header: dict | str, data: bytes) -> None:
    text = header if isinstance(header, str) else json.dumps(header)
    raw = text.encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def same_shape_pair(header: dict) -> tuple[str, str]:
    """Two tensors with the same dtype and shape (the two layers' q_norm weights)."""
    names = sorted(n for n in header if n.endswith("self_attn.q_norm.weight"))
    return names[0], names[1]


def to_maxtext(src: Path, out: Path, *flags: str) -> Path:
    r = run("convert", "hf-to-maxtext", src, "--out", out, "--quiet", *flags)
    assert r.exit_code == 0, r.output
    return out


# ------------------------------------------------------------------------- 6: missing zarr chunks fail


@pytest.fixture(scope="module")
def chunked(model, tmp_path_factory) -> Path:
    """The tiny model as a MaxText checkpoint with one directory per array (no OCDBT): chunks are files."""
    return to_maxtext(model, tmp_path_factory.mktemp("chunked") / "mt", "--no-ocdbt")


def without_a_chunk(chunked: Path, dest: Path) -> tuple[Path, str]:
    """A copy of `chunked` with one chunk of the MLP's wi_0 kernel deleted; (copy, array name)."""
    shutil.copytree(chunked, dest)
    array = dest / "0" / "items" / "params.params.decoder.layers.mlp.wi_0.kernel"
    chunks = sorted(p for p in array.rglob("*") if p.is_file() and p.name != "zarr.json")
    assert len(chunks) > 1
    chunks[-1].unlink()
    return dest, "decoder/layers/mlp/wi_0/kernel"


def test_missing_chunk_fails_maxtext_to_hf(chunked, tmp_path):
    src, array = without_a_chunk(chunked, tmp_path / "mt")
    out = tmp_path / "hf"
    refused(["convert", "maxtext-to-hf", src, "--out", out], 2, f"array {array} is missing its chunk",
            "incomplete", source=src, out=out)


def test_missing_chunk_fails_verify_logits(chunked, model, tmp_path):
    src, array = without_a_chunk(chunked, tmp_path / "mt")
    refused(["verify-logits", "--maxtext", src, "--hf", model, "--tokens", "1,2,3,4"], 2,
            f"array {array} is missing its chunk", source=src)


def test_own_writer_stores_chunks_equal_to_the_fill_value(model, tmp_path):
    """A tensor of zeros (the fill value) still gets every chunk file, so strict reads accept ckpt's output."""
    import ml_dtypes
    import numpy as np

    from ckpt_cli.io.safetensors import SafetensorsFolder, save_file

    src = copy(model, tmp_path / "src")
    folder = SafetensorsFolder(src)
    tensors = {n: np.array(folder.read(n)) for n in folder.tensors}
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros_like(tensors["model.layers.1.mlp.up_proj.weight"],
                                                                 dtype=ml_dtypes.bfloat16)
    del folder
    save_file(src / "model.safetensors", tensors, {"format": "pt"})
    mt = to_maxtext(src, tmp_path / "mt", "--no-ocdbt")
    wi_1 = mt / "0" / "items" / "params.params.decoder.layers.mlp.wi_1.kernel"
    assert len([p for p in wi_1.rglob("*") if p.is_file() and p.name != "zarr.json"]) == 2   # one per layer
    r = run("convert", "maxtext-to-hf", mt, "--out", tmp_path / "hf", "--quiet")
    assert r.exit_code == 0, r.output


# -------------------------------------------------------------- 8: safetensors headers, as strict as the library


def _negative(header: dict, data: bytes) -> tuple[dict, bytes]:
    name = sorted(n for n in header if n != "__metadata__")[0]
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin - 64, end - 64]
    return header, data


def _overlap(header: dict, data: bytes) -> tuple[dict, bytes]:
    a, b = same_shape_pair(header)
    header[b]["data_offsets"] = list(header[a]["data_offsets"])
    return header, data


def _duplicate(header: dict, data: bytes) -> tuple[str, bytes]:
    a, _ = same_shape_pair(header)
    text = json.dumps(header)
    entry = json.dumps({a: header[a]})[1:-1]
    return text[:-1] + ", " + entry + "}", data


def _trailing(header: dict, data: bytes) -> tuple[dict, bytes]:
    return header, data + b"\0" * 16


HEADER_CASES = {
    "negative-offsets": (_negative, "data_offsets"),
    "overlapping-offsets": (_overlap, "overlaps the tensor before it"),
    "duplicate-name": (_duplicate, "appears twice"),
    "bytes-past-the-data": (_trailing, "the file holds"),
}


def bad_header_model(model: Path, dest: Path, case: str) -> Path:
    src = copy(model, dest)
    header, data = read_st(src / "model.safetensors")
    header, data = HEADER_CASES[case][0](header, data)
    write_st(src / "model.safetensors", header, data)
    return src


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_bad_safetensors_header_is_one_line(model, tmp_path, case):
    src = bad_header_model(model, tmp_path / "src", case)
    out = tmp_path / "mt"
    line = refused(["convert", "hf-to-maxtext", src, "--out", out], 2, "model.safetensors", HEADER_CASES[case][1],
                   source=src, out=out)
    assert refused(["inspect", src], 2, source=src) == line


@pytest.mark.parametrize("case", ["negative-offsets", "overlapping-offsets"])
def test_bad_safetensors_header_on_the_hub_is_one_line(model, tmp_path, fake_hub, case):  # noqa: F811
    hub, _ = fake_hub
    hub.add_repo("org/bad", bad_header_model(model, tmp_path / "repo", case))
    refused(["inspect", "org/bad"], 2, "org/bad/model.safetensors: ", HEADER_CASES[case][1], source=tmp_path / "repo")


# ------------------------------------------------------------------ 9: names in metadata stay inside the folder


def sharded_with_index(model: Path, dest: Path, name: str) -> Path:
    """A copy whose weights are named by an index entry `name` (the shard itself moved to `dest/../outside`)."""
    src = copy(model, dest)
    outside = dest.parent / "outside"
    outside.mkdir()
    shard = outside / "x.safetensors"
    (src / "model.safetensors").rename(shard)
    header, _ = read_st(shard)
    target = str(shard) if name == "absolute" else "../outside/x.safetensors"
    weight_map = {n: target for n in header if n != "__metadata__"}
    (src / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return src


@pytest.mark.parametrize("name", ["dotdot", "absolute"])
def test_index_naming_a_file_outside_the_folder_is_refused(model, tmp_path, name):
    src = sharded_with_index(model, tmp_path / "src", name)
    out = tmp_path / "mt"
    entry = "../outside/x.safetensors" if name == "dotdot" else str(tmp_path / "outside" / "x.safetensors")
    refused(["convert", "hf-to-maxtext", src, "--out", out], 2, INDEX, repr(entry), "refused", source=src, out=out)
    refused(["inspect", src], 2, repr(entry), source=src)


def test_hub_index_naming_dotdot_is_refused(model, tmp_path, fake_hub):  # noqa: F811
    hub, _ = fake_hub
    src = copy(model, tmp_path / "repo")
    header, _ = read_st(src / "model.safetensors")
    (src / INDEX).write_text(json.dumps({"weight_map": {n: "../model.safetensors" for n in header
                                                        if n != "__metadata__"}}))
    hub.add_repo("org/dotdot", src)
    refused(["inspect", "org/dotdot"], 2, INDEX, "'../model.safetensors'", source=src)
    out = tmp_path / "mt"
    refused(["convert", "hf-to-maxtext", "org/dotdot", "--out", out], 2, "'../model.safetensors'", source=src,
            out=out)


def test_orbax_metadata_key_with_dotdot_is_refused(chunked, tmp_path):
    src = tmp_path / "mt"
    shutil.copytree(chunked, src)
    meta_path = src / "0" / "items" / "_METADATA"
    meta = json.loads(meta_path.read_text())
    key = next(k for k in meta["tree_metadata"] if "wi_0" in k)
    entry = meta["tree_metadata"].pop(key)
    entry["key_metadata"][-1]["key"] = ".."
    meta["tree_metadata"][key.replace("kernel", "..")] = entry
    meta_path.write_text(json.dumps(meta))
    out = tmp_path / "hf"
    refused(["convert", "maxtext-to-hf", src, "--out", out], 2, "'..'", "not a plain name", source=src, out=out)


# --------------------------------------------------------------- 10: tokenizer files from the carried folder

TOKENIZER = {"tokenizer.json": "{}", "tokenizer_config.json": "{}", "special_tokens_map.json": "{}"}


def with_tokenizer(model: Path, dest: Path) -> Path:
    src = copy(model, dest)
    for name, text in TOKENIZER.items():
        (src / name).write_text(text)
    return src


def test_carried_folder_with_another_config_gives_no_tokenizer(model, tmp_path):
    src = with_tokenizer(model, tmp_path / "src")
    mt = to_maxtext(src, tmp_path / "mt")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(cfg | {"vocab_size": 512}))    # another model lives there now
    r = run("convert", "maxtext-to-hf", mt, "--out", tmp_path / "hf")
    assert r.exit_code == 0, r.output
    assert not any((tmp_path / "hf" / name).exists() for name in TOKENIZER)
    assert f"tokenizer files not copied from {src}" in " ".join(r.stderr.split())


def test_carried_folder_links_leading_out_and_unknown_names_are_not_copied(model, tmp_path):
    src = with_tokenizer(model, tmp_path / "src")
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    (src / "tokenizer.json").unlink()
    (src / "tokenizer.json").symlink_to(secret)                 # a link leading out of the folder
    (src / "tokenizer_notes.txt").write_text("not a tokenizer file")   # matched `tokenizer*` before
    mt = to_maxtext(src, tmp_path / "mt")
    r = run("convert", "maxtext-to-hf", mt, "--out", tmp_path / "hf", "--json")
    assert r.exit_code == 0, r.output
    files = json.loads(r.stdout)["files"]
    assert "tokenizer.json" not in files and "tokenizer_notes.txt" not in files
    assert {"special_tokens_map.json", "tokenizer_config.json"} <= set(files)
    assert (f"tokenizer files copied from {src}: special_tokens_map.json, tokenizer_config.json"
            in " ".join(r.stderr.split()))


# --------------------------------------------------------------------------- 11: a hub that never answers


@contextlib.contextmanager
def silent_hub():
    """A TCP server on 127.0.0.1 that accepts every connection and never sends a byte; yields its URL."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []

    def accept():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()
        for conn in held:
            conn.close()
        thread.join(timeout=5)


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_hub_that_never_answers_fails_within_the_timeouts(tmp_path, command):
    out = tmp_path / "mt"
    args = ["inspect", "org/model"] if command == "inspect" else ["convert", "hf-to-maxtext", "org/model", "--out", out]
    with silent_hub() as endpoint:
        env = hub_env(endpoint, tmp_path / "hf-home") | {"HF_HUB_ETAG_TIMEOUT": "1", "HF_HUB_DOWNLOAD_TIMEOUT": "1"}
        r, seconds = ckpt_process(args, env, timeout=60)
    assert r.returncode == 4, r.stderr
    line = one_line(r.stderr)
    assert line.startswith("error: org/model: the hub did not answer") and "after 3 tries" in line
    assert seconds < 30          # 3 tries of 1 s, 1.5 s of backoff, start-up
    assert nothing_published(out)


# ------------------------------------------------------------------------- 12: one line, never a traceback


CONFIG_CASES = {
    "json-list": ([1, 2], "not a config object"),
    "layers-zero": ({"num_hidden_layers": 0}, "num_hidden_layers must be at least 1, found 0"),
    "layers-negative": ({"num_hidden_layers": -2}, "num_hidden_layers must be at least 1, found -2"),
    "dim-string": ({"hidden_size": "64"}, "hidden_size must be an integer, found '64' (str)"),
    "dim-float": ({"intermediate_size": 128.0}, "intermediate_size must be an integer, found 128.0 (float)"),
    "layers-absurd": ({"num_hidden_layers": 10_000_000}, "declares 10000000 layers, but the files hold 2"),
    "layers-fewer": ({"num_hidden_layers": 1}, "layer 1 would be dropped; pass --allow-unused"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_is_one_line(model, tmp_path, case):
    change, message = CONFIG_CASES[case]
    src = copy(model, tmp_path / "src")
    cfg = change if isinstance(change, list) else json.loads((src / "config.json").read_text()) | change
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "mt"
    t = time.perf_counter()
    refused(["convert", "hf-to-maxtext", src, "--out", out], 2, message, source=src, out=out)
    assert time.perf_counter() - t < 20        # nothing is built per declared layer before the check
    refused(["plan", "hf-to-maxtext", src, "--out", out], 2, message, source=src, out=out)


def test_fewer_layers_with_allow_unused_converts(model, tmp_path):
    src = copy(model, tmp_path / "src", num_hidden_layers=1)
    r = run("convert", "hf-to-maxtext", src, "--out", tmp_path / "mt", "--allow-unused")
    assert r.exit_code == 0, r.output
    assert "not used: model.layers.1." in " ".join(r.stderr.split())


def test_transformers_load_failure_is_one_line(model, tmp_path):
    src = copy(model, tmp_path / "src", intermediate_size=96)       # the weights say 128
    out = tmp_path / "mt"
    refused(["convert", "hf-to-maxtext", src, "--out", out, "--load-method", "transformers"], 2,
            f"transformers cannot load {src}: RuntimeError: the weights' shapes do not match config.json",
            source=src, out=out)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_non_regular_source_file_is_refused(model, tmp_path, kind):
    src = copy(model, tmp_path / "src")
    (src / "model.safetensors").unlink()
    if kind == "fifo":
        os.mkfifo(src / "model.safetensors")        # opening it would block until a writer comes
    else:
        (src / "model.safetensors").symlink_to("/dev/zero")
    out = tmp_path / "mt"
    before = tree_hash(src)
    r, _ = ckpt_process(["convert", "hf-to-maxtext", src, "--out", out], timeout=60)
    assert r.returncode == 2, r.stderr
    line = one_line(r.stderr)
    assert "model.safetensors is not a regular file" in line, line
    assert tree_hash(src) == before and nothing_published(out)


def test_ctrl_c_while_the_cli_imports_is_one_line_and_130(tmp_path):
    """Ctrl-C arriving while Python imports the CLI (the seconds before a command's own guard runs)."""
    code = ("import builtins, runpy, shutil, sys\n"
            "real = builtins.__import__\n"
            "def fake(name, *args, **kwargs):\n"
            "    if name == 'typer':\n"
            "        raise KeyboardInterrupt\n"
            "    return real(name, *args, **kwargs)\n"
            "builtins.__import__ = fake\n"
            "sys.argv = ['ckpt', 'inspect', 'x']\n"
            "runpy.run_path(shutil.which('ckpt'), run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 130, r.stderr
    assert one_line(r.stderr) == "interrupted: nothing was done (Ctrl-C during start-up)"

"""What a new user meets: help text, choices, tables that fit 80 and 200 columns, `ckpt models`, completion,
did-you-mean, the demo, and the small wrongs of issue 16 (each with the fix's test)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from ckpt_cli.cli.app import app
from ckpt_cli.cli.output import Output
from ckpt_cli.cli.tables import Col, Grid, render, wrap
from ckpt_cli.families import FAMILIES

runner = CliRunner()
COMMANDS = [["convert", "hf-to-maxtext"], ["convert", "maxtext-to-hf"], ["plan", "hf-to-maxtext"],
            ["plan", "maxtext-to-hf"], ["inspect"], ["verify-logits"], ["demo"], ["models"]]


def run(*args, columns: int = 80):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": str(columns)})


def lines_fit(text: str, width: int) -> None:
    for line in text.splitlines():
        assert len(line) <= width, line
        assert line == line.rstrip(), repr(line)


# ------------------------------------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_names_arguments_hides_bool_and_offers_quiet_wide_json(command):
    r = run(*command, "--help", columns=200)
    assert r.exit_code == 0, r.output
    assert "<bool>" not in r.stdout and "--help" in r.stdout and "-h" in r.stdout
    assert "{source}" not in r.stdout and "{target}" not in r.stdout
    assert "--quiet" in r.stdout and "--json" in r.stdout and "--wide" in r.stdout and "-q " in r.stdout
    # an option taking a value shows what it is (DIR, NAME, MESH, N ...), never Typer's bare type
    typed = [ln for ln in r.stdout.splitlines()
             if re.match(r"│[\s*]*--", ln) and re.search(r"<(str|int|float|path)( range)?>", ln)]
    assert typed == []
    if command[0] in ("convert", "plan", "inspect"):
        assert ("TARGET" if command == ["inspect"] else "SOURCE") in r.stdout


def test_root_and_group_help_show_no_bool_but_typer_completion_installers():
    for args in (["--help"], ["convert", "--help"], ["plan", "-h"]):
        r = run(*args, columns=200)
        assert r.exit_code == 0, r.output
        assert [ln for ln in r.stdout.splitlines() if "<bool>" in ln and "completion" not in ln] == []


@pytest.mark.parametrize("command,flag,choices", [
    (["convert", "hf-to-maxtext"], "--dtype", "bf16|f32|fp8"),
    (["convert", "hf-to-maxtext"], "--compression", "none|zstd"),
    (["convert", "hf-to-maxtext"], "--load-method", "safetensors|transformers"),
    (["convert", "maxtext-to-hf"], "--dtype", "bf16|f32|fp8"),
    (["verify-logits"], "--hf-load", "auto|full|stream"),
    (["verify-logits"], "--dtype", "bf16|f32"),
])
def test_choices_are_listed_and_enforced_alike(command, flag, choices, tmp_path, capsys):
    assert choices in run(*command, "--help", columns=200).stdout
    capsys.readouterr()
    args = {"convert": [tmp_path, "--out", tmp_path / "o"], "verify-logits": ["--maxtext", tmp_path]}[command[0]]
    status, err = ckpt_main(capsys, *command, *args, flag, "nope")
    listed = ", ".join(repr(c) for c in choices.split("|"))
    assert status == 2 and err == f"error: Invalid value for '{flag}': 'nope' is not one of {listed}.\n", err
    assert not (tmp_path / "o").exists()


def ckpt_main(capsys, *args) -> tuple[int, str]:
    """`ckpt ARGS` through the console script's own entry (Typer's standalone mode off): status and stderr."""
    from ckpt_cli.cli.app import run as run_ckpt

    status = run_ckpt([str(a) for a in args])
    return status, capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["convert", "hf-to-maxtext"], "Missing argument 'SOURCE'."),
    (["inspect", "--bogus"], "No such option: --bogus"),
    (["plan", "hf-to-maxtxt"], "No such command 'hf-to-maxtxt'."),
    (["convert", "maxtext-to-hf", "x", "--out", "y", "--workers", "0"], "Invalid value for '--workers': "),
    (["convert", "maxtext-to-hf", "x", "--out", "y", "--shard-size", "5"], "Invalid value for --shard-size: '5' has "
                                                                            "no unit"),
])
def test_usage_errors_are_one_error_line_like_every_other(args, message, capsys):
    status, err = ckpt_main(capsys, *args)
    assert status == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_usage_error_of_the_installed_script_is_one_line(tmp_path):
    """The real `ckpt` process: no usage line, no framed box; the same line as in-process."""
    r = subprocess.run(["ckpt", "convert", "hf-to-maxtext", str(tmp_path), "--out", str(tmp_path / "o"), "--dtype",
                        "f16"], capture_output=True, text=True, env=os.environ | {"COLUMNS": "80"}, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "error: Invalid value for '--dtype': 'f16' is not one of 'bf16', 'f32', 'fp8'.\n", r.stderr


# ------------------------------------------------------------------------------------------------------- tables


def test_wrap_breaks_paths_only_after_slash_or_dot():
    text = wrap("decoder/layers/self_attention/query/kernel", 16)
    assert text.split("\n") == ["decoder/layers/", "self_attention/", "query/kernel"]
    assert wrap("model.layers.0.self_attn.q_proj.weight", 16).split("\n") == [
        "model.layers.0.", "self_attn.", "q_proj.weight"]
    assert wrap("two words", 80) == "two words"


def _rows(stdout: str) -> list[str]:
    return [ln for ln in stdout.splitlines() if ln.startswith("│")]


@pytest.mark.parametrize("columns", [80, 200])
def test_show_tensors_fits_the_width_without_breaking_names(hf_models, tmp_path, columns):
    r = run("convert", "hf-to-maxtext", hf_models("qwen3", "bfloat16"), "--out", tmp_path / "mt", "--show-tensors",
            "--no-scan", columns=columns)
    assert r.exit_code == 0, r.output
    lines_fit(r.stdout, columns)
    tensors = r.stdout.split("converted")[0]          # the tensor table comes first, then the summary
    cells = [c.strip() for ln in _rows(tensors) for c in ln.strip("│").split("│")]
    for piece in ("token_embedder", "embedding", "self_attention", "layers_1", "post_self_attention_layer_norm"):
        assert any(piece in c.split("/") for c in cells), piece
    names = {"decoder", "layers_0", "layers_1", "self_attention", "query", "key", "value", "out", "kernel", "scale",
             "token_embedder", "embedding", "mlp", "wi_0", "wi_1", "wo", "decoder_norm", "logits_dense",
             "pre_self_attention_layer_norm", "post_self_attention_layer_norm", "query_norm", "key_norm"}
    first = [ln.strip("│").split("│")[0].strip() for ln in _rows(tensors)]
    for cell in filter(None, first):   # every fragment of a MaxText path is whole names, each ending at a '/'
        assert all(part in names for part in cell.rstrip("/").split("/")), cell
    headers = {"scan axis", "chunk axes", "sources"}

    def header_row(text: str) -> str:
        return next(ln for ln in text.splitlines() if ln.startswith("┃"))

    if columns == 200:
        assert all(h in header_row(r.stdout) for h in headers) and "--wide" not in r.stdout
    else:
        assert not any(h in header_row(r.stdout) for h in headers)
        assert "not shown at this width" in r.stdout and "--wide" in r.stdout
        wide = run("convert", "hf-to-maxtext", hf_models("qwen3", "bfloat16"), "--out", tmp_path / "w",
                   "--show-tensors", "--no-scan", "--wide", columns=80)
        assert all(h in header_row(wide.stdout) for h in headers)


def test_table_cells_never_cut_numbers_at_80_columns():
    names = ["prompt", "tokens", "KL mean", "KL max (pos)", "max |Δlogit|", "max |Δprob|", "top-1 agree",
             "top-k overlap", "rank agree"]
    grid = Grid([Col(n, right=n != "prompt", wrap=n == "prompt", drop=i % 4) for i, n in enumerate(names)])
    numbers = ["3.04e-14", "40", "1.23e-15", "3.04e-14 (27)", "6.41e-07", "1.1e-08", "100%", "10/10", "100%"]
    grid.add_row("3: built-in 40 tokens (seed 2)", *numbers[1:])
    out = Output(wide=False)
    out.width = 80
    table, width = render(grid, 80)
    from rich.console import Console

    console = Console(width=80, record=True)
    with console.capture() as cap:
        console.print(table)
    text = cap.get()
    assert "…" not in text
    lines_fit("\n".join(ln.rstrip() for ln in text.splitlines()), 80)
    hidden = text.split("not shown at this width: ")[1].split(";")[0].split(", ")
    assert 0 < len(hidden) < len(names) - 3
    for name, number in zip(names[1:], numbers[1:], strict=True):
        assert name in hidden or number in text, (name, number)


@pytest.mark.parametrize("columns", [80, 200])
def test_verify_logits_tables_keep_their_numbers_whole(columns):
    import numpy as np

    from ckpt_cli.cli.verify import metrics_table, top_k_table
    from ckpt_cli.verify.metrics import PromptMetrics
    from ckpt_cli.verify.prompts import Prompt

    ids = list(range(100000, 100010))
    m = PromptMetrics(kl=np.array([3.0412345e-14, 1.2e-15]), max_abs_dlogit=6.4123e-07, max_abs_dprob=1.1e-08,
                      top1_agreement=1.0, hf_top_ids=ids, hf_top_logits=[-12.3456789] * 10, mt_top_ids=ids,
                      mt_top_logits=[-12.3456781] * 10)
    r = SimpleNamespace(prompt=Prompt(tuple(range(40))), metrics=m)
    result = SimpleNamespace(results=[r], token_text={}, text=lambda i: f"token{i}")
    out = Output()
    out.width = columns
    from rich.console import Console

    console = Console(width=columns)
    for grid, numbers in ((metrics_table(result), ("3.04e-14 (0)", "6.41e-07", "1.58e-14")),
                          (top_k_table(result, 1, r), ("-12.34568", "100000", "100009"))):
        table, width = render(grid, columns)
        with console.capture() as cap:
            console.print(table, width=width)
        text = cap.get()
        assert not re.search(r"\d…|…\d", text.replace("1,2,3,4,5,…", ""))   # the prompt's own label ends in …
        lines_fit("\n".join(ln.rstrip() for ln in text.splitlines()), columns)
        for number in numbers:
            assert number in text, number


@pytest.mark.parametrize("columns", [80, 100, 200])
@pytest.mark.parametrize("label", ["maxtext forward", "hf → maxtext"])
def test_progress_line_fits_the_terminal_with_its_numbers_whole(columns, label):
    import io

    from rich.console import Console

    outp = Output()
    outp.err = Console(file=io.StringIO(), width=columns, force_terminal=True, color_system=None)
    with outp.bytes_progress(label) as update:
        update(123_450_000, 999_990_000)
        update(999_990_000, 999_990_000)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", outp.err.file.getvalue())
    lines = [ln for ln in re.split(r"[\r\n]", text) if ln.strip()]
    assert lines and all(len(ln) <= columns for ln in lines), lines
    last = lines[-1]
    assert last.startswith(label) and "999.99 MB/999.99 MB" in last and "RSS " in last and "took " in last, last
    assert ("%" in last) == (columns >= 120)


def test_byte_sizes_never_round_up_to_1000_of_a_unit():
    from ckpt_cli.units import human_bytes

    assert human_bytes(999_999) == "1.00 MB" and human_bytes(999_994) == "999.99 KB"
    assert human_bytes(999.6) == "1.00 KB" and human_bytes(999) == "999 B" and human_bytes(0) == "0 B"


def test_piped_width_is_columns_else_120(monkeypatch):
    from ckpt_cli.cli import output

    monkeypatch.setenv("COLUMNS", "93")
    assert output.output_width() == 93
    monkeypatch.delenv("COLUMNS")
    monkeypatch.setattr(output.os, "get_terminal_size", lambda fd: (_ for _ in ()).throw(OSError()))
    assert output.output_width() == 120


# ------------------------------------------------------------------------------------------------------- models


def test_models_lists_every_name_with_its_facts():
    from ckpt_cli import registry

    r = run("models", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)["models"]
    assert [m["name"] for m in data] == list(registry.MODELS)
    q8 = next(m for m in data if m["name"] == "qwen3-8b")
    assert q8["family"] == "qwen3" and q8["repo_id"] == "Qwen/Qwen3-8B"
    assert q8["directions"] == ["hf-to-maxtext", "maxtext-to-hf"] and q8["scan_layers"] == [True, False]
    assert 8.1e9 < q8["parameters"] < 8.3e9
    human = run("models", columns=80)
    lines_fit(human.stdout, 80)
    assert "qwen3-8b" in human.stdout and "Qwen/Qwen3-8B" in human.stdout and "8.19 B" in human.stdout
    assert run("models", "--family", "nope").exit_code == 2


@pytest.mark.parametrize("name", ["qwen3-8b", "deepseek3-671b", "gemma3-4b", "gpt-oss-20b", "mixtral-8x7b"])
def test_parameter_count_equals_the_planned_tree(name):
    import math

    from ckpt_cli import registry
    from ckpt_cli.cli.models import model_record
    from ckpt_cli.inspect import open_model

    planned = sum(math.prod(leaf.shape) for leaf in open_model(name, True).leaves)
    assert model_record(name)["parameters"] == planned
    assert registry.lookup(name)


COMPLETIONS = [     # (what was typed, what TAB must offer: exactly, or at least with "+")
    ("ckpt convert hf-to-maxtext qwen3-0", ["qwen3-0.6b"]),
    ("ckpt convert hf-to-maxtext x --model llama3.1-7", ["llama3.1-70b", "llama3.1-70b-Instruct"]),
    ("ckpt convert maxtext-to-hf x --model qwen3-0", ["qwen3-0.6b"]),
    ("ckpt plan hf-to-maxtext qwen3-0", ["qwen3-0.6b"]),
    ("ckpt plan hf-to-maxtext --model qwen3-0", ["qwen3-0.6b"]),
    ("ckpt plan maxtext-to-hf --model qwen3-0", ["qwen3-0.6b"]),
    ("ckpt plan maxtext-to-hf qwen3-0", []),            # SOURCE is a checkpoint folder: the shell completes files
    ("ckpt convert hf-to-maxtext ./", []),
    ("ckpt inspect qwen3-0", ["qwen3-0.6b"]),
    ("ckpt inspect --model qwen3-0", ["qwen3-0.6b"]),
    ("ckpt inspect x --against qwen3-0", ["qwen3-0.6b"]),
    ("ckpt verify-logits --hf qwen3-0", ["qwen3-0.6b"]),
    ("ckpt models --family qwen3", sorted(f for f in FAMILIES if f.startswith("qwen3"))),
    ("ckpt convert hf-to-maxtext x --dtype ", ["bf16", "f32", "fp8"]),
    ("ckpt convert maxtext-to-hf x --dtype ", ["bf16", "f32", "fp8"]),
    ("ckpt plan hf-to-maxtext --dtype b", ["bf16"]),
    ("ckpt inspect --dtype ", ["bf16", "f32"]),
    ("ckpt verify-logits --dtype ", ["bf16", "f32"]),
    ("ckpt convert hf-to-maxtext x --compression ", ["none", "zstd"]),
    ("ckpt convert hf-to-maxtext x --load-method ", ["safetensors", "transformers"]),
    ("ckpt verify-logits --hf-load ", ["auto", "full", "stream"]),
]


@pytest.mark.parametrize("typed,offered", COMPLETIONS, ids=[t for t, _ in COMPLETIONS])
def test_tab_completes_model_names_families_and_choices(typed, offered):
    """Bash TAB through the installed `ckpt` script, as the completion script calls it (Typer's env vars)."""
    words = typed.split(" ")
    env = os.environ | {"_CKPT_COMPLETE": "complete_bash", "COMP_WORDS": typed, "COMP_CWORD": str(len(words) - 1)}
    r = subprocess.run(["ckpt"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == offered


# ------------------------------------------------------------------------------------------------------- sources


def test_unknown_source_gets_did_you_mean_and_local_paths_stay_local(tmp_path, monkeypatch):
    r = run("convert", "hf-to-maxtext", "qwen3-8", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "did you mean qwen3-8b" in r.stderr
    (tmp_path / "o").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    r = run("inspect", "o/nope")      # could still be a repo: asked, but the error says it is no local folder
    assert r.exit_code == 4 and "error: o/nope: no such folder here (o/ is one), and as a hub repo id: " in r.stderr
    r = run("inspect", "./o/nope")    # written as a path: never asked of the hub
    assert r.exit_code == 2 and r.stderr.strip() == "error: ./o/nope: no such folder"


def test_unknown_model_option_gets_the_closest_names():
    r = run("inspect", "--model", "llama3.1-8b-instruc")
    assert r.exit_code == 2
    assert r.stderr.startswith("error: unknown model 'llama3.1-8b-instruc'; did you mean llama3.1-8b-Instruct or "), \
        r.stderr
    r = run("plan", "hf-to-maxtext", "--model", "nothing-like-it")
    assert r.stderr.strip() == "error: unknown model 'nothing-like-it' (`ckpt models` lists the model names)"


def test_plan_offline_with_a_model_name_suggests_model(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    r = run("plan", "hf-to-maxtext", "qwen3-8b")
    assert r.exit_code == 4 and "ckpt plan hf-to-maxtext --model qwen3-8b" in r.stderr
    r = run("inspect", "qwen3-8b")
    assert r.exit_code == 4 and r.stderr.strip().endswith("with no data at all: ckpt inspect --model qwen3-8b")
    assert run("inspect", "--model", "qwen3-8b", "--json").exit_code == 0      # ... which works offline


def test_a_model_name_given_as_a_maxtext_checkpoint_suggests_model(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for args in (["plan", "maxtext-to-hf", "qwen3-8b"], ["convert", "maxtext-to-hf", "qwen3-8b", "--out", "hf"]):
        r = run(*args)
        assert r.exit_code == 2 and r.stderr.strip() == ("error: qwen3-8b: no such checkpoint directory (qwen3-8b is "
                                                         "a model name: give it as --model qwen3-8b)"), r.stderr


# ------------------------------------------------------------------------------------------------------- demo


def test_demo_round_trips_verifies_and_leaves_no_temp(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    r = run("demo", columns=80)
    assert r.exit_code == 0, r.output
    assert "bit-identical" in r.stdout and "PASS: max KL" in r.stdout
    assert "ckpt convert hf-to-maxtext qwen3-0.6b" in r.stdout and "ckpt verify-logits" in r.stdout
    assert list(tmp_path.glob("ckpt-demo-*")) == []
    kept = tmp_path / "kept"
    data = json.loads(run("demo", "--out", kept, "--json").stdout)
    assert data["round_trip_identical"] and data["verify"]["passed"] and len(data["next"]) == 3
    assert (kept / "maxtext" / "0" / "items").is_dir() and (kept / "hf-roundtrip" / "config.json").is_file()
    assert run("demo", "-q").stdout == ""


# ------------------------------------------------------------------------------------------------------- small wrongs


def test_plan_counts_a_tiny_model_in_millions(hf_models):
    r = run("plan", "hf-to-maxtext", hf_models("qwen3", "bfloat16"), "--read-gbps", "1", "--write-gbps", "1",
            columns=200)
    assert r.exit_code == 0, r.output
    assert "0.000 B" not in r.stdout and re.search(r"[\d,]+ \(0\.\d\d M\) parameters", r.stdout)


def test_summary_rates_use_the_progress_units():
    from ckpt_cli.cli.report import stats_rows

    rows = stats_rows(SimpleNamespace(tensors=1, tasks=2, bytes_read=78_800_000, bytes_written=1, wall_s=1.0,
                                      peak_rss=1))
    assert rows["wall"] == "1.00 s (read 78.80 MB/s)"


@pytest.mark.parametrize("size,ok", [("5", False), ("5000000", False), ("2MB", True)])
def test_shard_size_needs_a_unit(size, ok):
    import typer

    from ckpt_cli.cli.convert import shard_bytes

    if ok:
        assert shard_bytes(size) == 2_000_000
    else:
        with pytest.raises(typer.BadParameter):
            shard_bytes(size)


def test_default_workers_follow_cores_and_memory():
    from ckpt_cli.machine import RAM_PER_WORKER, default_workers

    assert default_workers(cpus=2, ram=64 * 2**30) == 2
    assert default_workers(cpus=16, ram=64 * 2**30) == 16
    assert default_workers(cpus=64, ram=256 * 2**30) == 16
    assert default_workers(cpus=16, ram=4 * RAM_PER_WORKER) == 4
    assert default_workers(cpus=16, ram=0) == 1


def test_maxtext_to_hf_keeps_an_f32_checkpoint_f32(hf_models, tmp_path):
    from ckpt_cli.io.safetensors import SafetensorsFolder

    src = hf_models("qwen3", "bfloat16")
    assert run("convert", "hf-to-maxtext", src, "--out", tmp_path / "mt", "--dtype", "f32", "-q").exit_code == 0
    r = run("convert", "maxtext-to-hf", tmp_path / "mt", "--out", tmp_path / "hf", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["dtype"] == "float32"
    assert any("the checkpoint stores f32: writing f32" in n for n in data["notes"])
    folder = SafetensorsFolder(tmp_path / "hf")
    assert {str(folder.info(n).dtype) for n in folder.tensors} == {"float32"}
    r = run("convert", "maxtext-to-hf", tmp_path / "mt", "--out", tmp_path / "hf16", "--dtype", "bf16", "--json")
    assert json.loads(r.stdout)["dtype"] == "bfloat16"


def test_tied_table_counts_twice_in_the_verify_progress_total(hf_models, tmp_path):
    from ckpt_cli.convert import ToMaxTextOptions, hf_to_maxtext
    from ckpt_cli.families import detect_family
    from ckpt_cli.io.orbax import OrbaxCheckpoint
    from ckpt_cli.verify.forward import ForwardConfig
    from ckpt_cli.verify.params import OrbaxParams
    from ckpt_cli.verify.prompts import Prompt
    from ckpt_cli.verify.run import maxtext_forward
    from tests.conftest import read_config

    src = hf_models("qwen3-tied", "float32")
    hf_to_maxtext(str(src), tmp_path / "mt", ToMaxTextOptions(dtype="f32"))
    cfg = read_config(src)
    seen = []
    params = OrbaxParams(OrbaxCheckpoint(tmp_path / "mt"), detect_family(cfg), cfg, True,
                         progress=lambda done, total: seen.append((done, total)))
    maxtext_forward(params, ForwardConfig.from_hf_config("qwen3", cfg), [Prompt((1, 2, 3))], "f32")
    assert seen[-1][0] == seen[-1][1] == params.total_bytes
    assert all(done <= total for done, total in seen)

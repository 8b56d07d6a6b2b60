"""`ckpt demo`: the main job end to end on a built-in tiny model, with no network: HF -> MaxText -> HF, the round
trip compared bit for bit, and verify-logits on the MaxText checkpoint."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from ckpt_cli.cli import options as O
from ckpt_cli.cli.errors import guarded
from ckpt_cli.cli.output import Output
from ckpt_cli.cli.report import stats_record, summary_table, tensor_table

NEXT_MODEL, NEXT_REPO = "qwen3-0.6b", "Qwen/Qwen3-0.6B"
DEMO_MAX_KL = 1e-6       # both forwards read the same bf16 weights and compute in f32


def next_commands(model: str = NEXT_MODEL, repo: str = NEXT_REPO) -> list[str]:
    """What a user runs next on a real model: price it, convert it, prove it."""
    out = f"./{model}-mt"
    return [f"ckpt plan hf-to-maxtext {model} --out {out}",
            f"ckpt convert hf-to-maxtext {model} --out {out}",
            f"ckpt verify-logits --maxtext {out} --hf {repo}"]


def round_trip_differences(a: Path, b: Path) -> list[str]:
    """Tensors of HF folder `b` that are not bit-identical to (or missing from) folder `a`."""
    from ckpt_cli.io.safetensors import SafetensorsFolder, iter_names

    fa, fb = SafetensorsFolder(a), SafetensorsFolder(b)
    names_a, names_b = set(iter_names(fa)), set(iter_names(fb))
    bad = sorted(names_a ^ names_b)
    for name in sorted(names_a & names_b):
        x, y = fa.read(name), fb.read(name)
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            bad.append(name)
    return bad

TINY, MAXTEXT, ROUND_TRIP = "hf-tiny-qwen3", "maxtext", "hf-roundtrip"


def check_demo_folder(root: Path) -> None:
    """demo --out must be new, empty, or a previous demo's folder: the demo writes nothing over anything else."""
    from ckpt_cli.errors import OutputError
    from ckpt_cli.io.outdir import LOCK_SUFFIX, check_partial, not_replaceable, output_path

    if not root.is_dir():
        return
    ours = {TINY, MAXTEXT, MAXTEXT + ".partial", MAXTEXT + LOCK_SUFFIX, ROUND_TRIP, ROUND_TRIP + ".partial",
            ROUND_TRIP + LOCK_SUFFIX}
    other = sorted(p.name for p in root.iterdir() if p.name not in ours)
    tiny = root / TINY
    if not other and (tiny.is_symlink() or tiny.exists() and not tiny.is_dir()):
        other = [TINY]
    elif not other and tiny.is_dir():
        model_files = ("config.json", "model.safetensors")
        other = [f"{TINY}/{p.name}" for p in sorted(tiny.iterdir()) if p.name not in model_files]
    if other:
        raise OutputError(f"demo --out {root} holds {other[0]}, which the demo did not write: give a new or empty "
                          f"folder")
    maxtext = output_path(root / MAXTEXT)
    why = not_replaceable(maxtext) if maxtext.is_dir() and any(maxtext.iterdir()) else None
    if why:         # the demo replaces a previous demo's checkpoint, nothing else
        raise OutputError(f"demo --out {root} holds {MAXTEXT}, which is not a checkpoint ({why}): give a new or "
                          f"empty folder")
    check_partial(maxtext)


@guarded
def demo(
    out: Annotated[str | None, typer.Option(
        "--out", "-o", metavar="DIR", help="Keep the demo's files here (default: a temporary folder, removed at "
                                          "the end).")] = None,
    show_tensors: O.ShowTensorsOpt = False,
    wide: O.WideOpt = False,
    json_out: O.JsonOpt = False,
    quiet: O.QuietOpt = False,
    help_: O.HelpOpt = False,
) -> None:
    """Make a tiny random Qwen3 model (numpy, no network), convert it HF -> MaxText -> HF, check the round trip is
    bit-identical, run verify-logits on the MaxText checkpoint, and print the commands to run on a real model.

    Examples:

      ckpt demo

      ckpt demo --out ./demo --show-tensors
    """
    from ckpt_cli import convert
    from ckpt_cli.errors import VerificationFailed
    from ckpt_cli.io.location import local_path
    from ckpt_cli.io.outdir import OutputLock, output_path
    from ckpt_cli.tiny import write_tiny_model
    from ckpt_cli.verify.run import VerifyOptions, verify_logits

    outp = Output(json_out, quiet, wide)
    local = local_path(out, "--out", "the demo writes a local folder")
    root = output_path(local) if local else Path(tempfile.mkdtemp(prefix="ckpt-demo-"))
    try:
        with OutputLock(root):
            check_demo_folder(root)
            src = write_tiny_model(root / TINY)
            mt, back = root / MAXTEXT, root / ROUND_TRIP
            opts = convert.ToMaxTextOptions(overwrite=True)     # a previous demo's checkpoint, nothing else
            with outp.bytes_progress("hf → maxtext") as progress:
                there = convert.hf_to_maxtext(str(src), mt, opts, progress=progress)
            with outp.bytes_progress("maxtext → hf") as progress:
                again = convert.maxtext_to_hf(str(mt), back, convert.ToHFOptions(overwrite=True), progress=progress)
        differ = round_trip_differences(src, back)
        check = verify_logits(VerifyOptions(maxtext=mt, hf=str(src), max_kl=DEMO_MAX_KL), note=lambda _: None)
        record = {"command": "demo", "source": str(src), "maxtext": str(mt), "round_trip": str(back),
                  "kept": out is not None, "to_maxtext": stats_record(there.stats),
                  "to_hf": stats_record(again.stats), "round_trip_identical": not differ,
                  "round_trip_differences": differ, "verify": check.record(), "next": next_commands()}
        if json_out:
            outp.emit_json(record)
        else:
            if show_tensors:
                outp.table(tensor_table(there.plan))
            where = root if out else "a temporary folder (removed; keep it with --out DIR)"
            outp.table(summary_table("demo: tiny Qwen3, HF → MaxText → HF", {
                "files": str(where),
                "hf → maxtext": f"{there.stats.tensors} tensors, {there.stats.wall_s:.2f} s → {mt.name}/0/items",
                "maxtext → hf": f"{again.stats.tensors} tensors, {again.stats.wall_s:.2f} s → {back.name}",
                "round trip": "bit-identical to the source" if not differ else f"{len(differ)} tensor(s) differ: "
                                                                              f"{', '.join(differ[:3])}",
                "verify-logits": check.verdict()}))
            outp.line("[bold]next, on a real model:[/bold]")
            for command in next_commands():
                outp.line(f"  {command}")
        if differ:
            raise VerificationFailed(f"round trip: {len(differ)} tensor(s) differ from the source: {differ[0]}")
        if not check.passed:
            raise VerificationFailed(check.verdict())
    finally:
        if out is None:
            shutil.rmtree(root, ignore_errors=True)

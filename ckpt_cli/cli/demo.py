"""`ckpt demo`: the main job end to end on a built-in tiny model, with no network."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from ckpt_cli.cli import options as O
from ckpt_cli.cli.errors import guarded
from ckpt_cli.cli.output import Output
from ckpt_cli.cli.report import stats_record, stats_rows, summary_table, tensor_table

TINY, MAXTEXT = "hf-tiny-qwen3", "maxtext"


def check_demo_folder(root: Path) -> None:
    """demo --out must be new, empty, or a previous demo's folder: the demo writes nothing over anything else."""
    from ckpt_cli.errors import OutputError
    from ckpt_cli.io.outdir import LOCK_SUFFIX, check_partial, not_replaceable, output_path

    if not root.is_dir():
        return
    ours = {TINY, MAXTEXT, MAXTEXT + ".partial", MAXTEXT + LOCK_SUFFIX}
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
    out: Annotated[str | None, typer.Option("--out", "-o", help="Where to leave the demo files (default: temp).")]
    = None,
    json_out: O.JsonOpt = False,
) -> None:
    """Make a tiny random Qwen3 model (numpy, no network), convert it to MaxText and show the result.

    Example:

      ckpt demo --out ./demo
    """
    from ckpt_cli import convert
    from ckpt_cli.io.outdir import OutputLock, output_path
    from ckpt_cli.tiny import write_tiny_model

    outp = Output(json_out, False)
    from ckpt_cli.io.location import local_path

    local = local_path(out, "--out", "the demo writes a local folder")
    root = output_path(local) if local else Path(tempfile.mkdtemp(prefix="ckpt-demo-"))
    with OutputLock(root):
        check_demo_folder(root)
        src = write_tiny_model(root / TINY)
        opts = convert.ToMaxTextOptions(overwrite=True)     # a previous demo's checkpoint, nothing else
        with outp.bytes_progress("hf → maxtext") as progress:
            result = convert.hf_to_maxtext(str(src), root / MAXTEXT, opts, progress=progress)
    if json_out:
        outp.emit_json({"command": "demo", "source": str(src), "out": str(result.out),
                        "stats": stats_record(result.stats)})
        return
    outp.table(tensor_table(result.plan))
    outp.table(summary_table("demo: tiny Qwen3 converted", {"source": str(src), "output": f"{result.out}/0/items",
                                                             **stats_rows(result.stats)}))

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


@guarded
def demo(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where to leave the demo files (default: temp).")]
    = None,
    json_out: O.JsonOpt = False,
) -> None:
    """Make a tiny random Qwen3 model (numpy, no network), convert it to MaxText and show the result.

    Example:

      ckpt demo --out ./demo
    """
    from ckpt_cli import convert
    from ckpt_cli.tiny import write_tiny_model

    outp = Output(json_out, False)
    root = Path(out) if out else Path(tempfile.mkdtemp(prefix="ckpt-demo-"))
    src = write_tiny_model(root / "hf-tiny-qwen3")
    opts = convert.ToMaxTextOptions(overwrite=True)
    with outp.bytes_progress("hf → maxtext") as progress:
        result = convert.hf_to_maxtext(str(src), root / "maxtext", opts, progress=progress)
    if json_out:
        outp.emit_json({"command": "demo", "source": str(src), "out": str(result.out),
                        "stats": stats_record(result.stats)})
        return
    outp.table(tensor_table(result.plan))
    outp.table(summary_table("demo: tiny Qwen3 converted", {"source": str(src), "output": f"{result.out}/0/items",
                                                             **stats_rows(result.stats)}))

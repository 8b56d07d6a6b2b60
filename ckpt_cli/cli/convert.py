"""`ckpt convert hf-to-maxtext` (and, beside it, the reverse direction)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from ckpt_cli.cli import options as O
from ckpt_cli.cli.errors import guarded
from ckpt_cli.cli.output import Output
from ckpt_cli.cli.report import stats_record, stats_rows, summary_table, tensor_record, tensor_table
from ckpt_cli.io.orbax import StorageOptions

app = typer.Typer(help="Convert checkpoints between Hugging Face and MaxText.", no_args_is_help=True)

LoadMethodOpt = Annotated[str, typer.Option(
    "--load-method", help="safetensors (streaming, default) or transformers (from_pretrained, whole model).")]


@app.command("hf-to-maxtext")
@guarded
def hf_to_maxtext(
    source: Annotated[str, typer.Argument(help="Local folder, HF repo id (org/name) or MaxText model name.")],
    out: O.OutOpt,
    model: O.ModelOpt = None,
    scan: O.ScanOpt = True,
    dtype: O.DtypeOpt = "bf16",
    load_method: LoadMethodOpt = "safetensors",
    revision: O.RevisionOpt = None,
    ocdbt: O.OcdbtOpt = True,
    zarr3: O.Zarr3Opt = True,
    compression: O.CompressionOpt = "none",
    workers: O.WorkersOpt = 2,
    mtp: O.MtpOpt = False,
    overwrite: O.OverwriteOpt = False,
    show_tensors: O.ShowTensorsOpt = False,
    json_out: O.JsonOpt = False,
    quiet: O.QuietOpt = False,
) -> None:
    """Convert a Hugging Face safetensors checkpoint into a MaxText (Orbax) checkpoint, streaming.

    Examples:

      ckpt convert hf-to-maxtext ./Qwen3-0.6B --out ./qwen3-0.6b-mt

      ckpt convert hf-to-maxtext qwen3-8b --out gs-mount/qwen3-8b --no-scan --dtype f32

      ckpt convert hf-to-maxtext meta-llama/Llama-3.1-8B --model llama3.1-8b --out ./l31 --json
    """
    from ckpt_cli import convert

    if compression not in ("zstd", "none"):
        raise typer.BadParameter("choose zstd or none", param_hint="--compression")
    outp = Output(json_out, quiet)
    opts = convert.ToMaxTextOptions(
        model=model, scan_layers=scan, dtype=dtype, load_method=load_method, revision=revision,
        storage=StorageOptions(use_ocdbt=ocdbt, use_zarr3=zarr3, compression=compression),
        overwrite=overwrite, workers=workers, mtp=mtp)

    def on_plan(plan, notes):
        for n in notes:
            outp.note(n)
        if show_tensors:
            outp.table(tensor_table(plan))

    with outp.bytes_progress("hf → maxtext") as progress:
        result = convert.hf_to_maxtext(source, Path(out), opts, progress=progress, on_plan=on_plan)
    plan, stats = result.plan, result.stats
    if json_out:
        outp.emit_json({
            "command": "convert", "direction": plan.direction, "source": result.source, "out": str(result.out),
            "family": plan.family, "scan_layers": plan.scan_layers, "dtype": np.dtype(plan.dtype).name,
            "notes": result.notes, "stats": stats_record(stats), "tensors": [tensor_record(t) for t in plan.tensors],
        })
        return
    rows = {"source": result.source, "output": f"{result.out}/0/items",
            "layout": f"{plan.family}, {'scanned' if plan.scan_layers else 'unscanned'}, "
                      f"{np.dtype(plan.dtype).name}", **stats_rows(stats)}
    outp.table(summary_table("converted", rows))

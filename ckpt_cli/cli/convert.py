"""`ckpt convert hf-to-maxtext` (and, beside it, the reverse direction)."""

from __future__ import annotations

from typing import Annotated

import numpy as np
import typer

from ckpt_cli.cli import options as O
from ckpt_cli.cli.errors import guarded
from ckpt_cli.cli.output import Output
from ckpt_cli.cli.report import convert_record, plan_announcer, stats_rows, summary_table
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
    max_disk: O.MaxDiskOpt = None,
    resume: O.ResumeOpt = False,
    overwrite: O.OverwriteOpt = False,
    show_tensors: O.ShowTensorsOpt = False,
    json_out: O.JsonOpt = False,
    quiet: O.QuietOpt = False,
) -> None:
    """Convert a Hugging Face safetensors checkpoint into a MaxText (Orbax) checkpoint, streaming.

    A hub repo is not downloaded first: its shards are fetched while converting, in the order read.
    --max-disk bounds the local space they take (each shard is deleted once converted).
    Interrupted (Ctrl-C, SIGTERM) after its first progress snapshot, a run keeps OUT.partial;
    the same command with --resume finishes it.

    Examples:

      ckpt convert hf-to-maxtext ./Qwen3-0.6B --out ./qwen3-0.6b-mt

      ckpt convert hf-to-maxtext qwen3-8b --out gs://bucket/qwen3-8b --no-scan --dtype f32

      ckpt convert hf-to-maxtext meta-llama/Llama-3.1-8B --model llama3.1-8b --out ./l31 --json

      ckpt convert hf-to-maxtext Qwen/Qwen3-8B --out ./q8 --max-disk 8GB
    """
    from ckpt_cli import convert
    from ckpt_cli.io.location import location, source_arg
    from ckpt_cli.units import parse_size

    source = source_arg(source, "SOURCE", what="HF folders in a bucket are not supported yet: copy it to a local "
                                                "folder or give its hub repo id")
    out_path = location(out, "--out", buckets=True)
    if compression not in ("zstd", "none"):
        raise typer.BadParameter("choose zstd or none", param_hint="--compression")
    outp = Output(json_out, quiet)
    opts = convert.ToMaxTextOptions(
        model=model, scan_layers=scan, dtype=dtype, load_method=load_method, revision=revision,
        storage=StorageOptions(use_ocdbt=ocdbt, use_zarr3=zarr3, compression=compression),
        overwrite=overwrite, workers=workers, mtp=mtp, max_disk=parse_size(max_disk) if max_disk else None,
        resume=resume)

    with outp.bytes_progress("hf → maxtext") as progress:
        result = convert.hf_to_maxtext(source, out_path, opts, progress=progress,
                                       on_plan=plan_announcer(outp, show_tensors))
    plan, stats = result.plan, result.stats
    if json_out:
        outp.emit_json(convert_record(result))
        return
    rows = {"source": result.source, "output": f"{result.out}/0/items",
            "layout": f"{plan.family}, {'scanned' if plan.scan_layers else 'unscanned'}, "
                      f"{np.dtype(plan.dtype).name}", **stats_rows(stats)}
    outp.table(summary_table("converted", rows))


ArchModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", help="MaxText model name (e.g. qwen3-8b): its reference config describes a checkpoint that "
                          "carries none; a carried or --hf-config config is checked against it.")]
HFConfigOpt = Annotated[str | None, typer.Option(
    "--hf-config", help="config.json (or a folder with one) describing the checkpoint; wins over a carried one.")]
OutDtypeOpt = Annotated[str | None, typer.Option(
    "--dtype", help="Stored dtype: bf16 or f32 (cast per slice). Default: the config's dtype, else bf16.")]
ShardSizeOpt = Annotated[str, typer.Option(
    "--shard-size", help="Most tensor bytes per safetensors shard (5GB, 500MB, 2GiB ...); one shard -> "
                         "model.safetensors.")]
TokenizerOpt = Annotated[str | None, typer.Option(
    "--tokenizer", help="Copy tokenizer files from this folder or hub repo id (default: from the carried source "
                        "folder, when it still exists).")]


@app.command("maxtext-to-hf")
@guarded
def maxtext_to_hf(
    source: Annotated[str, typer.Argument(help="MaxText checkpoint: run dir, step dir (DIR/0) or items dir "
                                               "(DIR/0/items).")],
    out: O.OutOpt,
    model: ArchModelOpt = None,
    hf_config: HFConfigOpt = None,
    dtype: OutDtypeOpt = None,
    shard_size: ShardSizeOpt = "5GB",
    tokenizer: TokenizerOpt = None,
    workers: O.WorkersOpt = 2,
    resume: O.ResumeOpt = False,
    overwrite: O.OverwriteOpt = False,
    show_tensors: O.ShowTensorsOpt = False,
    json_out: O.JsonOpt = False,
    quiet: O.QuietOpt = False,
) -> None:
    """Convert a MaxText (Orbax) checkpoint into a Hugging Face safetensors folder, streaming.

    Scanned or unscanned is read from the checkpoint.
    A checkpoint written by hf-to-maxtext carries its config.json: no other flag is needed.
    For one written by MaxText, name its architecture with --model or --hf-config.
    The output folder loads with transformers' from_pretrained.
    Interrupted (Ctrl-C, SIGTERM) after its first progress snapshot, a run keeps OUT.partial;
    the same command with --resume finishes it.

    Examples:

      ckpt convert maxtext-to-hf ./qwen3-0.6b-mt --out ./Qwen3-0.6B-roundtrip

      ckpt convert maxtext-to-hf gs://bucket/run/checkpoints/1000 --model qwen3-8b --tokenizer Qwen/Qwen3-8B --out ./q8

      ckpt convert maxtext-to-hf ./mt/0/items --hf-config ./config.json --dtype f32 --shard-size 2GB --out ./hf
    """
    from ckpt_cli import convert
    from ckpt_cli.io.location import BucketURL, local_path, location, source_arg
    from ckpt_cli.units import human_bytes, parse_size

    src = location(source, "SOURCE", buckets=True)
    source = src if isinstance(src, BucketURL) else source
    out_path = local_path(out, "--out", what="writing the HF folder into a bucket is not supported yet")
    tokenizer = source_arg(tokenizer, "--tokenizer")
    outp = Output(json_out, quiet)
    opts = convert.ToHFOptions(model=model, hf_config=local_path(hf_config, "--hf-config"), dtype=dtype,
                               shard_size=parse_size(shard_size),
                               tokenizer=tokenizer, overwrite=overwrite, workers=workers, resume=resume)

    with outp.bytes_progress("maxtext → hf") as progress:
        result = convert.maxtext_to_hf(source, out_path, opts, progress=progress,
                                       on_plan=plan_announcer(outp, show_tensors))
    plan, stats = result.plan, result.stats
    if json_out:
        outp.emit_json(convert_record(result, config_origin=result.config_origin, files=result.files))
        return
    shards = stats.extra.get("shards", 0)
    rows = {"source": result.source, "output": str(result.out),
            "layout": f"{plan.family}, {'scanned' if plan.scan_layers else 'unscanned'} source, "
                      f"{np.dtype(plan.dtype).name}",
            "architecture": "config carried in the checkpoint" if result.config_origin == "carried"
            else result.config_origin,
            "files": f"{shards} shard(s) of at most {human_bytes(opts.shard_size)}, "
                     + ", ".join(f for f in result.files if not f.endswith(".safetensors")),
            **stats_rows(stats)}
    outp.table(summary_table("converted", rows))

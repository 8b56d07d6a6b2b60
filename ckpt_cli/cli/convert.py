"""`ckpt convert hf-to-maxtext` (and, beside it, the reverse direction)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ckpt_cli.cli import options as O
from ckpt_cli.cli.errors import guarded
from ckpt_cli.cli.output import Output
from ckpt_cli.cli.report import convert_record, dtype_name, plan_announcer, stats_rows, summary_table

app = typer.Typer(help="Convert checkpoints between Hugging Face and MaxText.", no_args_is_help=True)


@app.callback()
def group(help_: O.HelpOpt = False) -> None:
    """The commands of this group (its own --help, as every command's)."""

LoadMethodOpt = Annotated[O.LoadMethodChoice, typer.Option(
    "--load-method", help="safetensors: streaming; transformers: from_pretrained, the whole model in memory.")]
SourceArg = Annotated[str, typer.Argument(
    metavar="SOURCE", autocompletion=O.complete_source,
    help="Local folder, HF repo id (org/name) or MaxText model name (`ckpt models`).")]


def resolve_workers(workers: int | None) -> int:
    """--workers, else the machine's default (cores and memory)."""
    if workers is not None:
        return workers
    from ckpt_cli.machine import default_workers

    return default_workers()


def take_up(resume: bool, restart: bool, out) -> bool:
    """Whether to take up OUT.partial: with --resume, or by default when one exists (not with --restart). The
    conversion itself resumes only a matching OUT.partial, and says so; a different one is started afresh.
    A bucket OUT (gs://, s3://) is resumed only on --resume (else its interrupted run is removed)."""
    if resume and restart:
        raise typer.BadParameter("--resume and --restart contradict each other", param_hint="--restart")
    if not isinstance(out, Path):
        return resume
    return resume or (not restart and out.with_name(out.name + ".partial").is_dir())


def shard_bytes(text: str) -> int:
    """--shard-size: a size with a unit ('5' alone would mean 5 bytes: one shard per tensor)."""
    from ckpt_cli.units import parse_size

    if text.strip() and text.strip()[-1].isdigit():
        raise typer.BadParameter(f"{text!r} has no unit: write e.g. {text.strip()}GB or {text.strip()}MB",
                                 param_hint="--shard-size")
    return parse_size(text)


@app.command("hf-to-maxtext")
@guarded
def hf_to_maxtext(
    source: SourceArg,
    out: O.OutOpt,
    model: O.ModelOpt = None,
    scan: O.ScanOpt = True,
    dtype: O.DtypeOpt = None,
    load_method: LoadMethodOpt = "safetensors",
    revision: O.RevisionOpt = None,
    ocdbt: O.OcdbtOpt = True,
    zarr3: O.Zarr3Opt = True,
    compression: O.CompressionOpt = "none",
    target_mesh: O.TargetMeshOpt = None,
    workers: O.WorkersOpt = None,
    mtp: O.MtpOpt = False,
    max_disk: O.MaxDiskOpt = None,
    allow_unused: O.AllowUnusedOpt = False,
    lora: O.LoraOpt = None,
    lora_only: O.LoraOnlyOpt = False,
    resume: O.ResumeOpt = False,
    restart: O.RestartOpt = False,
    overwrite: O.OverwriteOpt = False,
    show_tensors: O.ShowTensorsOpt = False,
    wide: O.WideOpt = False,
    json_out: O.JsonOpt = False,
    quiet: O.QuietOpt = False,
    help_: O.HelpOpt = False,
) -> None:
    """Convert a Hugging Face safetensors checkpoint into a MaxText (Orbax) checkpoint, streaming.

    --lora ADAPTER (a PEFT folder or hub repo) merges the adapter into the base weights; with --lora-only
    only the adapter's MaxText LoRA tree is written (kernel_lora_a / kernel_lora_b beside each kernel).

    A hub repo is not downloaded first: its shards are fetched while converting, in the order read.
    --max-disk bounds the local space they take (each shard is deleted once converted).
    Interrupted (Ctrl-C, SIGTERM) after its first progress snapshot, a run keeps OUT.partial;
    the same command run again finishes it (--restart starts afresh).

    Examples:

      ckpt convert hf-to-maxtext ./Qwen3-0.6B --out ./qwen3-0.6b-mt

      ckpt convert hf-to-maxtext qwen3-8b --out gs://bucket/qwen3-8b --no-scan --dtype f32

      ckpt convert hf-to-maxtext meta-llama/Llama-3.1-8B --model llama3.1-8b --out ./l31 --json

      ckpt convert hf-to-maxtext Qwen/Qwen3-8B --out ./q8 --max-disk 8GB

      ckpt convert hf-to-maxtext Qwen/Qwen3-8B --lora ./my-adapter --lora-only --out ./q8-lora
    """
    from ckpt_cli import convert
    from ckpt_cli.io.location import BucketURL, location
    from ckpt_cli.io.orbax import StorageOptions
    from ckpt_cli.units import parse_size

    src = location(source, "SOURCE", buckets=True)
    source = src if isinstance(src, BucketURL) else source      # an HF folder in gs:// or s3://: ranged reads
    out_path = location(out, "--out", buckets=True)
    if lora_only and not lora:
        raise typer.BadParameter("--lora-only needs --lora ADAPTER", param_hint="--lora-only")
    outp = Output(json_out, quiet, wide)
    opts = convert.ToMaxTextOptions(
        model=model, scan_layers=scan, dtype=dtype, load_method=load_method, revision=revision,
        storage=StorageOptions(use_ocdbt=ocdbt, use_zarr3=zarr3, compression=compression),
        target_mesh=O.target_mesh(target_mesh),
        overwrite=overwrite, workers=resolve_workers(workers), mtp=mtp,
        max_disk=parse_size(max_disk) if max_disk else None, resume=take_up(resume, restart, out_path),
        allow_unused=allow_unused, lora=lora, lora_only=lora_only)

    with outp.bytes_progress("hf → maxtext") as progress:
        result = convert.hf_to_maxtext(source, out_path, opts, progress=progress,
                                       on_plan=plan_announcer(outp, show_tensors))
    plan, stats = result.plan, result.stats
    if json_out:
        outp.emit_json(convert_record(result))
        return
    rows = {"source": result.source, "output": f"{result.out}/0/items",
            "layout": f"{plan.family}, {'scanned' if plan.scan_layers else 'unscanned'}, "
                      f"{dtype_name(plan.dtype)}", **stats_rows(stats)}
    outp.table(summary_table("converted", rows))


ArchModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", metavar="NAME", autocompletion=O.complete_model,
    help="MaxText model name (e.g. qwen3-8b): its reference config describes a checkpoint that "
         "carries none; a carried or --hf-config config is checked against it.")]
HFConfigOpt = Annotated[str | None, typer.Option(
    "--hf-config", metavar="FILE",
    help="config.json (or a folder with one) describing the checkpoint; wins over a carried one.")]
OutDtypeOpt = Annotated[O.StoreDtypeChoice | None, typer.Option(
    "--dtype", help="Stored dtype (cast per slice). Default: the checkpoint's own (else the config's, else bf16); "
                    "fp8 weights kept with their scales are written back as they are.")]
ShardSizeOpt = Annotated[str, typer.Option(
    "--shard-size", metavar="SIZE", help="Most tensor bytes per safetensors shard, with a unit (5GB, 500MB, "
                                         "2GiB ...); one shard -> model.safetensors.")]
TokenizerOpt = Annotated[str | None, typer.Option(
    "--tokenizer", metavar="SRC",
    help="Copy tokenizer files from this folder or hub repo id (default: from the carried source "
         "folder, when it still exists).")]


PushOpt = Annotated[str | None, typer.Option(
    "--push-to-hub", metavar="ORG/NAME",
    help="Then upload the --out folder to this hub model repo (created if missing) with huggingface_hub "
         "(resumable with hf_xet); token: HF_TOKEN or the stored login.")]
PrivateOpt = Annotated[bool, O.flag("--private", help="With --push-to-hub: create the repo private.")]
PushRevisionOpt = Annotated[str | None, typer.Option(
    "--revision", metavar="BRANCH", help="With --push-to-hub: push to this branch (created from main if missing).")]
MaxTextLoraOpt = Annotated[str | None, typer.Option(
    "--lora", metavar="CKPT", help="A MaxText LoRA checkpoint (kernel_lora_a / kernel_lora_b leaves) to merge into "
                                   "SOURCE: the output is the merged full model.")]


@app.command("maxtext-to-hf")
@guarded
def maxtext_to_hf(
    source: Annotated[str, typer.Argument(metavar="SOURCE", help="MaxText checkpoint: run dir, step dir (DIR/0) or "
                                                                 "items dir (DIR/0/items).")],
    out: O.OutOpt,
    model: ArchModelOpt = None,
    hf_config: HFConfigOpt = None,
    dtype: OutDtypeOpt = None,
    shard_size: ShardSizeOpt = "5GB",
    tokenizer: TokenizerOpt = None,
    lora: MaxTextLoraOpt = None,
    lora_only: O.LoraOnlyOpt = False,
    workers: O.WorkersOpt = None,
    resume: O.ResumeOpt = False,
    restart: O.RestartOpt = False,
    overwrite: O.OverwriteOpt = False,
    show_tensors: O.ShowTensorsOpt = False,
    push_to_hub: PushOpt = None,
    private: PrivateOpt = False,
    revision: PushRevisionOpt = None,
    wide: O.WideOpt = False,
    json_out: O.JsonOpt = False,
    quiet: O.QuietOpt = False,
    help_: O.HelpOpt = False,
) -> None:
    """Convert a MaxText (Orbax) checkpoint into a Hugging Face safetensors folder, streaming.

    Scanned or unscanned is read from the checkpoint.
    A checkpoint written by hf-to-maxtext carries its config.json: no other flag is needed.
    For one written by MaxText, name its architecture with --model or --hf-config.
    The output folder loads with transformers' from_pretrained.
    Interrupted (Ctrl-C, SIGTERM) after its first progress snapshot, a run keeps OUT.partial;
    the same command run again finishes it (--restart starts afresh).
    --lora-only reads SOURCE as a LoRA checkpoint and writes a PEFT adapter folder (adapter_config.json +
    adapter_model.safetensors) that peft loads on the HF base; --lora CKPT merges a LoRA checkpoint into SOURCE.

    Examples:

      ckpt convert maxtext-to-hf ./qwen3-0.6b-mt --out ./Qwen3-0.6B-roundtrip

      ckpt convert maxtext-to-hf gs://bucket/run/checkpoints/1000 --model qwen3-8b --tokenizer Qwen/Qwen3-8B --out ./q8

      ckpt convert maxtext-to-hf ./mt --out s3://bucket/hf/qwen3-8b

      ckpt convert maxtext-to-hf ./mt/0/items --hf-config ./config.json --dtype f32 --shard-size 2GB --out ./hf

      ckpt convert maxtext-to-hf ./run/checkpoints/500 --lora-only --model qwen3-8b --out ./my-adapter

      ckpt convert maxtext-to-hf ./qwen3-8b-mt --lora ./run/checkpoints/500 --out ./qwen3-8b-merged
    """
    from ckpt_cli import convert
    from ckpt_cli.io.location import BucketURL, local_path, location, source_arg
    from ckpt_cli.units import human_bytes

    src = location(source, "SOURCE", buckets=True)
    source = src if isinstance(src, BucketURL) else source
    out_path = location(out, "--out", buckets=True)
    tokenizer = source_arg(tokenizer, "--tokenizer")
    if (private or revision) and not push_to_hub:
        raise typer.BadParameter("--private and --revision go with --push-to-hub", param_hint="--push-to-hub")
    if push_to_hub:
        from ckpt_cli.io.hub_push import check_push

        if isinstance(out_path, BucketURL):
            raise typer.BadParameter("--push-to-hub uploads a local --out folder, not a bucket",
                                     param_hint="--push-to-hub")
        check_push(push_to_hub)
    if lora and lora_only:
        raise typer.BadParameter("--lora merges a LoRA checkpoint into SOURCE; --lora-only converts SOURCE, a LoRA "
                                 "checkpoint, alone: give one", param_hint="--lora-only")
    outp = Output(json_out, quiet, wide)
    opts = convert.ToHFOptions(model=model, hf_config=local_path(hf_config, "--hf-config"), dtype=dtype,
                               shard_size=shard_bytes(shard_size), tokenizer=tokenizer, overwrite=overwrite,
                               workers=resolve_workers(workers), resume=take_up(resume, restart, out_path),
                               lora=local_path(lora, "--lora", what="a LoRA checkpoint in a bucket is not "
                                               "supported yet") if lora else None, lora_only=lora_only)

    with outp.bytes_progress("maxtext → hf") as progress:
        result = convert.maxtext_to_hf(source, out_path, opts, progress=progress,
                                       on_plan=plan_announcer(outp, show_tensors))
    plan, stats = result.plan, result.stats
    pushed = None
    if push_to_hub:
        from ckpt_cli.io.hub_push import push_folder

        outp.note(f"uploading {result.out} to {push_to_hub}" + (f" (branch {revision})" if revision else ""))
        pushed = push_folder(Path(result.out), push_to_hub, private=private, revision=revision)
    if json_out:
        outp.emit_json(convert_record(result, config_origin=result.config_origin, files=result.files,
                                      **({"pushed": pushed} if pushed else {})))
        return
    shards = stats.extra.get("shards", 0)
    rows = {"source": result.source, "output": str(result.out),
            "layout": f"{plan.family}, {'scanned' if plan.scan_layers else 'unscanned'} source, "
                      f"{dtype_name(plan.dtype)}",
            "architecture": "config carried in the checkpoint" if result.config_origin == "carried"
            else result.config_origin,
            "files": f"{shards} shard(s) of at most {human_bytes(opts.shard_size)}, "
                     + ", ".join(f for f in result.files if not f.endswith(".safetensors")),
            **({"pushed": f"{pushed['repo_id']} @ {pushed['revision']}: {pushed['commit_url']}"} if pushed else {}),
            **stats_rows(stats)}
    outp.table(summary_table("converted", rows))

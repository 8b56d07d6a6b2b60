"""`ckpt plan hf-to-maxtext|maxtext-to-hf`: price the exact plan `convert` would run, from metadata only."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from ckpt_cli.cli import options as O
from ckpt_cli.cli.convert import (
    ArchModelOpt,
    HFConfigOpt,
    MaxTextLoraOpt,
    OutDtypeOpt,
    ShardSizeOpt,
    resolve_workers,
    shard_bytes,
)
from ckpt_cli.cli.errors import guarded
from ckpt_cli.cli.output import Output
from ckpt_cli.cli.report import dtype_name, human_params, summary_table
from ckpt_cli.cli.tables import Col, Grid
from ckpt_cli.io.outdir import preflight, read_paths
from ckpt_cli.units import human_bytes

app = typer.Typer(help="Price a conversion (RAM, disk, bytes, time) from metadata only, with a go / no-go.",
                  no_args_is_help=True)



@app.callback()
def group(help_: O.HelpOpt = False) -> None:
    """The commands of this group (its own --help, as every command's)."""


PlanOutOpt = Annotated[str | None, typer.Option(
    "--out", "-o", metavar="DIR",
    help="Where the output would go: its disk is checked and probed (default: the current "
         "directory).")]
ReadGbpsOpt = Annotated[float | None, typer.Option(
    "--read-gbps", min=0.001, metavar="GBPS", help="Source read rate in GB/s (default: a short probe of the source).")]
WriteGbpsOpt = Annotated[float | None, typer.Option(
    "--write-gbps", min=0.001, metavar="GBPS",
    help="Durable output write rate in GB/s (default: a 64 MB probe beside --out).")]
NetGbpsOpt = Annotated[float | None, typer.Option(
    "--net-gbps", min=0.001, metavar="GBPS",
    help="Download rate in GB/s, to include the download in the time estimate.")]
PlanSourceArg = Annotated[str | None, typer.Argument(
    metavar="SOURCE", autocompletion=O.complete_source,
    help="What convert would read; leave it out and give --model NAME to price a registered model with no data.")]


@app.command("hf-to-maxtext")
@guarded
def plan_hf_to_maxtext(
    source: PlanSourceArg = None,
    out: PlanOutOpt = None,
    model: O.ModelOpt = None,
    scan: O.ScanOpt = True,
    dtype: O.DtypeOpt = None,
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
    overwrite: O.OverwriteOpt = False,
    read_gbps: ReadGbpsOpt = None,
    write_gbps: WriteGbpsOpt = None,
    net_gbps: NetGbpsOpt = None,
    wide: O.WideOpt = False,
    json_out: O.JsonOpt = False,
    quiet: O.QuietOpt = False,
    help_: O.HelpOpt = False,
) -> None:
    """Price `convert hf-to-maxtext` with the same flags, from metadata only; exit 1 on no-go.

    Peak RSS, output and temporary disk, bytes to download, read and write, estimated time,
    the tensors that drive memory, and go / no-go against this machine's free RAM and disk.
    Reads only config.json and the safetensors headers (by range requests for a hub repo).

    Examples:

      ckpt plan hf-to-maxtext ./Qwen3-0.6B --out ./qwen3-mt

      ckpt plan hf-to-maxtext Qwen/Qwen3-8B --max-disk 10GB --json

      ckpt plan hf-to-maxtext --model llama3.1-70b --no-scan --write-gbps 0.4

      ckpt plan hf-to-maxtext Qwen/Qwen3-8B --lora ./my-adapter --lora-only --json
    """
    from ckpt_cli import convert, pricing, registry
    from ckpt_cli.errors import RemoteError
    from ckpt_cli.io.location import BucketURL, location, source_arg
    from ckpt_cli.io.orbax import StorageOptions
    from ckpt_cli.units import parse_size

    where = location(source, "SOURCE", buckets=True) if source is not None else None
    bucket_source = isinstance(where, BucketURL)     # an HF folder in gs:// or s3://: read in place
    source = where if bucket_source else source_arg(source, "SOURCE")
    out = location(out, "--out", buckets=True) if out is not None else None
    workers = resolve_workers(workers)
    opts = convert.ToMaxTextOptions(
        model=model, scan_layers=scan, dtype=dtype, revision=revision,
        storage=StorageOptions(use_ocdbt=ocdbt, use_zarr3=zarr3, compression=compression),
        target_mesh=O.target_mesh(target_mesh),
        overwrite=overwrite, workers=workers, mtp=mtp, max_disk=parse_size(max_disk) if max_disk else None,
        allow_unused=allow_unused, lora=lora, lora_only=lora_only)
    if lora_only and not lora:
        raise typer.BadParameter("--lora-only needs --lora ADAPTER", param_hint="--lora-only")
    if lora and source is None:
        raise typer.BadParameter("--lora needs a SOURCE (the base model the adapter was trained on)",
                                 param_hint="--lora")
    try:
        plan, src, notes = pricing.plan_hf_to_maxtext(source, opts)
    except RemoteError as exc:
        if source and model is None and registry.is_model_name(source):
            raise RemoteError(f"{exc}; to price {source} with no data at all: ckpt plan hf-to-maxtext --model "
                              f"{source}") from None
        raise
    if compression == "zstd":
        notes.append("zstd: output bytes are the uncompressed upper bound (bf16 weights shrink ~10%)")
    reads = read_paths(Path(source)) if source and not bucket_source else []
    _price_and_show(plan, src, notes, out, workers, overwrite, read_gbps, write_gbps, net_gbps,
                    Output(json_out, quiet, wide), reads)


PlanCheckpointArg = Annotated[str | None, typer.Argument(
    metavar="SOURCE", help="The MaxText checkpoint convert would read (run, step or items dir); leave it out and give "
                           "--model NAME to price a registered model with no data.")]


@app.command("maxtext-to-hf")
@guarded
def plan_maxtext_to_hf(
    source: PlanCheckpointArg = None,
    out: PlanOutOpt = None,
    model: ArchModelOpt = None,
    hf_config: HFConfigOpt = None,
    dtype: OutDtypeOpt = None,
    shard_size: ShardSizeOpt = "5GB",
    scan: Annotated[bool, O.flag("--scan/--no-scan", help="With --model and no SOURCE: price a scanned or "
                                 "unscanned checkpoint (a SOURCE's own layout is read from it).")] = True,
    workers: O.WorkersOpt = None,
    lora: MaxTextLoraOpt = None,
    lora_only: O.LoraOnlyOpt = False,
    overwrite: O.OverwriteOpt = False,
    read_gbps: ReadGbpsOpt = None,
    write_gbps: WriteGbpsOpt = None,
    wide: O.WideOpt = False,
    json_out: O.JsonOpt = False,
    quiet: O.QuietOpt = False,
    help_: O.HelpOpt = False,
) -> None:
    """Price `convert maxtext-to-hf` with the same flags, from the checkpoint's metadata only; exit 1 on no-go.

    Examples:

      ckpt plan maxtext-to-hf ./qwen3-0.6b-mt --out ./Qwen3-0.6B-roundtrip

      ckpt plan maxtext-to-hf --model qwen3-32b --json
    """
    from ckpt_cli import convert, pricing
    from ckpt_cli.io.location import is_url, local_path, location

    remote = is_url(source)     # a gs:// or s3:// checkpoint (others refused by pricing)
    out = location(out, "--out", buckets=True) if out is not None else None
    hf_config = local_path(hf_config, "--hf-config")
    workers = resolve_workers(workers)
    if (lora or lora_only) and source is None:
        raise typer.BadParameter("--lora / --lora-only need a SOURCE checkpoint", param_hint="--lora")
    if lora and lora_only:
        raise typer.BadParameter("give --lora or --lora-only, not both", param_hint="--lora-only")
    opts = convert.ToHFOptions(model=model, hf_config=hf_config, dtype=dtype, shard_size=shard_bytes(shard_size),
                               overwrite=overwrite, workers=workers, lora=local_path(lora, "--lora"),
                               lora_only=lora_only)
    plan, src, notes = pricing.plan_maxtext_to_hf(source, opts, scan)
    reads = []
    if source and not remote:
        from ckpt_cli.io.orbax import find_items_dir

        reads = [Path(source), find_items_dir(Path(source)), *([hf_config] if hf_config else [])]
    _price_and_show(plan, src, notes, out, workers, overwrite, read_gbps, write_gbps, None,
                    Output(json_out, quiet, wide), reads)


def _price_and_show(plan, src, notes: list[str], out: Path | None, workers: int, overwrite: bool,
                    read_gbps: float | None, write_gbps: float | None, net_gbps: float | None,
                    outp: Output, reads: list[Path]) -> None:
    from ckpt_cli import pricing
    from ckpt_cli.io.location import BucketURL
    from ckpt_cli.io.remote_stream import tree_bytes
    from ckpt_cli.machine import probe_rates, this_machine

    writer = "orbax" if plan.direction == "hf-to-maxtext" else "safetensors"
    if isinstance(out, BucketURL):          # a bucket destination: its own checks, its write rate probed
        from ckpt_cli.io import bucket
        from ckpt_cli.io.location import is_url, location

        sources = [location(src.label, "SOURCE", buckets=True)] if is_url(src.label) else []
        refusals = bucket.preflight(out, overwrite, sources)
        bucket_gbps = write_gbps or (bucket.probe_write_gbps(out, writer) if not refusals else None)
        rates = probe_rates(src.probe_file, None, writer, workers, read_gbps, bucket_gbps or 1.0, net_gbps)
        rates.basis["write"] = "flag" if write_gbps else "bucket probe" if bucket_gbps else "assumed"
        figures = pricing.price(plan, src, rates, this_machine(None), writer, 0, workers, refusals,
                                output_local=False)
    else:
        refusals = preflight(out, overwrite, reads) if out is not None else []     # what convert refuses up front
        replaced = tree_bytes(out) if out is not None and out.is_dir() and overwrite and not refusals else 0
        rates = probe_rates(src.probe_file, out, writer, workers, read_gbps, write_gbps, net_gbps)
        figures = pricing.price(plan, src, rates, this_machine(out), writer, replaced, workers, refusals)
    record = {"command": "plan", "direction": plan.direction, "source": src.label, "source_kind": src.kind,
              "out": str(out) if out else None, "family": plan.family, "scan_layers": plan.scan_layers,
              "dtype": dtype_name(plan.dtype), "tensors": len(plan.tensors),
              "tasks": sum(len(t.tasks) for t in plan.tensors),
              "parameters": sum(math.prod(t.shape) for t in plan.tensors),
              **figures, "notes": notes}
    if outp.json_mode:
        outp.emit_json(record)
    else:
        for note in notes:
            outp.note(note)
        outp.table(summary_table(f"plan: {plan.direction} {src.label}", _rows(record)))
        outp.table(_largest_table(record["largest_tensors"]))
        outp.line(("[bold green]" if record["go"] else "[bold red]") + record["verdict"])
    if not record["go"]:
        raise typer.Exit(1)


def _rows(r: dict) -> dict[str, str]:
    b, m, t = r["bytes"], r["memory"], r["time"]
    rows = {"layout": f"{r['family']}, {'scanned' if r['scan_layers'] else 'unscanned'}, {r['dtype']}: "
                      f"{r['tensors']} tensors in {r['tasks']} slices, {human_params(r['parameters'])} parameters",
            "peak RSS": f"{human_bytes(m['peak_rss'])}  (baseline {human_bytes(m['baseline'])} + engine window "
                        f"{human_bytes(m['engine_window'])} of a {human_bytes(m['engine_budget'])} budget + writer "
                        f"{human_bytes(m['writer'])})",
            "output on disk": human_bytes(b["output_on_disk"]),
            "temporary disk": human_bytes(b["temporary_disk"])}
    if b["download"]:
        rows["download"] = human_bytes(b["download"]) + (
            f" (kept in the hub cache: {human_bytes(b['hub_cache'])})" if b["hub_cache"] else "")
    rows["read / written"] = f"{human_bytes(b['read'])} / {human_bytes(b['written'])}"
    rates = r["rates"]
    rows["time"] = (f"~{t['estimate_s']:.0f} s, mostly {t['bound_by']} (read {rates['read_gbps']:.2f}, write "
                    f"{rates['write_gbps']:.2f}, transform {rates['cpu_gbps']:.2f} GB/s; "
                    + ", ".join(f"{k} {v}" for k, v in rates["basis"].items()) + ")"
                    + ("; download not included (give --net-gbps)" if t["excludes_download"] else ""))
    mach = r["machine"]
    rows["this machine"] = (f"{human_bytes(mach['available_ram'])} RAM available, {human_bytes(mach['free_disk'])} "
                            f"free at {mach['disk_path']}, {mach['cpus']} CPUs")
    return rows


def _largest_table(rows: list[dict]) -> Grid:
    table = Grid([Col("tensor", wrap=True), Col("slice", right=True), Col("slices", right=True, drop=1),
                  Col("tensor bytes", right=True, drop=2)], title="largest slices (what drives memory)")
    for x in rows:
        table.add_row(x["tensor"], f"{tuple(x['slice_shape'])} {human_bytes(x['slice_bytes'])}",
                      str(x["slices"]) + (" (row pieces)" if x["row_pieces"] else ""), human_bytes(x["bytes"]))
    return table

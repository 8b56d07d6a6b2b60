"""`ckpt inspect`: what a checkpoint holds (metadata only), or how it differs from another / from a model."""

from __future__ import annotations

from typing import Annotated

import typer

from ckpt_cli.cli import options as O
from ckpt_cli.cli.errors import guarded
from ckpt_cli.cli.output import Output
from ckpt_cli.cli.report import human_params, summary_table
from ckpt_cli.cli.tables import Col, Grid
from ckpt_cli.units import human_bytes

TensorsOpt = Annotated[bool | None, O.flag(
    "--tensors/--summary", help="List every tensor, or only the summary. Default: summary for people, tensors "
                                "in --json.")]
FilterOpt = Annotated[str | None, typer.Option(
    "--filter", metavar="GLOB",
    help="Only tensors / paths matching this glob (e.g. '*mlp*'); totals and comparisons follow it.")]
AgainstOpt = Annotated[str | None, typer.Option(
    "--against", metavar="TARGET", autocompletion=O.complete_source,
    help="Compare with another target (folder, repo id, Orbax dir) in MaxText path space; "
         "exit 1 if they differ.")]
InspectModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", metavar="NAME", autocompletion=O.complete_model,
    help="MaxText model name: alone, show the tree MaxText expects for it; with a TARGET, "
         "compare the target against that tree.")]
InspectScanOpt = Annotated[bool | None, O.flag(
    "--scan/--no-scan", help="Layout of the MaxText side built from a config (default: the Orbax side's, "
                             "else scanned).")]
InspectDtypeOpt = Annotated[O.DtypeChoice | None, typer.Option(
    "--dtype", help="dtype of a MaxText tree built from a config (default bf16, what convert writes).")]
MeshOpt = Annotated[str | None, typer.Option(
    "--mesh", metavar="MESH",
    help="MaxText mesh to restore on, e.g. fsdp=16 or fsdp=64,tensor=4 (Orbax or model target): show the bytes each "
         "host reads over the bytes its devices hold, from the chunk shapes.")]
HostsOpt = Annotated[int | None, typer.Option(
    "--hosts", min=1, metavar="N",
    help="Hosts the --mesh devices are spread over, consecutive devices per host (default: one host per 4 devices).")]


@guarded
def inspect(
    target: Annotated[str | None, typer.Argument(
        metavar="TARGET", autocompletion=O.complete_source,
        help="HF folder or .safetensors file, hub repo id (org/name) or model name (its repo), or a MaxText/"
             "Orbax checkpoint (run, step or items dir).")] = None,
    model: InspectModelOpt = None,
    against: AgainstOpt = None,
    scan: InspectScanOpt = None,
    dtype: InspectDtypeOpt = None,
    tensors: TensorsOpt = None,
    filter_glob: FilterOpt = None,
    revision: O.RevisionOpt = None,
    mesh: MeshOpt = None,
    hosts: HostsOpt = None,
    target_mesh: O.TargetMeshOpt = None,
    wide: O.WideOpt = False,
    json_out: O.JsonOpt = False,
    quiet: O.QuietOpt = False,
    help_: O.HelpOpt = False,
) -> None:
    """Show a checkpoint's tensors, shapes, dtypes and totals from metadata only (no tensor data is read).

    A hub repo is read by range requests on its safetensors headers (a few KB per shard).
    An Orbax checkpoint shows its tree with chunk shapes (write chunk, and the read chunk inside it),
    scan_layers and what ckpt recorded in it; --mesh adds the read amplification per host on that mesh.
    With --against (or --model and a TARGET), both sides are mapped to MaxText paths and compared:
    missing, extra and mis-shaped tensors, as MaxText's restore sees them (exit 1 if any).

    Examples:

      ckpt inspect ./Qwen3-0.6B --tensors

      ckpt inspect Qwen/Qwen3-8B --json

      ckpt inspect --model qwen3-8b --no-scan --filter 'decoder/layers_0/*'

      ckpt inspect ./qwen3-mt --model qwen3-0.6b

      ckpt inspect ./Qwen3-0.6B --against ./qwen3-mt/0/items

      ckpt inspect ./qwen3-mt --mesh fsdp=64,tensor=4 --hosts 16

      ckpt inspect --model deepseek3-671b --target-mesh fsdp=256 --mesh fsdp=256 --hosts 64
    """
    from ckpt_cli import inspect as I
    from ckpt_cli.io.location import source_arg

    against = source_arg(against, "--against")      # TARGET may be gs:// or s3:// (inspect.open_target)
    out = Output(json_out, quiet, wide)
    if target is not None and (against or model):
        if against and model:
            raise typer.BadParameter("compare with either --against TARGET or --model NAME, not both",
                                     param_hint="--against")
        a = I.open_target(target, revision=revision, dtype=dtype)
        if against:
            b = I.open_target(against, revision=revision, dtype=dtype)
        else:
            b = I.open_model(model, next(s for s in (scan, a.scan_layers, True) if s is not None), dtype)
        result = I.compare(a, b, scan, dtype, filter_glob)
        if json_out:
            out.emit_json(result)
        else:
            _show_comparison(out, result)
        if not result["identical"]:
            raise typer.Exit(1)
        return
    if against:
        raise typer.BadParameter("--against needs a TARGET to compare", param_hint="--against")
    if target_mesh is not None and (target is not None or model is None):
        raise typer.BadParameter("--target-mesh applies to --model's tree alone", param_hint="--target-mesh")
    t = _open_or_suggest_model(target, model=model, revision=revision, scan=scan, dtype=dtype,
                               mesh=O.target_mesh(target_mesh))
    record = I.report(t, json_out if tensors is None else tensors, filter_glob)
    if mesh is not None:
        from ckpt_cli.plan import TargetMesh

        try:
            ways = TargetMesh.parse(mesh)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--mesh") from None
        if t.kind not in ("orbax", "maxtext-model"):
            raise typer.BadParameter("--mesh needs an Orbax checkpoint or --model", param_hint="--mesh")
        record["read_amplification"] = I.read_amplification(t, mesh, hosts or max(1, ways.fsdp * ways.tensor // 4))
    if json_out:
        out.emit_json(record)
        return
    for note in record["notes"]:
        out.note(note)
    out.table(summary_table(_title(record), _rows(record, filter_glob)))
    if record["tensors"]:
        out.table(_tensor_table(record))
    if "read_amplification" in record:
        out.table(_amplification_table(record["read_amplification"]))


def _amplification_table(amp: dict) -> Grid:
    """Bytes read per host over bytes its devices hold, then the tensors read most over their size."""
    table = Grid([Col("what", wrap=True), Col("bytes read / bytes held", right=True)],
                 title=f"restore on {amp['mesh']}: {amp['hosts']} host(s) x {amp['devices_per_host']} device(s)"
                 + ("" if amp["roles_known"] else " (no config: every tensor taken as replicated)"))
    hosts = amp["per_host"]
    table.add_row("total (all hosts / array bytes)", f"{amp['total']:.3f}")
    table.add_row("per host: min / max", f"{min(hosts):.3f} / {max(hosts):.3f}")
    worst = sorted(amp["tensors"].items(), key=lambda kv: -kv[1])[:5]
    for path, ratio in worst:
        table.add_row(f"  {path} (all hosts / its bytes)", f"{ratio:.3f}")
    return table


def _title(r: dict) -> str:
    kind = {"hf": "Hugging Face checkpoint", "hf-remote": "Hugging Face repo (headers only)",
            "hf-bucket": "Hugging Face folder in a bucket (headers only)",
            "orbax": "MaxText / Orbax checkpoint", "maxtext-model": "the tree MaxText expects"}[r["kind"]]
    return f"{r['target']}: {kind}"


def _rows(r: dict, pattern: str | None) -> dict[str, str]:
    tot = r["totals"]
    rows: dict[str, str] = {}
    if r["family"]:
        rows["family"] = r["family"] + (f"  (MaxText: {', '.join(r['maxtext_models'])})" if r["maxtext_models"]
                                        else "  (no registered MaxText model matches this config)")
    if r["kind"] in ("hf", "hf-remote", "hf-bucket"):
        if r["config"]:
            rows["config"] = _config_line(r["config"])
        src = r["source"]
        if src["repo_id"]:
            rows["repo"] = f"{src['repo_id']} @ {src['revision'] or 'main'} (commit {src['commit'][:12]})"
        rows["shards"] = str(len(r["shards"]))
    elif r["kind"] == "orbax":
        prov = r["provenance"]
        rows["items"] = r["items_dir"]
        rows["scan_layers"] = str(r["scan_layers"]).lower() if r["scan_layers"] is not None else "unknown"
        rows["storage"] = ("OCDBT" if r["storage"]["use_ocdbt"] else "one dir per array") + ", " + (
            "zarr3" if r["storage"]["use_zarr3"] else "zarr v2")
        if prov:
            rows["written by"] = (f"ckpt {prov.get('version', '?')} from {prov.get('source', '?')} "
                                  f"({prov.get('dtype', '?')}, {prov.get('created', '?')})")
        if r["disk_bytes"] is not None:         # None: in a bucket
            rows["on disk"] = human_bytes(r["disk_bytes"])
    else:
        rows["repo"] = r["repo_id"]
        rows["layout"] = f"{'scanned' if r['scan_layers'] else 'unscanned'}, {r['dtype']}"
    if r.get("lora"):
        rows["LoRA"] = _lora_line(r["lora"])
    label = f" matching {pattern}" if pattern else ""
    rows["tensors"] = f"{tot['tensors']}{label}"
    rows["parameters"] = human_params(tot["parameters"])
    rows["bytes"] = f"{human_bytes(tot['bytes'])}  " + ", ".join(
        f"{d}: {v['tensors']} tensors, {human_bytes(v['bytes'])}" for d, v in tot["by_dtype"].items())
    if r.get("fetched"):
        f = r["fetched"]
        rows["fetched"] = (f"{human_bytes(f['bytes'])} in {f['requests']} request(s): config, index and headers, "
                           f"no tensor data")
    return rows


def _lora_line(lora: dict) -> str:
    """rank, alpha, scale, the modules adapted, tensors and bytes of an adapter (PEFT or MaxText)."""
    alpha = "?" if lora["lora_alpha"] is None else f"{lora['lora_alpha']:g}"
    scale = "?" if lora["scale"] is None else f"{lora['scale']:g}"
    rs = ", rsLoRA" if lora.get("use_rslora") else ""
    return (f"r {lora['r']}, alpha {alpha} (scale {scale}{rs}) on {', '.join(lora['modules'])}: "
            f"{lora['tensors']} tensors, {human_bytes(lora['bytes'])}")


def _config_line(c: dict) -> str:
    parts = [str(c["model_type"]), f"hidden {c['hidden_size']}", f"layers {c['num_hidden_layers']}",
             f"heads {c['num_attention_heads']}/{c['num_key_value_heads']} (head_dim {c['head_dim'] or '-'})",
             f"mlp {c['intermediate_size']}", f"vocab {c['vocab_size']}"]
    if c.get("experts"):
        parts.append(f"{c['experts']} experts")
    parts.append("tied embeddings" if c.get("tie_word_embeddings") else "untied head")
    if c.get("torch_dtype"):
        parts.append(str(c["torch_dtype"]))
    return ", ".join(parts)


def _tensor_table(r: dict) -> Grid:
    hf = r["kind"] in ("hf", "hf-remote", "hf-bucket")
    table = Grid([Col("HF tensor" if hf else "MaxText path", wrap=True), Col("shape"), Col("dtype", drop=2),
                  Col("bytes", right=True), Col("shard" if hf else "chunk shape", drop=1)],
                 title=f"{len(r['tensors'])} tensors")
    for t in r["tensors"]:
        table.add_row(t.get("name") or t["path"], str(tuple(t["shape"])), t["dtype"], human_bytes(t["bytes"]),
                      t["shard"] if hf else _chunks(t))
    return table


def _open_or_suggest_model(target: str | None, **kw):
    """open_target; a model name whose repo cannot be reached says how to see its MaxText tree with no data."""
    from ckpt_cli import registry
    from ckpt_cli.errors import RemoteError
    from ckpt_cli.inspect import open_target

    try:
        return open_target(target, **kw)
    except RemoteError as exc:
        if target and kw.get("model") is None and registry.is_model_name(target):
            raise RemoteError(f"{exc}; to see the tree MaxText expects for {target} with no data at all: "
                              f"ckpt inspect --model {target}") from None
        raise


def _show_comparison(out: Output, r: dict) -> None:
    c = r["counts"]
    for note in r["notes"]:
        out.note(note)
    verdict = "same structure (names and shapes; no tensor data compared)" if r["identical"] else "DIFFERENT"
    out.table(summary_table(f"{r['a']['target']} against {r['b']['target']}: {verdict}", {
        "A": f"{r['a']['target']} ({r['a']['kind']})", "B": f"{r['b']['target']} ({r['b']['kind']})",
        "layout": "scanned" if r["scan_layers"] else "unscanned",
        "matched": f"{c['matched']}/{c['b']} of B's paths present in A with the same shape",
        "differences": f"{c['missing']} missing from A, {c['extra']} extra in A, {c['mismatched']} mis-shaped"
                       + (f", {c['dtype_differs']} dtype only" if c["dtype_differs"] else ""),
    }))
    if r["missing"] or r["extra"] or r["mismatched"]:
        table = Grid([Col(""), Col("MaxText path", wrap=True), Col("A"), Col("B"), Col("why", wrap=True, drop=1)])
        for m in r["missing"]:
            table.add_row("missing", m["path"], "-", _shp(m["shape"]), m["reason"] or "")
        for m in r["extra"]:
            table.add_row("extra", m["path"], _shp(m["shape"]), "-", "")
        for m in r["mismatched"]:
            table.add_row("shape", m["path"], _shp(m["shape_a"]), _shp(m["shape_b"]), m["reason"] or "")
        out.table(table)
    if r["unmapped"]:
        out.note(f"{len(r['unmapped'])} HF tensor(s) of A map to no MaxText path: {', '.join(r['unmapped'][:4])}"
                 + (" ..." if len(r["unmapped"]) > 4 else ""))


def _shp(shape: list[int] | None) -> str:
    return "?" if shape is None else str(tuple(shape))


def _chunks(t: dict) -> str:
    chunk, read = tuple(t["chunk_shape"]), tuple(t.get("read_chunk") or t["chunk_shape"])
    return str(chunk) if read == chunk else f"{chunk} read {read}"

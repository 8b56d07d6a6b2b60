"""Options shared by several commands, declared once so every command spells and documents them alike.

Help shows a metavar for every value (`DIR`, `NAME`, `SIZE` ...) and none for flags; options with a fixed set of
values are `Literal`s, so help lists them, TAB completes them and a wrong one gets Typer's one usage error.
Nothing heavy is imported here: `ckpt --help` and TAB completion must stay instant.
"""

from __future__ import annotations

from typing import Annotated, Literal

import typer

DtypeChoice = Literal["bf16", "f32"]
StoreDtypeChoice = Literal["bf16", "f32", "fp8"]   # fp8: an fp8 source's block-scaled weights kept, with their scales
CompressionChoice = Literal["none", "zstd"]
LoadMethodChoice = Literal["safetensors", "transformers"]
HFLoadChoice = Literal["auto", "full", "stream"]


def complete_model(incomplete: str) -> list[str]:
    """Registered MaxText model names starting with what was typed (none for path-like text: files then)."""
    from ckpt_cli.registry import MODELS

    if incomplete.startswith((".", "/", "~")):
        return []
    return [name for name in MODELS if name.lower().startswith(incomplete.lower())]


def complete_family(incomplete: str) -> list[str]:
    """The families of the registered model names, starting with what was typed."""
    from ckpt_cli.registry import MODELS

    return sorted({spec.family for spec in MODELS.values() if spec.family.startswith(incomplete.lower())})


def complete_source(incomplete: str) -> list[str]:
    """SOURCE: model names once a letter is typed; an empty word or a path completes as files (the shell's)."""
    return complete_model(incomplete) if incomplete else []


def flag(*names: str, help: str) -> typer.models.OptionInfo:  # noqa: A002 (typer's own keyword)
    """A boolean option shown with no `<bool>` type in help."""
    return typer.Option(*names, metavar="", help=help)


def _show_help(ctx: typer.Context, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        typer.echo(ctx.get_help(), nl=False)
        raise typer.Exit()


# Every command declares its own --help (Typer's built-in one shows a `<bool>` type); put it last.
HelpOpt = Annotated[bool, typer.Option("--help", "-h", metavar="", is_eager=True, expose_value=False,
                                       callback=_show_help, help="Show this message and exit.")]
OutOpt = Annotated[str, typer.Option("--out", "-o", metavar="DIR",
                                     help="Output directory (published atomically when done).")]
ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", metavar="NAME", autocompletion=complete_model,
    help="MaxText model name (e.g. qwen3-8b, llama3.1-8b; see `ckpt models`): check the config against it.")]
ScanOpt = Annotated[bool, flag(
    "--scan/--no-scan", help="Scanned layout (layers stacked on axis 1, MaxText's default) or layers_<i>.")]
DtypeOpt = Annotated[StoreDtypeChoice | None, typer.Option(
    "--dtype", help="Stored dtype (cast per slice; default bf16, fp8 for a -fp8 model name); fp8: keep an fp8 "
                    "source's e4m3 weights and block scales as MaxText's -fp8 models store them, the rest bf16.")]
RevisionOpt = Annotated[str | None, typer.Option("--revision", metavar="REV",
                                                 help="Hub revision (branch, tag or commit).")]
JsonOpt = Annotated[bool, flag("--json", help="Print the result as JSON on stdout (no progress, no ANSI).")]
QuietOpt = Annotated[bool, flag("--quiet", "-q", help="Print nothing but errors.")]
ShowTensorsOpt = Annotated[bool, flag("--show-tensors", help="Print the per-tensor table.")]
WideOpt = Annotated[bool, flag("--wide", help="Tables keep every column, whatever the terminal's width.")]
OverwriteOpt = Annotated[bool, flag("--overwrite", help="Replace a non-empty output directory.")]
ResumeOpt = Annotated[bool, flag(
    "--resume", help="Finish an interrupted run of the same conversion from what it left in OUT.partial (its "
                     "progress is saved every GB). The default when OUT.partial matches this conversion.")]
RestartOpt = Annotated[bool, flag(
    "--restart", help="Start afresh: remove a matching OUT.partial instead of resuming from it.")]
OcdbtOpt = Annotated[bool, flag("--ocdbt/--no-ocdbt", help="Store arrays in one OCDBT key-value store.")]
Zarr3Opt = Annotated[bool, flag("--zarr3/--no-zarr3", help="zarr v3 arrays (else zarr v2).")]
CompressionOpt = Annotated[CompressionChoice, typer.Option("--compression", help="Chunk compression.")]
WorkersOpt = Annotated[int | None, typer.Option(
    "--workers", min=1, max=64, metavar="N",
    help="Reader/transform threads. Default: one per CPU core, at most 16, and one per 512 MiB of available "
         "memory.")]

TargetMeshOpt = Annotated[str | None, typer.Option(
    "--target-mesh", metavar="MESH",
    help="MaxText mesh the checkpoint will be restored on, e.g. fsdp=256 or fsdp=64,tensor=4: read chunks are cut "
         "so each host reads about its slice (default: up to 16 hosts per axis).")]


def target_mesh(text: str | None):
    """--target-mesh parsed (None: the default read chunks); a bad spec is a usage error."""
    if text is None:
        return None
    from ckpt_cli.plan import TargetMesh

    try:
        return TargetMesh.parse(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--target-mesh") from None


MtpOpt = Annotated[bool, flag(
    "--mtp", help="DeepSeek-V3/V3.2: also convert the multi-token-prediction layer (MaxText mtp_block).")]
MaxDiskOpt = Annotated[str | None, typer.Option(
    "--max-disk", metavar="SIZE",
    help="Hub repos: most local disk the downloaded shards may take at once (e.g. 20GB). Shards then go to a "
         "private directory beside --out and each is deleted once converted; default: the hub cache, kept for "
         "the next run.")]
AllowUnusedOpt = Annotated[bool, flag(
    "--allow-unused", help="Convert although config.json declares fewer decoder layers than the files hold (the "
                           "extra layers are dropped); without it that is refused as a mismatched config.")]
LoraOpt = Annotated[str | None, typer.Option(
    "--lora", metavar="ADAPTER",
    help="A LoRA adapter: merged into the base (W + scale·B·A), or alone with --lora-only.")]
LoraOnlyOpt = Annotated[bool, flag("--lora-only", help="Write the LoRA adapter alone (needs --lora, or for "
                                                       "maxtext-to-hf a LoRA checkpoint as SOURCE).")]

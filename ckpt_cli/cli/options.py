"""Options shared by several commands, declared once so every command spells and documents them alike."""

from __future__ import annotations

from typing import Annotated

import typer

OutOpt = Annotated[str, typer.Option("--out", "-o", help="Output directory (published atomically when done).")]
ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", help="MaxText model name (e.g. qwen3-8b, llama3.1-8b): check the config against it.")]
ScanOpt = Annotated[bool, typer.Option(
    "--scan/--no-scan", help="Scanned layout (layers stacked on axis 1, MaxText's default) or layers_<i>.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Stored dtype: bf16 or f32 (cast per slice).")]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (no progress, no ANSI).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
ShowTensorsOpt = Annotated[bool, typer.Option("--show-tensors", help="Print the per-tensor table.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output directory.")]
ResumeOpt = Annotated[bool, typer.Option(
    "--resume", help="Finish an interrupted run of the same conversion from what it left in OUT.partial (its "
                     "progress is saved every GB); without it, OUT.partial is removed and the run starts afresh.")]
OcdbtOpt = Annotated[bool, typer.Option("--ocdbt/--no-ocdbt", help="Store arrays in one OCDBT key-value store.")]
Zarr3Opt = Annotated[bool, typer.Option("--zarr3/--no-zarr3", help="zarr v3 arrays (else zarr v2).")]
CompressionOpt = Annotated[str, typer.Option("--compression", help="Chunk compression: zstd or none.")]
WorkersOpt = Annotated[int, typer.Option("--workers", min=1, max=64, help="Reader/transform threads.")]
MtpOpt = Annotated[bool, typer.Option(
    "--mtp", help="DeepSeek-V3/V3.2: also convert the multi-token-prediction layer (MaxText mtp_block).")]
MaxDiskOpt = Annotated[str | None, typer.Option(
    "--max-disk", help="Hub repos: most local disk the downloaded shards may take at once (e.g. 20GB). Shards then "
                       "go to a private directory beside --out and each is deleted once converted; default: the "
                       "hub cache, kept for the next run.")]

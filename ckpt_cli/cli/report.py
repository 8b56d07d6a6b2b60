"""Rendering plans and results: the per-tensor table, the summary, and their JSON forms."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckpt_cli.cli.tables import Col, Grid
from ckpt_cli.units import human_bytes

if TYPE_CHECKING:
    from ckpt_cli.engine import Stats
    from ckpt_cli.plan import ConversionPlan, TensorPlan


def dtype_name(dtype) -> str:
    """'bfloat16' for any dtype-like (numpy is imported here, not at start-up)."""
    import numpy as np

    return np.dtype(dtype).name


def human_rate(bytes_per_s: float) -> str:
    """A throughput in the units the progress bar shows: '78.80 MB/s'."""
    return f"{human_bytes(bytes_per_s)}/s"


def human_params(n: int) -> str:
    """A parameter count: '106,880 (0.11 M)', '8,190,735,360 (8.191 B)'."""
    return f"{n:,} ({n / 1e9:.3f} B)" if n >= 1e9 else f"{n:,} ({n / 1e6:.2f} M)"


def human_count(n: int) -> str:
    """A short parameter count: '751.6 M', '8.19 B', '671 B'."""
    if n >= 1e11:
        return f"{n / 1e9:.0f} B"
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def chunk_axis(t: TensorPlan) -> str:
    """Which axes the chunk grid splits (the write/sharding unit), e.g. 'axis 1 (layers)'."""
    split = [a for a, (s, c) in enumerate(zip(t.shape, t.chunk_shape, strict=True)) if c < s]
    return ",".join(str(a) for a in split) if split else "-"


def _sources(t: TensorPlan) -> tuple[str, ...]:
    """The source names of a tensor; a constant one (no HF tensor, e.g. DeepSeek-V4's mhc_norm) says so."""
    return (f"(none: constant {t.fill:g})",) if t.fill is not None else t.source_names


def tensor_record(t: TensorPlan) -> dict:
    names = _sources(t)
    return {
        "target": t.target, "shape": list(t.shape), "dtype": dtype_name(t.dtype),
        "stack_axes": list(t.stack_axes), "chunk_shape": list(t.chunk_shape), "chunk_axes": chunk_axis(t),
        "transform": t.chain.describe(), "sources": len(names), "source_first": names[0],
        "source_last": names[-1], "bytes": t.nbytes,
    }


def tensor_table(plan: ConversionPlan) -> Grid:
    to_mt = plan.direction == "hf-to-maxtext"
    table = Grid([Col("MaxText path" if to_mt else "HF tensor", wrap=True), Col("shape"), Col("dtype"),
                  Col("scan axis", drop=3), Col("chunk axes", drop=4), Col("transform", wrap=True, drop=2),
                  Col("sources", wrap=True, drop=5)], title=f"{len(plan.tensors)} tensors")
    for t in plan.tensors:
        names = _sources(t)
        src = names[0] if len(names) == 1 else f"{names[0]} … {names[-1]} ({len(names)})"
        scan = ",".join(map(str, t.stack_axes)) or "-"
        table.add_row(t.target, str(tuple(t.shape)), dtype_name(t.dtype), scan, chunk_axis(t),
                      t.chain.describe(), src)
    return table


def stats_record(stats: Stats) -> dict:
    return {"tensors": stats.tensors, "tasks": stats.tasks, "bytes_read": stats.bytes_read,
            "bytes_written": stats.bytes_written, "wall_s": round(stats.wall_s, 3), "peak_rss": stats.peak_rss,
            "throughput_gbps": round(stats.bytes_read / stats.wall_s / 1e9, 3) if stats.wall_s else None,
            **stats.extra}


def summary_table(title: str, rows: dict[str, str]) -> Grid:
    return Grid([Col("", bold=True), Col("", wrap=True)], [[k, v] for k, v in rows.items()], title=title,
                show_header=False)


def stats_rows(stats: Stats) -> dict[str, str]:
    rate = human_rate(stats.bytes_read / stats.wall_s) if stats.wall_s else "-"
    return {"tensors": f"{stats.tensors} ({stats.tasks} slices)", "read": human_bytes(stats.bytes_read),
            "written": human_bytes(stats.bytes_written), "wall": f"{stats.wall_s:.2f} s (read {rate})",
            "peak RSS": human_bytes(stats.peak_rss)}


def plan_announcer(outp, show_tensors: bool):
    """The `on_plan` callback both convert commands use: notes to stderr, then the tensor table if asked."""

    def on_plan(plan: ConversionPlan, notes: list[str]) -> None:
        for n in notes:
            outp.note(n)
        if show_tensors:
            outp.table(tensor_table(plan))

    return on_plan


def convert_record(result, **extra) -> dict:
    """The --json document of a conversion, either direction."""
    plan = result.plan
    return {"command": "convert", "direction": plan.direction, "source": result.source, "out": str(result.out),
            "family": plan.family, "scan_layers": plan.scan_layers, "dtype": dtype_name(plan.dtype), **extra,
            "notes": result.notes, "stats": stats_record(result.stats),
            "tensors": [tensor_record(t) for t in plan.tensors]}

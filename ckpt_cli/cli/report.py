"""Rendering plans and results: the per-tensor table, the summary, and their JSON forms."""

from __future__ import annotations

import numpy as np
from rich.table import Table

from ckpt_cli.engine import Stats
from ckpt_cli.plan import ConversionPlan, TensorPlan
from ckpt_cli.units import human_bytes


def chunk_axis(t: TensorPlan) -> str:
    """Which axes the chunk grid splits (the write/sharding unit), e.g. 'axis 1 (layers)'."""
    split = [a for a, (s, c) in enumerate(zip(t.shape, t.chunk_shape, strict=True)) if c < s]
    return ",".join(str(a) for a in split) if split else "-"


def tensor_record(t: TensorPlan) -> dict:
    names = t.source_names
    return {
        "target": t.target, "shape": list(t.shape), "dtype": np.dtype(t.dtype).name,
        "stack_axes": list(t.stack_axes), "chunk_shape": list(t.chunk_shape), "chunk_axes": chunk_axis(t),
        "transform": t.chain.describe(), "sources": len(names), "source_first": names[0],
        "source_last": names[-1], "bytes": t.nbytes,
    }


def tensor_table(plan: ConversionPlan) -> Table:
    to_mt = plan.direction == "hf-to-maxtext"
    table = Table(title=f"{len(plan.tensors)} tensors", show_lines=False, header_style="bold")
    table.add_column("MaxText path" if to_mt else "HF tensor", overflow="fold")
    table.add_column("shape")
    table.add_column("dtype")
    table.add_column("scan axis")
    table.add_column("chunk axes")
    table.add_column("transform")
    table.add_column("sources", overflow="fold")
    for t in plan.tensors:
        names = t.source_names
        src = names[0] if len(names) == 1 else f"{names[0]} … {names[-1]} ({len(names)})"
        scan = ",".join(map(str, t.stack_axes)) or "-"
        table.add_row(t.target, str(tuple(t.shape)), np.dtype(t.dtype).name, scan, chunk_axis(t),
                      t.chain.describe(), src)
    return table


def stats_record(stats: Stats) -> dict:
    return {"tensors": stats.tensors, "tasks": stats.tasks, "bytes_read": stats.bytes_read,
            "bytes_written": stats.bytes_written, "wall_s": round(stats.wall_s, 3), "peak_rss": stats.peak_rss,
            "throughput_gbps": round(stats.bytes_read / stats.wall_s / 1e9, 3) if stats.wall_s else None,
            **stats.extra}


def summary_table(title: str, rows: dict[str, str]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows.items():
        table.add_row(k, v)
    return table


def stats_rows(stats: Stats) -> dict[str, str]:
    rate = stats.bytes_read / stats.wall_s / 1e9 if stats.wall_s else 0.0
    return {"tensors": f"{stats.tensors} ({stats.tasks} slices)", "read": human_bytes(stats.bytes_read),
            "written": human_bytes(stats.bytes_written), "wall": f"{stats.wall_s:.2f} s ({rate:.2f} GB/s)",
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
            "family": plan.family, "scan_layers": plan.scan_layers, "dtype": np.dtype(plan.dtype).name, **extra,
            "notes": result.notes, "stats": stats_record(result.stats),
            "tensors": [tensor_record(t) for t in plan.tensors]}

"""Byte sizes: parsing user input and printing figures."""

from __future__ import annotations

import re

from ckpt_cli.errors import CkptError

_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "M": 1000**2, "MB": 1000**2, "G": 1000**3, "GB": 1000**3,
          "T": 1000**4, "TB": 1000**4, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '512MiB' -> 536870912, '1000' -> 1000."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise CkptError(f"cannot read size {text!r}: use a number with an optional unit such as 5GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def human_bytes(n: float) -> str:
    """1234567 -> '1.23 MB' (decimal units, as disks and the hub count)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < (999.5 if unit == "B" else 999.995) or unit == "TB":     # what rounds to 1000 is the next unit
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")

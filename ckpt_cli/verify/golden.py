"""Golden files: the reference (Hugging Face) logits of a set of prompts, kept to verify without torch.

Two formats, chosen by the file name:

* `.npz` (recommended): exact float32 logits, compact. Arrays `tokens_<n>` (int64, (T,)) and
  `logits_<n>` (float32, (T, V)) for prompt n = 0, 1, ...; `meta` holds a JSON string with the prompt
  texts, the HF source, the HF dtype, the family and the HF config. Loaded with `allow_pickle=False`.
* `.jsonl`: MaxText's golden format (maxtext-layout.md §12, `forward_pass_logit_checker`): one JSON
  object per prompt with `prompt`, `tokens` and `logits` (T rows of V floats); we add `ckpt_meta` on
  each line. Files MaxText's generator wrote can be read here and ours can be read by MaxText.
  Values round-trip exactly (float32 -> float64 text -> float32) but files are ~5x larger than .npz.

Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ckpt_cli.errors import CkptError, SourceError
from ckpt_cli.io.outdir import OutputLock, os_error
from ckpt_cli.verify.prompts import Prompt

FORMAT = "ckpt-golden-logits"
SUFFIXES = (".npz", ".jsonl")


@dataclass
class Golden:
    """Prompts and the reference logits of each, (T, V) float32, plus where they came from."""

    prompts: list[Prompt]
    logits: list[np.ndarray]
    meta: dict = field(default_factory=dict)


def check_suffix(path: Path) -> None:
    if Path(path).suffix not in SUFFIXES:
        raise CkptError(f"{path}: a golden file ends in .npz (exact, compact) or .jsonl (MaxText's format)")


def save(path: Path, golden: Golden) -> None:
    """Write a golden file (format by suffix), through a temporary sibling and a rename, holding the file's
    lock (one writer at a time, see io/outdir.py)."""
    path = Path(path)
    check_suffix(path)
    with OutputLock(path):
        _save(path, golden)


def _save(path: Path, golden: Golden) -> None:
    meta = {"format": FORMAT, "version": 1, **golden.meta, "prompts": [p.text for p in golden.prompts]}
    tmp = path.with_name(f".{path.name}.partial")
    try:
        if path.suffix == ".npz":
            arrays = {"meta": np.array(json.dumps(meta))}
            for n, (p, lg) in enumerate(zip(golden.prompts, golden.logits, strict=True)):
                arrays[f"tokens_{n}"] = np.asarray(p.ids, dtype=np.int64)
                arrays[f"logits_{n}"] = np.asarray(lg, dtype=np.float32)
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
        else:
            with open(tmp, "w") as fh:
                for p, lg in zip(golden.prompts, golden.logits, strict=True):
                    record = {"prompt": p.text, "tokens": list(p.ids),
                              "logits": np.asarray(lg, dtype=np.float32).astype(np.float64).tolist(),
                              "ckpt_meta": meta}
                    fh.write(json.dumps(record) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise os_error(exc, f"cannot write golden file {path}") from None


def load(path: Path) -> Golden:
    """Read a golden file written by `save` (or a MaxText .jsonl golden file)."""
    path = Path(path)
    check_suffix(path)
    if not path.is_file():
        raise SourceError(f"{path}: no such golden file")
    try:
        return _load_npz(path) if path.suffix == ".npz" else _load_jsonl(path)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError, OSError) as exc:
        raise SourceError(f"{path}: not a golden logits file ({type(exc).__name__}: {str(exc).splitlines()[0]})"
                          ) from None


def _load_npz(path: Path) -> Golden:
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        if meta.get("format") != FORMAT:
            raise ValueError(f"meta format is {meta.get('format')!r}")
        texts = meta.get("prompts") or []
        n = sum(1 for k in data.files if k.startswith("tokens_"))
        prompts, logits = [], []
        for i in range(n):
            ids = tuple(int(t) for t in data[f"tokens_{i}"])
            prompts.append(Prompt(ids, texts[i] if i < len(texts) else None))
            logits.append(_check(np.asarray(data[f"logits_{i}"], dtype=np.float32), len(ids), i))
    return Golden(prompts, logits, meta)


def _load_jsonl(path: Path) -> Golden:
    prompts, logits, meta = [], [], {}
    with open(path) as fh:
        for line in fh:
            if not line.strip():
                continue
            record = json.loads(line)
            ids = tuple(int(t) for t in record["tokens"])
            prompts.append(Prompt(ids, record.get("prompt")))
            logits.append(_check(np.asarray(record["logits"], dtype=np.float32), len(ids), len(logits)))
            meta = record.get("ckpt_meta") or meta
    if not prompts:
        raise ValueError("no records")
    meta.pop("prompts", None)
    return Golden(prompts, logits, meta)


def _check(logits: np.ndarray, length: int, n: int) -> np.ndarray:
    if logits.ndim != 2 or logits.shape[0] != length:
        raise ValueError(f"record {n}: logits of shape {logits.shape} for {length} tokens")
    return logits

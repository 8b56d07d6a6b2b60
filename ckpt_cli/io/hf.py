"""Hugging Face sources: resolving SOURCE to a local folder and config, and the two tensor readers.

SOURCE is a local folder, a MaxText model name from the registry (its default repo), or a repo id.
Remote repos are fetched through huggingface_hub (HF_TOKEN / stored login, HF_HOME, HF_ENDPOINT,
HF_HUB_OFFLINE, --revision all honoured by the client itself).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ckpt_cli import registry
from ckpt_cli.errors import CkptError, SourceError
from ckpt_cli.io import int4, mxfp4
from ckpt_cli.io.remote import RemoteRepo, hub_errors, is_offline, retried
from ckpt_cli.io.safetensors import SafetensorsFolder, regular_file
from ckpt_cli.plan import SourceSlice


@dataclass(frozen=True)
class HFSource:
    """A resolved source: where its files are, its config, and what the user called it."""

    folder: Path
    config: dict
    label: str
    model_name: str | None = None
    repo_id: str | None = None
    revision: str | None = None
    remote: RemoteRepo | None = None     # a repo read by headers and streamed shards (resolve(stream=True))
    files: SafetensorsFolder | None = None  # tensors already opened elsewhere (an HF folder in a bucket)


def load_config(folder: Path) -> dict:
    """A folder's config.json: a regular file holding a JSON object, or a one-line SourceError."""
    path = folder / "config.json"
    if not path.exists():
        raise SourceError(f"{folder}: no config.json")
    regular_file(path, "config.json")
    try:
        cfg = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise SourceError(f"{path}: not a config object (found a JSON {type(cfg).__name__})")
    return cfg


def resolve(source: str, revision: str | None = None, stream: bool = False) -> HFSource:
    """Turn a user's SOURCE into a local folder with a config (downloading a repo when needed).

    With `stream`, a repo is not downloaded: only its listing, config and shard headers are read
    (`HFSource.remote`), and the shards are fetched later, while converting. Offline, the cached
    snapshot is used either way.
    """
    if not isinstance(source, Path):
        from ckpt_cli.io.location import BucketURL

        if isinstance(source, BucketURL):   # an HF folder in gs:// or s3://: read in place by ranged reads
            from ckpt_cli.io.bucket_safetensors import BucketSafetensorsFolder

            files = BucketSafetensorsFolder(source)
            return HFSource(Path(str(source.path or source.bucket)), files.config(), str(source), files=files)
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceError(f"{source} is not a folder (expected config.json + *.safetensors)")
        return HFSource(path, load_config(path), str(path))
    model_name = None
    repo_id = source
    if registry.is_model_name(source):
        spec = registry.lookup(source)
        model_name, repo_id = spec.name, spec.repo_id
    else:
        check_repo_id(source)
    try:
        if stream and not is_offline():
            repo = RemoteRepo.open(repo_id, revision)
            return HFSource(repo.snapshot_dir, repo.config, repo_id, model_name, repo_id, revision, repo)
        folder = download(repo_id, revision)
    except CkptError as exc:
        parent = path.parent
        if model_name is None and parent != Path(".") and parent.is_dir():   # o/nope where o/ is a local folder
            raise type(exc)(f"{source}: no such folder here ({parent}/ is one), and as a hub repo id: {exc}") from None
        raise
    return HFSource(folder, load_config(folder), repo_id, model_name, repo_id, revision)


def check_repo_id(source: str) -> None:
    """Refuse a SOURCE that is no folder, no model name and cannot be a hub repo id (with the closest model names),
    or that is written as a local path (./x, ../x, /x, ~/x): it is never asked of the hub."""
    hint = registry.did_you_mean(source)
    if source.startswith(("./", "../", "/", "~")):
        raise SourceError(f"{source}: no such folder")
    if "/" not in source or source.count("/") > 1:
        raise SourceError(f"{source}: no such folder, and not a model name or an org/name repo id{hint}")


def download(repo_id: str, revision: str | None, allow_patterns: list[str] | None = None) -> Path:
    """Fetch config, index and safetensors shards (or `allow_patterns`) of a repo into the hub cache."""
    from huggingface_hub import snapshot_download

    with hub_errors(repo_id, revision):
        return Path(retried(snapshot_download, repo_id, revision=revision, allow_patterns=allow_patterns
                            or ["*.json", "*.safetensors", "tokenizer*", "*.model"]))


class SafetensorsReader:
    """The default reader: one tensor (or row range) at a time from safetensors shards.

    fp8 weights stored the DeepSeek way (float8_e4m3fn with a float32 `<name>_scale_inv` per
    block, possibly in another shard) are dequantized slice by slice on the fly into `dequant_dtype`.
    So are MXFP4 weights (GPT-OSS experts, see `io/mxfp4.py`): a weight absent under its own name but
    stored as `<name>_blocks` + `<name>_scales` is served under its own name, in its dequantized (X, in,
    out) layout, one expert (index of axis 0) at a time; `mxfp4` maps such names to their pair. And so are int4
    weights packed by compressed-tensors (Kimi K2's int4 experts, see `io/int4.py`: `<name>_packed` + `_scale` +
    `_shape`, groups of `int4_group` values), one weight (one expert) at a time; `int4` maps such names to them.
    DeepSeek-V4's release: fp8 weights with a float8_e8m0fnu `<stem>.scale` per block instead of `_scale_inv`, and
    fp4 experts (`<stem>.weight` int8, two E2M1 values a byte, with `<stem>.scale` per 32 values; `fp4` maps them to
    their scales), served dequantized under their own names.
    """

    def __init__(self, folder: Path | SafetensorsFolder, dequant_dtype: np.dtype | None = None,
                 block: tuple[int, int] = (128, 128), int4_group: int | None = None):
        self.files = folder if isinstance(folder, SafetensorsFolder) else SafetensorsFolder(folder)
        self.dequant_dtype = np.dtype(dequant_dtype) if dequant_dtype is not None else np.dtype(np.float32)
        self.block = block
        self.mxfp4 = mxfp4.logical_names(self.files.tensors)
        self.int4 = int4.logical_names(self.files.tensors)
        self.int4_group = int4_group
        self.int4_checked: set[str] = set()    # weights whose weight_shape has been checked
        self.fp4 = mxfp4.row_weights(self.files.tensors)    # DeepSeek-V4's fp4 experts -> their scales

    def describe(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        if name in self.mxfp4:
            return self.mxfp4_shape(name), np.dtype(np.float32)
        if name in self.int4:
            return self.int4_shape(name), np.dtype(np.float32)
        if name in self.fp4:
            return self.fp4_shape(name), np.dtype(np.float32)
        if name not in self.files and name + mxfp4.SCALES in self.files:
            raise SourceError(f"tensor {name + mxfp4.SCALES} (MXFP4) has no {name + mxfp4.BLOCKS}: "
                              "the packed weights are missing")
        info = self.files.info(name)
        return info.shape, info.dtype

    def mxfp4_shape(self, name: str) -> tuple[int, ...]:
        """The dequantized shape of an MXFP4 weight (its pair checked: both present, uint8, matching shapes)."""
        blocks, scales = self.mxfp4[name]
        b = self.files.info(blocks)
        s = self.files.info(scales) if scales in self.files else None
        return mxfp4.logical_shape(name, (b.shape, b.dtype), (s.shape, s.dtype) if s else None)

    def int4_shape(self, name: str) -> tuple[int, int]:
        """The dequantized (out, in) of an int4-packed weight, from its headers (packed and scales checked). In a
        local folder its `weight_shape` (two integers) is checked here too, so a mismatch stops the conversion
        before anything is written; a streamed repo's is checked when the weight is read."""
        packed, scale, shape = self.int4[name]
        p = self.files.info(packed)
        s = self.files.info(scale) if scale in self.files else None
        planned = int4.logical_shape(name, (p.shape, p.dtype), (s.shape, s.dtype) if s else None, self.int4_group)
        if shape not in self.files:
            raise SourceError(f"tensor {packed} (int4) has no {shape}")
        if self.files.local and name not in self.int4_checked:
            int4.check_shape(name, self.files.read(shape), planned)
            self.int4_checked.add(name)
        return planned

    def fp4_shape(self, name: str) -> tuple[int, int]:
        """The dequantized (out, in) of a row-wise fp4 weight (its scales checked)."""
        p, s = self.files.info(name), self.files.info(self.fp4[name])
        return mxfp4.row_shape(name, (p.shape, p.dtype), (s.shape, s.dtype))

    def scale_name(self, name: str) -> str | None:
        """The companion block-scale tensor of an fp8 weight, when it has one: `<name>_scale_inv` (DeepSeek-V3,
        float32) or `<stem>.scale` (DeepSeek-V4, float8_e8m0fnu powers of two)."""
        info = self.files.info(name)
        if info.dtype.itemsize != 1 or not info.dtype.name.startswith("float8"):
            return None
        scale = name + "_scale_inv"
        v4 = name.removesuffix(".weight") + mxfp4.ROW_SCALE
        if scale not in self.files and name.endswith(".weight") and v4 in self.files:
            return v4
        if scale not in self.files:
            raise SourceError(f"tensor {name} is {info.dtype.name} but {scale} is missing")
        return scale

    def read(self, source: SourceSlice) -> np.ndarray:
        """The tensor, a range of its rows, or (experts stored in one tensor) one index of its axis 0."""
        if source.name in self.mxfp4:
            return self.read_mxfp4(source)
        if source.name in self.int4:
            return self.read_int4(source)
        if source.name in self.fp4:
            if source.axes or (source.rows is not None and source.rows_axis != 0):
                raise AssertionError("fp4 weights are read whole or by rows")
            self.fp4_shape(source.name)
            return mxfp4.dequantize_rows(self.files.read(source.name, source.rows),
                                         self.files.read(self.fp4[source.name], source.rows), self.dequant_dtype)
        if source.axes:
            if source.axes != (0,) or source.rows is not None:
                raise AssertionError("HF sources are read whole, by rows, or by one index of axis 0")
            (i,) = source.index
            x = self.files.read(source.name, (i, i + 1))[0]
            if self.scale_name(source.name) is not None:
                raise SourceError(f"tensor {source.name}: fp8 block scales of a stacked tensor are not supported")
            return x
        x = self.files.read(source.name, source.rows)
        scale_name = self.scale_name(source.name)
        if scale_name is None or source.raw:      # raw: an fp8 weight kept fp8 (its scale is a source of its own)
            return x
        return dequantize_blocks(x, self.files.read(scale_name), (source.rows or (0, 0))[0], self.block,
                                 self.dequant_dtype)

    def read_mxfp4(self, source: SourceSlice) -> np.ndarray:
        """One expert (or all, or a range of experts) of an MXFP4 weight, dequantized into `dequant_dtype`.

        Only that expert's blocks and scales are read; the float32 values exist for this slice alone.
        """
        blocks, scales = self.mxfp4[source.name]
        self.mxfp4_shape(source.name)
        if source.axes:
            if source.axes != (0,) or source.rows is not None:
                raise AssertionError("HF sources are read whole, by rows, or by one index of axis 0")
            (i,) = source.index
            rows: tuple[int, int] | None = (i, i + 1)
        else:
            rows = source.rows
            if rows is not None and source.rows_axis != 0:
                raise AssertionError("MXFP4 weights are read by experts (axis 0)")
        x = mxfp4.dequantize(self.files.read(blocks, rows), self.files.read(scales, rows), self.dequant_dtype)
        return x[0] if source.axes else x

    def read_int4(self, source: SourceSlice) -> np.ndarray:
        """An int4-packed weight (or a range of its rows), unpacked and dequantized into `dequant_dtype`; its
        `weight_shape` is checked against the headers' shape. Only this weight's words and scales are read."""
        if source.axes or (source.rows is not None and source.rows_axis != 0):
            raise AssertionError("int4-packed weights are read whole or by rows")
        packed, scale, shape = self.int4[source.name]
        planned = self.int4_shape(source.name)
        if source.name not in self.int4_checked:
            int4.check_shape(source.name, self.files.read(shape), planned)
            self.int4_checked.add(source.name)
        return int4.dequantize(self.files.read(packed, source.rows), self.files.read(scale, source.rows),
                               self.int4_group, self.dequant_dtype)

    def consumed_with(self, name: str) -> list[str]:
        """Extra tensors read along with `name` (its fp8 scale, its MXFP4 pair, its int4 parts), for the
        unused-tensor report and the shards a task needs."""
        if name in self.mxfp4:
            return [n for n in self.mxfp4[name] if n in self.files]
        if name in self.int4:
            return [n for n in self.int4[name] if n in self.files]
        if name in self.fp4:
            return [self.fp4[name]]
        scale = self.scale_name(name) if name in self.files else None
        return [scale] if scale else []

    def order_key(self, source: SourceSlice) -> tuple:
        stored = self.mxfp4.get(source.name) or self.int4.get(source.name)
        info = self.files.info(stored[0] if stored else source.name)
        return (str(info.file), info.begin)

    @property
    def names(self) -> list[str]:
        return list(self.files.tensors)


class TransformersReader:
    """Loads the model with transformers (from_pretrained, dtype="auto") and serves its state_dict.

    For sources the safetensors reader cannot read (e.g. .bin weights). Holds the whole model. Tensors are
    served under the names the checkpoint files use (see `saved_state`), which the family tables name.
    """

    def __init__(self, folder: Path):
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as tf_logging

        verbosity, bars = tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()
        tf_logging.set_verbosity_error()        # its load report and progress bar would bury our one line
        tf_logging.disable_progress_bar()
        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto")
        except Exception as exc:  # noqa: BLE001 - whatever transformers raises on these files is the input's fault
            first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
            if "ignore_mismatched_sizes" in first:
                first = "the weights' shapes do not match config.json"
            raise SourceError(f"transformers cannot load {folder}: {type(exc).__name__}: {first}") from None
        finally:
            tf_logging.set_verbosity(verbosity)
            if bars:
                tf_logging.enable_progress_bar()
        self.state = saved_state(model)
        self._torch = torch

    def describe(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        if name not in self.state:
            raise SourceError(f"tensor {name} is missing from the transformers model")
        t = self.state[name]
        return tuple(t.shape), _numpy_dtype(t.dtype, self._torch)

    def read(self, source: SourceSlice) -> np.ndarray:
        t = self.state[source.name]
        if source.axes:
            if source.axes != (0,) or source.rows is not None:
                raise AssertionError("HF sources are read whole, by rows, or by one index of axis 0")
            t = t[source.index[0]]
        elif source.rows is not None:
            t = t[source.rows[0]:source.rows[1]]
        return to_numpy(t)

    def order_key(self, source: SourceSlice) -> tuple:
        return (source.name,)

    @property
    def names(self) -> list[str]:
        return list(self.state)


def saved_state(model) -> dict:
    """The model's state dict under the names and layouts `save_pretrained` writes.

    transformers 5 holds some weights differently in memory from the files (Mixtral and Qwen3 MoE experts
    fused into `mlp.experts.gate_up_proj` / `down_proj`, `block_sparse_moe` renamed `mlp`) and undoes that
    when saving; the same reversal gives back the released per-expert tensors. transformers 4 has no such
    conversions: its state dict is already the file layout.
    """
    state = {k: v.detach() for k, v in model.state_dict().items()}
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return state
    return {k: v.detach() for k, v in revert_weight_conversion(model, state).items()}


def _numpy_dtype(dtype, torch) -> np.dtype:
    import ml_dtypes

    if dtype == torch.bfloat16:
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(str(dtype).removeprefix("torch."))


def to_numpy(t) -> np.ndarray:
    """A torch tensor as numpy, bf16 kept bit-exact (through an int16 view)."""
    import ml_dtypes
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def dequantize_blocks(w: np.ndarray, scale_inv: np.ndarray, row_offset: int, block: tuple[int, int],
                      dtype: np.dtype) -> np.ndarray:
    """Block-scaled fp8 -> dtype: `w[i, j] * scale_inv[i // bh, j // bw]`, computed in float32.

    `w` may be a row range starting at `row_offset`; edge blocks may be ragged (partial).
    """
    if w.ndim != 2 or scale_inv.ndim != 2:
        raise SourceError(f"fp8 dequantization expects 2-D weight and scale, got {w.shape} and {scale_inv.shape}")
    bh, bw = block
    rows, cols = w.shape
    want = (-(-(row_offset + rows) // bh) if rows else 0, -(-cols // bw))
    if scale_inv.shape[1] != want[1] or scale_inv.shape[0] < want[0]:
        raise SourceError(f"fp8 scale shape {scale_inv.shape} does not cover a weight of {cols} columns "
                          f"in {bh}x{bw} blocks")
    x = _as_float32(w)
    if rows and row_offset % bh == 0 and rows % bh == 0 and cols % bw == 0:   # whole blocks: scaled in place
        first = row_offset // bh
        scale = scale_inv[first:first + rows // bh].astype(np.float32)
        x.reshape(rows // bh, bh, cols // bw, bw).__imul__(scale[:, None, :, None])
        return x.astype(dtype)
    r_idx = np.arange(row_offset, row_offset + rows) // bh
    c_idx = np.arange(cols) // bw
    scale = scale_inv.astype(np.float32)[r_idx][:, c_idx]
    return (x * scale).astype(dtype)


_FLOAT32_OF_BYTE: dict[np.dtype, np.ndarray] = {}


def _as_float32(w: np.ndarray) -> np.ndarray:
    """`w` as a new float32 array: a one-byte float (e4m3) through a 256-entry table (the same values as
    `astype`, several times faster: the dequantization is CPU-bound on small machines)."""
    if w.dtype.itemsize != 1:
        return w.astype(np.float32)
    table = _FLOAT32_OF_BYTE.get(w.dtype)
    if table is None:
        table = _FLOAT32_OF_BYTE[w.dtype] = np.arange(256, dtype=np.uint8).view(w.dtype).astype(np.float32)
    return np.take(table, np.ascontiguousarray(w).view(np.uint8))

"""What a checkpoint holds, from metadata only, and how two of them differ in MaxText's path space.

A target is a local HF folder, a hub repo (its safetensors headers read by range requests), an
Orbax/MaxText checkpoint (run, step or items dir; zarr metadata opened through tensorstore, no array
data), or the tree MaxText expects for a registered model (its reference config through the plan).
`compare` maps both sides to MaxText paths (an HF side through its conversion plan) and lists what
is missing, extra or mis-shaped: the "143/145 paths matched" report, with names.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ckpt_cli import registry
from ckpt_cli.dtypes import output_dtype
from ckpt_cli.engine import source_slice_shape
from ckpt_cli.errors import CkptError, ConfigMismatchError, SourceError, UnknownModelError, UnsupportedError
from ckpt_cli.families import detect_family, family_named
from ckpt_cli.io import int4, mxfp4
from ckpt_cli.io.remote_stream import tree_bytes
from ckpt_cli.io.safetensors import SafetensorsFolder, TensorInfo, read_header
from ckpt_cli.plan import ConversionPlan, TargetMesh, build_to_maxtext, rename_sources

HF_KINDS = ("hf", "hf-remote", "hf-bucket")
CONFIG_KEYS = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
               "torch_dtype", "max_position_embeddings", "rope_theta", "experts")


@dataclass(frozen=True)
class Leaf:
    """One tensor as inspect shows it: an HF tensor (with its shard) or a MaxText path (with its chunks)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    shard: str | None = None
    chunk_shape: tuple[int, ...] | None = None
    read_chunk: tuple[int, ...] | None = None     # the read unit inside a chunk (zarr3 sharding), else the chunk

    def record(self) -> dict:
        if self.chunk_shape is None:
            return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "bytes": self.nbytes,
                    "shard": self.shard}
        return {"path": self.name, "shape": list(self.shape), "dtype": self.dtype, "bytes": self.nbytes,
                "chunk_shape": list(self.chunk_shape), "read_chunk": list(self.read_chunk or self.chunk_shape)}


@dataclass
class Target:
    """An opened target: its leaves in display order plus what is known about it."""

    kind: str                       # hf | hf-remote | hf-bucket | orbax | maxtext-model
    label: str
    leaves: list[Leaf]
    config: dict | None = None      # HF config (carried one for orbax, reference one for a model)
    info: dict = field(default_factory=dict)     # kind-specific JSON-ready facts
    headers: dict[str, TensorInfo] = field(default_factory=dict)   # HF kinds: every tensor's header
    scan_layers: bool | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def model_name(self) -> str | None:
        """The registered model name it is (a model target) or was converted as (ckpt provenance), if any."""
        name = self.info.get("model") or (self.info.get("provenance") or {}).get("model_name")
        return name if name and registry.is_model_name(name) else None

    @property
    def family(self) -> str | None:
        try:
            return detect_family(self.config, self.model_name).name if self.config else None
        except UnknownModelError:
            return None


# ----------------------------------------------------------------------------------------------- opening


def open_target(target: str | None, model: str | None = None, revision: str | None = None,
                scan: bool | None = None, dtype: str | None = None, mesh: TargetMesh | None = None) -> Target:
    """Detect and open TARGET (folder, repo id, model name as its repo, Orbax dir), or `--model NAME`'s tree."""
    if target is None:
        if model is None:
            raise SourceError("give a TARGET (folder, repo id, Orbax checkpoint) or --model NAME")
        return open_model(model, True if scan is None else scan, dtype, mesh)
    from ckpt_cli.io.location import is_url, location

    if is_url(target):      # gs:// or s3:// (others refused): an Orbax checkpoint read in place
        url = location(target, "TARGET", buckets=True, what="an Orbax checkpoint in gs:// or s3://")
        if isinstance(url, Path):
            return open_target(str(url), model, revision, scan, dtype, mesh)
        return open_bucket(url)
    path = Path(target).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".safetensors":
            return _hf_target("hf", str(path), None, read_header(path), {"folder": str(path.parent)})
        if is_orbax(path):
            return open_orbax(path)
        if path.is_dir():
            return open_hf_folder(path)
        raise SourceError(f"{target}: not a checkpoint folder, a safetensors file or an Orbax checkpoint")
    from ckpt_cli.io.hf import resolve

    source = resolve(target, revision, stream=True)
    if source.remote is None:       # offline: the cached snapshot
        target_ = open_hf_folder(source.folder)
        target_.label = source.label
        target_.notes.append("HF_HUB_OFFLINE: read from the hub cache")
        return target_
    repo = source.remote
    where = {"folder": None, "repo_id": repo.repo_id, "revision": repo.revision, "commit": repo.commit}
    t = _hf_target("hf-remote", repo.label, repo.config, repo.tensors, where,
                   {s: repo.sizes[s] for s in repo.shards})
    t.info["fetched"] = {"bytes": repo.bytes_fetched, "requests": repo.requests,
                         "cached_shards": len(repo.cached_shards)}
    return t


def open_bucket(url) -> Target:
    """A gs:// or s3:// prefix: an HF folder (headers by ranged reads) or an Orbax checkpoint (metadata)."""
    from ckpt_cli.errors import OutputError
    from ckpt_cli.io.bucket import list_keys
    from ckpt_cli.io.bucket_safetensors import BucketSafetensorsFolder, is_hf_prefix

    try:
        keys = list_keys(url)
    except OutputError as exc:
        raise SourceError(str(exc)) from None
    if not is_hf_prefix(keys):
        return open_orbax(url)
    files = BucketSafetensorsFolder(url, keys)
    config = files.config() if "config.json" in keys else None
    t = _hf_target("hf-bucket", str(url), config, files.tensors, {"folder": str(url)})
    t.info["fetched"] = {"bytes": files.bytes_fetched, "requests": files.requests, "cached_shards": 0}
    return t


def is_orbax(path: Path) -> bool:
    return (path / "_METADATA").exists() or (path / "items" / "_METADATA").exists() or (
        path.is_dir() and any(p.name.isdigit() and (p / "items" / "_METADATA").exists() for p in path.iterdir()))


def open_hf_folder(folder: Path) -> Target:
    from ckpt_cli.io.hf import load_config
    from ckpt_cli.io.safetensors import shard_files

    files = shard_files(folder)
    headers = SafetensorsFolder(folder, files).tensors
    config = load_config(folder) if (folder / "config.json").exists() else None
    where = {"folder": str(folder), "repo_id": None, "revision": None, "commit": None}
    t = _hf_target("hf", str(folder), config, headers, where, {f.name: f.stat().st_size for f in files})
    from ckpt_cli.lora import describe_peft

    adapter = describe_peft(folder, headers)
    if adapter is not None:
        t.info["lora"] = adapter
        t.notes = [n for n in t.notes if not n.startswith("no config.json")]
        t.notes.append("a PEFT LoRA adapter: hf-to-maxtext BASE --lora converts it (merged, or alone with "
                       "--lora-only)")
    return t


def _hf_target(kind: str, label: str, config: dict | None, headers: dict[str, TensorInfo], source: dict,
               shard_sizes: dict[str, int] | None = None) -> Target:
    leaves = [Leaf(i.name, i.shape, i.dtype.name, i.nbytes, i.file.name)
              for i in sorted(headers.values(), key=lambda i: (i.file.name, i.begin))]
    shard_sizes = shard_sizes or {}
    counts: dict[str, int] = {}
    for leaf in leaves:
        counts[leaf.shard] = counts.get(leaf.shard, 0) + 1
    shards = [{"file": s, "bytes": shard_sizes.get(s), "tensors": n} for s, n in counts.items()]
    info = {"source": {"folder": None, "repo_id": None, "revision": None, "commit": None, **source},
            "shards": shards, "fetched": None}
    t = Target(kind, label, leaves, config, info, headers)
    if config is None:
        t.notes.append("no config.json: family and MaxText mapping unknown")
    packed = mxfp4.logical_names(headers)
    if packed:
        t.notes.append(f"{len(packed)} MXFP4 weight(s) stored as *_blocks (uint8, two FP4 values a byte) + *_scales "
                       f"(uint8, one exponent per {mxfp4.GROUP} values), e.g. {min(packed)}: parameter counts of "
                       "these are bytes; hf-to-maxtext dequantizes them")
    packed4 = int4.logical_names(headers)
    if packed4:
        t.notes.append(f"{len(packed4)} int4 weight(s) stored compressed-tensors pack-quantized as *.weight_packed "
                       f"(int32, eight 4-bit values a word) + *.weight_scale (one per group) + *.weight_shape, e.g. "
                       f"{min(packed4)}: parameter counts of these are words; hf-to-maxtext dequantizes them")
    return t


def open_orbax(path) -> Target:
    """An Orbax checkpoint's tree from its metadata: shapes, dtypes and chunk shapes, no array data."""
    from ckpt_cli.io.orbax import ROOT_KEYS, OrbaxCheckpoint
    from ckpt_cli.to_hf import detect_scan

    ckpt = OrbaxCheckpoint(path)
    futures = {p: ckpt.open(p) for p in ckpt.paths}
    leaves = []
    for p in sorted(ckpt.paths):
        try:
            arr = futures[p].result()
        except ValueError as exc:
            raise SourceError(f"{ckpt.items}: cannot open {p}: {str(exc).splitlines()[0]}") from None
        dtype = np.dtype(arr.dtype.numpy_dtype)
        chunk = tuple(int(c) for c in arr.chunk_layout.write_chunk.shape)
        read = tuple(int(c) for c in arr.chunk_layout.read_chunk.shape)
        leaves.append(Leaf(p, tuple(arr.shape), dtype.name, math.prod(arr.shape) * dtype.itemsize, None, chunk, read))
    try:
        scan = detect_scan(ckpt)
    except SourceError:
        scan = None
    prov = ckpt.provenance
    root = ckpt.items.parent if ckpt.items.name == "items" else ckpt.items
    info = {"items_dir": str(ckpt.items), "scan_layers": scan,
            "storage": {"use_ocdbt": ckpt.opts.use_ocdbt, "use_zarr3": ckpt.opts.use_zarr3},
            "provenance": prov, "disk_bytes": tree_bytes(root) if isinstance(root, Path) else None}
    t = Target("orbax", str(path), leaves, prov.get("hf_config"), info, scan_layers=scan)
    elsewhere = sorted(p for p in ckpt.paths if ckpt.keys[p][:2] != ROOT_KEYS)
    info["stored_outside_params"] = {p: ckpt.stored_at(p) for p in elsewhere}
    if elsewhere:
        t.notes.append(f"{len(elsewhere)} variable(s) stored outside params/params, shown at their parameter path: "
                       f"{elsewhere[0]} is {ckpt.stored_at(elsewhere[0])}" + (" ..." if len(elsewhere) > 1 else ""))
    if not prov:
        t.notes.append("no ckpt provenance (not written by ckpt): family unknown unless compared with --model")
    from ckpt_cli.lora import describe_checkpoint

    lora = describe_checkpoint(ckpt)
    if lora is not None:
        info["lora"] = lora
    return t


def open_model(name: str, scan: bool, dtype: str | None = None, mesh: TargetMesh | None = None) -> Target:
    """The tree MaxText expects for a registered model (reference config through the HF -> MaxText plan; a -fp8
    name's fp8 tree unless `dtype` says otherwise), chunked as `convert --target-mesh` would write it for `mesh`."""
    spec = registry.lookup(name)
    config = registry.reference_config(spec.name)
    plan = build_to_maxtext(family_named(spec.family), config, scan, output_dtype(dtype or spec.dtype or "bf16"),
                            mesh=mesh)
    leaves = [Leaf(t.target, t.shape, np.dtype(t.dtype).name, t.nbytes, None, t.chunk_shape, t.read_chunk)
              for t in plan.tensors]
    info = {"model": spec.name, "repo_id": spec.repo_id, "scan_layers": scan, "dtype": np.dtype(plan.dtype).name}
    return Target("maxtext-model", spec.name, leaves, config, info, scan_layers=scan, notes=list(plan.notes))


# ----------------------------------------------------------------------------------------------- facts


def matching_models(config: dict | None) -> list[str]:
    """Registered MaxText model names whose reference hyperparameters this config matches."""
    if not config:
        return []
    found = []
    for spec in registry.MODELS.values():
        family = family_named(spec.family)
        if config.get("model_type") not in family.model_types:   # Llama 3.3's config is also Llama 3.1's
            continue
        try:
            registry.check_against(spec, config, family.reference_keys)
        except ConfigMismatchError:
            continue
        found.append(spec.name)
    return found


def config_summary(config: dict | None) -> dict:
    """The fields of an HF config a user checks first (None where absent), flat or nested text_config."""
    cfg = config or {}
    text = cfg.get("text_config") or {}

    def get(key: str):
        return cfg.get(key, text.get(key))

    rope = get("rope_theta") or (get("rope_parameters") or {}).get("rope_theta")
    experts = get("num_experts") or get("n_routed_experts") or get("num_local_experts")
    values = {k: get(k) for k in CONFIG_KEYS if k not in ("torch_dtype", "rope_theta", "experts")}
    return {**values, "torch_dtype": get("torch_dtype") or get("dtype"), "rope_theta": rope, "experts": experts}


def totals(leaves: list[Leaf]) -> dict:
    by_dtype: dict[str, dict] = {}
    for leaf in leaves:
        d = by_dtype.setdefault(leaf.dtype, {"tensors": 0, "parameters": 0, "bytes": 0})
        d["tensors"] += 1
        d["parameters"] += math.prod(leaf.shape)
        d["bytes"] += leaf.nbytes
    return {"tensors": len(leaves), "parameters": sum(d["parameters"] for d in by_dtype.values()),
            "bytes": sum(d["bytes"] for d in by_dtype.values()), "by_dtype": dict(sorted(by_dtype.items()))}


def select(leaves: list[Leaf], pattern: str | None) -> list[Leaf]:
    return [x for x in leaves if pattern is None or fnmatch.fnmatchcase(x.name, pattern)]


def report(t: Target, with_tensors: bool, pattern: str | None = None) -> dict:
    """The JSON record of one target (key sets are fixed per kind; see tests/test_inspect.py)."""
    leaves = select(t.leaves, pattern)
    base = {"command": "inspect", "kind": t.kind, "target": t.label, "family": t.family,
            "maxtext_models": [t.info["model"]] if t.kind == "maxtext-model" else matching_models(t.config)}
    tail = {"totals": totals(leaves), "tensors": [x.record() for x in leaves] if with_tensors else [],
            "notes": t.notes}
    if t.kind in HF_KINDS:
        return {**base, "config": config_summary(t.config) if t.config else None, **t.info, **tail}
    return {**base, **t.info, **tail}


# ----------------------------------------------------------------------------------------------- comparing


@dataclass(frozen=True)
class Entry:
    """A MaxText path as one side has it; `problem` says why an HF side cannot provide it as planned."""

    shape: tuple[int, ...] | None
    dtype: str
    problem: str | None = None
    missing: bool = False


def maxtext_tree(t: Target, scan: bool, dtype: str | None = None) -> tuple[dict[str, Entry], list[str]]:
    """The target in MaxText path space, and the HF tensors no MaxText path reads (HF targets only)."""
    if t.kind not in HF_KINDS:
        return {x.name: Entry(x.shape, x.dtype) for x in t.leaves}, []
    if not t.config:
        raise SourceError(f"{t.label}: no config.json, so its MaxText paths are unknown")
    family = detect_family(t.config, t.model_name)
    plan: ConversionPlan = build_to_maxtext(family, t.config, scan, output_dtype(dtype or "bf16"),
                                            family.source_layouts(t.config, t.headers))
    rename, _ = family.source_names(t.config, t.headers)   # e.g. a multimodal release's text-model prefix
    if rename is not None:
        plan = rename_sources(plan, rename)
    tree: dict[str, Entry] = {}
    used: set[str] = set()
    for tensor in plan.tensors:
        missing, misshaped = [], []
        # a constant leaf (`fill`, e.g. DeepSeek-V4's mhc_norm) has no HF source
        sources = {task.source.name: task.source for task in tensor.tasks} if tensor.fill is None else {}
        for name, source in sources.items():
            used.add(name)
            used.update(mxfp4.pair(name))
            used.update(int4.parts(name))
            used.add(name.removesuffix(".weight") + mxfp4.ROW_SCALE)    # DeepSeek-V4's fp8 / fp4 scales
            try:
                shape = _hf_shape(t.headers, name, t.config)
            except SourceError as exc:
                misshaped.append(str(exc))
                continue
            if shape is None:
                missing.append(name)
            elif source_slice_shape(shape, source) != tuple(source.shape or tensor.source_shape):   # per expert
                misshaped.append(f"{name} is {shape}, expected {tuple(source.shape or tensor.source_shape)}"
                                 + (" per index of axis 0" if source.axes else ""))
        dtype_name = np.dtype(tensor.dtype).name
        if missing:
            more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
            tree[tensor.target] = Entry(None, dtype_name, f"HF tensor {missing[0]} is absent{more}", missing=True)
        elif misshaped:
            tree[tensor.target] = Entry(None, dtype_name, misshaped[0])
        else:
            tree[tensor.target] = Entry(tuple(tensor.shape), dtype_name)
    return tree, sorted(set(t.headers) - used)


def _hf_shape(headers: dict[str, TensorInfo], name: str, config: dict) -> tuple[int, ...] | None:
    """A planned HF source's shape as the plan reads it (per expert for stacked experts): stored under its name,
    or an MXFP4 pair's or int4-packed weight's dequantized shape; None when absent."""
    info = headers.get(name)
    scale = headers.get(name.removesuffix(".weight") + mxfp4.ROW_SCALE)
    if info is not None and np.dtype(info.dtype) == np.int8 and scale is not None:   # DeepSeek-V4's fp4 experts
        return mxfp4.row_shape(name, (info.shape, info.dtype), (scale.shape, scale.dtype))
    if info is not None:
        return tuple(info.shape)
    if name + mxfp4.BLOCKS in headers:
        b, s = headers[name + mxfp4.BLOCKS], headers.get(name + mxfp4.SCALES)
        return mxfp4.logical_shape(name, (b.shape, b.dtype), (s.shape, s.dtype) if s else None)
    packed, scale, _ = int4.parts(name)
    if packed in headers:
        p, s = headers[packed], headers.get(scale)
        return int4.logical_shape(name, (p.shape, p.dtype), (s.shape, s.dtype) if s else None,
                                  int4.group_size(config.get("quantization_config")))
    return None


def compare(a: Target, b: Target, scan: bool | None = None, dtype: str | None = None,
            pattern: str | None = None) -> dict:
    """A against B (the reference) in MaxText path space: missing from A, extra in A, mis-shaped, dtypes."""
    if scan is None:
        known = [x.scan_layers for x in (b, a) if x.kind == "orbax" and x.scan_layers is not None]
        scan = known[0] if known else True
    tree_a, unmapped = maxtext_tree(a, scan, dtype)
    tree_b, _ = maxtext_tree(b, scan, dtype)
    keep = (lambda p: fnmatch.fnmatchcase(p, pattern)) if pattern else (lambda p: True)
    paths_a = {p for p in tree_a if keep(p)}
    paths_b = {p for p in tree_b if keep(p)}
    missing, extra, mismatched, dtypes = [], [], [], []
    for p in sorted(paths_b):
        eb, ea = tree_b[p], tree_a.get(p)
        if ea is None or ea.missing:
            missing.append({"path": p, "shape": _shape(eb.shape), "reason": ea.problem if ea else None})
        elif ea.problem or eb.problem or ea.shape != eb.shape:
            mismatched.append({"path": p, "shape_a": _shape(ea.shape), "shape_b": _shape(eb.shape),
                               "reason": ea.problem or eb.problem})
        elif ea.dtype != eb.dtype:
            dtypes.append({"path": p, "dtype_a": ea.dtype, "dtype_b": eb.dtype})
    for p in sorted(paths_a - paths_b):
        if not tree_a[p].missing:
            extra.append({"path": p, "shape": _shape(tree_a[p].shape)})
    matched = len(paths_b) - len(missing) - len(mismatched)
    notes = _hints(paths_a, paths_b, a, b)
    if dtypes:
        notes.append(f"{len(dtypes)} path(s) differ only in dtype: MaxText casts on restore, so they still load")
    return {"command": "inspect", "kind": "compare",
            "a": {"target": a.label, "kind": a.kind}, "b": {"target": b.label, "kind": b.kind},
            "scan_layers": scan, "identical": not (missing or extra or mismatched),
            "counts": {"a": len(paths_a), "b": len(paths_b), "matched": matched, "missing": len(missing),
                       "extra": len(extra), "mismatched": len(mismatched), "dtype_differs": len(dtypes)},
            "missing": missing, "extra": extra, "mismatched": mismatched, "dtype_differs": dtypes,
            "unmapped": unmapped, "notes": notes}


def _shape(shape: tuple[int, ...] | None) -> list[int] | None:
    return None if shape is None else list(shape)


def _hints(paths_a: set[str], paths_b: set[str], a: Target, b: Target) -> list[str]:
    """A one-line diagnosis of the classic whole-tree mismatches."""
    def layout(paths: set[str]) -> str | None:
        scanned = any("/layers/" in p or "_layers/" in p for p in paths)
        unscanned = any("/layers_" in p or "_layers_" in p for p in paths)
        return "scanned" if scanned and not unscanned else "unscanned" if unscanned and not scanned else None

    hints = []
    la, lb = layout(paths_a), layout(paths_b)
    if la and lb and la != lb:
        hints.append(f"A is {la} and B is {lb}: convert with --{'no-' if lb == 'unscanned' else ''}scan "
                     f"(MaxText's scan_layers must match the checkpoint)")
    if a.config and b.config:
        ca, cb = config_summary(a.config), config_summary(b.config)
        diff = [f"{k} {ca[k]} vs {cb[k]}" for k in CONFIG_KEYS[2:12] if ca[k] is not None and cb[k] is not None
                and ca[k] != cb[k] and k != "torch_dtype"]
        if diff:
            hints.append("the configs differ: " + ", ".join(diff[:4]) + (" ..." if len(diff) > 4 else ""))
    return hints



def read_amplification(t: Target, mesh_text: str, hosts: int) -> dict:
    """Bytes each of `hosts` hosts reads to restore its devices' slices on a MaxText mesh (e.g. "fsdp=16,tensor=4",
    devices in order, consecutive ones on a host), over the bytes those slices hold: the read chunks each device's
    slice overlaps, from metadata only. Dims are sharded as MaxText's default logical-axis rules do (the plan's
    roles, from the target's config); a tensor without a config is taken as replicated (read whole everywhere).
    """
    from ckpt_cli.plan import TargetMesh

    mesh = TargetMesh.parse(mesh_text)
    devices = mesh.fsdp * mesh.tensor
    if hosts < 1 or devices % hosts:
        raise UnsupportedError(f"--hosts {hosts}: must divide the mesh's {devices} devices")
    roles: dict[str, tuple] = {}
    if t.config:
        try:
            plan = build_to_maxtext(detect_family(t.config, t.model_name), t.config, bool(t.scan_layers),
                                    np.dtype(np.float32))
            roles = {p.target: p.roles for p in plan.tensors}
        except CkptError:
            roles = {}
    per_host = devices // hosts
    reads = [0] * hosts
    needs = [0] * hosts
    tensors = {}
    for leaf in t.leaves:
        if leaf.chunk_shape is None:
            continue
        itemsize = np.dtype(leaf.dtype).itemsize
        axis_roles = roles.get(leaf.name) or (None,) * len(leaf.shape)
        read_chunk = leaf.read_chunk or leaf.chunk_shape
        leaf_read = 0
        for h in range(hosts):
            boxes = [_device_box(leaf.shape, axis_roles, mesh, d) for d in range(h * per_host, (h + 1) * per_host)]
            # A host reads each chunk its devices' slices overlap once (Orbax reads a host's shards in one batch).
            held = [sorted({box[a] for box in boxes}) for a in range(len(leaf.shape))]
            needs[h] += math.prod(sum(b - a for a, b in axis) for axis in held) * itemsize
            got = math.prod(_covered(axis, c, n) for axis, c, n in zip(held, read_chunk, leaf.shape, strict=True))
            reads[h] += got * itemsize
            leaf_read += got * itemsize
        tensors[leaf.name] = leaf_read / max(1, leaf.nbytes)
    total = sum(leaf.nbytes for leaf in t.leaves if leaf.chunk_shape is not None)
    return {"mesh": mesh_text, "hosts": hosts, "devices_per_host": per_host, "roles_known": bool(roles),
            "per_host": [r / max(1, n) for r, n in zip(reads, needs, strict=True)],
            "total": sum(reads) / max(1, total), "tensors": tensors}


def _device_box(shape: tuple[int, ...], roles: tuple, mesh, device: int) -> tuple[tuple[int, int], ...]:
    """The index box device `device` of a (fsdp, tensor) mesh holds: blocks of ceil(n / ways), as JAX cuts."""
    coord = {"fsdp": (device // mesh.tensor, mesh.fsdp), "tensor": (device % mesh.tensor, mesh.tensor)}
    box = []
    for n, role in zip(shape, roles, strict=True):
        i, ways = coord.get(role, (0, 1))
        step = -(-n // ways)
        box.append((min(n, i * step), min(n, (i + 1) * step)))
    return tuple(box)


def _covered(ranges: list[tuple[int, int]], chunk: int, n: int) -> int:
    """Elements of the read chunks that disjoint (or equal) ranges of an axis of length n overlap."""
    chunks = {i for a, b in ranges if b > a for i in range(a // chunk, -(-b // chunk))}
    return sum(min(n, (i + 1) * chunk) - i * chunk for i in chunks)

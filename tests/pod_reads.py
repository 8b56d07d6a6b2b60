"""Hosts restoring a checkpoint: which slices each holds under a MaxText mesh, and the bytes it reads for them.

Run as a script (the tests and the benchmark spawn it):

  python -m tests.pod_reads boxes ITEMS CASES   # CASES: JSON [[hosts, "fsdp=8,tensor=2"], ...]; prints, per case
      and host, the boxes of each parameter its devices hold (jax on simulated CPU devices: set
      XLA_FLAGS=--xla_force_host_platform_device_count=N, N at least the largest mesh); also restores the params
      with Orbax onto the first case's mesh and checks them against a plain read
  python -m tests.pod_reads read ITEMS BOXES_FILE CASE/HOST...   # per host: bytes tensorstore read, bytes needed

The sharding is MaxText 0.2.5's default: each parameter's logical axes (as its layers declare them) mapped by
configs/base.yml's logical_axis_rules: embed/embed_attn/embed_vocab/embed_moe on fsdp, vocab/heads/q_heads/
kv_heads/mlp/mlp_moe/norm on tensor, kv and layers (stage) on none. A host holds the devices of one process,
consecutive in `jax.devices()` as on a pod; reading a box is what Orbax does for each addressable shard.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MESH_OF = {"embed": "fsdp", "embed_attn": "fsdp", "embed_vocab": "fsdp", "embed_moe": "fsdp",
           "vocab": "tensor", "heads": "tensor", "q_heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
           "mlp_moe": "tensor", "norm": "tensor", "exp": "expert", "kv": None, "layers": None}

# Logical axes of the Qwen3 / Llama parameters (per layer; scanned ones get "layers" at axis 1).
LOGICAL = {
    "token_embedder/embedding": ("vocab", "embed_vocab"),
    "decoder/logits_dense/kernel": ("embed_vocab", "vocab"),
    "decoder/decoder_norm/scale": ("norm",),
    "pre_self_attention_layer_norm/scale": ("norm",),
    "post_self_attention_layer_norm/scale": ("norm",),
    "self_attention/query/kernel": ("embed_attn", "q_heads", "kv"),
    "self_attention/key/kernel": ("embed_attn", "kv_heads", "kv"),
    "self_attention/value/kernel": ("embed_attn", "kv_heads", "kv"),
    "self_attention/out/kernel": ("heads", "kv", "embed_attn"),
    "self_attention/query_norm/scale": ("norm",),
    "self_attention/key_norm/scale": ("norm",),
    "mlp/wi_0/kernel": ("embed", "mlp"),
    "mlp/wi_1/kernel": ("embed", "mlp"),
    "mlp/wo/kernel": ("mlp", "embed"),
}


def logical_axes(path: str, ndim: int) -> tuple:
    for suffix, axes in LOGICAL.items():
        if path.endswith(suffix):
            if len(axes) == ndim - 1 and path.startswith("decoder/layers/"):
                return (axes[0], "layers", *axes[1:])
            if len(axes) == ndim:
                return axes
    raise KeyError(f"{path}: no logical axes known for rank {ndim}")


def parse_mesh(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in (p.split("=") for p in text.split(","))}


def _arrays(items: str) -> dict:
    from ckpt_cli.io.orbax import OrbaxCheckpoint

    ckpt = OrbaxCheckpoint(items)
    return {p: ckpt.array(p) for p in ckpt.paths}


def boxes(items: str, mesh_text: str, hosts: int, restore: bool = True) -> dict:
    """{host: {path: [box, ...]}} for a mesh over the first devices; `restore`: also restore with Orbax onto it."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    sizes = parse_mesh(mesh_text)
    devices = jax.devices()[:math.prod(sizes.values())]
    assert len(devices) == math.prod(sizes.values()) and len(devices) % hosts == 0, (len(devices), sizes, hosts)
    mesh = Mesh(np.array(devices).reshape(tuple(sizes.values())), tuple(sizes))
    per_host = len(devices) // hosts
    host_of = {d: i // per_host for i, d in enumerate(devices)}
    arrays = _arrays(items)
    out: dict = {str(h): {} for h in range(hosts)}
    shardings = {}
    for path, arr in arrays.items():
        spec = PartitionSpec(*(MESH_OF[a] if MESH_OF[a] in sizes else None for a in logical_axes(path, arr.rank)))
        sharding = shardings[path] = NamedSharding(mesh, spec)
        for device, index in sharding.devices_indices_map(tuple(arr.shape)).items():
            box = [list(s.indices(n)[:2]) for s, n in zip(index, arr.shape, strict=True)]
            held = out[str(host_of[device])].setdefault(path, [])
            if box not in held:
                held.append(box)
    if restore:
        check_restore(items, arrays, shardings)
    return out


def check_restore(items: str, arrays: dict, shardings: dict) -> None:
    """Orbax restores the params onto the mesh (MaxText's way: ArrayRestoreArgs with each sharding) and gets
    the stored values."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    ckptr = ocp.PyTreeCheckpointer()
    meta = ckptr.metadata(items)
    tree = (meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree)["params"]

    def args(keypath, m):
        path = "/".join(str(getattr(k, "key", k)) for k in keypath[1:])
        return ocp.ArrayRestoreArgs(sharding=shardings[path], global_shape=m.shape)

    restored = ckptr.restore(items, args=ocp.args.PyTreeRestore(
        item={"params": tree}, restore_args={"params": jax.tree_util.tree_map_with_path(args, tree)},
        partial_restore=True))["params"]["params"]
    for path, arr in arrays.items():
        node = restored
        for key in path.split("/"):
            node = node[key]
        assert node.sharding == shardings[path], path
        np.testing.assert_array_equal(np.asarray(node), arr.read().result(), err_msg=path)


def read(items: str, held: dict, hosts: list[str]) -> dict:
    """Each host's boxes read as Orbax reads them (its context: a 100 MB cache for OCDBT B-tree nodes, no chunk
    cache), a fresh context per host."""
    import tensorstore as ts

    from ckpt_cli.io.orbax import OrbaxCheckpoint, kvstore_spec, param_name

    def bytes_read() -> int:
        metrics = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
        return sum(v.get("value", 0) for m in metrics for v in m.get("values", []))

    ckpt = OrbaxCheckpoint(items)
    result = {}
    for host in hosts:
        context = ts.Context({"file_io_concurrency": {"limit": 128},
                              "cache_pool#ocdbt": {"total_bytes_limit": 100_000_000}})
        before = bytes_read()
        needed = 0
        for path, path_boxes in held[host].items():
            kv = kvstore_spec(ckpt.items, param_name(path), ckpt.opts)
            if ckpt.opts.use_ocdbt:
                kv["cache_pool"] = "cache_pool#ocdbt"
            driver = "zarr3" if ckpt.opts.use_zarr3 else "zarr"
            arr = ts.open({"driver": driver, "kvstore": kv, "open": True}, context=context).result()
            itemsize = arr.dtype.numpy_dtype.itemsize
            with ts.Batch() as batch:       # as Orbax reads a host's shards: a chunk two of them share is read once
                futures = [arr[tuple(slice(a, b) for a, b in box)].read(batch=batch) for box in path_boxes]
            for future in futures:
                future.result()
            needed += sum(math.prod(b - a for a, b in box) for box in path_boxes) * itemsize
        result[host] = {"bytes_read": bytes_read() - before, "needed": needed}
    return result


def measure(items: Path, cases: list[tuple[int, str]], tmp: Path, readers: int = 4) -> dict[str, list[dict]]:
    """Per case ("HOSTSxMESH"), per host: bytes read and bytes its devices hold; `readers` processes read for
    the hosts, each host with its own tensorstore context."""
    devices = max(math.prod(parse_mesh(m).values()) for _, m in cases)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {
        "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    proc = subprocess.run([sys.executable, "-m", "tests.pod_reads", "boxes", str(items), json.dumps(cases)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    held = json.loads(proc.stdout)
    boxes_file = tmp / "boxes.json"
    boxes_file.write_text(json.dumps(held))
    jobs = [f"{case}/{host}" for case in held for host in held[case]]
    procs = [subprocess.Popen([sys.executable, "-m", "tests.pod_reads", "read", str(items), str(boxes_file),
                               *jobs[i::readers]], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(readers)]
    results: dict = {}
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        results.update(json.loads(out))
    return {case: [results[f"{case}/{h}"] for h in held[case]] for case in held}


def array_bytes(items: str) -> int:
    return sum(math.prod(a.shape) * a.dtype.numpy_dtype.itemsize for a in _arrays(items).values())


if __name__ == "__main__":
    if sys.argv[1] == "boxes":      # boxes ITEMS CASES_JSON: [[hosts, mesh], ...]; Orbax restores onto the first
        cases = json.loads(sys.argv[3])
        print(json.dumps({f"{h}x{m}": boxes(sys.argv[2], m, h, restore=i == 0) for i, (h, m) in enumerate(cases)}))
    elif sys.argv[1] == "read":     # read ITEMS BOXES_FILE CASE/HOST...
        with open(sys.argv[3]) as f:
            held = json.load(f)
        result = {}
        for job in sys.argv[4:]:
            case, host = job.rsplit("/", 1)
            result[job] = read(sys.argv[2], held[case], [host])[host]
        print(json.dumps(result))
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]}")

"""A MaxText-like baseline converter, for benchmarks only: the incumbent's approach in its eager mode.

MaxText 0.2.5 (`to_maxtext`) does not install on this Python (it needs 3.12), so the benchmark measures
the same approach in the same run: load every HF tensor (safetensors, mmap), build every MaxText
array in memory (stacked layers), then save the whole tree with Orbax (OCDBT + zarr3).
Usage: python maxtext_like.py SRC OUT [--no-scan]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def main() -> None:
    import orbax.checkpoint as ocp
    from safetensors import safe_open

    from ckpt_cli.dtypes import output_dtype
    from ckpt_cli.families import detect_family
    from ckpt_cli.io.hf import load_config
    from ckpt_cli.io.safetensors import shard_files
    from ckpt_cli.plan import build_to_maxtext

    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    scan = "--no-scan" not in sys.argv
    cfg = load_config(src)
    plan = build_to_maxtext(detect_family(cfg), cfg, scan, output_dtype("bf16"))
    hf = {}
    for f in shard_files(src):
        with safe_open(str(f), framework="np") as fh:
            for k in fh.keys():
                hf[k] = fh.get_tensor(k)
    tree: dict = {}
    for t in plan.tensors:
        full = np.empty(t.shape, t.dtype)
        for task in t.tasks:
            x = hf[task.source.name]
            if task.source.rows is not None:
                x = x[task.source.rows[0]:task.source.rows[1]]
            full[t.target_index(task)] = t.apply(x, plan.direction, task)
        node = tree
        *parents, leaf = t.target.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = full
    state = {"step": 0, "params": {"params": tree}, "opt_state": {}}
    mngr = ocp.CheckpointManager(out.resolve(), item_names=("items",),
                                 options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
                                 item_handlers={"items": ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True)})
    mngr.save(0, args=ocp.args.Composite(items=ocp.args.PyTreeSave(item=state)),
              custom_metadata={"scan_layers": scan})
    mngr.wait_until_finished()


if __name__ == "__main__":
    main()

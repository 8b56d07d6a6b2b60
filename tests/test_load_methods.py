"""--load-method safetensors and transformers give bit-identical checkpoints.

transformers 5 holds MoE experts fused in memory (mlp.experts.gate_up_proj); the transformers reader serves them
under the files' per-expert names, so the same family table reads both.
"""

from __future__ import annotations

import numpy as np
import pytest

from ckpt_cli.convert import ToMaxTextOptions, hf_to_maxtext
from tests.expectations import flatten


@pytest.mark.parametrize("kind,dtype", [("qwen3-tied", "bfloat16"), ("llama", "float32"), ("mixtral", "bfloat16"),
                                        ("qwen3-moe", "float32")])
def test_load_methods_identical(hf_models, tmp_path, kind, dtype):
    import orbax.checkpoint as ocp

    src = hf_models(kind, dtype, sharded=True)
    trees = []
    for method in ("safetensors", "transformers"):
        out = tmp_path / method
        hf_to_maxtext(str(src), out, ToMaxTextOptions(load_method=method, dtype="bf16"))
        trees.append(flatten(ocp.PyTreeCheckpointer().restore(str(out / "0" / "items"))["params"]))
    assert set(trees[0]) == set(trees[1])
    for path in trees[0]:
        assert np.array_equal(trees[0][path].view(np.uint16), trees[1][path].view(np.uint16)), path

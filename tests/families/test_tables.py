"""Every family table loads and passes strict validation (one-to-one, known transforms, consistent sizes)."""

from __future__ import annotations

import pytest

from ckpt_cli import registry
from ckpt_cli.errors import UnknownModelError, UnsupportedError
from ckpt_cli.families import FAMILIES, detect_family
from ckpt_cli.families.base import validate_rules


@pytest.mark.parametrize("name", sorted(registry.MODELS))
def test_every_registered_model_has_a_valid_table(name):
    spec = registry.lookup(name)
    cfg = registry.reference_config(name)
    family = detect_family(cfg, name)
    assert family.name == spec.family
    dims = family.dims(cfg)
    validate_rules(family.top_rules(dims, cfg), dims)
    for scan in (True, False):
        try:
            layout = family.blocks(dims, cfg, scan, family.features)
        except UnsupportedError:
            assert scan and name in ("gemma4-e2b", "gemma4-e4b")   # MaxText 0.2.5 builds these unscanned only
            continue
        for block in layout:
            validate_rules(block.rules, dims)   # each block's table is one-to-one on its own


def test_every_family_is_reachable_from_the_registry():
    assert {registry.lookup(n).family for n in registry.MODELS} == set(FAMILIES)


def test_validation_rejects_non_injective_table():
    from ckpt_cli.families.base import row

    rules = [row("a/kernel", "x.weight", "E", "E"), row("b/kernel", "x.weight", "E", "E")]
    with pytest.raises(AssertionError, match="one-to-one"):
        validate_rules(rules, {"E": 4})


def test_validation_rejects_unknown_transform_and_bad_sizes():
    from ckpt_cli.families.base import row

    with pytest.raises(AssertionError, match="unknown transform"):
        validate_rules([row("a/kernel", "x", "E", "E", "rotate")], {"E": 4})
    with pytest.raises(AssertionError, match="element counts"):
        validate_rules([row("a/kernel", "x", "E,E", "E", "transpose")], {"E": 4})


def test_unknown_model_type_and_refused_features():
    with pytest.raises(UnknownModelError, match="model_type 'bert'"):
        detect_family({"model_type": "bert"})
    cfg = registry.reference_config("qwen3-0.6b") | {"attention_bias": True}
    with pytest.raises(UnsupportedError, match="attention_bias"):
        detect_family(cfg).check_config(cfg)
    cfg = registry.reference_config("llama3.1-8b") | {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(UnsupportedError, match="yarn"):
        detect_family(cfg).check_config(cfg)


def test_registry_lookup_and_mismatch():
    from ckpt_cli.errors import ConfigMismatchError

    assert registry.lookup("QWEN3-8B").repo_id == "Qwen/Qwen3-8B"
    with pytest.raises(UnknownModelError, match=r"unknown model 'qwen3-7b'; did you mean .*qwen3-8b"):
        registry.lookup("qwen3-7b")        # the closest names, not every name with the prefix
    spec = registry.lookup("qwen3-8b")
    with pytest.raises(ConfigMismatchError, match="hidden_size = 64"):
        registry.check_against(spec, {"hidden_size": 64}, ("hidden_size",))


def test_doubly_stacked_block_places_layers_on_a_grid():
    """A block with `inner` stacks its layers on axes 1 and 2 (row, position), and refuses a ragged grid."""
    from ckpt_cli.families.base import Block

    block = Block("decoder/layers/local_layers", (0, 1, 2, 4, 5, 6), True, (), inner=3)
    assert block.stack_dims == (2, 3) and block.stack_axes == (1, 2)
    assert [block.stack_index(s) for s in range(6)] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    plain = Block("decoder/layers", (0, 1), True, ())
    assert (plain.stack_dims, plain.stack_axes, plain.stack_index(1)) == ((2,), (1,), (1,))
    with pytest.raises(AssertionError, match="rows of 3"):
        Block("decoder/layers/local_layers", (0, 1, 2, 4), True, (), inner=3)

"""`ckpt models`: the registered MaxText model names, what each converts, and how."""

from __future__ import annotations

from typing import Annotated

import typer

from ckpt_cli.cli import options as O
from ckpt_cli.cli.errors import guarded
from ckpt_cli.cli.output import Output
from ckpt_cli.cli.tables import Col, Grid

DIRECTIONS = ("hf-to-maxtext", "maxtext-to-hf")


def model_record(name: str) -> dict:
    """One model: its family, default repo, parameter count, the directions and layouts its family plans."""
    from ckpt_cli import registry
    from ckpt_cli.errors import UnsupportedError
    from ckpt_cli.families import family_named
    from ckpt_cli.plan import parameter_count

    spec = registry.lookup(name)
    family = family_named(spec.family)
    config = registry.reference_config(name)
    dims = family.dims(family.model_config(config))
    try:
        scanned = family.blocks(dims, family.model_config(config), True, frozenset())
    except UnsupportedError:              # a model MaxText builds unscanned only (gemma4-e2b, -e4b)
        scanned = None
    stacked = [len(b.hf_layers) for b in scanned or () if b.stacked]
    return {"name": spec.name, "family": spec.family, "repo_id": spec.repo_id,
            "parameters": parameter_count(family, config), "layers": config.get("num_hidden_layers"),
            # every family's table plans both directions (plan.build_to_hf inverts build_to_maxtext)
            "directions": list(DIRECTIONS), "scan_layers": [True, False] if scanned is not None else [False],
            "scan_blocks": stacked, "optional_parts": sorted(family.features)}


def _scan(r: dict) -> str:
    blocks = r["scan_blocks"]
    if True not in r["scan_layers"]:
        return "unscanned"
    if len(blocks) == 1:
        return "scanned, unscanned"
    return f"scanned ({len(blocks)} stacks), unscanned"


@guarded
def models(
    family: Annotated[str | None, typer.Option("--family", metavar="FAMILY", autocompletion=O.complete_family,
                                               help="Only this family's models (e.g. qwen3, deepseek).")] = None,
    wide: O.WideOpt = False,
    json_out: O.JsonOpt = False,
    quiet: O.QuietOpt = False,
    help_: O.HelpOpt = False,
) -> None:
    """List the MaxText model names ckpt knows: family, default Hugging Face repo, parameters, directions and
    layouts. A name works as SOURCE (its repo) and as --model (its reference config, checked or used alone).

    Examples:

      ckpt models

      ckpt models --family qwen3 --json
    """
    from ckpt_cli import registry
    from ckpt_cli.cli.report import human_count
    from ckpt_cli.errors import UnknownModelError

    names = [n for n, s in registry.MODELS.items() if family is None or s.family == family]
    if not names:
        known = sorted({s.family for s in registry.MODELS.values()})
        raise UnknownModelError(f"unknown family {family!r}; known: {', '.join(known)}")
    records = [model_record(n) for n in names]
    outp = Output(json_out, quiet, wide)
    if json_out:
        outp.emit_json({"command": "models", "models": records})
        return
    table = Grid([Col("name"), Col("family", drop=1), Col("default repo", wrap=True),
                  Col("parameters", right=True), Col("directions", drop=3), Col("layouts", wrap=True, drop=2)],
                 title=f"{len(records)} MaxText model names (SOURCE or --model)")
    for r in records:
        table.add_row(r["name"], r["family"], r["repo_id"], human_count(r["parameters"]),
                      "both" if r["directions"] == list(DIRECTIONS) else ", ".join(r["directions"]), _scan(r))
    outp.table(table)

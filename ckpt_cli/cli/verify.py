"""`ckpt verify-logits`: prove a conversion right with a forward pass of the MaxText checkpoint."""

from __future__ import annotations

from typing import Annotated

import typer

from ckpt_cli.cli import options as O
from ckpt_cli.cli.errors import guarded
from ckpt_cli.cli.output import Output
from ckpt_cli.cli.report import summary_table
from ckpt_cli.cli.tables import Col, Grid
from ckpt_cli.errors import VerificationFailed
from ckpt_cli.units import human_bytes

MaxTextOpt = Annotated[str, typer.Option(
    "--maxtext", metavar="DIR", help="MaxText Orbax checkpoint: run dir (latest step), step dir or items dir.")]
HFOpt = Annotated[str | None, typer.Option(
    "--hf", metavar="SRC", autocompletion=O.complete_source,
    help="Hugging Face folder, repo id or model name: the reference model, its tokenizer and config.json.")]
TokensOpt = Annotated[list[str] | None, typer.Option(
    "--tokens", metavar="IDS",
    help="Token ids of one prompt, comma-separated; repeat the option, or separate prompts with ';'.")]
PromptOpt = Annotated[list[str] | None, typer.Option(
    "--prompt", metavar="TEXT", help="A text prompt, encoded with the --hf tokenizer (repeatable).")]
MaxKLOpt = Annotated[float, typer.Option(
    "--max-kl", min=0.0, metavar="KL",
    help="Pass when the largest per-position KL(p_hf || p_maxtext) is at most this.")]
TopKOpt = Annotated[int, typer.Option("--top-k", min=1, metavar="K",
help="Tokens shown and compared at the last position.")]
ComputeDtypeOpt = Annotated[O.DtypeChoice, typer.Option(
    "--dtype", help="Compute dtype of both forwards: f32 (exact check) or bf16 (as MaxText serves).")]
GoldenOpt = Annotated[str | None, typer.Option(
    "--golden", metavar="FILE",
    help="Compare against reference logits saved with --save-golden (.npz or .jsonl); no torch needed.")]
SaveGoldenOpt = Annotated[str | None, typer.Option(
    "--save-golden", metavar="FILE",
    help="Also write the HF logits, tokens and prompts to FILE (.npz exact; .jsonl: MaxText's).")]
LoraCkptOpt = Annotated[str | None, typer.Option(
    "--lora", metavar="CKPT", help="A MaxText LoRA checkpoint (kernel_lora_a / kernel_lora_b) applied in the "
                                   "MaxText forward; the HF model gets the PEFT adapter it was converted from.")]
HFLoraOpt = Annotated[str | None, typer.Option(
    "--hf-lora", metavar="ADAPTER", help="A PEFT LoRA adapter folder applied to the HF model (peft's PeftModel when "
                                         "installed); default: the adapter --lora was converted from.")]
HFLoadOpt = Annotated[O.HFLoadChoice, typer.Option(
    "--hf-load", help="auto: the whole HF model if it fits in RAM, else layer-streamed; full; stream.")]
ExpertGroupOpt = Annotated[int | None, typer.Option(
    "--expert-group", min=1, metavar="N",
    help="Routed experts a MoE layer reads and applies at a time (both sides); default: the most that fit in "
         "the available memory.")]


@guarded
def verify_logits(
    maxtext: MaxTextOpt,
    hf: HFOpt = None,
    tokens: TokensOpt = None,
    prompt: PromptOpt = None,
    max_kl: MaxKLOpt = 0.015,
    top_k: TopKOpt = 10,
    dtype: ComputeDtypeOpt = "f32",
    golden: GoldenOpt = None,
    save_golden: SaveGoldenOpt = None,
    hf_load: HFLoadOpt = "auto",
    revision: O.RevisionOpt = None,
    lora: LoraCkptOpt = None,
    hf_lora: HFLoraOpt = None,
    expert_group: ExpertGroupOpt = None,
    wide: O.WideOpt = False,
    json_out: O.JsonOpt = False,
    quiet: O.QuietOpt = False,
    help_: O.HelpOpt = False,
) -> None:
    """Run the MaxText checkpoint's forward pass (JAX, one layer at a time) and the Hugging Face model
    (transformers) on the same token ids, and compare their logits. Exit 0 when the largest per-position
    KL(p_hf || p_maxtext) is at most --max-kl, 1 when it is not.

    Without --tokens or --prompt, three built-in prompts of 8, 16 and 40 token ids (fixed seed) are used.
    MoE layers read their routed experts a group at a time, so a layer larger than memory runs; the memory plan
    (peak estimate, bytes to read, the group size) is printed before the forwards run.

    Examples:

      ckpt verify-logits --maxtext ./qwen3-0.6b-mt --hf ./Qwen3-0.6B

      ckpt verify-logits --maxtext ./l31 --hf ./Llama-3.1-8B --prompt "I love to" --prompt "Today is a" --dtype bf16

      ckpt verify-logits --maxtext ./mt --hf ./Qwen3-0.6B --tokens "1,2,3;4,5,6,7" --save-golden golden.npz

      ckpt verify-logits --maxtext ./mt --golden golden.npz --max-kl 1e-6 --json

      ckpt verify-logits --maxtext ./qwen3-mt --lora ./qwen3-lora-mt --hf ./Qwen3-0.6B --hf-lora ./my-adapter
    """
    from ckpt_cli.io.location import local_path, location, source_arg
    from ckpt_cli.verify.prompts import parse_token_lists
    from ckpt_cli.verify.run import VerifyOptions
    from ckpt_cli.verify.run import verify_logits as run_verify

    maxtext, hf = location(maxtext, "--maxtext", buckets=True), source_arg(hf, "--hf")
    golden, save_golden = local_path(golden, "--golden"), local_path(save_golden, "--save-golden")
    outp = Output(json_out, quiet, wide)
    opts = VerifyOptions(maxtext=maxtext, hf=hf, tokens=parse_token_lists(tokens or []),
                         prompts=tuple(prompt or ()), max_kl=max_kl, top_k=top_k, dtype=dtype, golden=golden,
                         save_golden=save_golden, hf_load=hf_load, revision=revision, lora=lora, hf_lora=hf_lora,
                         expert_group=expert_group)
    with outp.bytes_progress("maxtext forward") as progress:
        result = run_verify(opts, note=outp.note, progress=progress)
    for n in result.notes:
        outp.note(n)
    if json_out:
        outp.emit_json(result.record())
    else:
        for n, r in enumerate(result.results, 1):
            outp.table(top_k_table(result, n, r))
        outp.table(metrics_table(result))
        outp.table(summary_table("verify-logits", summary_rows(result)))
    if not result.passed:
        raise VerificationFailed(result.verdict())
    outp.line(f"[bold green]PASS[/bold green]{result.verdict().removeprefix('PASS')}")


def _token(result, token_id: int) -> str:
    text = result.text(token_id)
    return "" if text is None else repr(text)


def top_k_table(result, n: int, r) -> Grid:
    """Side-by-side top-k of the last position, as MaxText's checker prints it."""
    m = r.metrics
    k = len(m.hf_top_ids)
    with_text = result.token_text is not None
    cols = [Col("rank", right=True)]
    for side in ("HF", "MaxText"):
        cols.append(Col(f"{side} id", right=True))
        if with_text:
            cols.append(Col(f"{side} token", wrap=True, drop=1))
        cols.append(Col(f"{side} logit", right=True))
    cols.append(Col("same"))
    table = Grid(cols, title=f"prompt {n}: {r.prompt.label} ({len(r.prompt.ids)} tokens), top-{k} at the last "
                             f"position", caption=f"overlap {m.top_k_overlap}/{k}, rank agreement "
                                                  f"{m.rank_agreement:.0%}")
    for k, (a, la, b, lb) in enumerate(zip(m.hf_top_ids, m.hf_top_logits, m.mt_top_ids, m.mt_top_logits,
                                           strict=True), 1):
        row = [str(k), str(a)] + ([_token(result, a)] if with_text else []) + [f"{la:.5f}", str(b)]
        row += ([_token(result, b)] if with_text else []) + [f"{lb:.5f}", "✓" if a == b else "✗"]
        table.add_row(*row)
    return table


def metrics_table(result) -> Grid:
    drops = {"prompt": 0, "tokens": 4, "KL mean": 0, "KL max (pos)": 0, "max |Δlogit|": 0, "max |Δprob|": 3,
             "top-1 agree": 0, "top-k overlap": 2, "rank agree": 1}
    table = Grid([Col(c, right=c != "prompt", wrap=c == "prompt", drop=d) for c, d in drops.items()],
                 title="per prompt (KL(p_hf || p_maxtext) per position, softmax in float64)")
    for n, r in enumerate(result.results, 1):
        m = r.metrics
        table.add_row(f"{n}: {r.prompt.label}", str(len(r.prompt.ids)), f"{m.kl_mean:.3g}",
                      f"{m.kl_max:.3g} ({m.kl_argmax})", f"{m.max_abs_dlogit:.3g}", f"{m.max_abs_dprob:.3g}",
                      f"{m.top1_agreement:.0%}", f"{m.top_k_overlap}/{len(m.hf_top_ids)}", f"{m.rank_agreement:.0%}")
    return table


def summary_rows(result) -> dict[str, str]:
    ref = result.reference
    if ref["kind"] == "golden":
        reference = f"golden file {ref['path']}" + (f" (HF {ref['hf']}, {ref['hf_dtype']})" if ref.get("hf") else "")
    else:
        reference = f"{ref['path']} (transformers, {ref['hf_dtype']}, {ref['load']} load)"
        if ref.get("saved_golden"):
            reference += f"; golden saved to {ref['saved_golden']}"
    t = result.timings
    return {
        "maxtext": f"{result.options.maxtext} ({result.family}, {'scanned' if result.scan_layers else 'unscanned'}, "
                   f"config from {result.config_source})",
        "reference": reference,
        "compute dtype": result.options.dtype,
        "max KL": f"{result.kl_max:.3g} (threshold {result.options.max_kl:g})",
        "mean KL": f"{result.kl_mean:.3g}",
        "max |Δlogit|": f"{result.max_abs_dlogit:.3g}",
        "wall": f"{t['total']:.2f} s (reference {t['reference']:.2f} s, maxtext {t['maxtext']:.2f} s)",
        "maxtext read": human_bytes(result.maxtext_bytes_read),
        "peak RSS": human_bytes(result.peak_rss),
    }

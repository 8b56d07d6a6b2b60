"""Benchmark: peak RSS and wall time of `ckpt verify-logits` on a Qwen3-0.6B-shaped checkpoint.

Makes a synthetic Qwen3-0.6B (bf16, random weights, benchmarks/synth.py), converts it with
`ckpt convert hf-to-maxtext` (scanned, bf16), then measures, each in its own process (interpreter
start-up included, the child's own peak RSS from wait4):

1. verify-logits with the HF side live in float32 (whole model), also writing a golden file;
2. the same with the HF side layer-streamed (--hf-load stream);
3. verify-logits --golden (JAX side only: what a machine without torch runs).

Baselines measured in the same run: transformers alone doing the same float32 forward
(from_pretrained + one batch), and the parameter bytes of the model in float32.

Usage: python benchmarks/bench_verify.py [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth import Run, gb, params_of, run_measured, warm, write_synthetic  # noqa: E402

MODEL = "qwen3-0.6b"

HF_ALONE = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM
    from ckpt_cli.verify.prompts import default_prompts
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, attn_implementation="eager")
    prompts = default_prompts(model.config.vocab_size)
    batch = torch.zeros((len(prompts), max(len(p.ids) for p in prompts)), dtype=torch.long)
    for n, p in enumerate(prompts):
        batch[n, :len(p.ids)] = torch.tensor(p.ids)
    with torch.inference_mode():
        model(input_ids=batch, use_cache=False)
""")


def verify(args: list[str]) -> tuple[Run, dict]:
    r = run_measured([sys.executable, "-m", "ckpt_cli", "verify-logits", *args, "--json"])
    if r.returncode != 0:
        raise SystemExit(f"verify-logits {' '.join(args)} exited {r.returncode}:\n{r.stdout}")
    return r, json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="ckpt-bench-verify-"))
    src, out, golden = root / "Qwen3-0.6B-synthetic", root / "qwen3-0.6b-mt", root / "golden.npz"
    if not (src / "model.safetensors").exists():
        print("writing synthetic Qwen3-0.6B (bf16, random) ...", flush=True)
        write_synthetic(src, MODEL)
    if not (out / "0" / "commit_success.txt").exists():
        conv = run_measured([sys.executable, "-m", "ckpt_cli", "convert", "hf-to-maxtext", str(src), "--out", str(out),
                             "--overwrite", "--json"])
        assert conv.returncode == 0, conv.stdout
    warm(src)

    f32_bytes = params_of(MODEL) * 4
    alone = run_measured([sys.executable, "-c", HF_ALONE, str(src)])
    assert alone.returncode == 0
    live, live_data = verify(["--maxtext", str(out), "--hf", str(src), "--hf-load", "full", "--save-golden",
                              str(golden)])
    streamed, streamed_data = verify(["--maxtext", str(out), "--hf", str(src), "--hf-load", "stream"])
    replay, replay_data = verify(["--maxtext", str(out), "--golden", str(golden)])
    assert replay_data["summary"] == live_data["summary"] == streamed_data["summary"]

    s = live_data["summary"]
    print(f"\nQwen3-0.6B-shaped checkpoint ({params_of(MODEL) / 1e6:.0f}M params, {gb(f32_bytes)} in float32), "
          f"scanned bf16 MaxText; prompts of {[p['length'] for p in live_data['prompts']]} tokens, --dtype f32")
    print(f"verdict: {live_data['verdict']}")
    print(f"  max KL {s['kl_max']:.3g}, mean KL {s['kl_mean']:.3g}, max |dlogit| {s['max_abs_dlogit']:.3g}, "
          f"max |dprob| {s['max_abs_dprob']:.3g}")
    print(f"baseline: transformers alone, f32 forward : {alone.wall_s:6.2f} s  peak RSS {gb(alone.peak_rss)}")
    for label, run in (("verify-logits, HF whole model (f32)", live), ("verify-logits, HF layer-streamed", streamed),
                       ("verify-logits --golden (no torch)", replay)):
        print(f"{label:<42}: {run.wall_s:6.2f} s  peak RSS {gb(run.peak_rss)}  = "
              f"{run.peak_rss / alone.peak_rss:.2f}x transformers alone, {run.peak_rss / f32_bytes:.2f}x the f32 "
              f"parameter bytes")
    print(f"golden file: {gb(golden.stat().st_size)}")
    if not args.keep and args.dir is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()

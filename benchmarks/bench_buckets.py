"""hf-to-maxtext into local disk vs the GCS and S3 emulators (fake-gcs-server, moto), same model, same run.

Not a test. Needs the dev extra (the emulators). Usage: python benchmarks/bench_buckets.py [WORKDIR]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import bucket_servers as bs  # noqa: E402


class _Temp:        # what the session fixtures want of pytest's tmp_path_factory
    def __init__(self, root: Path):
        self.root = root

    def mktemp(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(exist_ok=True)
        return path


def make_model(folder: Path) -> None:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Qwen3Config(hidden_size=1024, num_attention_heads=8, num_key_value_heads=4, head_dim=128,
                         intermediate_size=3072, num_hidden_layers=8, vocab_size=32000, tie_word_embeddings=False)
    tf.Qwen3ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)


def convert(src: Path, out: str, env: dict) -> dict:
    run = subprocess.run([sys.executable, "-m", "ckpt_cli", "convert", "hf-to-maxtext", str(src), "--out", out,
                          "--json"], env=dict(os.environ, PYTHONPATH=str(ROOT), **env), capture_output=True,
                         text=True, check=False)
    if run.returncode:
        raise SystemExit(run.stderr[-2000:])
    return json.loads(run.stdout)["stats"]


def main() -> None:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="ckpt-bench-buckets-"))
    src = work / "hf"
    if not (src / "config.json").exists():
        make_model(src)
    temp = _Temp(work)
    gcs_gen, s3_gen = bs.gcs_emulator.__wrapped__(temp), bs.s3_emulator.__wrapped__(temp)
    gcs, s3 = next(gcs_gen), next(s3_gen)
    try:
        gcs.make_bucket("bench")
        s3.make_bucket("bench")
        shutil.rmtree(work / "local-mt", ignore_errors=True)
        runs = (("local disk", str(work / "local-mt"), {}), ("fake-gcs-server", "gs://bench/mt", gcs.env),
                ("moto S3", "s3://bench/mt", s3.env))
        for name, out, env in runs:
            st = convert(src, out, env)
            print(f"{name:16s} {st['bytes_written'] / 1e6:8.1f} MB  {st['wall_s']:6.2f} s  "
                  f"{st['throughput_gbps']:5.2f} GB/s  peak RSS {st['peak_rss'] / 1e9:.2f} GB", flush=True)
    finally:
        for gen in (gcs_gen, s3_gen):
            next(gen, None)


if __name__ == "__main__":
    main()

"""Local disk vs the GCS and S3 emulators (fake-gcs-server, moto), same model, same run, both directions:

1. hf-to-maxtext of a local HF folder into local disk / gs:// / s3://;
2. maxtext-to-hf of the local MaxText checkpoint into local disk / gs:// / s3:// (shards streamed as uploads);
3. hf-to-maxtext from the HF folder mirrored into gs:// / s3:// (ranged reads) into local disk.

Not a test. Needs the dev extra (the emulators). Usage: python benchmarks/bench_buckets.py [WORKDIR]
The emulators run on this machine and share its cores with the conversion: the figures compare code paths
(the bucket protocol's overhead), not real object stores.
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


def convert(direction: str, src: str, out: str, env: dict, *extra: str) -> dict:
    run = subprocess.run([sys.executable, "-m", "ckpt_cli", "convert", direction, src, "--out", out, "--json",
                          *extra], env=dict(os.environ, PYTHONPATH=str(ROOT), **env), capture_output=True,
                         text=True, check=False)
    if run.returncode:
        raise SystemExit(run.stderr[-2000:])
    return json.loads(run.stdout)["stats"]


def mirror(folder: Path, url: str, env: dict) -> None:
    """The HF folder copied into the bucket object by object (as users mirror hub models)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        from ckpt_cli.io.bucket import open_store
        from ckpt_cli.io.location import location

        store = open_store(location(url, "--out", buckets=True))
        for f in sorted(folder.iterdir()):
            if f.is_file():
                store.write(f.name, f.read_bytes()).result()
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def show(what: str, name: str, st: dict) -> None:
    print(f"{what:34s} {name:16s} {st['bytes_written'] / 1e6:8.1f} MB  {st['wall_s']:6.2f} s  "
          f"{st['throughput_gbps']:5.2f} GB/s  peak RSS {st['peak_rss'] / 1e9:.2f} GB", flush=True)


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
        for name in ("local-mt", "local-hf", "from-local", "from-gs", "from-s3"):
            shutil.rmtree(work / name, ignore_errors=True)
        dests = (("local disk", work, {}), ("fake-gcs-server", "gs://bench", gcs.env),
                 ("moto S3", "s3://bench", s3.env))
        for name, base, env in dests:
            out = str(work / "local-mt") if env == {} else f"{base}/mt"
            show("hf-to-maxtext into", name, convert("hf-to-maxtext", str(src), out, env))
        for name, base, env in dests:
            out = str(work / "local-hf") if env == {} else f"{base}/hf-out"
            show("maxtext-to-hf into", name, convert("maxtext-to-hf", str(work / "local-mt"), out, env,
                                                     "--shard-size", "100MB"))
        show("hf-to-maxtext from", "local disk", convert("hf-to-maxtext", str(src), str(work / "from-local"), {}))
        for name, base, env in dests[1:]:
            mirror(src, f"{base}/hf-src", env)
            show("hf-to-maxtext from", name, convert("hf-to-maxtext", f"{base}/hf-src",
                                                     str(work / f"from-{base[:2]}"), env))
    finally:
        for gen in (gcs_gen, s3_gen):
            next(gen, None)


if __name__ == "__main__":
    main()

"""One-line errors for buckets: missing credentials, a missing bucket, permission denied (a store on 127.0.0.1
refusing everything with 403), each as a source and as a destination, both schemes."""

from __future__ import annotations

import pytest

from tests import bucket_servers
from tests.cli_helpers import error_line, run

gcs_emulator, s3_emulator, emulator = bucket_servers.gcs_emulator, bucket_servers.s3_emulator, bucket_servers.emulator
denying_store = bucket_servers.denying_store


@pytest.fixture(scope="module")
def local_mt(hf_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("err-mt") / "mt"
    assert run("convert", "hf-to-maxtext", hf_models("qwen3"), "--out", out, "--quiet").exit_code == 0
    return out


def test_permission_denied(denying_store, hf_models, local_mt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scheme = denying_store
    cases = [(("convert", "hf-to-maxtext", hf_models("qwen3"), "--out", f"{scheme}://bkt/mt"), 3),
             (("convert", "maxtext-to-hf", local_mt, "--out", f"{scheme}://bkt/hf"), 3),
             (("inspect", f"{scheme}://bkt/mt"), 2),
             (("convert", "hf-to-maxtext", f"{scheme}://bkt/hf", "--out", tmp_path / "out"), 2)]
    for args, code in cases:
        result = run(*args)
        assert result.exit_code == code and "permission denied" in error_line(result), (args, result.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_missing_bucket_as_source(emulator, tmp_path):
    missing = f"{emulator.scheme}://no-such-bucket-src/x"
    for args in (("inspect", missing), ("convert", "hf-to-maxtext", missing, "--out", tmp_path / "o"),
                 ("convert", "maxtext-to-hf", missing, "--out", tmp_path / "o")):
        result = run(*args)
        line = error_line(result)
        assert result.exit_code == 2 and ("does not exist" in line or "nothing there" in line), (args, line)
    assert not (tmp_path / "o").exists()


def test_missing_credentials_for_a_write(emulator, hf_models, local_mt, tmp_path, monkeypatch):
    """No credentials anywhere (and, for GCS, no emulator endpoint): refused before anything is written."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG", "CKPT_GCS_ENDPOINT", "GCE_METADATA_HOST",
                 "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    bucket_servers_env = "GCS" if emulator.scheme == "gs" else "AWS"
    for args in (("convert", "hf-to-maxtext", hf_models("qwen3"), "--out", f"{emulator.scheme}://b-x/mt"),
                 ("convert", "maxtext-to-hf", local_mt, "--out", f"{emulator.scheme}://b-x/hf")):
        result = run(*args)
        assert result.exit_code == 3, result.output
        assert f"no {bucket_servers_env} credentials found" in error_line(result)


def test_plan_prices_a_bucket_destination(emulator, hf_models, local_mt, tmp_path):
    """plan --out gs:// / s3:// probes the bucket's write rate (objects removed after), or takes --write-gbps;
    the output takes no local disk; a non-empty prefix is no-go, as convert would refuse it."""
    from ckpt_cli.io.bucket import list_keys, open_store
    from ckpt_cli.io.location import location

    bucket = emulator.make_bucket("plan-dest")
    for args in (("hf-to-maxtext", hf_models("qwen3")), ("maxtext-to-hf", local_mt)):
        result = run("plan", *args, "--out", f"{bucket}/out", "--read-gbps", "1", "--json")
        assert result.exit_code == 0, result.output
        import json

        record = json.loads(result.stdout)
        assert record["go"] is True and record["rates"]["basis"]["write"] == "bucket probe"
        assert record["rates"]["write_gbps"] > 0 and record["out"] == f"{bucket}/out"
        assert record["bytes"]["output_on_disk"] > 0
        flagged = json.loads(run("plan", *args, "--out", f"{bucket}/out", "--read-gbps", "1", "--write-gbps",
                                 "0.25", "--json").stdout)
        assert flagged["rates"]["write_gbps"] == 0.25 and flagged["rates"]["basis"]["write"] == "flag"
    assert list_keys(location(bucket, "--out", buckets=True)) == []          # the probe objects are gone
    open_store(location(f"{bucket}/taken", "--out", buckets=True)).write("x", b"1").result()
    result = run("plan", "maxtext-to-hf", local_mt, "--out", f"{bucket}/taken", "--write-gbps", "1")
    assert result.exit_code == 1 and "no-go" in result.stdout and "not empty" in result.stdout

"""Path arguments written as URLs: routed to the bucket code or refused with one line, never a local folder
named after the URL (issue 15: `--out gs://bucket/x` used to write ./gs:/bucket/x and exit 0)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckpt_cli.errors import UnsupportedError
from ckpt_cli.io.location import BucketURL, location
from tests.cli_helpers import error_line, run


def test_location_parses_urls_and_paths():
    assert location("gs://my-bkt/run/x/", "--out", buckets=True) == BucketURL("gs", "my-bkt", "run/x")
    assert location("s3://my-bkt", "--out", buckets=True) == BucketURL("s3", "my-bkt", "")
    assert location("file:///tmp/x", "--out") == Path("/tmp/x")
    assert location("./gs/x", "--out") == Path("gs/x")
    assert location("org/name", "SOURCE") == Path("org/name")
    assert str(BucketURL("gs", "b-1", "a/b")) == "gs://b-1/a/b"
    for bad, why in [("http://h/x", "unsupported URL scheme http://"), ("hf://org/name", "unsupported URL scheme"),
                     ("gs:/bkt/x", "missing slash"), ("gs://B_/x", "not a valid bucket name"),
                     ("gs://bkt/a/../b", "'..'"), ("file://rel/x", "absolute path")]:
        with pytest.raises(UnsupportedError, match=why):
            location(bad, "--out", buckets=True)
    with pytest.raises(UnsupportedError, match="gs:// is not supported here"):
        location("gs://bkt/x", "--hf-config")


@pytest.mark.parametrize("args", [
    ["convert", "hf-to-maxtext", "{src}", "--out", "http://example.com/x"],
    ["convert", "hf-to-maxtext", "{src}", "--out", "gs:/bkt/x"],
    ["convert", "hf-to-maxtext", "{src}", "--out", "az://bkt/x"],
    ["convert", "hf-to-maxtext", "hf://org/name", "--out", "out"],
    ["convert", "maxtext-to-hf", "{src}", "--out", "ftp://h/x"],
    ["convert", "maxtext-to-hf", "{src}", "--hf-config", "https://h/config.json", "--out", "out"],
    ["convert", "maxtext-to-hf", "{src}", "--tokenizer", "https://h/tok", "--out", "out"],
    ["convert", "maxtext-to-hf", "{src}", "--out", "gs:/bkt/hf"],
    ["convert", "hf-to-maxtext", "az://bkt/hf", "--out", "out"],
    ["demo", "--out", "gs://bkt/demo"],
    ["demo", "--out", "s3:/bkt/demo"],
    ["plan", "hf-to-maxtext", "{src}", "--out", "http://h/x"],
    ["plan", "maxtext-to-hf", "{src}", "--hf-config", "gs://bkt/c.json"],
    ["inspect", "https://h/x"],
    ["inspect", "{src}", "--against", "http://h/x"],
    ["verify-logits", "--maxtext", "http://h/mt", "--hf", "{src}"],
    ["verify-logits", "--maxtext", "{src}", "--golden", "gs://bkt/g.npz"],
    ["verify-logits", "--maxtext", "{src}", "--hf", "{src}", "--save-golden", "s3://bkt/g.npz"],
])
def test_url_arguments_are_refused_in_one_line_and_write_nothing(args, hf_models, tmp_path, monkeypatch):
    src = hf_models("qwen3")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    result = run(*(a.format(src=src) for a in args))
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert "URL" in line or "not supported here" in line or "missing slash" in line, line
    assert list(work.iterdir()) == []       # no folder named gs:, http:, ... and nothing else

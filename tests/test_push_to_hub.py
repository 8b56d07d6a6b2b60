"""maxtext-to-hf --push-to-hub against the fake hub on 127.0.0.1 (the real huggingface_hub client, LFS path)."""

from __future__ import annotations

import json

import pytest

from tests.cli_helpers import error_line, run
from tests.hub_server import FAKE_TOKEN, fake_hub  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def local_mt(hf_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("push-mt") / "mt"
    result = run("convert", "hf-to-maxtext", hf_models("qwen3"), "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    return out


def same_files(folder, pushed) -> None:
    names = sorted(p.name for p in folder.iterdir())
    assert sorted(p.name for p in pushed.iterdir()) == names and "config.json" in names
    for name in names:
        assert (pushed / name).read_bytes() == (folder / name).read_bytes(), name


def test_push_to_hub_main_and_branch(fake_hub, local_mt, tmp_path, monkeypatch):  # noqa: F811
    hub, _ = fake_hub
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    out = tmp_path / "hf"
    result = run("convert", "maxtext-to-hf", local_mt, "--out", out, "--shard-size", "40KB",
                 "--push-to-hub", "me/tiny", "--private", "--json")
    assert result.exit_code == 0, result.output
    pushed = json.loads(result.stdout)["pushed"]
    assert pushed["repo_id"] == "me/tiny" and pushed["revision"] == "main" and pushed["commit"]
    assert hub.created["me/tiny"].get("visibility") == "private" or hub.created["me/tiny"].get("private") is True
    same_files(out, hub.repos["me/tiny"])
    assert [c["revision"] for c in hub.commits] == ["main"]
    assert any(n.endswith(".safetensors") for n in hub.commits[0]["paths"])
    assert len(hub.lfs_objects) == sum(1 for _ in out.glob("*.safetensors")) > 1      # shards went through LFS
    # a branch: created from main, the folder committed there; main untouched
    out2 = tmp_path / "hf-f32"
    result = run("convert", "maxtext-to-hf", local_mt, "--out", out2, "--push-to-hub", "me/tiny", "--revision",
                 "dev", "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    assert "me/tiny @ dev" in result.stdout
    branch = hub.branches[("me/tiny", "dev")]
    assert (branch / "model.safetensors").read_bytes() == (out2 / "model.safetensors").read_bytes()
    same_files(out, hub.repos["me/tiny"])


def test_push_to_hub_refusals(fake_hub, local_mt, tmp_path, monkeypatch):  # noqa: F811
    """No token: refused before converting. A token the hub refuses: one line, the converted folder kept."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    out = tmp_path / "hf"
    result = run("convert", "maxtext-to-hf", local_mt, "--out", out, "--push-to-hub", "me/x")
    assert result.exit_code == 4 and "no hub token" in error_line(result), result.output
    assert not out.exists()
    result = run("convert", "maxtext-to-hf", local_mt, "--out", out, "--push-to-hub", "not a repo")
    assert result.exit_code == 2 and "not a valid repo id" in error_line(result), result.output
    result = run("convert", "maxtext-to-hf", local_mt, "--out", out, "--private")
    assert result.exit_code == 2 and "--push-to-hub" in result.output
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token")
    result = run("convert", "maxtext-to-hf", local_mt, "--out", out, "--push-to-hub", "me/x", "--quiet")
    assert result.exit_code == 4 and "may not write to me/x (403)" in error_line(result), result.output
    assert f"hf upload me/x {out}" in result.stderr and (out / "config.json").is_file()

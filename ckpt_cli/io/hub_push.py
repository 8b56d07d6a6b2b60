"""`maxtext-to-hf --push-to-hub ORG/NAME`: the converted folder uploaded to a Hugging Face model repo.

huggingface_hub does the upload: `HfApi.upload_folder`, which with `hf_xet` installed (the default) is its
streamed, multi-commit, resumable pipeline (the successor of `upload_large_folder`: rerunning after a
failure transfers only what the hub does not have yet), and otherwise one commit over the LFS protocol.
The token is `HF_TOKEN` or the stored login (`hf auth login`), never a command-line argument. The repo is
created when missing (`--private` makes a new one private; an existing repo keeps its visibility), and
`--revision BRANCH` pushes to that branch, created from main when missing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from ckpt_cli.errors import RemoteError, SourceError
from ckpt_cli.io.remote import hub_errors, is_offline


def check_push(repo_id: str) -> None:
    """Before converting: a valid repo id, a token, and the hub not switched off (each refused in one line)."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise SourceError(f"--push-to-hub {repo_id}: not a valid repo id (expected org/name)") from None
    if "/" not in repo_id:
        raise SourceError(f"--push-to-hub {repo_id}: give the namespace too (org/name or user/name)")
    if is_offline():
        raise RemoteError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set")
    if not get_token():
        raise RemoteError(f"--push-to-hub {repo_id}: no hub token: set HF_TOKEN or run `hf auth login`")


@contextlib.contextmanager
def push_errors(repo_id: str, revision: str | None, folder: Path) -> Iterator[None]:
    """hub_errors, with the write refusals said in a push's words."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        with hub_errors(repo_id, revision):
            try:
                yield
            except HfHubHTTPError as exc:
                status = exc.response.status_code if exc.response is not None else None
                if status == 401:
                    raise RemoteError(f"--push-to-hub {repo_id}: the hub refused the token (401): set a valid "
                                      f"HF_TOKEN or run `hf auth login`") from None
                if status == 403:
                    raise RemoteError(f"--push-to-hub {repo_id}: this token may not write to {repo_id} (403)") from None
                raise
    except RemoteError as exc:
        branch = f" --revision {revision}" if revision else ""
        raise RemoteError(f"{exc}; the converted folder is kept: upload it with `hf upload {repo_id} {folder}{branch}`"
                          ) from None


def push_folder(folder: Path, repo_id: str, private: bool = False, revision: str | None = None,
                message: str = "Upload converted with ckpt") -> dict:
    """Create the repo (and branch) when missing and upload `folder`; returns what was pushed."""
    from huggingface_hub import HfApi

    api = HfApi()
    with push_errors(repo_id, revision, folder):
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                   commit_message=message)
    return {"repo_id": repo_id, "revision": revision or "main", "url": str(url),
            "commit_url": getattr(commit, "commit_url", str(commit)), "commit": getattr(commit, "oid", None)}

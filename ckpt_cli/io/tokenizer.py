"""Tokenizer files for an HF output folder: found in a local folder, or fetched from a hub repo.

Files are copied as they are (no tokenizer library is loaded): tokenizer.json, tokenizer_config.json,
tokenizer.model, special_tokens_map.json, added_tokens.json, vocab/merges files, tiktoken and
sentencepiece models, chat templates.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

from ckpt_cli.errors import SourceError

TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                      "*.tiktoken", "spiece.model", "sentencepiece*.model", "chat_template*")
GENERATION_CONFIG = "generation_config.json"
# The only names taken from the folder a checkpoint says it was converted from (see `carried_files`).
KNOWN_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                         "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
                         "sentencepiece.bpe.model", "tokenizer.tiktoken", "tiktoken.model", "chat_template.jinja",
                         "chat_template.json")


def tokenizer_files(folder: Path) -> dict[str, Path]:
    """The tokenizer files directly inside `folder`, by file name (empty when there are none)."""
    if not folder.is_dir():
        return {}
    return {p.name: p for p in sorted(folder.iterdir())
            if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in TOKENIZER_PATTERNS)}


def resolve_tokenizer(source: str, revision: str | None = None) -> tuple[dict[str, Path], Path | None]:
    """`--tokenizer`: a local folder (or one tokenizer file) or a hub repo id.

    Returns the tokenizer files by name and the generation_config.json found beside them, if any.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return {path.name: path}, None
    if path.is_dir():
        files = tokenizer_files(path)
        if not files:
            raise SourceError(f"{source}: no tokenizer files in this folder (tokenizer.json, tokenizer.model, ...)")
        gen = path / GENERATION_CONFIG
        return files, gen if gen.is_file() else None
    if source.count("/") != 1 or path.exists():
        raise SourceError(f"--tokenizer {source}: no such folder or file, and not an org/name repo id")
    from ckpt_cli.io import hf

    folder = hf.download(source, revision, allow_patterns=[*TOKENIZER_PATTERNS, GENERATION_CONFIG])
    files = tokenizer_files(folder)
    if not files:
        raise SourceError(f"{source}: the repo has no tokenizer files (tokenizer.json, tokenizer.model, ...)")
    gen = folder / GENERATION_CONFIG
    return files, gen if gen.is_file() else None


def carried_files(folder: Path,
                  names: tuple[str, ...] = (*KNOWN_TOKENIZER_FILES, GENERATION_CONFIG)) -> dict[str, Path]:
    """The files among `names` that `folder` holds as regular files, never through a symbolic link that leads
    out of it. For the folder a checkpoint's metadata names (which a shared checkpoint controls): a link out
    of it could make the copy pick up any local file. A hub-cache snapshot's links into its own repo's blobs
    are the one exception (that is how the cache stores every file)."""
    root = folder.resolve()
    roots = [root]
    if root.parent.name == "snapshots":
        roots.append((root.parent.parent / "blobs").resolve())
    found = {}
    for name in names:
        path = folder / name
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError):
            continue
        if target.is_file() and any(target.is_relative_to(r) for r in roots):
            found[name] = path
    return found

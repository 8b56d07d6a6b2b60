"""The token ids verify-logits feeds both models, and how token ids are shown as text.

Prompts come from `--tokens` (ids, no tokenizer), from `--prompt` (text, encoded with the HF
folder's tokenizer, BOS included when the tokenizer adds one, as MaxText's golden generator does),
from a golden file, or from a small built-in set of deterministic ids. Showing ids as text uses the
light `tokenizers` library on `tokenizer.json`, so the golden path never imports transformers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ckpt_cli.errors import CkptError, SourceError

DEFAULT_LENGTHS = (8, 16, 40)
DEFAULT_SEED = 20240604


@dataclass(frozen=True)
class Prompt:
    """One prompt: its token ids and, when it was given as text, the text."""

    ids: tuple[int, ...]
    text: str | None = None

    @property
    def label(self) -> str:
        if self.text is not None:
            return repr(self.text) if len(self.text) <= 40 else repr(self.text[:37] + "...")
        head = ",".join(map(str, self.ids[:6]))
        return f"ids {head}{',…' if len(self.ids) > 6 else ''}"


def parse_token_lists(values: Iterable[str]) -> list[tuple[int, ...]]:
    """`--tokens` values -> id lists. Each value is one comma-separated list; ';' separates several lists.

    '1,2,3' -> [(1, 2, 3)]; '1,2;3,4' -> [(1, 2), (3, 4)]. Spaces are ignored.
    """
    lists: list[tuple[int, ...]] = []
    for value in values:
        for part in value.split(";"):
            items = [p.strip() for p in part.split(",") if p.strip()]
            if not items:
                if part.strip():
                    raise CkptError(f"--tokens {value!r}: an empty token list")
                continue
            try:
                ids = tuple(int(p) for p in items)
            except ValueError:
                raise CkptError(f"--tokens {value!r}: token ids are integers separated by ',' "
                                f"(';' between prompts)") from None
            lists.append(ids)
    return lists


def default_prompts(vocab: int) -> list[Prompt]:
    """Three prompts of 8, 16 and 40 ids drawn from a fixed seed, within [0, vocab)."""
    rng = np.random.default_rng(DEFAULT_SEED)
    return [Prompt(tuple(int(t) for t in rng.integers(0, vocab, size=n))) for n in DEFAULT_LENGTHS]


def check_ids(prompts: Sequence[Prompt], vocab: int) -> None:
    """Every prompt non-empty and every id inside the vocabulary."""
    for n, p in enumerate(prompts, 1):
        if not p.ids:
            raise CkptError(f"prompt {n} has no tokens")
        bad = [t for t in p.ids if not 0 <= t < vocab]
        if bad:
            raise CkptError(f"prompt {n}: token id {bad[0]} is outside the vocabulary [0, {vocab})")


def encode_texts(folder: Path | None, texts: Sequence[str]) -> list[Prompt]:
    """Encode `--prompt` texts with the HF folder's tokenizer (transformers' AutoTokenizer)."""
    if folder is None:
        raise CkptError("--prompt needs a tokenizer: give --hf FOLDER (with tokenizer files) or use --tokens")
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
    if not any((Path(folder) / n).exists() for n in names):
        raise SourceError(f"{folder}: no tokenizer files ({', '.join(names)}) for --prompt; use --tokens instead")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as exc:
        raise SourceError(f"{folder}: no usable tokenizer for --prompt ({str(exc).splitlines()[0]}); "
                          f"use --tokens instead") from None
    prompts = []
    for text in texts:
        if not text:
            raise CkptError("--prompt: an empty prompt")
        prompts.append(Prompt(tuple(int(t) for t in tok.encode(text)), text))
    return prompts


class TokenText:
    """Token id -> its text, from `tokenizer.json` with the `tokenizers` library (no transformers, no torch)."""

    def __init__(self, tokenizer):
        self._tok = tokenizer

    @classmethod
    def find(cls, folder: Path | None) -> TokenText | None:
        """The folder's tokenizer.json, or None (ids are then shown alone)."""
        if folder is None or not (Path(folder) / "tokenizer.json").exists():
            return None
        try:
            from tokenizers import Tokenizer

            return cls(Tokenizer.from_file(str(Path(folder) / "tokenizer.json")))
        except Exception:  # noqa: BLE001 - text is a courtesy; a broken tokenizer must not fail verification
            return None

    def __call__(self, token_id: int) -> str:
        return self._tok.decode([int(token_id)], skip_special_tokens=False)

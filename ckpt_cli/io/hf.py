"""Hugging Face sources: resolving SOURCE to a local folder and config, and the two tensor readers.

SOURCE is a local folder, a MaxText model name from the registry (its default repo), or a repo id.
Remote repos are fetched through huggingface_hub (HF_TOKEN / stored login, HF_HOME, HF_ENDPOINT,
HF_HUB_OFFLINE, --revision all honoured by the client itself).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ckpt_cli import registry
from ckpt_cli.errors import RemoteError, SourceError
from ckpt_cli.io.safetensors import SafetensorsFolder
from ckpt_cli.plan import SourceSlice


@dataclass(frozen=True)
class HFSource:
    """A resolved source: where its files are, its config, and what the user called it."""

    folder: Path
    config: dict
    label: str
    model_name: str | None = None
    repo_id: str | None = None
    revision: str | None = None


def load_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise SourceError(f"{folder}: no config.json")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SourceError(f"{path}: not valid JSON ({exc})") from None
    # Multimodal wrappers nest the text model; plain causal LMs are flat.
    return cfg


def resolve(source: str, revision: str | None = None) -> HFSource:
    """Turn a user's SOURCE into a local folder with a config (downloading a repo when needed)."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceError(f"{source} is not a folder (expected config.json + *.safetensors)")
        return HFSource(path, load_config(path), str(path))
    model_name = None
    repo_id = source
    if registry.is_model_name(source):
        spec = registry.lookup(source)
        model_name, repo_id = spec.name, spec.repo_id
    elif "/" not in source or source.count("/") > 1:
        raise SourceError(f"{source}: no such folder, and not a model name or an org/name repo id")
    folder = download(repo_id, revision)
    return HFSource(folder, load_config(folder), repo_id, model_name, repo_id, revision)


def download(repo_id: str, revision: str | None) -> Path:
    """Fetch config, index and safetensors shards of a repo into the hub cache; return the folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"]))
    except GatedRepoError:
        raise RemoteError(f"{repo_id} is gated: accept its licence on the hub and set HF_TOKEN "
                          f"(or run `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise RemoteError(f"{repo_id}: repository not found (or private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise RemoteError(f"{repo_id}: revision {revision} not found") from None
    except LocalEntryNotFoundError:
        raise RemoteError(f"{repo_id}: not in the local cache and the hub cannot be reached "
                          f"(HF_HUB_OFFLINE is set or there is no network)") from None
    except HfHubHTTPError as exc:
        raise RemoteError(f"{repo_id}: the hub answered {exc.response.status_code if exc.response else '?'}"
                          f" ({str(exc).splitlines()[0]})") from None


class SafetensorsReader:
    """The default reader: one tensor at a time from safetensors shards, by pread."""

    def __init__(self, folder: Path):
        self.files = SafetensorsFolder(folder)

    def describe(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        info = self.files.info(name)
        return info.shape, info.dtype

    def read(self, source: SourceSlice) -> np.ndarray:
        if source.axes:
            raise AssertionError("HF sources are read whole or by rows")
        return self.files.read(source.name, source.rows)

    def order_key(self, source: SourceSlice) -> tuple:
        info = self.files.info(source.name)
        return (str(info.file), info.begin)

    @property
    def names(self) -> list[str]:
        return list(self.files.tensors)


class TransformersReader:
    """Loads the model with transformers (from_pretrained, dtype="auto") and serves its state_dict.

    For sources the safetensors reader cannot read (e.g. .bin weights). Holds the whole model.
    """

    def __init__(self, folder: Path):
        import torch
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto")
        except (OSError, ValueError) as exc:
            raise SourceError(f"transformers cannot load {folder}: {str(exc).splitlines()[0]}") from None
        self.state = {k: v.detach() for k, v in model.state_dict().items()}
        self._torch = torch

    def describe(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        if name not in self.state:
            raise SourceError(f"tensor {name} is missing from the transformers model")
        t = self.state[name]
        return tuple(t.shape), _numpy_dtype(t.dtype, self._torch)

    def read(self, source: SourceSlice) -> np.ndarray:
        t = self.state[source.name]
        if source.rows is not None:
            t = t[source.rows[0]:source.rows[1]]
        return to_numpy(t)

    def order_key(self, source: SourceSlice) -> tuple:
        return (source.name,)

    @property
    def names(self) -> list[str]:
        return list(self.state)


def _numpy_dtype(dtype, torch) -> np.dtype:
    import ml_dtypes

    if dtype == torch.bfloat16:
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(str(dtype).removeprefix("torch."))


def to_numpy(t) -> np.ndarray:
    """A torch tensor as numpy, bf16 kept bit-exact (through an int16 view)."""
    import ml_dtypes
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()

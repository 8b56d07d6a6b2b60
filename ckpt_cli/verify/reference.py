"""The Hugging Face side of verify-logits: transformers' own forward of the source model.

`AutoModelForCausalLM` in float32 or bfloat16 with eager attention, on the same token ids as the
MaxText forward (prompts right-padded to one batch: causal attention keeps padding from touching
real positions). Two ways to hold the weights, chosen by `load`:

* `full`: `from_pretrained`, the whole model in RAM (parameters x bytes per value).
* `stream`: the model is built on the meta device; the embedding, final norm and LM head are loaded,
  and each decoder layer's weights are read from the safetensors files just before that layer runs
  and dropped right after it (forward hooks), so RAM holds about one layer plus the embedding/head.
  Same modules, same math: logits are identical to `full`. Needs safetensors files. Where transformers
  holds a weight differently from the files (transformers 5 fuses the per-expert tensors of Qwen3 MoE and
  Mixtral into `mlp.experts.gate_up_proj` / `down_proj` and renames Mixtral's `block_sparse_moe` to
  `mlp`), each layer's file tensors go through transformers' own load-time conversion
  (`transformers.conversion_mapping`), the one `from_pretrained` applies. Non-persistent buffers
  computed from the config (RoPE frequencies, Gemma3's embedding scale) are rebuilt; so are the RoPE modules inside
  a layer (DeepSeek-V4's compressors and indexer), each time the layer loads.
  A multimodal release (Gemma 3/4, Llama 4: the language model under `model.language_model.` or
  `language_model.model.`) streams its text model alone (the config's text config, the files' text tensors
  renamed), which is the model ckpt converts.
  A MoE layer's routed experts are not loaded with their layer: the layer's experts module (transformers'
  `*Experts` class) runs its own forward (its configured experts implementation, `grouped_mm` by default) a
  group of hit experts at a time (`expert_group`; the group's file tensors read and converted as above, then
  dropped), as one expert-parallel rank of transformers would: the group's experts renumbered 0..G-1, the slots
  routed elsewhere given transformers' EP sentinel G. So a layer larger than memory runs with transformers' own
  expert math: one group (every hit expert) gives the whole layer's bits; several give the same figures up to
  rounding (the groups' outputs, each cast to the compute dtype by transformers, are added in float32). Llama 4's
  experts (a batched matmul over every expert) run a group of experts' rows at a time, the experts no token
  reaches (all-zero input, so zero output) skipped.
  fp8 weights (DeepSeek-V3 / Kimi K2: e4m3 with a float32 `weight_scale_inv` per 128x128 block) are read through
  ckpt's own reader and dequantized on the fly (in float32, then the compute dtype), as MXFP4 and int4 weights are.
* `auto` (default): `full` when the estimate fits in the available memory, else `stream`; when
  even streaming does not fit, a one-line error instead of running out of memory. A quantized (fp8) source is
  always streamed: its weights are dequantized by ckpt's reader, which `from_pretrained` does not use.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from ckpt_cli.errors import CkptError, SourceError
from ckpt_cli.io.safetensors import SafetensorsFolder
from ckpt_cli.plan import SourceSlice
from ckpt_cli.units import human_bytes
from ckpt_cli.verify.prompts import Prompt

LOAD_MODES = ("auto", "full", "stream")
LAYERS_PREFIX = "model.layers."
OVERHEAD_BYTES = 512 * 1024 * 1024   # interpreter, torch, transformers, allocator slack
FIT_FRACTION = 0.85                  # use at most this share of the available memory
# Bytes held per expert of a streamed group, in units of the expert's own bytes: the file tensors read, the stacked
# copies and allocator slack (measured 2.6 on a full-width Kimi K2 MoE layer, benchmarks/bench_kimi_experts.py).
EXPERT_COPIES = 3
PER_EXPERT = re.compile(r"\.experts\.\d+\.")   # released per-expert tensors (transformers 5 fuses them)
EXPERT_NUMBER = re.compile(r"\.experts\.(\d+)\.")
ROUTED_EXPERTS = re.compile(r"\.experts\.")    # a routed expert's tensor, fused (X, ...) or per expert


class NotEnoughMemory(CkptError):
    """The reference model cannot be run in the memory this machine has."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes the HF forward needs, loaded whole or layer-streamed, and the bytes available.

    Streamed, a MoE layer's routed experts are loaded a group at a time: `stream_fixed` plus, per expert of the
    group, `EXPERT_COPIES` times `expert_bytes` (the tensors read, the stacked copies, slack); `stream` is the need
    with one expert a
    time (`stream_with(group)` with more). `quantized`: the folder holds fp8 weights (streamed only)."""

    full: int
    stream: int | None          # None when the folder cannot be streamed (no safetensors)
    available: int
    stream_fixed: int = 0
    expert_bytes: int = 0       # one routed expert of one layer in the compute dtype
    experts: int = 0            # routed experts of a MoE layer
    quantized: bool = False

    def stream_with(self, group: int | None) -> int | None:
        if self.stream is None or not self.experts:
            return self.stream
        return self.stream_fixed + EXPERT_COPIES * self.expert_bytes * max(1, min(group or self.experts, self.experts))


def available_memory() -> int:
    """MemAvailable, capped by a cgroup v2 limit when there is one (bytes)."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            room = int(limit) - used
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail if avail is not None else 1 << 62


def _torch_dtype(dtype: str):
    import torch

    return {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]


# Where a multimodal release keeps its language model (transformers 5's saves, the Hub's Gemma 3 / Llama 4 files),
# and the text model's own names for them.
TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                 ("language_model.lm_head.", "lm_head."))


def text_names(names) -> dict[str, str]:
    """{text-model name: file name}: the names themselves for a text model's files; for a multimodal release (no
    `model.layers.*`, its language model under a prefix) the language model's tensors renamed to a text model's,
    the vision/audio towers left out."""
    names = list(names)
    if any(n.startswith(LAYERS_PREFIX) for n in names):
        return {n: n for n in names}
    out = {}
    for n in names:
        for prefix, to in TEXT_PREFIXES:
            if n.startswith(prefix):
                out[to + n[len(prefix):]] = n
                break
    return out if any(k.startswith(LAYERS_PREFIX) for k in out) else {n: n for n in names}


def estimate_memory(folder: Path, cfg: dict, prompts: Sequence[Prompt], dtype: str) -> MemoryEstimate:
    """Parameter bytes in the compute dtype plus activations, for a whole model and for layer streaming."""
    itemsize = 4 if dtype == "f32" else 2
    batch, length = len(prompts), max(len(p.ids) for p in prompts)
    vocab, heads = int(cfg["vocab_size"]), int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    # logits in the model dtype and as float32, the eager attention scores, a few hidden states
    activations = batch * length * (vocab * (itemsize + 8) + 3 * heads * length * 4 + 16 * hidden * 4)
    try:
        files = SafetensorsFolder(folder)
    except SourceError:
        size = sum(f.stat().st_size for f in Path(folder).glob("*.bin"))
        stored = 2 if str(cfg.get("dtype") or cfg.get("torch_dtype")) in ("bfloat16", "float16") else 4
        return MemoryEstimate(size * itemsize // stored + activations + OVERHEAD_BYTES, None, available_memory())
    layer_bytes: dict[int, int] = {}
    expert_bytes: dict[int, int] = {}
    expert_ids: dict[int, set[int]] = {}
    fused_experts = 0
    other = largest_read = 0
    quantized = False
    for name, file_name in text_names(files.tensors).items():   # a multimodal release: its language model
        info = files.tensors[file_name]
        if info.dtype.itemsize == 1 and info.dtype.name.startswith("float8"):
            quantized = True
        if name.endswith("_scale_inv"):
            continue   # an fp8 weight's block scales: read with it, not held
        n = int(np.prod(info.shape, dtype=np.int64)) * itemsize
        largest_read = max(largest_read, n if info.dtype.itemsize == 1 else info.nbytes)
        if name.startswith(LAYERS_PREFIX):
            i = int(name[len(LAYERS_PREFIX):].split(".", 1)[0])
            if ROUTED_EXPERTS.search(name):
                number = EXPERT_NUMBER.search(name)
                if number:
                    expert_ids.setdefault(i, set()).add(int(number.group(1)))
                    expert_bytes[i] = expert_bytes.get(i, 0) + n
                else:   # fused (X, ...) in the file
                    fused_experts = max(fused_experts, info.shape[0])
                    expert_bytes[i] = expert_bytes.get(i, 0) + n
            else:
                layer_bytes[i] = layer_bytes.get(i, 0) + n
        else:
            other += n
    experts = max([len(v) for v in expert_ids.values()] + [fused_experts], default=0)
    per_expert = max(expert_bytes.values(), default=0) // experts if experts else 0
    # from_pretrained maps the safetensors files while it copies out of them: their pages count in RSS then
    stored = sum(info.nbytes for info in files.tensors.values())
    whole = other + sum(layer_bytes.values()) + sum(expert_bytes.values())
    full = whole + stored + activations + OVERHEAD_BYTES
    # streaming: one layer without its experts live (the previous one is dropped first) plus one tensor being read
    # and cast, and a group of experts: the tensors read and transformers' stacked copies coexist while it is built
    layer = max(layer_bytes.values(), default=0)
    fixed = other + layer + largest_read + activations + OVERHEAD_BYTES
    stream = fixed + EXPERT_COPIES * per_expert
    return MemoryEstimate(full, stream, available_memory(), fixed, per_expert, experts, quantized)


def choose_load(load: str, est: MemoryEstimate, dtype: str) -> str:
    """'full' or 'stream' for `load`, or NotEnoughMemory with the figures and what to do instead."""
    if load not in LOAD_MODES:
        raise CkptError(f"unknown --hf-load {load!r}: choose {', '.join(LOAD_MODES)}")
    budget = int(est.available * FIT_FRACTION)
    fits_full = est.full <= budget and not est.quantized
    fits_stream = est.stream is not None and est.stream <= budget
    if load == "full" and fits_full or load == "auto" and fits_full:
        return "full"
    if load in ("stream", "auto") and fits_stream:
        return "stream"
    precision = "float32" if dtype == "f32" else "bfloat16"
    if load == "stream" and est.stream is None:
        raise CkptError("--hf-load stream needs safetensors weights in the HF folder")
    if load == "full" and est.quantized:
        raise CkptError("--hf-load full cannot run fp8 weights on this machine: use --hf-load stream (ckpt "
                        "dequantizes them as it reads each layer)")
    need = est.full if load == "full" or est.stream is None else est.stream
    how = "loaded whole" if need == est.full else "streamed layer by layer"
    hints = "--golden FILE made with --save-golden on a larger machine"
    if dtype == "f32":
        hints = "--dtype bf16, or " + hints
    if load == "full" and est.stream is not None:
        hints = "--hf-load stream, or " + hints
    raise NotEnoughMemory(f"the Hugging Face model needs about {human_bytes(need)} in {precision} ({how}), "
                          f"{human_bytes(est.available)} of memory is available: use {hints}")


def hf_logits(folder: Path, cfg: dict, prompts: Sequence[Prompt], dtype: str, load: str = "auto",
              note: Callable[[str], None] | None = None, adapter: Path | None = None,
              expert_group: int | None = None, est: MemoryEstimate | None = None) -> tuple[list[np.ndarray], dict]:
    """(T_n, V) float32 logits of transformers' forward for each prompt, and how the model was held; with
    `adapter`, of the model with that PEFT LoRA adapter applied (the whole model in memory).

    `expert_group`: streamed, the routed experts a MoE layer loads at a time (None: all its hit experts)."""
    import torch

    est = est or estimate_memory(folder, cfg, prompts, dtype)
    mode = choose_load(load, est, dtype)
    if adapter is not None and mode != "full":
        raise CkptError("a LoRA adapter is applied to the whole HF model in memory: pass --hf-load full")
    need = est.full if mode == "full" else est.stream_with(expert_group) or 0
    if note:
        experts = f", experts {expert_group} at a time" if mode == "stream" and est.experts and expert_group else ""
        note(f"running the Hugging Face model with transformers ({'float32' if dtype == 'f32' else 'bfloat16'}, "
             f"eager attention, {'whole model' if mode == 'full' else 'layer-streamed'}{experts}, "
             f"~{human_bytes(need)} needed)")
    model = _load_full(folder, dtype) if mode == "full" else StreamedModel(folder, dtype, expert_group)
    if adapter is not None:
        from ckpt_cli.lora_convert import apply_peft

        model = apply_peft(model, adapter, note)
    length = max(len(p.ids) for p in prompts)
    batch = torch.zeros((len(prompts), length), dtype=torch.long)
    for n, p in enumerate(prompts):
        batch[n, : len(p.ids)] = torch.tensor(p.ids, dtype=torch.long)
    with torch.inference_mode():
        out = model(input_ids=batch, use_cache=False).logits
        logits = [out[n, : len(p.ids)].float().numpy().copy() for n, p in enumerate(prompts)]
    del model, out
    info = {"load": mode, "estimated_bytes": need, "available_bytes": est.available}
    if mode == "stream" and est.experts:
        info["expert_group"] = expert_group or est.experts
    return logits, info


# Model types transformers builds under another name: Kimi K2's config.json says `kimi_k2` (the repo's own code,
# a DeepseekV3ForCausalLM), which is transformers' deepseek_v3.
MODEL_TYPE_ALIASES = {"kimi_k2": "deepseek_v3"}


def hf_config(folder: Path):
    """The transformers config of an HF folder (AutoConfig), an aliased model type read as its transformers one."""
    import json

    from transformers import CONFIG_MAPPING, AutoConfig

    try:
        raw = json.loads((folder / "config.json").read_text())
        alias = MODEL_TYPE_ALIASES.get(raw.get("model_type"))
        if alias is None:
            return AutoConfig.from_pretrained(str(folder))
        fields = {k: v for k, v in raw.items() if k not in ("model_type", "auto_map")}
        return CONFIG_MAPPING[alias].from_dict(fields)
    except (OSError, ValueError) as exc:
        raise SourceError(f"transformers cannot read {folder}/config.json: {str(exc).splitlines()[0]}") from None


def _load_full(folder: Path, dtype: str):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = hf_config(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), config=config, dtype=_torch_dtype(dtype),
                                                     attn_implementation="eager")
    except (OSError, ValueError) as exc:
        raise SourceError(f"transformers cannot load {folder}: {str(exc).splitlines()[0]}") from None
    return model.eval()


def _to_torch(array: np.ndarray, torch_dtype):
    """A safetensors view as a torch tensor of `torch_dtype` (bf16 through an int16 view, bit-exact)."""
    import torch

    if array.dtype == np.dtype(ml_dtypes.bfloat16):
        t = torch.from_numpy(np.array(array.view(np.int16))).view(torch.bfloat16)
    else:
        t = torch.from_numpy(np.array(array))
    return t.to(torch_dtype)


class WeightMap:
    """Which file tensors make each tensor of the model's state dict, and how (transformers' load-time conversion).

    transformers 5 keeps, per model type, the renamings and converters `from_pretrained` applies to the file
    tensors (`get_model_conversion_mapping`; e.g. Qwen3 MoE: per expert `mlp.experts.{e}.gate_proj.weight` and
    `up_proj.weight` stacked over experts and concatenated into `mlp.experts.gate_up_proj`). The names are
    matched once, here, exactly as `from_pretrained` matches them; `build` runs the same conversion on just the
    tensors asked for. Without that API (transformers 4, which holds the file layout) names map one to one.
    """

    def __init__(self, model, names):
        state = model.state_dict()
        self.model = model
        self.api = _conversion_api()
        self.groups: dict[str, tuple[object | None, list[tuple[str, str | None]]]] = {}
        self.produced: set[str] = set()
        if self.api is None:
            for name in names:
                if name in state:
                    self.groups[name] = (None, [(name, None)])
            self.produced = set(self.groups)
            return
        rename_source_key, dot_natural_key, renaming_cls, converter_cls, get_mapping = self.api
        mapping = get_mapping(model)
        renamings = [t for t in mapping if isinstance(t, renaming_cls)]
        converters = [t for t in mapping if isinstance(t, converter_cls)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        prefix = model.base_model_prefix
        for name in sorted(names, key=dot_natural_key):   # the order from_pretrained stacks experts in
            target, pattern = rename_source_key(name, renamings, converters, prefix, state)
            if target not in state and name in state:
                target, pattern = rename_source_key(name, [], [], prefix, state)
            if target not in state:
                continue   # a file tensor the model does not use (from_pretrained ignores it too)
            converter = by_pattern[pattern] if pattern is not None else None
            self.groups.setdefault(target, (converter, []))[1].append((name, pattern))
        for target, (converter, _) in self.groups.items():
            if converter is None:
                self.produced.add(target)
            else:   # a one-to-many converter is keyed by its first target (as in from_pretrained)
                first = converter.target_patterns[0]
                self.produced.update(target.replace(first, t) for t in converter.target_patterns)

    def keys_under(self, prefix: str) -> list[str]:
        return [k for k in self.groups if k.startswith(prefix)]

    def build(self, keys, read: Callable[[str], object], experts: Sequence[int] | None = None) -> dict:
        """The model's tensors for the group `keys`, made from the file tensors `read(name)` gives; `experts`: of
        per-expert file tensors (`.experts.<e>.`), only those experts' (the result stacks just them, in order)."""
        out = {}
        for key in keys:
            converter, sources = self.groups[key]
            if experts is not None:
                chosen = set(experts)
                sources = [(n, p) for n, p in sources
                           if (m := EXPERT_NUMBER.search(n)) is None or int(m.group(1)) in chosen]
            if converter is None:
                out[key] = read(sources[0][0])
                continue
            conv = copy.deepcopy(converter)
            for name, pattern in sources:
                conv.add_tensor(key, name, pattern, read(name))
            for name, value in conv.convert(key, model=self.model, config=self.model.config).items():
                out[name] = value[0] if isinstance(value, list) else value
        return out


def _conversion_api():
    """transformers' weight-conversion functions (transformers 5), or None when this transformers has none."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key
    except ImportError:
        return None
    return rename_source_key, dot_natural_key, WeightRenaming, WeightConverter, get_model_conversion_mapping


class StreamedModel:
    """A transformers causal LM whose decoder layers are loaded from safetensors only while they run."""

    def __init__(self, folder: Path, dtype: str, expert_group: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        from ckpt_cli.io.hf import SafetensorsReader

        self.files = SafetensorsFolder(folder)
        self.reader = SafetensorsReader(self.files)   # fp8 block-scaled weights dequantized on the fly (float32)
        self.dtype = _torch_dtype(dtype)
        self.expert_group = expert_group
        config = hf_config(folder)
        self.names = text_names(self.files.tensors)
        if any(k != v for k, v in self.names.items()):   # a multimodal release: stream its text model
            config = config.get_text_config()
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype, attn_implementation="eager")
        layers = dict(model.named_modules()).get(LAYERS_PREFIX.rstrip("."))
        if layers is None:
            raise CkptError(f"{type(model).__name__} has no {LAYERS_PREFIX.rstrip('.')}: cannot stream it; "
                            f"use --hf-load full")
        cls = type(model).__name__
        companions = {c for name in self.files.tensors for c in self.reader.consumed_with(name)}
        self.map = WeightMap(model, [n for n, f in self.names.items() if f not in companions])
        self.layer_groups = [self.map.keys_under(f"{LAYERS_PREFIX}{i}.") for i in range(len(layers))]
        # each layer's routed experts module (transformers' *Experts class): its tensors load a group at a time
        self.expert_keys: list[list[str]] = []
        for i, layer in enumerate(layers):
            keys: list[str] = []
            for name, module in layer.named_modules():
                if name and type(module).__name__.endswith("Experts") and not name.endswith("shared_experts"):
                    prefix = f"{LAYERS_PREFIX}{i}.{name}."
                    keys += [k for k in self.layer_groups[i] if k.startswith(prefix)]
                    module.forward = self._experts_forward(module, prefix, i)
            self.expert_keys.append(keys)
            self.layer_groups[i] = [k for k in self.layer_groups[i] if k not in keys]
        # RoPE modules inside a layer (DeepSeek-V4's compressors and indexer): rebuilt from the config as it loads
        self.layer_ropes = [[n for n, m in layer.named_modules() if n.endswith("rotary_emb")
                             and _rebuildable(m, config)] for layer in layers]
        for i, layer in enumerate(layers):
            unbuilt = [k for k in layer.state_dict() if f"{LAYERS_PREFIX}{i}.{k}" not in self.map.produced]
            if unbuilt:   # e.g. experts stored in a layout transformers' load-time conversion does not know
                how = "" if self.map.api else " (this transformers has no weight-conversion API)"
                raise CkptError(f"cannot stream {cls}: transformers holds {LAYERS_PREFIX}{i}.{unbuilt[0]}, which "
                                f"it cannot build from the weight files{how}; use --hf-load full, or --golden")
            lost = {n for n, _ in layer.named_buffers() if not any(n.startswith(r + ".") for r in self.layer_ropes[i])
                    } - set(layer.state_dict())
            if lost:
                raise CkptError(f"cannot stream {cls}: {LAYERS_PREFIX}{i}.{sorted(lost)[0]} is a buffer not in the "
                                "weight files; use --hf-load full")
        state = model.state_dict()
        tied = bool(getattr(config, "tie_word_embeddings", False))
        top = [k for k in self.map.groups if not k.startswith(LAYERS_PREFIX)]
        others = self.map.build(top, self._read)
        for name in state:
            if not name.startswith(LAYERS_PREFIX) and name not in others and not (tied and name == "lm_head.weight"):
                raise SourceError(f"tensor {name} is missing from {folder}")
        model.load_state_dict(others, strict=False, assign=True)
        if tied:
            model.lm_head.weight = model.get_input_embeddings().weight
        self._rebuild_buffers(model, config)
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(self._loader(i))
            layer.register_forward_hook(self._dropper())
        self.model = model.eval()

    def _read(self, name: str):
        return _to_torch(self.reader.read(SourceSlice(self.names[name])), self.dtype)

    def _read_experts(self, name: str, experts: Sequence[int]):
        """Experts `experts` of a fused (X, ...) file tensor, stacked (one expert read at a time)."""
        import torch

        return torch.cat([_to_torch(self.reader.read(SourceSlice(self.names[name], rows=(x, x + 1))), self.dtype)
                          for x in experts])

    def _expert_tensors(self, i: int, prefix: str, experts: list[int]) -> dict:
        """The experts module's tensors for `experts` only (each (len(experts), ...)), by parameter name."""
        keys = [k for k in self.expert_keys[i] if k.startswith(prefix)]

        def read(name: str):
            return self._read(name) if EXPERT_NUMBER.search(name) else self._read_experts(name, experts)

        return {k.removeprefix(prefix): v for k, v in self.map.build(keys, read, experts).items()}

    def _experts_forward(self, module, prefix: str, i: int):
        """The experts module's forward, its tensors loaded a group of hit experts at a time (see the module doc).

        Called as transformers calls it: `(hidden (BT,E), top_k_index (BT,k), top_k_weights (BT,k))`, or Llama 4's
        `(routed_in (X·BT, E))`. Each group runs the class's own forward (its configured experts implementation) on
        the module holding just that group's experts, renumbered 0..G-1, as one expert-parallel rank of
        transformers: the slots routed elsewhere carry its sentinel (G) and contribute nothing. One group (every
        hit expert) is exactly the whole layer's computation; with several, the groups' outputs are added in
        float32, then cast once.
        """
        import torch

        forward = type(module).forward
        meta = dict(module.named_parameters(recurse=False))
        size = self.expert_group

        def install(experts: list[int]) -> None:
            for name, value in self._expert_tensors(i, prefix, experts).items():
                module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
            module.num_experts = len(experts)

        def restore() -> None:
            module._parameters.update(meta)
            module.num_experts = total
            module._is_expert_parallel = parallel

        def split(hit: list[int]) -> list[list[int]]:
            step = max(1, size or len(hit) or 1)
            return [hit[a:a + step] for a in range(0, len(hit), step)]

        total, parallel = module.num_experts, getattr(module, "_is_expert_parallel", False)

        def routed(hidden, top_k_index, top_k_weights):
            groups = split(torch.unique(top_k_index).tolist())
            total_out = None
            for experts in groups:
                local = torch.full_like(top_k_index, len(experts))   # transformers' expert-parallel sentinel
                for j, x in enumerate(experts):
                    local[top_k_index == x] = j
                install(experts)
                module._is_expert_parallel = len(groups) > 1
                try:
                    out = forward(module, hidden, local, top_k_weights)
                finally:
                    restore()
                if len(groups) == 1:
                    return out
                total_out = out.float() if total_out is None else total_out + out.float()
            return torch.zeros_like(hidden) if total_out is None else total_out.to(hidden.dtype)

        def dense(routed_in):
            per = routed_in.view(total, -1, routed_in.shape[-1])
            out = torch.zeros_like(per)
            hit = [x for x in range(total) if bool(per[x].any())]
            for experts in split(hit):
                install(experts)
                try:
                    rows = forward(module, per[experts].reshape(-1, per.shape[-1]))
                finally:
                    restore()
                out[experts] = rows.view(len(experts), -1, per.shape[-1])
                del rows
            return out.view(-1, per.shape[-1])

        def stream(*args, **kwargs):
            args = (*args, *kwargs.values())
            return dense(*args) if len(args) == 1 else routed(*args)

        return stream

    @staticmethod
    def _rebuild_buffers(model, config) -> None:
        """Non-persistent buffers are not in the files: RoPE modules are rebuilt from the config, other buffers
        (Gemma3's embedding scale) are initialized by the model's own `_init_weights`, as from_pretrained does."""
        import torch

        for name, module in list(model.named_modules()):
            if name.startswith(LAYERS_PREFIX) or not any(b.is_meta for b in module.buffers(recurse=False)):
                continue
            if name.endswith("rotary_emb"):
                parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
                setattr(parent, name.rsplit(".", 1)[-1], type(module)(config=getattr(module, "config", config)))
                continue
            _init_buffers(model, name, module, torch)
        left = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(LAYERS_PREFIX)]
        if left:
            raise CkptError(f"cannot stream: {left[0]} is not loaded; use --hf-load full")

    def _loader(self, i: int):
        prefix = f"{LAYERS_PREFIX}{i}."

        def hook(module, args):
            weights = self.map.build(self.layer_groups[i], self._read)
            missing, _ = module.load_state_dict({k.removeprefix(prefix): v for k, v in weights.items()},
                                                strict=False, assign=True)
            streamed = {k.removeprefix(prefix) for k in self.expert_keys[i]}
            left = [k for k in missing if k not in streamed and not any(k.startswith(s.rsplit(".", 1)[0] + ".")
                                                                         for s in streamed)]
            if left:
                raise CkptError(f"cannot stream: {prefix}{left[0]} was not loaded; use --hf-load full")
            for name in self.layer_ropes[i]:
                rope = module.get_submodule(name)
                parent, _, attr = name.rpartition(".")
                setattr(module.get_submodule(parent) if parent else module, attr,
                        type(rope)(config=getattr(rope, "config", self.model.config)))

        return hook

    @staticmethod
    def _dropper():
        def hook(module, args, output):
            module.to_empty(device="meta")

        return hook

    def __call__(self, **kwargs):
        return self.model(**kwargs)


def _rebuildable(rope, config) -> bool:
    """Whether a RoPE module inside a layer can be built again from its config alone (else the layer is refused)."""
    try:
        type(rope)(config=getattr(rope, "config", config))
    except (TypeError, ValueError, KeyError, AttributeError):
        return False
    return True


def _init_buffers(model, name: str, module, torch) -> None:
    """Give `module`'s meta buffers their values from the model's `_init_weights` (its loaded weights untouched).

    The buffers start as NaN: one the initializer does not set (or a non-float one) is refused in one line.
    """
    refuse = CkptError(f"{name}: a buffer not in the weight files; cannot stream, use --hf-load full")
    init_weights = getattr(model, "_init_weights", None)
    if init_weights is None:
        raise refuse
    for p in module.parameters(recurse=False):
        p._is_hf_initialized = True   # transformers' init functions skip flagged tensors: keep the loaded weights
    fresh = []
    for key, buf in list(module.named_buffers(recurse=False)):
        if buf is None or not buf.is_meta:
            continue
        if not buf.is_floating_point():
            raise refuse
        value = torch.full(buf.shape, float("nan"), dtype=buf.dtype)
        setattr(module, key, value)   # an existing buffer name: stays a buffer, persistence unchanged
        fresh.append(key)
    try:
        from transformers import initialization

        guard = initialization.guard_torch_init_functions()
    except (ImportError, AttributeError):
        guard = contextlib.nullcontext()
    with torch.no_grad(), guard:
        init_weights(module)
    if any(torch.isnan(getattr(module, key)).any() for key in fresh):
        raise refuse

"""verify-logits as a plain function: MaxText forward (JAX, layer-streamed) vs a Hugging Face reference.

Order of work, so memory peaks at the larger of the two sides rather than their sum and mistakes
fail before anything heavy runs: open the checkpoint and settle the config (metadata only, tree
checked against the plan) -> the prompts -> the reference logits (transformers, or a golden file)
-> the MaxText forward -> the figures. The reference is freed before the MaxText forward starts.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ckpt_cli import __version__, registry
from ckpt_cli.errors import CkptError, ConfigMismatchError, SourceError, UnsupportedError
from ckpt_cli.families import detect_family
from ckpt_cli.io.location import BucketURL
from ckpt_cli.io.orbax import OrbaxCheckpoint
from ckpt_cli.io.outdir import check_not_overlapping
from ckpt_cli.resources import peak_rss_bytes
from ckpt_cli.verify import golden as golden_io
from ckpt_cli.verify.metrics import KL_DEFINITION, PromptMetrics, compare
from ckpt_cli.verify.params import OrbaxParams, check_tree, detect_scan
from ckpt_cli.verify.prompts import Prompt, TokenText, check_ids, default_prompts, encode_texts

COMPUTE_DTYPES = {"f32": "float32", "bf16": "bfloat16"}
DEFAULT_MAX_KL = 0.015   # MaxText's own tolerance for live bf16 checks (maxtext-layout.md §12)
_MATCH_KEYS = ("model_type", "tie_word_embeddings", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size")


@dataclass(frozen=True)
class VerifyOptions:
    """Options of verify-logits; the CLI flags map one to one."""

    maxtext: Path | BucketURL
    hf: str | None = None
    tokens: Sequence[tuple[int, ...]] = ()
    prompts: Sequence[str] = ()
    max_kl: float = DEFAULT_MAX_KL
    top_k: int = 10
    dtype: str = "f32"
    golden: Path | None = None
    save_golden: Path | None = None
    hf_load: str = "auto"
    revision: str | None = None
    lora: Path | None = None        # a MaxText LoRA checkpoint applied in the MaxText forward
    hf_lora: str | None = None      # a PEFT adapter applied to the HF model (default: the one --lora came from)
    expert_group: int | None = None   # routed experts a MoE layer reads at a time (None: from the memory budget)


@dataclass
class PromptResult:
    prompt: Prompt
    metrics: PromptMetrics


@dataclass
class VerifyResult:
    """Everything verify-logits measured; `passed` is max KL <= max_kl (and every figure finite)."""

    options: VerifyOptions
    family: str
    scan_layers: bool
    config_source: str
    reference: dict
    results: list[PromptResult]
    vocab_compared: int
    timings: dict[str, float]
    peak_rss: int
    maxtext_bytes_read: int
    token_text: TokenText | None = field(default=None, repr=False)
    notes: list[str] = field(default_factory=list)
    memory_plan: dict | None = None

    @property
    def kl_max(self) -> float:
        return float(np.max([r.metrics.kl_max for r in self.results]))

    @property
    def kl_mean(self) -> float:
        kl = np.concatenate([r.metrics.kl for r in self.results])
        return float(kl.mean())

    @property
    def max_abs_dlogit(self) -> float:
        return float(np.max([r.metrics.max_abs_dlogit for r in self.results]))

    @property
    def worst(self) -> tuple[int, int]:
        """(prompt number from 1, position) of the largest KL."""
        kl = np.array([r.metrics.kl_max for r in self.results])
        n = int(np.nanargmax(kl)) if np.isfinite(kl).any() else 0
        return n + 1, self.results[n].metrics.kl_argmax

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.kl_max) and self.kl_max <= self.options.max_kl
                    and np.isfinite(self.max_abs_dlogit))

    @property
    def positions(self) -> int:
        return sum(len(r.prompt.ids) for r in self.results)

    def verdict(self) -> str:
        n, pos = self.worst
        figures = (f"max KL {self.kl_max:.3g} {'<=' if self.passed else '>'} {self.options.max_kl:g} over "
                   f"{len(self.results)} prompt(s), {self.positions} positions (worst: prompt {n}, position {pos}); "
                   f"max |Δlogit| {self.max_abs_dlogit:.3g}")
        return f"PASS: {figures}" if self.passed else f"FAIL: {figures}"

    def text(self, token_id: int) -> str | None:
        return self.token_text(token_id) if self.token_text else None

    def record(self) -> dict:
        """Every figure as plain JSON data."""
        o = self.options
        prompts = []
        for r in self.results:
            m = r.metrics
            top = [{"rank": k + 1,
                    "hf": {"id": a, "token": self.text(a), "logit": la},
                    "maxtext": {"id": b, "token": self.text(b), "logit": lb}}
                   for k, (a, la, b, lb) in enumerate(zip(m.hf_top_ids, m.hf_top_logits, m.mt_top_ids,
                                                          m.mt_top_logits, strict=True))]
            prompts.append({
                "prompt": r.prompt.text, "tokens": list(r.prompt.ids), "length": len(r.prompt.ids),
                "kl_mean": m.kl_mean, "kl_max": m.kl_max, "kl_max_position": m.kl_argmax,
                "kl_per_position": [float(x) for x in m.kl], "max_abs_dlogit": m.max_abs_dlogit,
                "max_abs_dprob": m.max_abs_dprob, "top1_agreement": m.top1_agreement,
                "top_k": {"k": len(m.hf_top_ids), "overlap": m.top_k_overlap, "rank_agreement": m.rank_agreement,
                          "jaccard": m.jaccard, "last_position": top},
            })
        return {
            "command": "verify-logits", "version": __version__, "passed": self.passed, "verdict": self.verdict(),
            "maxtext": str(o.maxtext), **({"lora": str(o.lora)} if o.lora else {}), "family": self.family,
            "scan_layers": self.scan_layers,
            "config_source": self.config_source, "reference": self.reference, "dtype": o.dtype,
            "max_kl_threshold": o.max_kl, "kl_definition": KL_DEFINITION, "vocab_compared": self.vocab_compared,
            "summary": {
                "prompts": len(self.results), "positions": self.positions, "kl_max": self.kl_max,
                "kl_mean": self.kl_mean, "worst_prompt": self.worst[0], "worst_position": self.worst[1],
                "max_abs_dlogit": self.max_abs_dlogit,
                "max_abs_dprob": max(r.metrics.max_abs_dprob for r in self.results),
                "top1_agreement": float(np.mean([r.metrics.top1_agreement for r in self.results])),
            },
            "prompts": prompts, "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "maxtext_bytes_read": self.maxtext_bytes_read, "peak_rss": self.peak_rss, "notes": self.notes,
            "memory_plan": self.memory_plan,
        }


def _text_config(cfg: dict) -> dict:
    """The config of the model a checkpoint converted from `cfg` holds (a multimodal config's text model), or `cfg`
    itself when no family reads it."""
    try:
        return detect_family(cfg).model_config(cfg)
    except CkptError:
        return cfg


def resolve_config(ckpt: OrbaxCheckpoint, hf_folder: Path | None, golden: golden_io.Golden | None
                   ) -> tuple[dict, str]:
    """The HF config to verify with: carried in the checkpoint, else --hf's config.json, else the golden file's.

    When both the checkpoint and --hf have one, their model type and shapes must agree.
    """
    from ckpt_cli.io.hf import load_config

    carried = ckpt.provenance.get("hf_config")
    folder_cfg = load_config(hf_folder) if hf_folder is not None else None
    if carried and folder_cfg:
        text = _text_config(folder_cfg)     # a multimodal folder (Gemma 3/4, Llama 4) is compared by its text model
        for key in _MATCH_KEYS:
            a, b = carried.get(key), text.get(key)
            if a is not None and b is not None and a != b:
                raise ConfigMismatchError(f"{key} = {b} in {hf_folder}/config.json, but the checkpoint was "
                                          f"converted from a model with {key} = {a}")
    if carried:
        return dict(carried), "checkpoint"
    if folder_cfg:
        return folder_cfg, f"{hf_folder}/config.json"
    if golden is not None and golden.meta.get("hf_config"):
        return dict(golden.meta["hf_config"]), "golden file"
    raise SourceError(f"{ckpt.items}: the checkpoint carries no HF config (not written by ckpt); give --hf "
                      f"FOLDER with a config.json")


def forward_config(cfg: dict, model: str | None = None):
    """(family, forward config) for an HF config (of registered model `model`, when known), refusing what the
    forward does not implement."""
    family = detect_family(cfg, model)
    family.check_config(cfg)
    try:
        if family.name == "deepseek":
            from ckpt_cli.verify.deepseek import DeepseekConfig

            return family, DeepseekConfig.from_hf_config(cfg)
        if family.name in ("gemma", "gemma2", "gemma3"):
            from ckpt_cli.verify.gemma3 import Gemma3Config

            return family, Gemma3Config.from_hf_config(cfg)
        if family.name == "deepseek4":
            from ckpt_cli.verify.deepseek4 import Deepseek4Config

            return family, Deepseek4Config.from_hf_config(cfg)
        if family.name == "gpt_oss":
            from ckpt_cli.verify.gpt_oss import GptOssConfig

            return family, GptOssConfig.from_hf_config(cfg)
        if family.name == "olmo3":
            from ckpt_cli.verify.olmo3 import Olmo3Config

            return family, Olmo3Config.from_hf_config(cfg)
        if family.name in ("qwen3_next", "qwen3_5"):
            from ckpt_cli.verify.qwen3_next import Qwen3NextConfig

            fcfg = Qwen3NextConfig.from_hf_config(family.model_config(cfg))
            # Qwen3.5 (MaxText's qwen3_5 = its Qwen3-Next layers) always renormalises the top-k router weights
            return family, replace(fcfg, norm_topk_prob=True) if family.name == "qwen3_5" else fcfg
        if family.name == "llama4":
            from ckpt_cli.verify.llama4 import Llama4Config

            return family, Llama4Config.from_hf_config(cfg)
        if family.name == "gemma4":
            from ckpt_cli.verify.gemma4 import Gemma4Config

            return family, Gemma4Config.from_hf_config(cfg)
        from ckpt_cli.verify.forward import ForwardConfig

        return family, ForwardConfig.from_hf_config(family.name, cfg)
    except ValueError as exc:
        raise UnsupportedError(f"verify-logits cannot run this config: {exc}") from None


def _prompts(opts: VerifyOptions, hf_folder: Path | None, golden: golden_io.Golden | None, vocab: int
             ) -> list[Prompt]:
    if golden is not None:
        if opts.tokens or opts.prompts:
            raise CkptError("--golden carries its own prompts: drop --tokens/--prompt")
        prompts = golden.prompts
    else:
        prompts = [Prompt(ids) for ids in opts.tokens]
        if opts.prompts:
            prompts += encode_texts(hf_folder, opts.prompts)
        if not prompts:
            prompts = default_prompts(vocab)
    check_ids(prompts, vocab)
    return prompts


def maxtext_forward(params: OrbaxParams, fcfg, prompts: Sequence[Prompt], dtype: str
                    ) -> tuple[list[np.ndarray], list[str]]:
    """Logits of every prompt in one right-padded batch (one pass over the checkpoint), and the forward's notes."""
    length = max(len(p.ids) for p in prompts)
    batch = np.zeros((len(prompts), length), dtype=np.int64)
    for n, p in enumerate(prompts):
        batch[n, : len(p.ids)] = p.ids
    notes: list[str] = []
    if type(fcfg).__name__ == "DeepseekConfig":
        from ckpt_cli.verify.deepseek import deepseek_logits

        logits, notes = deepseek_logits(params, fcfg, batch, dtype=COMPUTE_DTYPES[dtype])
    elif type(fcfg).__name__ == "Deepseek4Config":
        from ckpt_cli.verify.deepseek4 import deepseek4_logits

        logits, notes = deepseek4_logits(params, fcfg, batch, dtype=COMPUTE_DTYPES[dtype])
        if COMPUTE_DTYPES[dtype] != "float32":
            notes.append("the DeepSeek-V4 forward computes in float32 whatever --dtype says")
    elif type(fcfg).__name__ == "Gemma3Config":
        from ckpt_cli.verify.gemma3 import gemma3_logits

        logits = gemma3_logits(params, fcfg, batch, dtype=COMPUTE_DTYPES[dtype])
    elif type(fcfg).__name__ == "GptOssConfig":
        from ckpt_cli.verify.gpt_oss import gpt_oss_logits

        logits = gpt_oss_logits(params, fcfg, batch, dtype=COMPUTE_DTYPES[dtype])
    elif type(fcfg).__name__ == "Olmo3Config":
        from ckpt_cli.verify.olmo3 import olmo3_logits

        logits = olmo3_logits(params, fcfg, batch, dtype=COMPUTE_DTYPES[dtype])
        notes = [fcfg.rope_note] if fcfg.rope_note else []
    elif type(fcfg).__name__ == "Qwen3NextConfig":
        from ckpt_cli.verify.qwen3_next import qwen3_next_logits

        logits = qwen3_next_logits(params, fcfg, batch, dtype=COMPUTE_DTYPES[dtype])
    elif type(fcfg).__name__ == "Llama4Config":
        from ckpt_cli.verify.llama4 import llama4_logits

        logits = llama4_logits(params, fcfg, batch, dtype=COMPUTE_DTYPES[dtype])
    elif type(fcfg).__name__ == "Gemma4Config":
        from ckpt_cli.verify.gemma4 import gemma4_logits

        logits = gemma4_logits(params, fcfg, batch, dtype=COMPUTE_DTYPES[dtype])
    else:
        from ckpt_cli.verify.forward import maxtext_logits

        logits = maxtext_logits(params, fcfg, batch, dtype=COMPUTE_DTYPES[dtype])
    return [logits[n, : len(p.ids)].copy() for n, p in enumerate(prompts)], list(notes)


def verify_logits(opts: VerifyOptions, note: Callable[[str], None] | None = None,
                  progress: Callable[[int, int], None] | None = None) -> VerifyResult:
    """Run both forwards on the same tokens and compare; returns every figure (the caller judges `passed`)."""
    say = note or (lambda msg: None)
    if opts.dtype not in COMPUTE_DTYPES:
        raise CkptError(f"unknown dtype {opts.dtype!r}: choose f32 or bf16")
    if opts.top_k < 1:
        raise CkptError("--top-k must be at least 1")
    if opts.golden and opts.save_golden:
        raise CkptError("--golden and --save-golden exclude each other")
    if opts.save_golden:
        golden_io.check_suffix(opts.save_golden)
    if opts.golden is None and opts.hf is None:
        raise CkptError("give --hf PATH_OR_REPO (run the Hugging Face model) or --golden FILE")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    remote = isinstance(opts.maxtext, BucketURL)        # gs:// or s3://: read in place, nothing local to overlap
    ckpt = OrbaxCheckpoint(opts.maxtext if remote else Path(opts.maxtext))
    golden = golden_io.load(opts.golden) if opts.golden else None
    hf_folder = _hf_folder(opts.hf, opts.revision) if opts.hf else None
    if opts.save_golden:
        reads = [] if remote else [opts.maxtext, ckpt.items]
        check_not_overlapping(opts.save_golden, [*reads, *([hf_folder] if hf_folder else [])], flag="--save-golden")
    cfg, config_source = resolve_config(ckpt, hf_folder, golden)
    model = ckpt.provenance.get("model_name")   # the family it was converted as (Llama 3.3's config reads as 3.1's)
    model = model if model and registry.is_model_name(model) else None
    cfg = detect_family(cfg, model).model_config(cfg)
    family, fcfg = forward_config(cfg, model)
    scan = detect_scan(ckpt)
    layout_notes = check_tree(ckpt, family, cfg, scan)
    lora_ckpt = OrbaxCheckpoint(Path(opts.lora)) if opts.lora else None
    hf_adapter = _hf_adapter(opts, lora_ckpt) if golden is None else None
    prompts = _prompts(opts, hf_folder, golden, fcfg.vocab)
    token_text = TokenText.find(hf_folder)
    timings["setup"] = time.perf_counter() - t0

    if opts.expert_group is not None and opts.expert_group < 1:
        raise CkptError("--expert-group must be at least 1")
    params = OrbaxParams(ckpt, family, cfg, scan, progress=progress)   # metadata only so far
    hf_est = hf_mode = None
    if golden is None:
        from ckpt_cli.verify.reference import choose_load, estimate_memory

        hf_est = estimate_memory(hf_folder, cfg, prompts, opts.dtype)
        hf_mode = choose_load(opts.hf_load, hf_est, opts.dtype)
    from ckpt_cli.verify.budget import plan_memory

    plan = plan_memory(params, prompts, opts.dtype, hf_est, hf_mode, opts.expert_group)
    for line in plan.lines():
        say(line)
    params.expert_group = plan.group or None

    t = time.perf_counter()
    if golden is not None:
        ref_logits = golden.logits
        reference = {"kind": "golden", "path": str(opts.golden), "hf": golden.meta.get("hf"),
                     "hf_dtype": golden.meta.get("dtype")}
    else:
        from ckpt_cli.verify.reference import hf_logits

        ref_logits, info = hf_logits(hf_folder, cfg, prompts, opts.dtype, hf_mode, say, adapter=hf_adapter,
                                     expert_group=plan.group or None, est=hf_est)
        if hf_adapter is not None:
            info["lora"] = str(hf_adapter)
        reference = {"kind": "hf", "path": str(hf_folder), "hf_dtype": opts.dtype, **info}
        if opts.save_golden:
            meta = {"hf": opts.hf, "dtype": opts.dtype, "family": family.name, "hf_config": cfg,
                    "tool": "ckpt", "tool_version": __version__}
            golden_io.save(opts.save_golden, golden_io.Golden(list(prompts), ref_logits, meta))
            reference["saved_golden"] = str(opts.save_golden)
    timings["reference"] = time.perf_counter() - t
    gc.collect()

    t = time.perf_counter()
    say(f"running the MaxText forward in JAX ({COMPUTE_DTYPES[opts.dtype]}, {family.name}, "
        f"{'scanned' if scan else 'unscanned'}, one layer at a time"
        f"{f', experts {plan.group} at a time' if plan.group else ''})")
    if lora_ckpt is not None:
        from ckpt_cli.lora_convert import LoraParams

        params = LoraParams(params, lora_ckpt, family, cfg, scan)
    mt_logits, notes = maxtext_forward(params, fcfg, prompts, opts.dtype)
    notes = [*layout_notes, *family.check_config(cfg), *notes]   # layout notes; what MaxText computes differently
    timings["maxtext"] = time.perf_counter() - t

    vocab = min(fcfg.vocab, min(r.shape[-1] for r in ref_logits))
    if any(r.shape[-1] != fcfg.vocab for r in ref_logits):
        notes.append(f"reference vocabulary {ref_logits[0].shape[-1]} differs from the config's {fcfg.vocab}: "
                     f"comparing the first {vocab} logits")
    results = [PromptResult(p, compare(r[:, :vocab], m[:, :vocab], opts.top_k))
               for p, r, m in zip(prompts, ref_logits, mt_logits, strict=True)]
    timings["total"] = time.perf_counter() - t0
    return VerifyResult(opts, family.name, scan, config_source, reference, results, vocab, timings,
                        peak_rss_bytes(), params.bytes_read, token_text, notes, plan.record())


def _hf_adapter(opts: VerifyOptions, lora_ckpt: OrbaxCheckpoint | None) -> Path | None:
    """The PEFT adapter for the HF side: --hf-lora, else the folder the --lora checkpoint was converted from."""
    if opts.hf_lora:
        return Path(opts.hf_lora)
    if lora_ckpt is None:
        return None
    carried = lora_ckpt.provenance.get("lora")
    source = carried.get("folder") if isinstance(carried, dict) else None
    if source and Path(source).is_dir():
        return Path(source)
    raise CkptError(f"{lora_ckpt.items}: give --hf-lora ADAPTER (the PEFT adapter the HF model runs with); the "
                    "checkpoint names no adapter folder that still exists")


def _hf_folder(hf: str, revision: str | None) -> Path:
    """--hf as a local folder (a repo id is fetched through the hub client)."""
    from ckpt_cli.io import hf as hf_io

    return hf_io.resolve(hf, revision).folder

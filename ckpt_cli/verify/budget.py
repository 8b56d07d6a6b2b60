"""verify-logits' memory plan: what each side holds at its peak, and how many experts a MoE layer streams at a time.

Both forwards hold one decoder layer at a time, except a MoE layer's routed experts, which are read and applied a
*group* at a time (``blocks.routed_experts`` on the MaxText side, ``reference.StreamedModel`` on the Hugging Face
side), so a layer larger than memory (a DeepSeek-V3 MoE layer is 22.5 GB in bf16, Kimi K2's 33.8 GB) still runs.
The group is the largest that fits both sides in ``FIT_FRACTION`` of the available memory (the two sides run one
after the other, the reference first), from metadata alone:

* MaxText side: ``base`` + the largest of (a) the embedding or head read, its device copy and its compute-dtype
  cast, and (b) a layer without its experts (host copy, device copy, cast) plus one expert the same way plus a
  group of experts ``EXPERT_COPIES`` times on the host (the group being applied, the next one being read, slack:
  2.6 measured on a full-width Kimi K2 layer);
* Hugging Face side (layer-streamed): embedding, head and a layer without its experts in the compute dtype, the
  largest tensor read, and a group of experts ``EXPERT_COPIES`` times (the tensors read, transformers' stacked
  copies, allocator slack); loaded
  whole (``--hf-load full``) it does not constrain the group.

``--expert-group N`` forces a group (tests, or a machine whose free memory is known better than ours); the plan is
printed before anything heavy runs and carried in ``--json`` as ``memory_plan``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ckpt_cli.units import human_bytes
from ckpt_cli.verify.blocks import EMBEDDING, FINAL_NORM, LM_HEAD
from ckpt_cli.verify.reference import EXPERT_COPIES, FIT_FRACTION, OVERHEAD_BYTES, MemoryEstimate, available_memory

BASE_BYTES = OVERHEAD_BYTES   # interpreter, jax, allocator slack (as the reference's estimate counts them)
COMPUTE_ITEMSIZE = {"f32": 4, "bf16": 2}


@dataclass(frozen=True)
class MemoryPlan:
    """Figures of a verify-logits run, from metadata (bytes; ``group`` 0 when no layer has routed experts)."""

    available: int
    budget: int
    group: int
    group_forced: bool
    experts: int                 # routed experts of a MoE layer
    moe_layers: int
    expert_bytes: int            # one expert of one layer, as stored in the MaxText checkpoint
    layer_bytes: int             # the largest layer without its routed experts, as stored
    moe_layer_bytes: int         # the largest MoE layer with all its experts, as stored
    top_bytes: int               # embedding, final norm and head, as stored
    read_bytes: int              # what the MaxText forward reads at most (every expert hit)
    maxtext_peak: int
    hf_load: str | None          # "full" or "stream" (None: a golden file, no HF model run)
    hf_peak: int | None

    def record(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        """The plan in a few lines, printed before the forwards run."""
        out = []
        if self.group:
            how = "forced by --expert-group" if self.group_forced else "chosen from the available memory"
            out.append(f"memory plan: {self.moe_layers} MoE layer(s) of {self.experts} experts "
                       f"({human_bytes(self.moe_layer_bytes)} each whole; one expert {human_bytes(self.expert_bytes)}"
                       f"): experts read and applied {self.group} at a time ({how})")
        else:
            out.append("memory plan: no routed experts; one layer at a time")
        held = "whole model" if self.hf_load == "full" else "layer-streamed"
        hf = f"; Hugging Face side ~{human_bytes(self.hf_peak)} ({held})" if self.hf_peak is not None else ""
        over = "" if max(self.maxtext_peak, self.hf_peak or 0) <= self.budget else " (over budget: it may not fit)"
        out.append(f"memory plan: peak ~{human_bytes(self.maxtext_peak)} on the MaxText side{hf}, "
                   f"{human_bytes(self.available)} available (budget {human_bytes(self.budget)}){over}; reads at most "
                   f"{human_bytes(self.read_bytes)} of the checkpoint (largest layer without experts "
                   f"{human_bytes(self.layer_bytes)}, embedding and head {human_bytes(self.top_bytes)})")
        return out


def _maxtext_needs(layer: int, expert: int, top_largest: int, ratio: float, activations: int) -> tuple[int, int]:
    """(fixed bytes, bytes per expert of the group) of the MaxText forward."""
    top_peak = int(top_largest * (2 + ratio))
    layer_peak = int(layer * (2 + ratio) + expert * (2 + ratio))
    return BASE_BYTES + max(top_peak, layer_peak) + activations, EXPERT_COPIES * expert


def plan_memory(params, prompts, dtype: str, hf_est: MemoryEstimate | None = None, hf_load: str | None = None,
                expert_group: int | None = None) -> MemoryPlan:
    """The plan for an ``OrbaxParams`` (metadata only), the prompts and the compute dtype ``f32``/``bf16``.

    ``hf_est``/``hf_load``: the reference's estimate and load mode ("full" or "stream"; None without an HF run).
    """
    available = hf_est.available if hf_est is not None else available_memory()
    budget = int(available * FIT_FRACTION)
    layers = [params.layer_bytes(i) for i in range(params.num_layers)]
    dense = max((d for d, _, _ in layers), default=0)
    moe = [(d, e, x) for d, e, x in layers if x]
    expert = max((e for _, e, _ in moe), default=0)
    experts = max((x for _, _, x in moe), default=0)
    tops = {p: params.ckpt.describe(p) for p in (EMBEDDING, FINAL_NORM, LM_HEAD) if p in params.ckpt.paths}
    top_sizes = {p: math.prod(shape) * np.dtype(dtype_).itemsize for p, (shape, dtype_) in tops.items()}
    stored = max((np.dtype(d).itemsize for _, d in tops.values()), default=2)
    ratio = COMPUTE_ITEMSIZE[dtype] / stored
    batch, length = len(prompts), max(len(p.ids) for p in prompts)
    vocab, hidden = tops[EMBEDDING][0][:2] if EMBEDDING in tops else (0, 0)
    activations = batch * length * (vocab * 12 + 32 * hidden * 4)   # logits (f32 and a copy), hidden states
    fixed, slope = _maxtext_needs(dense, expert, max(top_sizes.values(), default=0), ratio, activations)
    hf_fixed = hf_slope = 0
    if hf_load == "stream" and hf_est is not None:
        hf_fixed, hf_slope = hf_est.stream_fixed, EXPERT_COPIES * hf_est.expert_bytes
    group = 0
    forced = expert_group is not None
    if experts:
        if forced:
            group = max(1, min(int(expert_group), experts))
        else:   # at least one: the reference already refused a model it cannot stream; the MaxText side tries
            fits = [(budget - f) // s for f, s in ((fixed, slope), (hf_fixed, hf_slope)) if s]
            group = max(1, min(experts, *fits))
    peak = fixed + slope * group
    hf_peak = None
    if hf_est is not None and hf_load is not None:
        hf_peak = hf_est.full if hf_load == "full" else hf_est.stream_with(group)
    read = sum(d + e * x for d, e, x in layers) + sum(top_sizes.values())
    if LM_HEAD not in tops:
        read += top_sizes.get(EMBEDDING, 0)   # a tied table is read again as the head
    return MemoryPlan(available=available, budget=budget, group=group, group_forced=forced, experts=experts,
                      moe_layers=len(moe), expert_bytes=expert, layer_bytes=dense,
                      moe_layer_bytes=max((d + e * x for d, e, x in moe), default=0), top_bytes=sum(top_sizes.values()),
                      read_bytes=read, maxtext_peak=peak, hf_load=hf_load, hf_peak=hf_peak)

"""LoRA adapters over a frozen (optionally NF4) base model, from scratch: QLoRA (paper Section 4, Appendix C.4).

The student of GenPI is the base model plus a prompt-specific low-rank adapter; the teacher is the same
model with the adapter switched off. Every linear of every block (q, k, v, o, gate, up, down; not the LM
head) becomes `y = W x + (B A dropout(x)) * alpha / r` with W frozen, A (r, in) kaiming-uniform and
B (out, r) zero, so training starts at the base model. Paper settings: r = 16, alpha = 32, dropout 0.05,
no bias; about 0.5% extra parameters on Llama-3-8B.

Adapters are saved in the Hugging Face PEFT layout (`adapter_config.json` + `adapter_model.safetensors`),
so `peft.PeftModel.from_pretrained` reads ours and `load_adapter` reads PEFT's. A wrapped layer keeps
the base as `.base` and the factors as `.lora_A` / `.lora_B` (bias-free nn.Linear), so our state-dict
key `layers.0.self_attn.q_proj.lora_A.weight` is PEFT's `base_model.model.model.` + the same key.
LoRA weights are kept in fp32 (like PEFT's default `autocast_adapter_dtype`), whatever the base
dtype; the update runs in the compute dtype (bf16 for QLoRA), as torch.autocast would run it, with
fp32 gradients.

    model, tok = load_model(quantize="nf4")
    add_lora(model, LoRAConfig())               # freezes the base, trains only A and B
    with adapter_disabled(model): ...           # the teacher
    compile_for_training(model)                 # optional: each block's training forward + backward compiled
    save_adapter(model, "runs/os/adapter", LoRAConfig())
"""
import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import cpu_kernels
from model import compiler_unavailable, fused_linears
from quant import LINEAR_NAMES, Linear4bit

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model.model."  # PeftModel -> LlamaForCausalLM -> LlamaModel, whose children are ours
SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim")


class AdapterError(ValueError):
    """An adapter that cannot be saved or loaded; the message names the file and the problem."""


@dataclass
class LoRAConfig:
    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    targets: tuple = LINEAR_NAMES  # attribute names of the block linears to adapt

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        self.targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        unknown = [t for t in self.targets if t not in LINEAR_NAMES]
        if not self.targets or unknown:
            raise ValueError(f"LoRA targets must be a non-empty subset of {LINEAR_NAMES}, got {self.targets!r}")
        self.targets = tuple(t for t in LINEAR_NAMES if t in self.targets)  # one canonical order

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def hashed_keep(shape, seed: torch.Tensor, drop: int, device="cpu") -> torch.Tensor:
    """Dropout's keep mask (int8, 1 = kept, 0 = dropped) from a counter-based hash: element i is dropped when the
    low 16 bits of fmix32(i * 0x9E3779B1 + seed) fall below `drop` (fmix32: the 32-bit finalizer of MurmurHash3,
    a bijection that mixes every input bit into every output bit). seed: an int32 scalar tensor, so one compiled
    graph serves every draw. The same bits eagerly or inside a compiled training block, where inductor fuses the
    hash with the mask's product and no random number is drawn per element; cpu_kernels.keep_mask computes them
    in C++, faster, and is used instead where it is built (cpu_keep_mask). Int32 products wrap around, and
    `>>` shifts in copies of the sign bit, so each shift is masked to act as an unsigned one."""
    h = torch.arange(math.prod(shape), dtype=torch.int32, device=device).mul_(-1640531535).add_(seed)  # 0x9E3779B1
    for shift, factor in ((16, -2048144789), (13, -1028477387), (16, None)):       # 0x85EBCA6B, 0xC2B2AE35
        h ^= (h >> shift) & ((1 << (32 - shift)) - 1)
        if factor is not None:
            h *= factor
    # 0/1 by the sign of low 16 bits - drop, not a bool from a comparison: compiled, inductor writes a bool mask
    # (which autograd may keep for the backward) ~8x slower than int8 (1.18 M elements on the 2-core AMD EPYC:
    # 3.8-6.9 against 0.47-0.59 ms), and writes this int8 faster than a comparison's (1.65 ms). A training block
    # of 4 x 512 tokens, forward and backward: 128.8 against 130.9 ms (medians of 60 alternations in one process).
    # Eagerly, in place, as fast as the comparison (2,048 x 1,536: 10.2 against 10.4 ms)
    h &= 0xFFFF
    h -= drop
    h >>= 31                                                                     # -1 where dropped, else 0
    return h.add_(1).to(torch.int8).view(shape)


def draw_seed() -> torch.Tensor:
    """A seed for hashed_keep from torch's CPU generator (torch.manual_seed fixes it): int32 scalar, 31 bits."""
    return torch.randint(2 ** 31, (), dtype=torch.int32)


def dropout_threshold(p: float) -> tuple[int, float]:
    """(drop, scale): hashed_keep drops an element with probability drop / 65536 = round(p * 65536) / 65536
    (0.0500030 for p = 0.05), and the kept ones are scaled by `scale` to keep the mean."""
    drop = round(p * 65536)
    return drop, 65536 / (65536 - drop)


def cpu_keep_mask(shape, p: float, device="cpu"):
    """Dropout's keep mask (int8, 1 = kept) and the scale of the kept elements, by hashed_keep with a new seed:
    its bits from cpu_kernels.keep_mask where the kernels are built, else from hashed_keep's PyTorch ops.
    nn.Dropout draws one random number per element from the CPU's mt19937 (~4 ns each); the hash costs less.
    QLoRA step of 4 x 512 tokens, bf16, compiled, on the 2-core AMD EPYC, 10 alternating steps in one process:
    hashed_keep's ops 1.096x faster than 16-bit random numbers cut from torch's 64-bit draws (the mask this
    replaced, itself 3x faster than nn.Dropout's), every pair faster. The kernel writes a mask of 4 x 512 x 1,536 in
    0.33 ms, where hashed_keep's ops, fused into a compiled graph, cost ~1.2 ms more than its product alone, and
    the graph hashed each mask again for the backward (see compile_for_training)."""
    drop, scale = dropout_threshold(p)
    seed = draw_seed()
    if torch.device(device).type == "cpu" and cpu_kernels.available():
        return cpu_kernels.keep_mask(shape, int(seed), drop), scale
    return hashed_keep(shape, seed, drop, device), scale


def cpu_dropout_unscaled(x, p: float):
    """Dropout as (x with its dropped elements zeroed, the scale of the kept ones): dropout(x) = their
    product, with `cpu_keep_mask`. The scale is left to the caller (LoRA folds it into A, an (r, in)
    weight), and the mask is 0/1 in x's dtype: on the 2-core Xeon a bf16 x times a bf16 mask took 0.46 ms
    for (4, 512, 1,536), times a bool mask 1.76 ms, and the scale another 0.40 ms; the backward pays the
    same again."""
    keep, scale = cpu_keep_mask(x.shape, p, x.device)
    return x * keep.to(x.dtype), scale                                    # 1 = kept, 0 = dropped


# ----------------------------------------------------------------------------- the layer
class LoRALinear(nn.Module):
    """A frozen base linear (nn.Linear or NF4 Linear4bit) plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, cfg: LoRAConfig):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        device = next(base.buffers() if isinstance(base, Linear4bit) else base.parameters()).device
        self.lora_A = nn.Linear(self.in_features, cfg.r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(cfg.r, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT and nn.Linear
        nn.init.zeros_(self.lora_B.weight)                             # delta W = B A = 0 at the start
        self.dropout = nn.Dropout(cfg.dropout)
        self.shared_dropout = {}        # add_lora shares one dict among a model's layers (see dropped)
        self.scale = cfg.scale
        self.enabled, self.merged = True, False

    def forward(self, x):                                                     # x: (..., in)
        out = self.base(x)                                                    # (..., out)
        if not self.enabled or self.merged:
            return out
        # the update in x's dtype, B and dropout's scale folded into the weights: see low_rank_updates
        (update,) = low_rank_updates(x, [self])
        return out + update.to(out.dtype)                                                     # (..., out)

    def dropped(self, x):
        """dropout(x) as (x with the dropped elements zeroed, in x's dtype; the scale of the kept ones):
        their product is dropout(x). q, k and v read the same x (so do gate and up): the first of
        them draws the dropout mask and the others reuse its result, through `shared_dropout`, a dict
        that add_lora gives all of a model's LoRA layers. PEFT draws one mask per layer; drawing 4
        instead of 7 per block saves ~0.4 s of a 9 s SmolLM2 step of 1,024 tokens on 2 CPU threads
        (random numbers cost ~4 ns each there)."""
        if not self.drops:
            return x, 1.0
        if torch.compiler.is_compiling():         # in a block of compile_for_training, which drew the seed
            drawn, scale = self.compiled_keep     # the keep mask, or the seed of hashed_keep for the graph to hash
            if drawn.dim() == 0:
                drawn = hashed_keep(x.shape, drawn, dropout_threshold(self.dropout.p)[0], x.device)
            return x * drawn.to(x.dtype), scale
        version = None if x.is_inference() else x._version                     # inference tensors have none
        memo, key = self.shared_dropout, (version, torch.is_grad_enabled())
        if memo.get("x") is not None and memo["x"]() is x and memo["key"] == key:
            return memo["out"]
        on_cpu = x.device.type == "cpu"
        out = cpu_dropout_unscaled(x, self.dropout.p) if on_cpu else (self.dropout(x), 1.0)
        memo.update(x=weakref.ref(x), key=key, out=out)
        return out

    @property
    def drops(self) -> bool:
        """Whether the forward applies dropout to its input (training, p > 0)."""
        return self.training and self.dropout.p > 0

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scale          # (out, r) @ (r, in)

    def merge(self):
        """W += B A * alpha / r, so the forward costs no more than the base. Not for an NF4 base:
        re-quantizing W + BA would round the update away (PEFT does it with a warning); merge into a
        full-precision copy instead (load_model without quantize, load_adapter, merge_lora)."""
        if isinstance(self.base, Linear4bit):
            raise ValueError("cannot merge LoRA into an NF4 (Linear4bit) base: load the model without "
                             "quantize='nf4', load_adapter, then merge")
        if not self.merged:
            with torch.no_grad():
                self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    def unmerge(self):
        """W -= B A * alpha / r (exact up to rounding: ~1e-7 relative in fp32, coarser in bf16)."""
        if self.merged:
            with torch.no_grad():
                self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    @staticmethod
    def fused_forward(x, layers: list["LoRALinear"]):
        """[layer(x) for layer in layers] for LoRA layers that read the same x (q, k, v; gate, up:
        model.fused_linears), with gradients on: their updates through one low_rank_updates. None where they
        cannot share it (a layer off or merged, other ranks or dropouts)."""
        first = layers[0]
        if not (torch.is_grad_enabled() and all(m.enabled and not m.merged for m in layers)
                and all(m.lora_A.out_features == first.lora_A.out_features and m.dropout.p == first.dropout.p
                        and m.drops == first.drops for m in layers)):
            return None
        bases = fused_linears(x, [m.base for m in layers])                        # (..., out) each
        return [y + u.to(y.dtype) for y, u in zip(bases, low_rank_updates(x, layers))]

    def extra_repr(self) -> str:
        return f"r={self.lora_A.out_features}, scale={self.scale:g}"


def low_rank_updates(x, layers: list["LoRALinear"]) -> list[torch.Tensor]:
    """[B A dropout(x) * alpha / r for each layer], for LoRA layers that read the same x (q, k, v share it, as do
    gate and up, and share its dropout mask), in x's dtype: (..., in) -> [(..., out) per layer]. Their A's are
    stacked (k r, in) for one product, and with gradients on, _LowRankUpdates runs the backward's products.
    The update runs in x's (compute) dtype, as autocast would run it; A and B stay fp32 master weights and get
    fp32 gradients. alpha / r scales B's (out, r) weight, not the (..., out) product, and dropout's scale A's:
    one pass less each. Their history on the 2-core Xeon, QLoRA step of 4 x 512 tokens: 7.19 s/step with the
    update in fp32 and the product scaled, 6.34-6.83 s with B scaled, then in bf16 4.41 against 5.99 s; the
    mask as a 0/1 tensor in x's dtype rather than a bool mask and a scaled input: 4.32 against 4.60 s."""
    kept, keep_scale = layers[0].dropped(x)                  # one mask for the group (dropped)
    a = torch.cat([m.lora_A.weight for m in layers]) if len(layers) > 1 else layers[0].lora_A.weight  # (k r, in)
    if keep_scale != 1.0:
        a = a * keep_scale                                   # no op at inference
    bs = [(m.lora_B.weight * m.scale).to(x.dtype) for m in layers]                     # (out, r) each
    if torch.is_grad_enabled():
        return _LowRankUpdates.apply(kept, a.to(x.dtype), *bs)
    h = F.linear(kept, a.to(x.dtype))                        # (..., k r); inference: no autograd.Function
    return [F.linear(hi, b) for hi, b in zip(h.split(layers[0].lora_A.out_features, -1), bs)]


class _LowRankUpdates(torch.autograd.Function):
    """low_rank_updates' products, forward and backward: the stacked A's one product each way, and B's gradient
    computed as (h^T g)^T, (r, M) @ (M, out), where the compiled autograd graph ran g^T h, (out, M) @ (M, r): for
    (2,048, 1,536) on the 2-core AMD EPYC 0.42 against 0.76 ms. The QLoRA step of bench_qlora.py, 8 alternating
    steps in one process: median 1.006x faster than autograd over the unstacked products (noisy); with the
    attention's own backward (model._CausalAttentionByBlocks) together 1.012x, all 10 pairs faster."""

    @staticmethod
    def forward(ctx, x, a, *bs):                  # x: (..., in); a: (k r, in); bs: k of (out, r)
        x2 = x.reshape(-1, x.shape[-1])                                            # (M, in)
        h = x2 @ a.t()                                                             # (M, k r)
        ctx.save_for_backward(x2, a, h, *bs)
        ctx.in_shape, ctx.r = x.shape, h.shape[1] // len(bs)
        return tuple((hi @ b.t()).view(*x.shape[:-1], -1) for hi, b in zip(h.split(ctx.r, 1), bs))   # (..., out)

    @staticmethod
    def backward(ctx, *grads):                    # grads: k of (..., out)
        x2, a, h, *bs = ctx.saved_tensors
        gs = [g.reshape(-1, g.shape[-1]) for g in grads]                           # (M, out) each
        gh = torch.cat([g @ b for g, b in zip(gs, bs)], 1)                          # (M, k r)
        gbs = [(hi.t() @ g).t() for hi, g in zip(h.split(ctx.r, 1), gs)]          # (out, r) each
        gx = (gh @ a).view(ctx.in_shape) if ctx.needs_input_grad[0] else None       # (..., in)
        return gx, gh.t() @ x2, *gbs


# ----------------------------------------------------------------------------- compiled training blocks
# Which input each adapted linear reads: q, k and v share one dropout mask, gate and up another.
DROPOUT_INPUT = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 2, "up_proj": 2, "down_proj": 3}


def compile_for_training(model, dynamic=None) -> int:
    """torch.compile the blocks' forward for training (grad enabled, train mode, no KV cache); other
    calls, as generation, stay eager. Inductor fuses each block's element-wise work (RMSNorm, rotary,
    SiLU, residual adds, the LoRA updates and the dropout masks) into a few kernels, forward and
    backward (~20-40 s to compile on 2 cores, seconds from inductor's disk cache). NF4
    weights must be kept dequantized (`quant.keep_dequantized`): inside the graph a layer reads its
    kept copy. On a CPU the dropout masks are hashed (hashed_keep; inductor's own CPU random numbers were
    slower than the rest of the block's element-wise work together): before each block runs, its masks' seeds
    are drawn in the order the eager forward draws them, so a seed gives the same masks either way. With
    cpu_kernels built, the masks themselves are made there and passed in (the graph saves them for the
    backward); otherwise the graph hashes the seeds, in the forward and again in the backward. The QLoRA step of
    bench_qlora.py on the 2-core AMD EPYC, 8 alternating steps in one process: median 1.032x faster with the
    masks passed in. Returns the number of blocks compiled."""
    why_not = compile_unavailable(model)
    if why_not:
        raise ValueError(f"compile_for_training: {why_not}; train uncompiled")
    # The first block reads the frozen embedding, an input with no gradient: compiled, it would need a graph
    # of its own (with inductor's cache empty, a first step of 1,500 tokens took 41 s with it, 29 s without) for
    # 1/30 of the work, so it stays eager. The other blocks share one graph.
    first = 0 if model.embed_tokens.weight.requires_grad else 1
    for block in model.layers[first:]:
        block.forward = _compiled_training_forward(block, torch.compile(block.forward, dynamic=dynamic))
    model.compiled_training = True                    # loss.lm_loss compiles its cross-entropy chunks too
    return len(model.layers) - first


def _compiled_training_forward(block, compiled):
    eager = block.forward
    inputs = {}                                       # dropout input -> the LoRA layers reading it
    for path, m in block.named_modules():
        if isinstance(m, LoRALinear):
            inputs.setdefault(DROPOUT_INPUT[path.rsplit(".", 1)[-1]], []).append(m)
    readers = [inputs[k] for k in sorted(inputs)]
    nf4 = [m for m in block.modules() if isinstance(m, Linear4bit)]

    def forward(x, cos, sin, mask, cache, last_only=False):            # x: (B, T, dim)
        if cache is not None or last_only or not (block.training and torch.is_grad_enabled()):
            return eager(x, cos, sin, mask, cache, last_only)
        for m in nf4:
            m.weight_as(x.dtype)                      # the kept copy the graph reads, current
        for layers in readers:                        # this step's masks, in the eager forward's order
            reader = layers[0]
            if reader.drops and reader.enabled and not reader.merged:
                shape, p = (*x.shape[:-1], reader.in_features), reader.dropout.p
                if x.device.type != "cpu":
                    keep = (torch.rand(shape, device=x.device) >= p, 1 / (1 - p))
                elif cpu_kernels.available():             # the graph reads the mask
                    keep = cpu_keep_mask(shape, p)
                else:                                     # the graph hashes it from the seed
                    keep = (draw_seed(), dropout_threshold(p)[1])
                for m in layers:
                    m.compiled_keep = keep
        out = compiled(x, cos, sin, mask, cache)
        for layers in readers:                        # autograd holds what the backward needs
            for m in layers:
                m.__dict__.pop("compiled_keep", None)
        return out
    return forward


def compile_unavailable(model) -> str | None:
    """Why compile_for_training cannot run on `model` here (None if it can): an NF4 weight not kept
    dequantized, or no compiler for inductor's kernels (C++ for a CPU: $CXX, default g++, as
    torch._inductor.config.cpp.cxx; Triton for a GPU)."""
    if any(isinstance(m, Linear4bit) and not m.keep for m in model.modules()):
        return ("the NF4 weights are not kept dequantized (quant.keep_dequantized; train.py --keep-dequantized off, "
                "or auto and they do not fit)")
    return compiler_unavailable(model.embed_tokens.weight.device)


# ----------------------------------------------------------------------------- whole-model operations
def _block_linears(model, targets):
    """[(name, parent, attr, module)] for the target linears inside model.layers, e.g.
    ("layers.0.self_attn.q_proj", <Attention>, "q_proj", <nn.Linear>)."""
    found = []
    for i, block in enumerate(model.layers):
        for path, parent in block.named_modules():
            for attr, child in parent.named_children():
                if attr in targets and isinstance(child, (nn.Linear, Linear4bit, LoRALinear)):
                    found.append((f"layers.{i}.{path + '.' if path else ''}{attr}", parent, attr, child))
    return found


def lora_layers(model) -> dict:
    """{name: LoRALinear} of the model, e.g. "layers.0.self_attn.q_proj"."""
    return {name: m for name, _, _, m in _block_linears(model, LINEAR_NAMES) if isinstance(m, LoRALinear)}


def add_lora(model, cfg: LoRAConfig | None = None):
    """Freeze every parameter of the model and wrap its target block linears in LoRALinear (in place)."""
    cfg = cfg or LoRAConfig()
    if lora_layers(model):
        raise ValueError("the model already has LoRA layers; load_adapter replaces their weights")
    model.requires_grad_(False)
    shared_dropout = {}
    for _, parent, attr, child in _block_linears(model, cfg.targets):
        layer = LoRALinear(child, cfg).train(model.training)                # an eval model stays in eval
        layer.shared_dropout = shared_dropout
        setattr(parent, attr, layer)
    return model


def set_adapter_enabled(model, enabled: bool):
    """Switch every LoRA layer on or off (off = exactly the base model: the GenPI teacher)."""
    layers = lora_layers(model).values()
    if not enabled and any(m.merged for m in layers):
        raise ValueError("the adapter is merged into the weights; unmerge_lora(model) before disabling it")
    for m in layers:
        m.enabled = enabled


@contextlib.contextmanager
def adapter_disabled(model):
    """`with adapter_disabled(model):` runs the base model (the teacher), then turns the adapter back on."""
    set_adapter_enabled(model, False)
    try:
        yield model
    finally:
        set_adapter_enabled(model, True)


def merge_lora(model):
    for m in lora_layers(model).values():
        m.merge()
    return model


def unmerge_lora(model):
    for m in lora_layers(model).values():
        m.unmerge()
    return model


def count_trainable(model) -> tuple[int, int]:
    """(trainable, total) parameters; an NF4 weight counts as its in x out parameters."""
    params = list(model.parameters())  # shared (tied) tensors once
    nf4 = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit))
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + nf4


# ----------------------------------------------------------------------------- adapter files (PEFT layout)
def base_identity(model) -> dict:
    """Name and shape fingerprint of the base model an adapter belongs to."""
    shape = {f: getattr(model.args, f) for f in SHAPE_FIELDS}
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()
    return {"genpi_base_name": str(model.args.name), "genpi_base_sha256": digest,
            "genpi_base_shape": json.dumps(shape, sort_keys=True)}


def peft_config(cfg: LoRAConfig, base_name: str) -> dict:
    """adapter_config.json as PEFT's LoraConfig writes it (PEFT fills every other field with its default)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
            "revision": None, "inference_mode": True, "r": cfg.r, "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout, "target_modules": sorted(cfg.targets), "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "lora_bias": False,
            "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None,
            "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}


def save_adapter(model, directory, cfg: LoRAConfig, base_name: str | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (PEFT keys, base identity in the metadata).
    Atomic: both files go into a temp dir next to `directory`, which then replaces it whole (so the
    directory must hold only an adapter). An interrupted save never leaves a half-written adapter: the old
    one stays (at worst, killed between the two renames, in a hidden `.NAME.old.*` folder beside it)."""
    directory = Path(directory)
    layers = lora_layers(model)
    if not layers:
        raise AdapterError(f"{directory}: the model has no LoRA layers to save")
    if directory.exists():
        extra = {p.name for p in directory.iterdir()} - {CONFIG_FILE, WEIGHTS_FILE, "README.md"}
        if not directory.is_dir() or extra:
            raise AdapterError(f"{directory}: exists and is not an adapter directory ({sorted(extra)[:3]}); "
                               "it would be replaced whole")
    tensors = {f"{PEFT_PREFIX}{name}.lora_{ab}.weight": getattr(m, f"lora_{ab}").weight.detach().contiguous().cpu()
               for name, m in layers.items() for ab in "AB"}
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_config(cfg, base_name or model.args.name), indent=2))
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt", **base_identity(model)})
        if directory.exists():  # a directory cannot be os.replace'd over a non-empty one: swap
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.replace(directory, old / "adapter")
            os.replace(tmp, directory)
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_config(directory) -> LoRAConfig:
    """LoRAConfig from a PEFT adapter_config.json; refuses LoRA variants this module does not implement."""
    path = Path(directory) / CONFIG_FILE
    try:
        c = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path}: cannot read the adapter config ({e})") from None
    unsupported = {"peft_type": "LORA", "bias": "none", "use_rslora": False, "use_dora": False, "lora_bias": False,
                   "fan_in_fan_out": False, "modules_to_save": None, "layers_to_transform": None,
                   "rank_pattern": {}, "alpha_pattern": {}}
    for key, plain in unsupported.items():
        if c.get(key) not in (plain, None):
            raise AdapterError(f"{path}: {key}={c[key]!r} is not supported (only plain LoRA: {key}={plain!r})")
    targets = c.get("target_modules")
    if not isinstance(targets, list):
        raise AdapterError(f"{path}: target_modules must be a list of names, got {targets!r}")
    try:
        return LoRAConfig(r=c.get("r"), alpha=c.get("lora_alpha"), dropout=c.get("lora_dropout", 0.0),
                          targets=tuple(targets))
    except ValueError as e:
        raise AdapterError(f"{path}: {e}") from None


def _read_weights(path: Path):
    """-> ({key: tensor}, metadata) of a safetensors file."""
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:
        raise AdapterError(f"{path}: not a readable safetensors file, it may be truncated ({e})") from None


def load_adapter(model, directory, check_base: bool = True) -> LoRAConfig:
    """Load a PEFT-layout LoRA adapter (ours or PEFT's) into the model, adding LoRA layers if it has none.
    Checks the base identity when the file carries one (ours; `check_base=False` skips the name/shape
    fingerprint), and always every key and shape. Returns the adapter's LoRAConfig."""
    directory = Path(directory)
    cfg = read_config(directory)
    path = directory / WEIGHTS_FILE
    tensors, meta = _read_weights(path)
    mine = base_identity(model)
    if check_base and "genpi_base_sha256" in meta and any(meta.get(k) != v for k, v in mine.items()):
        same_shape = meta["genpi_base_sha256"] == mine["genpi_base_sha256"]
        raise AdapterError(f"{path}: adapter for base model {meta.get('genpi_base_name')!r} "
                           f"{meta.get('genpi_base_shape')}, but this model is {mine['genpi_base_name']!r} "
                           f"{mine['genpi_base_shape']}" + ("; same shapes, so check_base=False would load it"
                                                            if same_shape else ""))
    expected = {f"{PEFT_PREFIX}{name}.lora_{ab}.weight": shape
                for name, _, _, m in _block_linears(model, cfg.targets)
                for ab, shape in (("A", (cfg.r, m.in_features)), ("B", (m.out_features, cfg.r)))}
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise AdapterError(f"{path}: does not fit this model: {len(missing)} missing tensors {missing[:2]}, "
                           f"{len(unexpected)} unexpected {unexpected[:2]}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise AdapterError(f"{path}: tensor {key} has shape {tuple(tensors[key].shape)}, this model needs {shape}")
    layers = lora_layers(model)
    if not layers:
        layers = lora_layers(add_lora(model, cfg))
    have = {f"{PEFT_PREFIX}{n}.lora_{ab}.weight": tuple(getattr(m, f"lora_{ab}").weight.shape)
            for n, m in layers.items() for ab in "AB"}
    if have != expected:
        raise AdapterError(f"{path}: the model already has a different LoRA (rank or targets); "
                           f"load into a model without LoRA")
    if any(m.merged for m in layers.values()):
        raise AdapterError(f"{path}: the model's adapter is merged; unmerge_lora(model) first")
    with torch.no_grad():
        for name, m in layers.items():
            m.lora_A.weight.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"])
            m.lora_B.weight.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"])
            m.scale, m.dropout.p = cfg.scale, cfg.dropout
    return cfg

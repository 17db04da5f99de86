"""NF4 4-bit weight quantization with double quantization, from scratch (QLoRA).

GenPI trains its adaptors with QLoRA (paper Section 4, Section 6.3 and Appendix C.4;
Dettmers et al. 2023, Section 3): the frozen base weights are stored as 4-bit NormalFloat
(NF4) codes in blocks of 64, each block scaled by its absmax; the absmax values are
themselves "double quantized" to 8 bits in blocks of 256 (one fp32 scale per block) after
subtracting their mean. About 0.52 bytes per parameter instead of 2 for bf16.

The layout and rounding match bitsandbytes 0.50.2 on CPU bit for bit
(`quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)`), which
tests/test_quant.py checks. bitsandbytes is not needed at run time.

    from quant import quantize_linears, quantized_footprint
    quantize_linears(model)            # swaps q/k/v/o/gate/up/down nn.Linear -> Linear4bit
    keep_dequantized(model)            # optional: dequantize each weight once, not in every pass
    nbytes, numel = quantized_footprint(model)
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import fits_in_memory, linear, version_key

# The 16 NF4 values (bitsandbytes `get_4bit_type("nf4")`): quantiles of N(0, 1) scaled to
# [-1, 1], with an exact zero. A 4-bit code is an index into this table.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)

BLOCKSIZE = 64  # weights per NF4 block (one absmax each)
ABSMAX_BLOCKSIZE = 256  # absmax values per double-quantization block (one fp32 scale each)
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def create_dynamic_map(max_exponent_bits: int = 7) -> torch.Tensor:
    """The signed 8-bit "dynamic" code of bitsandbytes (Dettmers 2015): 256 sorted values in
    [-0.993, 1]. For exponent e = 0..6, 2**e evenly spaced fractions in [0.1, 1] (bin midpoints)
    times 10**(e-6), both signs; plus 0 and 1. Same float32 ops as `create_dynamic_map(signed=True)`."""
    data = []
    for i in range(max_exponent_bits):
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)  # (256,)


DYNAMIC_CODE = create_dynamic_map()


@dataclass
class NF4Weight:
    """Packed NF4 weight. n = shape.numel(), nb = ceil(n / 64) blocks."""
    packed: torch.Tensor         # (ceil(n/2),) uint8, code of element 2i in the high nibble, 2i+1 low
    absmax_codes: torch.Tensor   # (nb,) uint8, index into absmax_code
    absmax_scale: torch.Tensor   # (ceil(nb/256),) float32, absmax of (absmax - offset) per 256 blocks
    absmax_offset: torch.Tensor  # () float32, mean of the block absmax values
    absmax_code: torch.Tensor    # (256,) float32, the dynamic 8-bit code table
    shape: torch.Size
    blocksize: int = BLOCKSIZE


def _lookup_table(code: torch.Tensor, size: int = 65536) -> torch.Tensor:
    """For a grid of `size` points over [-1, 1], the index of the nearest code value (ties go
    down). bitsandbytes' CPU 8-bit quantizer rounds through this table, not an exact search."""
    midpoints = 0.5 * (code[:-1] + code[1:])  # (255,)
    grid = torch.arange(size, dtype=torch.float32, device=code.device) * 2 / (size - 1) - 1.0  # (size,)
    return torch.bucketize(grid, midpoints)  # number of midpoints strictly below each point


def _quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    """Blockwise absmax 8-bit quantization of a 1-D float32 tensor, as bitsandbytes' CPU kernel
    (`quantize_cpu_impl`): scale into [-1, 1], snap to a 65536-point grid with a fused
    multiply-add, then look the grid point up in `_lookup_table(code)`."""
    n = x.numel()
    nb = -(-n // blocksize)
    blocks = F.pad(x, (0, nb * blocksize - n)).view(nb, blocksize)  # zero padding: absmax unchanged
    absmax = blocks.abs().amax(dim=1)  # (nb,)
    inv = torch.where(absmax > 0, 1.0 / absmax, 0.0)
    scaled = (blocks * inv[:, None]).clamp(-1.0, 1.0)
    t = (scaled + 1.0) * 0.5
    grid_idx = (t.double() * 65535 + 0.5).float().long()  # exact in fp64, one rounding: the kernel's fma
    codes = _lookup_table(code)[grid_idx]
    codes[absmax == 0] = 0
    return codes.to(torch.uint8).view(-1)[:n], absmax


def _nf4_absmax_and_scaled(flat: torch.Tensor, blocksize: int):
    """Absmax per block and weights scaled into [-1, 1]. Like bitsandbytes, full blocks multiply by
    the reciprocal while a trailing partial block divides by its (clamped) absmax."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)  # (n // 64, 64)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)
    if full < n:
        tail_absmax = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax[None]])
        scaled = torch.cat([scaled, (flat[full:] / tail_absmax).clamp(-1, 1)])
    return absmax, scaled


def quantize_nf4(w: torch.Tensor, blocksize: int = BLOCKSIZE) -> NF4Weight:
    """Quantize a float tensor to NF4 with double-quantized absmax."""
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"quantize_nf4: weight must be float32/bfloat16/float16, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"quantize_nf4: weight of shape {tuple(w.shape)} is empty")
    flat = w.detach().reshape(-1).float()  # (n,)
    if not torch.isfinite(flat).all():
        raise ValueError(f"quantize_nf4: weight of shape {tuple(w.shape)} has inf or nan values")
    absmax, scaled = _nf4_absmax_and_scaled(flat, blocksize)  # (nb,), (n,)
    scaled = F.pad(scaled, (0, scaled.numel() % 2))  # odd n: pad with 0 (code 7)
    code = NF4_CODE.to(w.device)
    q = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)  # nearest code, ties down
    packed = (q[0::2] << 4) | q[1::2]  # (ceil(n/2),)

    offset = absmax.mean()
    absmax_code = DYNAMIC_CODE.to(w.device, copy=True)
    absmax_codes, absmax_scale = _quantize_blockwise_8bit(absmax - offset, absmax_code, ABSMAX_BLOCKSIZE)
    return NF4Weight(packed, absmax_codes, absmax_scale, offset, absmax_code, w.shape, blocksize)


def dequantize_absmax(state: NF4Weight) -> torch.Tensor:
    """The per-block fp32 absmax from its 8-bit double quantization. Returns (nb,)."""
    scale = state.absmax_scale.repeat_interleave(ABSMAX_BLOCKSIZE)[: state.absmax_codes.numel()]
    return state.absmax_code[state.absmax_codes.long()] * scale + state.absmax_offset


# byte -> the NF4 values of its (high, low) nibbles: unpacking is then one table lookup per byte
NF4_PAIRS = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=-1)     # (256, 2)


def dequantize_nf4(state: NF4Weight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Unpack NF4 codes and scale each block by its absmax (in fp32, then cast to dtype)."""
    n, bs = state.shape.numel(), state.blocksize
    values = NF4_PAIRS.to(state.packed.device).index_select(0, state.packed.int()).view(-1)[:n]  # (n,)
    if n % bs:
        values = F.pad(values, (0, -n % bs))
    w = values.view(-1, bs) * dequantize_absmax(state)[:, None]                                # (nb, 64)
    return w.view(-1)[:n].to(dtype).view(state.shape)


def nf4_nbytes(state: NF4Weight) -> int:
    """Bytes stored per quantized weight: packed codes + 8-bit absmax codes + fp32 scales and offset.
    The 256-entry code table (1 KiB) is the same for every weight and not counted."""
    return state.packed.numel() + state.absmax_codes.numel() + 4 * state.absmax_scale.numel() + 4


class _NF4Linear(torch.autograd.Function):
    """x @ W^T (+ b) for a frozen NF4 weight, when x needs a gradient. As bitsandbytes' `MatMul4Bit`,
    backward dequantizes W again for x's gradient instead of keeping it: autograd would otherwise hold
    a full-precision copy of every weight from the forward to the backward (16 GB of bf16 for
    Llama-3-8B), which is what QLoRA's 4 bits are there to avoid. With `keep_dequantized` both passes
    take the layer's kept copy instead."""

    @staticmethod
    def forward(ctx, x, layer, bias):                                         # x: (..., in)
        ctx.layer = layer
        return linear(x, layer.weight_as(x.dtype), bias)                     # (..., out)

    @staticmethod
    def backward(ctx, grad_out):                                              # (..., out)
        weight = ctx.layer.weight_as(grad_out.dtype)                          # (out, in)
        return grad_out @ weight, None, None                                 # (..., in)


class Linear4bit(nn.Module):
    """A frozen nn.Linear whose weight is stored as NF4 buffers and dequantized on every forward (and
    again in the backward), or, after `keep_dequantized`, once.
    Quantize after any `model.to(dtype)`: that call would also cast the fp32 absmax scales."""
    keep = False   # keep_dequantized(model) sets it per layer

    def __init__(self, in_features: int, out_features: int, bias: bool = True, blocksize: int = BLOCKSIZE):
        super().__init__()
        self.in_features, self.out_features, self.blocksize = in_features, out_features, blocksize
        n = in_features * out_features
        nb = -(-n // blocksize)
        self.register_buffer("packed", torch.zeros((n + 1) // 2, dtype=torch.uint8))
        self.register_buffer("absmax_codes", torch.zeros(nb, dtype=torch.uint8))
        self.register_buffer("absmax_scale", torch.zeros(-(-nb // ABSMAX_BLOCKSIZE)))
        self.register_buffer("absmax_offset", torch.zeros(()))
        self.register_buffer("absmax_code", DYNAMIC_CODE.clone(), persistent=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Linear4bit":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        layer.load_state(quantize_nf4(linear.weight))
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().clone()
        return layer.to(linear.weight.device)

    def load_state(self, state: NF4Weight) -> None:
        if tuple(state.shape) != (self.out_features, self.in_features) or state.blocksize != self.blocksize:
            raise ValueError(f"Linear4bit: NF4 weight of shape {tuple(state.shape)}, blocksize {state.blocksize}"
                             f" does not fit ({self.out_features}, {self.in_features}), {self.blocksize}")
        for name in ("packed", "absmax_codes", "absmax_scale", "absmax_offset", "absmax_code"):
            setattr(self, name, getattr(state, name).clone())

    @property
    def state(self) -> NF4Weight:
        return NF4Weight(self.packed, self.absmax_codes, self.absmax_scale, self.absmax_offset,
                         self.absmax_code, torch.Size((self.out_features, self.in_features)), self.blocksize)

    def weight_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized (out_features, in_features) weight. With `keep`, one copy is kept and reused
        while its dtype and the NF4 buffers stay the same (replacing or writing them changes the key)."""
        if not self.keep:
            return dequantize_nf4(self.state, dtype=dtype)
        key = (dtype, version_key(self.packed, self.absmax_codes, self.absmax_scale, self.absmax_offset))
        if getattr(self, "_kept", (None,))[0] != key:
            self._kept = (key, dequantize_nf4(self.state, dtype=dtype))
        return self._kept[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if torch.compiler.is_compiling() and self.keep:     # lora.compile_for_training keeps it current
            return F.linear(x, self._kept[1], bias)          # autograd keeps this copy, not a new one
        if torch.is_grad_enabled() and x.requires_grad:
            return _NF4Linear.apply(x, self, bias)
        return linear(x, self.weight_as(x.dtype), bias)    # F.linear, split over the threads for a few rows

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, bias={self.bias is not None}"


def quantize_linears(module: nn.Module, names=LINEAR_NAMES) -> int:
    """Replace, in place, every nn.Linear child whose attribute name is in `names` by a
    Linear4bit. Returns the number of layers swapped."""
    targets = [(parent, name, child) for parent in module.modules()
               for name, child in parent.named_children() if name in names and isinstance(child, nn.Linear)]
    for parent, name, child in targets:
        setattr(parent, name, Linear4bit.from_linear(child))
    return len(targets)


def keep_dequantized(module: nn.Module, keep: bool = True) -> int:
    """Let every Linear4bit in `module` keep its dequantized weight (one copy, in the last dtype) instead of
    dequantizing it in every forward and backward; keep=False drops the copies. Costs the weights'
    full-precision memory (SmolLM2 in bf16: 212 MB; Llama-3-8B: 15 GB), so train.py turns it on only
    when that fits (`dequantized_fits`). Saves SmolLM2's dequantization, ~0.13 s per forward and again
    per backward on 2 Xeon cores: the default demo takes 8 passes per step. Returns the layer count."""
    layers = [m for m in module.modules() if isinstance(m, Linear4bit)]
    for m in layers:
        m.keep = keep
        if not keep:
            m.__dict__.pop("_kept", None)
    return len(layers)


def dequantized_fits(module: nn.Module, dtype: torch.dtype, device, share: float = 0.125) -> bool:
    """Whether `module`'s Linear4bit weights, dequantized to `dtype`, take at most `share` of the
    device's memory (GPU memory, or the machine's RAM for a CPU)."""
    numel = sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, Linear4bit))
    return fits_in_memory(numel * torch.finfo(dtype).bits // 8, device, share)


KEEP_MODES = ("auto", "on", "off")  # train.py / bench_qlora.py --keep-dequantized


def keep_dequantized_if(module: nn.Module, mode: str, dtype: torch.dtype, device) -> bool:
    """The --keep-dequantized setting of train.py: "on", "off", or "auto" (on when `dequantized_fits`).
    Returns whether the weights are now kept."""
    if mode not in KEEP_MODES:
        raise ValueError(f"keep-dequantized must be auto, on or off, not {mode!r}")
    keep = mode == "on" or (mode == "auto" and dequantized_fits(module, dtype, device))
    keep_dequantized(module, keep)
    return keep


def quantized_footprint(module: nn.Module) -> tuple[int, int]:
    """(bytes, parameters) of all Linear4bit weights in `module`; bytes / parameters ~ 0.52."""
    layers = [m for m in module.modules() if isinstance(m, Linear4bit)]
    return sum(nf4_nbytes(m.state) for m in layers), sum(m.in_features * m.out_features for m in layers)

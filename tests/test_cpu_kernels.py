"""The hand-written CPU kernels (cpu_kernels.cpp) against float64 products of the weights they encode, and
their layout against the GGUF file's bytes."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no AVX-512-BF16 or no g++ on this machine")


def within_one_rounding(got, ref, scale):
    """Whether bf16 `got` is the float64 `ref` rounded once to bf16 (half a spacing at |ref|), give or take
    fp32 sums' error: 2^-20 of `scale`, the sum of the magnitudes the kernel adds up."""
    spacing = 2.0 ** (torch.floor(torch.log2(ref.abs().clamp(min=1e-30))) - 7)
    return bool(((got.double() - ref).abs() <= spacing / 2 + 2.0 ** -20 * scale).all())


def random_q4(out, n_in, gen):
    codes = torch.randint(0, 16, (out, n_in), generator=gen)
    d = torch.rand(out, n_in // 32, generator=gen) * 0.01 + 1e-4
    m = -8 * d + torch.randn(out, n_in // 32, generator=gen) * 1e-3
    return codes, d, m


@pytest.mark.parametrize("out,n_in", [(64, 64), (48, 128), (96, 576), (40, 1536), (16, 320)])
@pytest.mark.parametrize("rows", [1, 3, 4, 9])
def test_q4_linear_is_the_float64_product_rounded_once(out, n_in, rows):
    """Every shape the kernel takes (inputs in whole groups of 128, with a last group of 64, or only that;
    rows alone and in passes of 4): the product with the weight d * code + m equals the float64 product up
    to the fp32 sums' error, well inside one bf16 rounding (a kernel with a wrong code, scale, offset or row
    is off by many)."""
    gen = torch.Generator().manual_seed(out * n_in + rows)
    codes, d, m = random_q4(out, n_in, gen)
    packed, dm = cpu_kernels.pack_q4(codes, d, m)
    weight = dm[:, 0].double().repeat_interleave(32, 1) * codes + dm[:, 1].double().repeat_interleave(32, 1)
    assert torch.equal(cpu_kernels.unpack_q4(packed, dm).double(), weight)
    x = torch.randn(rows, n_in, generator=gen).bfloat16()
    ref = x.double() @ weight.t()                                                    # (rows, out)
    got = cpu_kernels.q4_linear(x, packed, dm)
    assert got.shape == (rows, out) and got.dtype == torch.bfloat16
    # the kernel adds x . (128 + code) d and (m - 128 d) sum(x): those magnitudes bound its fp32 error
    terms = dm[:, 0].double().abs().repeat_interleave(32, 1) * 143 + dm[:, 1].double().abs().repeat_interleave(32, 1)
    assert within_one_rounding(got, ref, x.double().abs() @ terms.t())
    assert not within_one_rounding(got, x.double() @ (weight + 1e-3).t(), x.double().abs() @ terms.t())


@pytest.mark.parametrize("out,n_in", [(64, 32), (50, 576), (8, 2048)])
@pytest.mark.parametrize("rows", [1, 4, 6])
def test_q8_linear_is_the_float64_product_rounded_once(out, n_in, rows):
    gen = torch.Generator().manual_seed(out + n_in + rows)
    codes = torch.randint(-128, 128, (out, n_in), generator=gen, dtype=torch.int8)
    d = (torch.rand(out, n_in // 32, generator=gen) * 0.01).half()
    weight = codes.double() * d.double().repeat_interleave(32, 1)
    x = torch.randn(rows, n_in, generator=gen).bfloat16()
    got = cpu_kernels.q8_linear(x, codes, d)
    assert got.shape == (rows, out)
    assert within_one_rounding(got, x.double() @ weight.t(), x.double().abs() @ weight.abs().t())


def test_pack_q4_is_the_gguf_q4_1_layout(tmp_path):
    """pack_q4 of the codes, d and m that model.read_codes takes from a Q4_1 tensor gives back the file's own
    bytes: the kernel reads the blocks as llama.cpp stores them."""
    import gguf
    from model import _open_gguf
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("embedding_length", 128), ("block_count", 1), ("attention.head_count", 4),
                       ("attention.head_count_kv", 2), ("feed_forward_length", 96), ("vocab_size", 32)):
        w.add_uint32(f"llama.{key}", value)
    x = (rng.standard_normal((96, 128)) * 0.05).astype(np.float32)
    raw = gguf.quantize(x, gguf.GGMLQuantizationType.Q4_1)
    w.add_tensor("blk.0.ffn_up.weight", raw, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    codes, scale, zero = _open_gguf(path)[4]("layers.0.mlp.up_proj.weight")
    packed, dm = cpu_kernels.pack_q4(codes, scale, zero - 8 * scale)
    blocks = np.asarray(raw, dtype=np.uint8).reshape(96, 4, 20)                # fp16 d, fp16 m, 16 code bytes
    assert np.array_equal(packed.numpy(), blocks[..., 4:].reshape(96, 64))
    assert np.array_equal(dm[:, 0].numpy().view(np.uint8), blocks[..., 0:2].reshape(96, 8))
    assert np.array_equal(dm[:, 1].numpy().view(np.uint8), blocks[..., 2:4].reshape(96, 8))


def test_bad_arguments_get_one_clear_error():
    codes, d, m = random_q4(32, 128, torch.Generator().manual_seed(0))
    packed, dm = cpu_kernels.pack_q4(codes, d, m)
    with pytest.raises(RuntimeError, match="x must be"):
        cpu_kernels.q4_linear(torch.randn(1, 128), packed, dm)                       # fp32 x
    with pytest.raises(RuntimeError, match="dm must be"):
        cpu_kernels.q4_linear(torch.randn(1, 128).bfloat16(), packed, dm.float())
    with pytest.raises(RuntimeError, match="codes must be"):
        cpu_kernels.q4_linear(torch.randn(1, 96).bfloat16(), packed[:, :48], dm)    # not a multiple of 64
    with pytest.raises(RuntimeError, match="d must be"):
        cpu_kernels.q8_linear(torch.randn(1, 128).bfloat16(), torch.zeros(32, 128, dtype=torch.int8), d)


@pytest.mark.parametrize("shape,seed,drop", [((4, 512, 1536), 12345, 3277), ((3, 1000003), 2 ** 31 - 1, 3277),
                                             ((17,), 0, 30000), ((5, 7), 99, 0)])
def test_keep_mask_has_hashed_keeps_bits(shape, seed, drop):
    """keep_mask (LoRA dropout) is element for element lora.hashed_keep, PyTorch's int32 ops on the same seed."""
    from lora import hashed_keep
    got = cpu_kernels.keep_mask(shape, seed, drop)
    assert got.dtype == torch.int8 and got.shape == shape
    assert torch.equal(got, hashed_keep(shape, torch.tensor(seed, dtype=torch.int32), drop))


@pytest.mark.parametrize("B,KVH,n,g,end", [(2, 3, 128, 3, 512), (1, 2, 5, 3, 13), (2, 1, 7, 1, 7), (1, 3, 17, 3, 40)])
def test_causal_softmax_is_the_masked_softmax_rounded_once(B, KVH, n, g, end):
    """causal_softmax == softmax over the keys each row's query may see (up to end - n + its query), 0 beyond,
    as float64 rounded once to bf16 (give or take fp32's error); row lengths not multiples of 16 included."""
    gen = torch.Generator().manual_seed(n)
    scores = (torch.randn(B, KVH, n * g, end, generator=gen) * 4).bfloat16()
    query = torch.arange(n).repeat_interleave(g)                                   # each row's query
    seen = torch.arange(end)[None, :] <= end - n + query[:, None]                   # (n*g, end)
    ref = scores.double().masked_fill(~seen, float("-inf")).softmax(-1)
    got = cpu_kernels.causal_softmax(scores, n, g)
    assert got.dtype == torch.bfloat16 and got.shape == scores.shape
    assert bool((got[..., ~seen] == 0).all())
    assert within_one_rounding(got, ref, 1.0)


def test_compiled_graph_calls_the_op():
    """torch.compile traces the ops through their registered shapes and calls them: the same result."""
    codes, d, m = random_q4(64, 576, torch.Generator().manual_seed(1))
    packed, dm = cpu_kernels.pack_q4(codes, d, m)
    x = torch.randn(1, 576).bfloat16()
    f = torch.compile(lambda x: cpu_kernels.q4_linear(x * 2, packed, dm) + 1, fullgraph=True, dynamic=True)
    assert torch.equal(f(x), cpu_kernels.q4_linear(x * 2, packed, dm) + 1)


def test_switched_off_or_without_g_plus_plus_the_model_falls_back(tmp_path):
    """GENPI_CPU_KERNELS=0, or no g++ on the PATH (with an empty cache), leaves the kernels unavailable, with
    no error: the model then keeps PyTorch's 4-bit layout."""
    code = "import cpu_kernels; print(cpu_kernels.available())"
    env = dict(os.environ, GENPI_CPU_KERNELS="0")
    root = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    env = dict(os.environ, PATH=str(tmp_path), GENPI_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False" and "could not be built" in out.stderr

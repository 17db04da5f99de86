"""Hand-written CPU kernels: decoding with a GGUF file's own 4-bit and 8-bit weights, and two pieces of the QLoRA
training step (engine and training speed, issue #8).

Not part of the paper's method: they make the engine's decoding steps, which synthesis (paper Section 5,
Appendix A) and evaluation (Section 6) run by the thousand, and the LoRA training step (Section 4, Appendix C.4)
faster on a CPU with AVX-512 and BF16. At batch 1 a step reads every weight once for one row of activations, so
it runs at the rate the weights are decoded. cpu_kernels.cpp reads the file's blocks as stored:
  - q4_linear: Q4_1 (the embedded SmolLM2's block weights), 1.7x PyTorch's 4-bit CPU kernel per core;
  - q8_linear: Q8_0 (its tied embedding, as the LM head), 30 MB read against 57 MB of bf16;
and for training (and prefill):
  - keep_mask: LoRA dropout's keep mask, the bits of lora.hashed_keep, ~4x faster than those PyTorch ops;
  - causal_softmax: the softmax of model.causal_attention_by_blocks, masking as it goes, ~2x PyTorch's.
The C++ file is compiled once per machine with the system's g++ (~10 s) into ~/.cache/genpi (or
$GENPI_CACHE) and loaded as the torch ops genpi_cpu.*, which compiled graphs call from C++. Without g++,
AVX-512-BF16 or on GENPI_CPU_KERNELS=0, `available()` is False and the callers use PyTorch's ops instead.

    import cpu_kernels
    if cpu_kernels.available():
        codes, dm = cpu_kernels.pack_q4(codes, d, m)        # (out, in) codes in 0..15; d, m (out, in/32)
        y = cpu_kernels.q4_linear(x, codes, dm)             # x (rows, in) bf16 -> (rows, out) bf16
"""
import functools
import hashlib
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().with_name("cpu_kernels.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-w"]   # -fopenmp: at::parallel_for


def cache_dir() -> Path:
    return Path(os.environ.get("GENPI_CACHE", Path.home() / ".cache" / "genpi"))


def cpu_flags() -> set:
    """The CPU's feature flags (Linux), to tell whether the kernels apply."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


NEEDED_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}


@functools.cache
def available() -> bool:
    """Whether the ops are loaded (building them on first use): on a CPU with AVX-512-BF16, with g++."""
    if os.environ.get("GENPI_CPU_KERNELS", "1") == "0" or not NEEDED_FLAGS <= cpu_flags():
        return False
    try:
        torch.ops.load_library(str(build()))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        print(f"note: the CPU kernels could not be built ({e}); using PyTorch's kernels", file=sys.stderr)
        return False
    if not hasattr(torch.ops.genpi_cpu, "q4_linear"):      # built without the instructions' macros
        return False
    _register_shapes()
    return True


def build() -> Path:
    """Compile cpu_kernels.cpp against this torch, once per source, torch build and CPU: -> the library's path.
    Written under a temporary name and renamed, so an interrupted build leaves nothing half-written."""
    from torch.utils import cpp_extension
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + " ".join(FLAGS).encode()
                         + " ".join(sorted(cpu_flags())).encode()).hexdigest()[:16]
    target = cache_dir() / f"cpu_kernels_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print("building the CPU kernels (once per machine, ~10 s)", file=sys.stderr, flush=True)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = [f"-L{p}" for p in cpp_extension.library_paths()] + ["-lc10", "-ltorch_cpu", "-ltorch"]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(["g++", *FLAGS, abi, *includes, str(SOURCE), "-o", tmp, *libs], check=True,
                       capture_output=True, text=True)
        os.replace(tmp, target)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"g++ failed: {e.stderr.strip()[-500:]}") from None
    except FileNotFoundError:
        raise OSError("g++ not found") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def q4_linear(x, codes, dm):
    """x (rows, in) bf16 times a Q4_1 weight packed by pack_q4 -> (rows, out) bf16."""
    return torch.ops.genpi_cpu.q4_linear(x, codes, dm)


def q8_linear(x, codes, d):
    """x (rows, in) bf16 times a Q8_0 weight (codes (out, in) int8, d (out, in/32) fp16) -> (rows, out) bf16."""
    return torch.ops.genpi_cpu.q8_linear(x, codes, d)


def keep_mask(shape, seed: int, drop: int):
    """Dropout's keep mask of `shape` (int8, 1 = kept): lora.hashed_keep's bits for the same seed and drop."""
    return torch.ops.genpi_cpu.keep_mask(math.prod(shape), seed, drop).view(shape)


def causal_softmax(scores, n: int, g: int):
    """softmax(-1) of a block of causal attention scores (model.causal_attention_by_blocks): scores (..., n*g, end)
    bf16, rows ordered (query, head) for n queries of g heads, the queries' own keys the last n; each row only over
    the keys its query may see, the rest 0. -> the same shape, bf16."""
    return torch.ops.genpi_cpu.causal_softmax(scores.contiguous(), n, g)


def pack_q4(codes, d, m):
    """A Q4_1 weight, w[o, 32b + j] = d[o, b] * codes[o, 32b + j] + m[o, b], in q4_linear's layout:
    codes (out, in) in 0..15 -> (out, in/2) uint8, byte j of block b holding code j (low nibble) and code
    j + 16 (high nibble), as a GGUF file stores them; d, m (out, in/32) -> dm (out, 2, in/32) fp16."""
    out, n_in = codes.shape
    halves = codes.to(torch.uint8).view(out, n_in // 32, 2, 16)                    # (out, blocks, 2, 16)
    packed = (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(out, n_in // 2)   # (out, in/2)
    return packed.contiguous(), torch.stack((d, m), 1).to(torch.float16).contiguous()   # (out, 2, in/32)


def unpack_q4(packed, dm):
    """The fp32 weight (out, in) of pack_q4's layout (the reference the tests compare the kernel with)."""
    out = packed.shape[0]
    blocks = packed.view(out, -1, 16)                                                   # (out, in/32, 16)
    codes = torch.cat((blocks & 15, blocks >> 4), -1).reshape(out, -1)                  # (out, in)
    d, m = (t.float().repeat_interleave(32, 1) for t in dm.unbind(1))                       # (out, in) each
    return d * codes.float() + m


def _register_shapes():
    """Shapes for graphs compiled with these ops (torch.compile traces them without running them)."""
    @torch.library.register_fake("genpi_cpu::q4_linear")
    def _(x, codes, dm):
        return x.new_empty(x.shape[0], codes.shape[0])

    @torch.library.register_fake("genpi_cpu::q8_linear")
    def _(x, codes, d):
        return x.new_empty(x.shape[0], codes.shape[0])

    @torch.library.register_fake("genpi_cpu::causal_softmax")
    def _(scores, n, g):
        return torch.empty_like(scores)

    @torch.library.register_fake("genpi_cpu::keep_mask")
    def _(n, seed, drop):
        return torch.empty(n, dtype=torch.int8)


"""Benchmark (the experiment behind the engine's compiled decoding step): how fast a batch-1 greedy decoding
step gets when `torch.compile` removes PyTorch's per-op and Python overhead, against the engine's eager step
and llama.cpp in the same run. The engine now compiles its steps this way (`model.compile_for_inference`,
`Llama._compiled_step`: symbolic batch and cache length, in `generate`); this script keeps the standalone
version with a fixed shape.

The eager step (`model(token, cache)`) spends ~7-8 ms of its ~17-20 ms in kernels (the GGUF's 4-bit
codes, the bf16 LM head, attention) and the rest in ~1,500 small ops and their Python. Here one graph
holds the whole step: 30 layers, a static cache of --slots slots written in place at a position given as
a tensor (so every step has the same shapes and compiles once), the same 4-bit kernel and LM head as the
engine. Inductor fuses the element-wise ops (RMSNorm, rotary, SiLU, residuals) and, with its C++ wrapper
(the default; --python-wrapper for the Python one), calls the kernels without Python. Greedy tokens are
compared with the eager step's. llama.cpp (when llama-cpp-python is installed) decodes the same 64-token
prompt, timed as in bench_engine.py; ours is timed per step (argmax included, generate's loop not), which
favours ours.

    python benchmarks/bench_compiled_decode.py [--tokens 32] [--slots 128] [--python-wrapper] [--profile]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_engine import bench_llama_cpp  # noqa: E402
from model import KVCache, apply_rope, load_model  # noqa: E402

PROJECTIONS = [("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
               ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj")]


class StaticStep(nn.Module):
    """One decoding step of a batch-1 SmolLM2 with a static cache: forward(token (1, 1), pos (1,)) ->
    logits (1, vocab). It reads the model's weights and the 4-bit codes that `load_model` kept."""

    def __init__(self, model, slots):
        super().__init__()
        self.model, self.slots, a = model, slots, model.args
        shape = (1, a.n_kv_heads, slots, a.head_dim)
        self.k = [torch.zeros(shape, dtype=torch.bfloat16) for _ in range(a.n_layers)]
        self.v = [torch.zeros(shape, dtype=torch.bfloat16) for _ in range(a.n_layers)]
        self.codes = [[getattr(getattr(b, part), name)._int4[:2] for part, name in PROJECTIONS] for b in model.layers]

    def fill(self, cache: KVCache):
        for dst, src in zip(self.k + self.v, cache.k + cache.v):
            dst.copy_(src[:, :, :self.slots])

    def forward(self, token, pos):
        a = self.model.args
        def mm4(x, codes):                                                    # (1, in) -> (1, out)
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, codes[0], 32, codes[1])
        x = self.model.embed_tokens(token)[0]                                 # (1, dim)
        angles = pos[:, None].float() * self.model.inv_freq                   # (1, hd/2)
        emb = torch.cat((angles, angles), -1)[:, None, None]                  # (1, 1, 1, hd)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask = (torch.arange(self.slots) <= pos)[None, None]                  # (1, 1, 1, slots)
        for block, codes, k_cache, v_cache in zip(self.model.layers, self.codes, self.k, self.v):
            h = block.input_layernorm(x)
            q = apply_rope(mm4(h, codes[0]).view(1, a.n_heads, 1, a.head_dim), cos, sin)     # (1, H, 1, hd)
            k = apply_rope(mm4(h, codes[1]).view(1, a.n_kv_heads, 1, a.head_dim), cos, sin)  # (1, KVH, 1, hd)
            k_cache.index_copy_(2, pos, k)
            v_cache.index_copy_(2, pos, mm4(h, codes[2]).view(1, a.n_kv_heads, 1, a.head_dim))
            y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=True)
            x = x + mm4(y.reshape(1, -1), codes[3])
            h = block.post_attention_layernorm(x)
            x = x + mm4(F.silu(mm4(h, codes[4])) * mm4(h, codes[5]), codes[6])
        return self.model.lm_head(self.model.norm(x))                        # (1, vocab)


def greedy(step, first_token, start, n):
    """n greedy tokens from step(token, pos) -> logits; returns them and the median seconds per step."""
    tokens, times, token = [], [], torch.tensor([[first_token]])
    with torch.inference_mode():
        for t in range(n):
            begin = time.perf_counter()
            token_id = int(step(token, torch.tensor([start + t])).argmax(-1))
            times.append(time.perf_counter() - begin)
            tokens.append(token_id)
            token = torch.tensor([[token_id]])
    return tokens, statistics.median(times[2:])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens per measurement")
    ap.add_argument("--slots", type=int, default=128, help="static cache slots (prompt + new tokens)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of compiled and eager")
    ap.add_argument("--python-wrapper", action="store_true", help="inductor's Python wrapper instead of C++")
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler's table of 10 compiled steps")
    args = ap.parse_args()
    model, tok = load_model(dtype=torch.bfloat16, device="cpu")
    if not hasattr(model.layers[0].self_attn.q_proj, "_int4"):
        sys.exit("needs the GGUF's 4-bit codes: a bf16 load of the embedded model on a CPU with PyTorch's int4 kernel")
    ids = tok.encode(Path(__file__).resolve().parent.parent.joinpath("prompts", "webshop.txt").read_text())[:64]
    prompt = torch.tensor([ids[:-1]])
    if len(ids) + args.tokens > args.slots:
        sys.exit(f"--slots must hold the {len(ids)}-token prompt and --tokens new tokens")

    def eager_run():                     # the engine's own step, on a cache holding the prompt
        cache = KVCache(model.args, 1, args.slots, torch.bfloat16, "cpu")
        with torch.inference_mode():
            model(prompt, cache)
        return greedy(lambda token, pos: model(token, cache)[:, -1], ids[-1], len(ids) - 1, args.tokens), cache

    step = StaticStep(model, args.slots)
    torch._inductor.config.cpp_wrapper = not args.python_wrapper
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    (reference, _), cache = eager_run()
    step.fill(cache)
    start = time.perf_counter()
    with torch.inference_mode():
        compiled(torch.tensor([[ids[-1]]]), torch.tensor([len(ids) - 1]))
    print(f"compiling the step took {time.perf_counter() - start:.1f} s", flush=True)
    for r in range(args.rounds):
        (eager_tokens, eager_s), cache = eager_run()
        step.fill(cache)
        tokens, compiled_s = greedy(compiled, ids[-1], len(ids) - 1, args.tokens)
        print(f"round {r + 1}: eager {eager_s * 1e3:.2f} ms/step ({1 / eager_s:.1f} tok/s), compiled "
              f"{compiled_s * 1e3:.2f} ms/step ({1 / compiled_s:.1f} tok/s), {eager_s / compiled_s:.2f}x; "
              f"greedy tokens equal to eager's: {tokens == reference}", flush=True)
    if args.profile:
        from torch.profiler import profile
        with torch.inference_mode(), profile() as prof:
            for t in range(10):
                compiled(torch.tensor([[ids[-1]]]), torch.tensor([len(ids) - 1 + t]))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    llama = bench_llama_cpp(ids, args.tokens, 3, torch.get_num_threads(), 3)
    print("llama.cpp (Q4_1), batch 1: " + (f"{llama['decode_b1_tok_s']:.1f} tok/s" if llama else "not installed"))


if __name__ == "__main__":
    main()

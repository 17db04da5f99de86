"""Benchmark: this project's engine against Hugging Face `transformers` on the same SmolLM2 weights.

Measures, in one run on one machine: prefill of 1,100 tokens (tokens/s), greedy decode at batch 1 and
batch 16 (new tokens/s). transformers runs in its best dtype of fp32/bf16 on this CPU (both are tried);
ours runs in `model.default_dtype` (bf16 only where the CPU has native bf16 matmul), with fp16 copies
of the weights in fp32 (`model.set_fp16_weights`, as synth, evaluate and train infer on a CPU) and again
with the exact fp32 weights. When llama-cpp-python is installed (only for this benchmark: `pip install
llama-cpp-python` builds llama.cpp from source, 4-10 min on 2 cores), llama.cpp runs the same GGUF file
(its own Q4_1 kernels) on the same token ids at batch 1. On a CPU with AMX whose VM does not grant it
(seen on a 2-core Xeon: a general protection fault in libggml-cpu on the first `eval`), build it
without AMX: CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON
-DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON" pip install --no-cache-dir
llama-cpp-python. Each figure is the median of --repeats runs after a warm-up. Speed is reported as
ratios, since the machine is shared.

A bf16 load of the GGUF keeps its Q4_1 codes (and its Q8_0 LM head), and decoding steps of a few rows read
them (`model.Linear.keep_int4`, `keep_q8`): with the hand-written kernels of `cpu_kernels.cpp` on a CPU with
AVX-512-BF16, else with PyTorch's CPU 4-bit kernel; ours is also run with the bf16 weights only.

The whole process runs with `model.keep_freed_memory` (glibc keeps freed memory for reuse), as train.py runs its
synthesis, unless --glibc-defaults. It matters to transformers' prefill, whose large temporaries otherwise come
back from the OS page by page: on the 2-core AMD EPYC, each side alone in its process, transformers 780 tok/s
with glibc's defaults and ~1,000 with it (ours 1,335 and ~1,370). Alternating in one process under glibc's
defaults, each side's frees move glibc's mmap threshold for the other: transformers then ran 874 tok/s after
one version of ours and 1,010 after the next, so that measure was not of transformers alone.

Decode at batch 1 is also measured with prompt-lookup guesses (speculative decoding that copies from the
context, `--draft` tokens per step, the same greedy tokens) on all three sides: ours (`generate(...,
draft=N)`), transformers (`prompt_lookup_num_tokens=N`) and llama.cpp (`LlamaPromptLookupDecoding`).

    python benchmarks/bench_engine.py [--repeats 3] [--decode-tokens 32] [--json out.json]
    python benchmarks/bench_engine.py --interleave 4   # prefill, then batch-16 decode, ours and transformers
                                                      # (same dtype); then batch-1 decode, ours and llama.cpp
                                                      # (if installed); alternating in one process: N ratios each
    python benchmarks/bench_engine.py --compile        # ours with compiled graphs (model.compile_for_inference)
    python benchmarks/bench_engine.py --compile --freeze   # and the decoding steps' weights as graph constants
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import (DRAFT_TOKENS, FP16_KERNELS, INT4_KERNELS, compile_for_inference, default_dtype,  # noqa: E402
                   embedded_model_path, generate, keep_freed_memory, load_model, set_fp16_weights, set_int4_weights)


def once(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed(fn, repeats):
    fn()  # warm-up
    return statistics.median(once(fn) for _ in range(repeats))


def load_transformers(dtype):
    """transformers' model of the same embedded GGUF file."""
    from transformers import AutoModelForCausalLM
    path = embedded_model_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()


def bench_ours(prompt_ids, batch16, n_new, repeats, dtype, draft, fp16_weights, int4=True, compiled=False, freeze=False):
    model, _ = load_model(dtype=dtype, device="cpu")
    set_fp16_weights(model, fp16_weights)
    set_int4_weights(model, int4)
    if compiled and (why_not := compile_for_inference(model, freeze=freeze)):
        raise SystemExit(f"--compile: {why_not}")
    x = torch.tensor([prompt_ids])
    with torch.inference_mode():
        prefill = timed(lambda: model(x, last_only=True), repeats)
    dec1 = timed(lambda: generate(model, [prompt_ids[:64]], n_new), repeats)
    pre1 = timed(lambda: generate(model, [prompt_ids[:64]], 1), repeats)
    spec1 = timed(lambda: generate(model, [prompt_ids[:64]], n_new, draft=draft), repeats)
    dec16 = timed(lambda: generate(model, batch16, n_new), repeats)
    pre16 = timed(lambda: generate(model, batch16, 1), repeats)
    return {"prefill_tok_s": len(prompt_ids) / prefill,
            "decode_b1_tok_s": (n_new - 1) / max(dec1 - pre1, 1e-9),
            "decode_b1_lookup_tok_s": (n_new - 1) / max(spec1 - pre1, 1e-9),
            "decode_b16_tok_s": 16 * (n_new - 1) / max(dec16 - pre16, 1e-9)}


def bench_transformers(prompt_ids, batch16, n_new, repeats, dtype, draft):
    hf = load_transformers(dtype)
    x = torch.tensor([prompt_ids])
    gen = dict(do_sample=False, pad_token_id=0)
    def hf_generate(ids, n, **kw):
        return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, **gen, **kw)
    b16 = torch.tensor(batch16)
    with torch.inference_mode():
        prefill = timed(lambda: hf(x, use_cache=False, logits_to_keep=1), repeats)
        dec1 = timed(lambda: hf_generate(x[:, :64], n_new), repeats)
        pre1 = timed(lambda: hf_generate(x[:, :64], 1), repeats)
        spec1 = timed(lambda: hf_generate(x[:, :64], n_new, prompt_lookup_num_tokens=draft), repeats)
        dec16 = timed(lambda: hf_generate(b16, n_new), repeats)
        pre16 = timed(lambda: hf_generate(b16, 1), repeats)
    return {"prefill_tok_s": len(prompt_ids) / prefill,
            "decode_b1_tok_s": (n_new - 1) / max(dec1 - pre1, 1e-9),
            "decode_b1_lookup_tok_s": (n_new - 1) / max(spec1 - pre1, 1e-9),
            "decode_b16_tok_s": 16 * (n_new - 1) / max(dec16 - pre16, 1e-9)}


def interleaved(prompt_ids, batch16, n_new, rounds, compiled, freeze=False):
    """Prefill and batch-16 decode ratios, ours (as `main` runs it) / transformers in the same dtype
    (`model.default_dtype`: bf16 on a CPU with native bf16 matmul, where it is transformers' best, else
    fp32), the two run alternately in one process: on a shared machine the load drifts between the
    separate measurements of a full run, not within a pair. Decode is timed as generate(n_new) -
    generate(1), as in `main`. With llama-cpp-python installed, batch-1 decode alternates with llama.cpp too.
    Prints each round's ratio, then each measure's median ratio."""
    dtype = default_dtype("cpu")
    model, _ = load_model(dtype=dtype, device="cpu")
    set_fp16_weights(model, FP16_KERNELS and dtype == torch.float32)
    if compiled and (why_not := compile_for_inference(model, freeze=freeze)):
        raise SystemExit(f"--compile: {why_not}")
    hf, name = load_transformers(dtype), f"transformers {str(dtype).replace('torch.', '')}"
    x, b16 = torch.tensor([prompt_ids]), torch.tensor(batch16)
    def hf_gen(n):
        return hf.generate(b16, attention_mask=torch.ones_like(b16), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
    def ours_decode(prompts):            # seconds for n_new - 1 decoding steps
        return once(lambda: generate(model, prompts, n_new)) - once(lambda: generate(model, prompts, 1))
    # name -> (peer, seconds of ours, seconds of theirs, ours' tokens per second, theirs' from seconds)
    pairs = {"prefill": (name, lambda: once(lambda: model(x, last_only=True)),
                         lambda: once(lambda: hf(x, use_cache=False, logits_to_keep=1)),
                         lambda t: len(prompt_ids) / t, lambda t: len(prompt_ids) / t),
             "decode b16": (name, lambda: ours_decode(batch16), lambda: once(lambda: hf_gen(n_new)) - once(lambda: hf_gen(1)),
                            lambda t: 16 * (n_new - 1) / t, lambda t: 16 * (n_new - 1) / t)}
    llama_run = llama_cpp_runner(torch.get_num_threads())
    if llama_run is not None:          # batch 1 against llama.cpp, timed as in bench_llama_cpp (n_new steps)
        one = prompt_ids[:64]
        pairs["decode b1"] = ("llama.cpp", lambda: ours_decode([one]),
                              lambda: once(lambda: llama_run(one, n_new)) - once(lambda: llama_run(one, 0)),
                              lambda t: (n_new - 1) / t, lambda t: n_new / t)
    with torch.inference_mode():
        for what, (peer, ours, theirs, rate, their_rate) in pairs.items():
            ours(), theirs()                                              # warm-up
            ratios = []
            for r in range(rounds):
                a, b = ours(), theirs()
                ratios.append(rate(a) / their_rate(b))
                print(f"{what} round {r + 1}: ours {rate(a):.1f} tok/s, {peer} {their_rate(b):.1f} tok/s, "
                      f"ratio {ratios[-1]:.2f}x", flush=True)
            print(f"{what}: median ratio over {rounds} rounds {statistics.median(ratios):.3f}x", flush=True)


def llama_cpp_settings(threads):
    """llama.cpp's settings for the embedded GGUF file."""
    return dict(model_path=str(embedded_model_path()), n_ctx=2048, n_batch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False)


def llama_cpp_runner(threads):
    """run(ids, n): llama.cpp on the embedded GGUF file feeds ids, then decodes n greedy tokens one at a time.
    None when llama-cpp-python is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    import numpy as np
    llm = Llama(**llama_cpp_settings(threads))

    def run(ids, n):
        llm.reset()
        llm.eval(ids)
        for _ in range(n):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    return run


def bench_llama_cpp(prompt_ids, n_new, repeats, threads, draft):
    """llama.cpp on the embedded GGUF file, batch 1 (its Python API runs one sequence): prefill and greedy
    decode, timed like ours, and greedy decode with its prompt-lookup drafts. None when llama-cpp-python
    is not installed."""
    run = llama_cpp_runner(threads)
    if run is None:
        return None
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    lookup = Llama(**llama_cpp_settings(threads), draft_model=LlamaPromptLookupDecoding(max_ngram_size=3, num_pred_tokens=draft))

    def run_lookup(ids, n):                       # its generate() with drafts, greedy, the first n tokens
        for i, _ in enumerate(lookup.generate(ids, top_k=1, temp=0.0, reset=True)):
            if i + 1 >= n:
                break
    prefill = timed(lambda: run(prompt_ids, 0), repeats)
    dec1 = timed(lambda: run(prompt_ids[:64], n_new), repeats)
    pre1 = timed(lambda: run(prompt_ids[:64], 0), repeats)
    spec1 = timed(lambda: run_lookup(prompt_ids[:64], n_new), repeats)
    spec_pre1 = timed(lambda: run_lookup(prompt_ids[:64], 1), repeats)
    return {"prefill_tok_s": len(prompt_ids) / prefill, "decode_b1_tok_s": n_new / max(dec1 - pre1, 1e-9),
            "decode_b1_lookup_tok_s": (n_new - 1) / max(spec1 - spec_pre1, 1e-9)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=32, help="new tokens per decode measurement")
    ap.add_argument("--prefill-tokens", type=int, default=1100)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--draft", type=int, default=DRAFT_TOKENS, help="prompt-lookup guesses per step")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--interleave", type=int, default=0, metavar="N",
                    help="only N alternating pairs of prefill, then of batch-16 decode, ours and transformers "
                         "(both in model.default_dtype), then of batch-1 decode, ours and llama.cpp (when "
                         "installed), and their ratios")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                    help="ours with prefills and decoding steps through compiled graphs (model.compile_for_inference; "
                         "the first calls compile, ~10 s each from inductor's cache, minutes the first time, in "
                         "the untimed warm-ups)")
    ap.add_argument("--glibc-defaults", action="store_true",
                    help="leave glibc's malloc settings alone (default: model.keep_freed_memory for the whole process, "
                         "so for every side, as train.py runs its synthesis)")
    ap.add_argument("--freeze", action="store_true",
                    help="with --compile: the decoding steps' graphs take the block weights as constants "
                         "(compile_for_inference(freeze=True); 90-100 s more per kind of step, every run)")
    args = ap.parse_args()
    if args.freeze and not args.compile:
        ap.error("--freeze needs --compile")
    if not args.glibc_defaults:
        keep_freed_memory()
    torch.set_num_threads(args.threads)
    text = Path(__file__).resolve().parent.parent.joinpath("prompts", "webshop.txt").read_text()
    _, tok = load_model(dtype=torch.float32, device="cpu")
    ids = (tok.encode(text) * 4)[: args.prefill_tokens]
    batch16 = [ids[i * 40: i * 40 + 64] for i in range(16)]     # 16 different 64-token prompts
    if args.interleave:
        return interleaved(ids, batch16, args.decode_tokens, args.interleave, args.compile, args.freeze)
    ours_dtype = default_dtype("cpu")
    results = {"machine": {"cpu_threads": args.threads, "torch": torch.__version__, "ours_dtype": str(ours_dtype)}}
    fp16 = FP16_KERNELS and ours_dtype == torch.float32            # as synth, evaluate and train infer here
    results["machine"]["ours_fp16_weights"] = fp16
    results["machine"]["ours_compiled"] = args.compile
    results["machine"]["ours_frozen_weights"] = args.freeze
    results["ours"] = bench_ours(ids, batch16, args.decode_tokens, args.repeats, ours_dtype, args.draft, fp16,
                                 compiled=args.compile, freeze=args.freeze)
    if fp16:                                                         # and with the exact fp32 weights
        results["ours_fp32_weights"] = bench_ours(ids, batch16, args.decode_tokens, args.repeats, ours_dtype,
                                                  args.draft, False)
    int4 = INT4_KERNELS and ours_dtype == torch.bfloat16                # the GGUF's 4-bit codes are kept
    if int4:                                                         # and without them: bf16 weights only
        results["ours_bf16_weights_only"] = bench_ours(ids, batch16, args.decode_tokens, args.repeats, ours_dtype,
                                                       args.draft, False, int4=False)
    hf_runs = {str(dt): bench_transformers(ids, batch16, args.decode_tokens, args.repeats, dt, args.draft)
               for dt in (torch.float32, torch.bfloat16)}
    results["transformers_by_dtype"] = hf_runs
    best = {k: max(r[k] for r in hf_runs.values()) for k in results["ours"]}
    results["transformers_best"] = best
    results["llama_cpp"] = llama = bench_llama_cpp(ids, args.decode_tokens, args.repeats, args.threads, args.draft)
    # the performance issue's targets: ratios to transformers' best, and decode at batch 1 >= llama.cpp
    # (>= 4x transformers when llama.cpp is not installed)
    targets = {"prefill_tok_s": ("transformers", 1.3), "decode_b1_tok_s": ("llama.cpp", 1.0) if llama else
               ("transformers", 4.0), "decode_b1_lookup_tok_s": ("llama.cpp", 1.0) if llama else
               ("transformers", 4.0), "decode_b16_tok_s": ("transformers", 2.5)}
    print(f"\n{'measure':<24}{'ours':>10}{'peer':>14}{'peer tok/s':>12}{'ratio':>8}{'target':>8}")
    for k, (peer, target) in targets.items():
        ref = llama[k] if peer == "llama.cpp" else best[k]
        ratio = results["ours"][k] / ref
        results.setdefault("ratio", {})[k] = {"peer": peer, "ratio": ratio, "target": target}
        print(f"{k:<24}{results['ours'][k]:>10.1f}{peer:>14}{ref:>12.1f}{ratio:>7.2f}x{target:>7.1f}x")
    if fp16:
        print("  ours, exact fp32 weights: " + ", ".join(f"{k}={v:.1f}" for k, v in results["ours_fp32_weights"].items()))
    if int4:
        print("  ours, bf16 weights only (no 4-bit codes): " +
              ", ".join(f"{k}={v:.1f}" for k, v in results["ours_bf16_weights_only"].items()))
    for dt, r in hf_runs.items():
        print(f"  transformers {dt}: " + ", ".join(f"{k}={v:.1f}" for k, v in r.items()))
    print("  llama.cpp (Q4_1): " + (", ".join(f"{k}={v:.1f}" for k, v in llama.items()) if llama else
                                    "not installed (pip install llama-cpp-python)"))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

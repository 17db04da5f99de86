"""Benchmark: one decoding step of SmolLM2 at a given batch size and cache fill, as in synthesis.

A step feeds one token per row after `--cached` slots of each row's own keys and values, optionally
after a `--prefix` of shared slots (one copy for the batch, as a cached agent prompt). Prints the
median milliseconds per step over --steps steps (with the fp16 weight copies that synth.py uses on a
CPU, unless --fp32-weights), and with --profile the operators that took the time.

    python benchmarks/bench_decode_step.py --batch 16 --cached 1000 [--prefix 1600] [--profile]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import KVCache, default_dtype, load_model, prefill_prefix, set_fp16_weights  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--cached", type=int, default=400, help="filled slots of each row's own cache")
    ap.add_argument("--prefix", type=int, default=0, help="shared prefix slots (0 = none)")
    ap.add_argument("--tokens", type=int, default=1, help="tokens per row per step (1 + drafts to check)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators")
    ap.add_argument("--fp32-weights", action="store_true", help="the exact weights, not the fp16 copies synth uses")
    args = ap.parse_args()
    model, _ = load_model(dtype=default_dtype("cpu"), device="cpu")
    set_fp16_weights(model, not args.fp32_weights)
    dtype = next(model.parameters()).dtype
    with torch.inference_mode():
        prefix = prefill_prefix(model, [100 + i % 1000 for i in range(args.prefix)], args.prefix) \
            if args.prefix else None
        cache = KVCache(model.args, args.batch, args.cached + args.tokens + 8, dtype, "cpu", shared=prefix)
        for k, v in zip(cache.k, cache.v):
            k.normal_(), v.normal_()
        cache.valid[:, :args.cached] = True
        cache.length = args.cached
        cache.next_pos += args.cached
        tokens = torch.randint(0, 1000, (args.batch, args.tokens))

        def step():                      # the tokens of each row, then the cache forgets them again
            model(tokens, cache)
            cache.length -= args.tokens
            cache.next_pos -= args.tokens
            cache.valid[:, cache.length:] = False

        for _ in range(3):
            step()
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        print(f"batch {args.batch} x {args.tokens} tokens, {args.prefix} shared + {args.cached} own cached slots: "
              f"{statistics.median(times) * 1e3:.1f} ms/step ({dtype}, {torch.get_num_threads()} threads)")
        if args.profile:
            from torch.profiler import profile
            with profile() as prof:
                for _ in range(5):
                    step()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()

"""Benchmark: SmolLM2's 211 linears (30 blocks x 7, and the LM head) at a few row counts, fp32 against
the fp16 weight copies that `model.set_fp16_weights` uses for inference on a CPU.

Random weights of SmolLM2's shapes, each linear fed its own input, as in one forward pass (the weights
are cold in the caches, as in a decoding step). fp32 goes through `model.linear` (the split over the
threads for a few rows), fp16 through `model.Linear` with its fp16 copy. Prints the best of --repeats
passes, in ms, and the ratio, all in one process.

    python benchmarks/bench_linears.py [--rows 1,4,16,64,512] [--repeats 5]
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import FP16_KERNELS, Linear, linear  # noqa: E402

DIM, HIDDEN, KV_DIM, VOCAB, LAYERS = 576, 1536, 192, 49152, 30      # SmolLM2-135M
BLOCK = [(DIM, DIM), (DIM, KV_DIM), (DIM, KV_DIM), (DIM, DIM), (DIM, HIDDEN), (DIM, HIDDEN), (HIDDEN, DIM)]


def best_ms(fns, inputs, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for fn, x in zip(fns, inputs):
            fn(x)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,4,16,64,512", help="comma-separated rows per product")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if not FP16_KERNELS:
        sys.exit("error: this PyTorch build has no fbgemm kernels")
    torch.manual_seed(0)
    layers = []
    for in_f, out_f in BLOCK * LAYERS + [(DIM, VOCAB)]:
        layer = Linear(in_f, out_f, bias=False).requires_grad_(False)
        layer.weight.normal_(0, 0.02)
        layer.fp16 = True
        layers.append(layer)
    fp32 = [lambda x, w=layer.weight: linear(x, w) for layer in layers]
    with torch.inference_mode():
        for rows in (int(r) for r in args.rows.split(",")):
            inputs = [torch.randn(rows, layer.in_features) for layer in layers]
            a, b = best_ms(fp32, inputs, args.repeats), best_ms(layers, inputs, args.repeats)
            print(f"{rows:>5} rows: fp32 {a:7.1f} ms, fp16 copies {b:7.1f} ms, ratio {a / b:.2f}x", flush=True)


if __name__ == "__main__":
    main()

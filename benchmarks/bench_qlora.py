"""Benchmark: one QLoRA training step (paper Section 4, Appendix C.4) of this project against transformers + PEFT.

Ours: `load_model(quantize="nf4")` (every block linear NF4 with double quantization) plus `lora.add_lora`
(r=16, alpha=32, dropout 0.05 on q/k/v/o/gate/up/down). Reference: transformers' LlamaForCausalLM read from
the same SmolLM2 GGUF, with PEFT LoRA of the same config over the full-precision (not quantized) weights.
One step = forward + next-token cross-entropy + backward + AdamW (lr 1e-4) on the LoRA parameters, for a
batch of --batch x --seq-len random token ids; each side computes the loss the way its training code
does (ours: loss.lm_loss; transformers: full logits, then F.cross_entropy). Ours computes in
--dtype (default `model.default_dtype`: fp32 on CPUs without native bf16 matmul, bf16 otherwise); the
reference runs in each of --peft-dtypes. The QLoRA issue names bf16 compute for both sides; on a CPU
without native bf16, fp32 is each side's faster dtype, so run both pairs. After --warmup untimed steps
(default 1), the median of --steps steps. Both sides run with `model.keep_freed_memory`, as train.py
does (glibc keeps freed memory instead of mapping large blocks afresh), unless --glibc-defaults: it is
process-wide, so the two sides always share the setting. Ours keeps its dequantized weights between
steps when they fit, as train.py does (`quant.keep_dequantized`; --keep-dequantized off dequantizes in
every forward and backward), and its blocks are compiled for training, as train.py does
(`lora.compile_for_training`, in the warm-up step; --no-compile runs them eager).

    python benchmarks/bench_qlora.py [--steps 3] [--batch 4] [--seq-len 512] [--threads 2]
    python benchmarks/bench_qlora.py --dtype bf16 --peft-dtypes bf16 --steps 1 --warmup 0   # the issue's bf16 pair
    python benchmarks/bench_qlora.py --peft-dtypes bf16 --floor   # and the lower bound of any LoRA step (floor_step)
    python benchmarks/bench_qlora.py --peft-dtypes bf16 --interleave 6   # alternating steps, 6 ratios
    python benchmarks/bench_qlora.py --peft-dtypes bf16 --no-compile     # ours eager (train.py --no-compile)
    python benchmarks/bench_qlora.py --peft-dtypes bf16 --interleave 4 --peft-compile   # both compiled
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lora import LoRAConfig, add_lora, compile_for_training, count_trainable  # noqa: E402
from loss import lm_loss  # noqa: E402
from model import default_dtype, embedded_model_path, keep_freed_memory, load_model  # noqa: E402
from quant import KEEP_MODES, keep_dequantized_if  # noqa: E402


def training_step(loss_fn, params):
    """A function tokens -> seconds of forward + loss + backward + AdamW step (lr 1e-4) on `params`;
    with no params, forward + loss + backward only."""
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0) if params else None

    def step(tokens):
        t = time.perf_counter()
        loss_fn(tokens).backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t
    return step


def median_time(step, tokens, steps, warmup):
    """Median seconds of `steps` steps after `warmup` untimed ones."""
    return statistics.median([step(tokens) for _ in range(warmup + steps)][warmup:])


def ours_step(dtype, keep, compiled=False):
    """Our QLoRA training step, and (trainable, total) parameters; `compiled`: with the blocks compiled
    (lora.compile_for_training, as train.py --compile; the warm-up step compiles)."""
    model, _ = load_model(dtype=dtype, device="cpu", quantize="nf4")
    keep_dequantized_if(model, keep, dtype, "cpu")                                # as train.py
    add_lora(model, LoRAConfig()).train()
    if compiled:
        compile_for_training(model)
    params = [p for p in model.parameters() if p.requires_grad]
    # the loss train.py uses: the LM head only over trained positions, chunked (loss.lm_loss)
    return training_step(lambda x: lm_loss(model, x, x), params), count_trainable(model)


def floor_step(dtype):
    """A lower bound for any LoRA step on this model: the frozen model in `dtype` with neither NF4 nor
    LoRA, the same loss, and the backward every LoRA step needs, through the activations of every block
    (here from the second block's input up; no weight gets a gradient, no optimizer runs)."""
    model, _ = load_model(dtype=dtype, device="cpu")
    model.requires_grad_(False).train()
    model.layers[0].register_forward_hook(lambda block, args, out: out.detach().requires_grad_())
    return training_step(lambda x: lm_loss(model, x, x), [])


def peft_step(dtype, compiled=False):
    """transformers + PEFT LoRA (same config, dense base) training step, and (trainable, total);
    `compiled`: the PEFT model through torch.compile (its first step compiles: ~190 s on 2 Xeon cores)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    path = embedded_model_path()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    cfg = LoRAConfig()
    pm = get_peft_model(hf, LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                                       target_modules=list(cfg.targets), task_type="CAUSAL_LM")).train()
    params = [p for p in pm.parameters() if p.requires_grad]
    trainable, total = sum(p.numel() for p in params), sum(p.numel() for p in pm.parameters())
    forward = torch.compile(pm) if compiled else pm
    def loss_fn(x):
        logits = forward(input_ids=x).logits                                       # (B, T, vocab)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())
    return training_step(loss_fn, params), (trainable, total)


def interleaved(tokens, rounds, dtype, keep, peft_dtype, compiled, peft_compiled):
    """Ours and transformers + peft in one process, one step each in turn (the order flips every round,
    after a warm-up step each): on a shared machine the load drifts between two separate measurements,
    less within a pair. Prints each round's ratio and the median."""
    ours, _ = ours_step(dtype, keep, compiled)
    theirs, _ = peft_step(DTYPES[peft_dtype], peft_compiled)
    ours(tokens), theirs(tokens)
    ratios = []
    for r in range(rounds):
        if r % 2 == 0:
            a = ours(tokens)
            b = theirs(tokens)
        else:
            b = theirs(tokens)
            a = ours(tokens)
        ratios.append(b / a)
        print(f"round {r + 1}: ours {a:.2f} s, transformers + peft {peft_dtype} {b:.2f} s, ratio {b / a:.2f}x",
              flush=True)
    print(f"median ratio over {rounds} rounds: {statistics.median(ratios):.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per side before them (default 1)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=list(DTYPES), default=None,
                    help="compute dtype of ours (default: model.default_dtype for the CPU)")
    ap.add_argument("--peft-dtypes", default="fp32,bf16",
                    help="dtypes of the transformers + peft reference, comma-separated (fp32, bf16)")
    ap.add_argument("--keep-dequantized", choices=KEEP_MODES, default="auto",
                    help="ours: keep the dequantized NF4 weights between passes (auto: as train.py, when they fit)")
    ap.add_argument("--floor", action="store_true",
                    help="also time the lower bound of any LoRA step here: the frozen model's forward and "
                         "backward through the activations, without NF4 or LoRA (see floor_step)")
    ap.add_argument("--interleave", type=int, default=0, metavar="N",
                    help="only N rounds of one step of ours and one of transformers + peft (the last of "
                         "--peft-dtypes) in one process, and their ratios")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="ours: the blocks compiled by torch.compile in the warm-up step, as train.py does by default "
                         "(--no-compile: eager)")
    ap.add_argument("--peft-compile", action="store_true",
                    help="transformers + peft through torch.compile too (compiled in its warm-up step, ~190 s here)")
    ap.add_argument("--glibc-defaults", action="store_true",
                    help="leave glibc's malloc settings alone (default: model.keep_freed_memory, as train.py)")
    args = ap.parse_args()
    if not args.glibc_defaults:
        keep_freed_memory()
    peft_dtypes = args.peft_dtypes.split(",")
    unknown = set(peft_dtypes) - set(DTYPES)
    if unknown:
        ap.error(f"--peft-dtypes: unknown {', '.join(sorted(unknown))} (choose from {', '.join(DTYPES)})")
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype("cpu")
    torch.manual_seed(0)
    tokens = torch.randint(0, 49152, (args.batch, args.seq_len))                   # (B, T) SmolLM2 vocab
    n = tokens.numel()
    timing = (f"{args.interleave} alternating rounds" if args.interleave else
              f"median of {args.steps} steps after {args.warmup} warm-up")
    print(f"QLoRA step: batch {args.batch} x {args.seq_len} tokens, LoRA r=16 on all block linears, "
          f"compute {dtype}, {args.threads} threads, {timing}, "
          f"{'glibc malloc defaults' if args.glibc_defaults else 'model.keep_freed_memory'} for both, "
          f"--keep-dequantized {args.keep_dequantized}{', ours compiled' if args.compile else ''}"
          f"{', transformers + peft compiled' if args.peft_compile else ''}")
    if args.interleave:
        return interleaved(tokens, args.interleave, dtype, args.keep_dequantized, peft_dtypes[-1], args.compile,
                           args.peft_compile)
    step, (o_train, o_total) = ours_step(dtype, args.keep_dequantized, args.compile)
    ours = median_time(step, tokens, args.steps, args.warmup)
    print(f"  ours done: {ours:.2f} s/step")
    floor = median_time(floor_step(dtype), tokens, args.steps, args.warmup) if args.floor else None
    if floor is not None:
        print(f"  floor done: {floor:.2f} s/step")
    refs = {}
    for name in peft_dtypes:
        step, (r_train, r_total) = peft_step(DTYPES[name], args.peft_compile)
        refs[name] = median_time(step, tokens, args.steps, args.warmup)
        print(f"  transformers + peft ({name}) done: {refs[name]:.2f} s/step")
    print(f"\n| {'implementation':<54} | {'s/step':>7} | {'tokens/s':>8} | {'LoRA params':>11} | {'of total':>8} |")
    print(f"|{'-' * 56}|{'-' * 9}|{'-' * 10}|{'-' * 13}|{'-' * 10}|")
    rows = [(f"ours: NF4 base + LoRA (QLoRA), {dtype_name(dtype)}{', compiled' if args.compile else ''}", ours, o_train,
             o_total)]
    peft_name = "transformers + peft: LoRA, dense base" + (", compiled" if args.peft_compile else "")
    rows += [(f"{peft_name}, {name}", s, r_train, r_total) for name, s in refs.items()]
    for name, s, tr, tot in rows:
        print(f"| {name:<54} | {s:>7.2f} | {n / s:>8.0f} | {tr:>11,} | {100 * tr / tot:>7.2f}% |")
    for name, s in refs.items():
        print(f"ours / transformers+peft {name} throughput: {s / ours:.2f}x")
        if floor is not None:
            print(f"  the floor (frozen {dtype_name(dtype)} model, forward + backward through the activations, "
                  f"no NF4, no LoRA): {floor:.2f} s/step = {s / floor:.2f}x transformers+peft {name}")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def dtype_name(dtype):
    return {v: k for k, v in DTYPES.items()}[dtype]


if __name__ == "__main__":
    main()

"""Benchmark: synth.py's role-play stage (paper section 5) at several engine settings, one process.

Role-plays the same pseudo inputs once per `--drafts` value (model.generate's `draft`: guessed tokens
checked per greedy step, 0 = one token per step) and per `--weights` value (fp16: the fp16 weight copies
that synth.py uses on a CPU, `model.set_fp16_weights`; fp32: the exact weights), and prints the seconds, the tokens/s, whether the
conversations are the same, and where the time went: the model's forward calls grouped by
(batch rows, tokens per row), prefills of more than 16 tokens together.

    python benchmarks/bench_roleplay.py --inputs runs/webshop/data/inputs.jsonl --samples 16 --turns 5 --drafts 3,0
    python benchmarks/bench_roleplay.py --inputs runs/webshop/data/inputs.jsonl --drafts 3 --weights fp16,fp32
"""
import argparse
import collections
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import model as engine  # noqa: E402
import synth  # noqa: E402
from prompts import example_inputs, load_prompt  # noqa: E402


def count_forwards(stats):
    """Wrap Llama.forward to add (calls, seconds) per (rows, tokens per row) into stats."""
    forward = engine.Llama.forward

    def timed_forward(self, tokens, cache=None, **kw):
        start = time.perf_counter()
        out = forward(self, tokens, cache, **kw)
        key = (tokens.shape[0], tokens.shape[1] if tokens.shape[1] <= 1 + engine.DRAFT_TOKENS else "prefill")
        stats[key][0] += 1
        stats[key][1] += time.perf_counter() - start
        return out
    engine.Llama.forward = timed_forward


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", default="prompts/webshop.txt")
    ap.add_argument("--inputs", default=None, help="a synth inputs.jsonl; None = the prompt's example inputs")
    ap.add_argument("--samples", type=int, default=16, help="conversations, one batch")
    ap.add_argument("--turns", type=int, default=None, help="max agent turns; None = the task's")
    ap.add_argument("--drafts", default=f"{engine.DRAFT_TOKENS},0", help="comma-separated draft settings")
    ap.add_argument("--weights", default="fp16", help="comma-separated: fp16 (weight copies, as synth.py) or fp32")
    args = ap.parse_args()
    model, tok = engine.load_model()
    prompt = load_prompt(args.prompt)
    task = synth.detect_task(prompt)
    if args.inputs:
        inputs = [r["input"] for r in synth.read_jsonl(Path(args.inputs))]
    else:
        inputs = [synth.input_of_item(task, prompt, synth.item_of_input(task, x), i)
                  for i, x in enumerate(example_inputs(prompt))]
    inputs = (inputs * args.samples)[:args.samples]
    stats = collections.defaultdict(lambda: [0, 0.0])
    count_forwards(stats)
    conversations = {}
    for weights in args.weights.split(","):
        if weights not in ("fp16", "fp32"):
            sys.exit(f"error: --weights takes fp16 and fp32, not {weights!r}")
        engine.set_fp16_weights(model, weights == "fp16")
        for draft in (int(d) for d in args.drafts.split(",")):
            stats.clear()
            cfg = synth.SynthConfig(draft_tokens=draft, max_turns=args.turns)
            key = f"draft {draft}, {weights} weights"
            conversations[key], tokens, seconds = synth.timed_roleplay(model, tok, prompt, task, cfg, inputs)
            print(f"{key}: {seconds:.1f} s, {tokens} tokens, {tokens / seconds:.1f} tok/s", flush=True)
            for (rows, width), (calls, secs) in sorted(stats.items(), key=lambda kv: -kv[1][1])[:8]:
                print(f"  {rows:>2} rows x {width} tokens: {calls:>5} calls, {secs:6.1f} s, "
                      f"{1e3 * secs / calls:6.0f} ms/call")
    first = next(iter(conversations.values()))
    print("same conversations:", {key: c == first for key, c in conversations.items()})


if __name__ == "__main__":
    main()

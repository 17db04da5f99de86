"""Efficiency of GenPI against prompting: MACs, FLOPs and latency of a multi-turn Web Shopping conversation.

Paper section 8, figures 3 and 4 (METHOD.md "Efficiency"). The fixed 6-turn WebShop episode
(prompts/webshop_conversation.json) is run, as cost, for: the full agent prompt prepended, the prompt
compressed at keep-rates 0.9 / 0.7 / 0.3, and GenPI (no prompt; its LoRA adapter merged, or unmerged with
r = 16). Each turn = prefill of its input + decode of the agent's reply (its token count in the shipped
conversation). Two settings:
  (a) no caching across turns (figure 3): each turn re-processes the whole chat so far (within a turn the
      reply is decoded with a KV cache, as the paper's caption says);
  (b) the prompt and earlier turns cached (figure 4): each turn processes only its new tokens; the prompt's
      one-time caching cost is reported apart from the conversation total. What is cached once is the fixed
      start of the chat: the prompt and the chat format's own fixed tokens (SmolLM2's format adds a default
      system message to every chat), so GenPI too has a small one-time cost.

The counter (`count_forward`) is written by hand from the config alone, so Llama-3-8B/70B are profiled
without weights. Matmuls: FLOPs = 2 x MACs. Attention (QK^T and AV) is counted over the full
T_new x (T_past + T_new) rectangle, as torch's SDPA math path computes it and as torch.utils.flop_counter
counts it; a causal kernel could skip about half of a prefill's rectangle. Grouped-query attention costs the
same as full attention (every query head does its own QK^T and AV). Elementwise work (RMSNorm, rotary,
softmax, SwiGLU, residual adds, the unmerged LoRA scale-and-add) has no MACs; it is counted separately with
the per-element costs below, and included in "flops" (DeepSpeed's profiler, used by the paper, also counts
these functionals). The embedding lookup costs nothing.

Latency (the embedded model or --model PATH; none with --config): every timed forward has the exact shape of
a turn's call (t_new new tokens after t_past cached ones); token values and cached keys do not change the
time, so the cache is marked filled without computing it. `--latency measure` times every call shape
(warm-up + median of --repeats); decode steps are timed for --decode-steps tokens at the turn's context and
multiplied by the reply's token count. `--latency fit` (default: the full-prompt turns without caching are
thousands of tokens each, too slow to time on a 2-core CPU in a few minutes) times a few fixed shapes the
same way and fits seconds = a + b * linear MACs + c * attention MACs for prefill, and a + c * attention MACs
per decode step, separately with and without the unmerged LoRA, then predicts every call from its count.
Timing uses one CPU thread by default (--threads): on a shared 2-core CPU, two threads wait on each other
and a forward takes 4-25x longer, with noise larger than the differences being measured.

The compressed prompts: LLMLingua-2 (an XLM-RoBERTa token classifier) is not available offline, so by
default a deterministic stand-in drops tokens by a fixed rule: of a message's n tokens it keeps tokens
floor(j / rate) for j = 0 .. ceil(rate * n) - 1 (evenly spaced, the first always kept). It has LLMLingua-2's
token counts, not its choice of tokens, which the cost does not depend on. Pass real LLMLingua-2 outputs
(prompt files) with --compressed FILE.

    python profile_flops.py                        # embedded SmolLM2-135M: counts + fitted latency + plots
    python profile_flops.py --config llama3-8b     # analytic only (paper's model), no weights needed
    python profile_flops.py --model DIR --latency measure --json runs/profile/out.json
"""
import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from model import CONFIGS, KVCache, ModelArgs, load_model
from prompts import PromptFileError, load_prompt

ROOT = Path(__file__).resolve().parent
CONVERSATION = ROOT / "prompts" / "webshop_conversation.json"
OUT_DIR = ROOT / "runs" / "profile"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KEEP_RATES = (0.9, 0.7, 0.3)

# Elementwise FLOPs per element (no MACs):
RMSNORM_FLOPS = 4     # per feature: square, sum, multiply by rsqrt(mean), multiply by weight
ROTARY_FLOPS = 3      # per q/k feature: x*cos + rotate(x)*sin
SOFTMAX_FLOPS = 5     # per attention score: 1/sqrt(hd) scale, subtract max, exp, sum, divide
SWIGLU_FLOPS = 5      # per hidden feature: silu(g) = g * sigmoid(g) (exp, add, divide, multiply), times up
RESIDUAL_FLOPS = 1    # per feature per residual add (two per block)
LORA_ADD_FLOPS = 2    # per output feature of an unmerged LoRA linear: scale by alpha/r, add to the base output


# ----------------------------------------------------------------------------- the counter
def linear_shapes(args: ModelArgs) -> dict:
    """(in_features, out_features) of each linear of one block, named as in model.py."""
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    return {"q_proj": (args.dim, q), "k_proj": (args.dim, kv), "v_proj": (args.dim, kv), "o_proj": (q, args.dim),
            "gate_proj": (args.dim, args.hidden_dim), "up_proj": (args.dim, args.hidden_dim),
            "down_proj": (args.hidden_dim, args.dim)}


def count_forward(args: ModelArgs, t_new: int, t_past: int = 0, lora_rank: int = 0, lora_merged: bool = True,
                  batch: int = 1, last_only: bool = False) -> dict:
    """MACs and FLOPs of one forward of `t_new` tokens per row after `t_past` cached ones (model.py's Llama).
    With `last_only` (only the last token's logits, as a prefill for generation), the last block computes
    every token's keys and values but the rest for the last token alone (model.Block.forward).

    Returns {"layer": {op: {"macs", "flops"}} for one block (all blocks are alike but, with last_only, the
    last: "last_layer"), "lm_head", "final_norm", and totals: "macs_linear" (block linears, LoRA, LM head),
    "macs_attention" (QK^T + AV), "macs", "flops_matmul" (= 2 * macs), "flops_elementwise", "flops"
    (matmul + elementwise)}."""
    if t_new < 1 or t_past < 0 or batch < 1 or lora_rank < 0:
        raise ValueError(f"count_forward needs t_new >= 1, t_past >= 0, batch >= 1, lora_rank >= 0 "
                         f"(got {t_new}, {t_past}, {batch}, {lora_rank})")
    n = batch * t_new                                   # token rows into every block
    s = t_past + t_new                                  # keys each query sees (full rectangle)
    n_out = batch * (1 if last_only else t_new)         # rows out of the last block, through the final norm and LM head
    hd, shapes = args.head_dim, linear_shapes(args)
    mm = lambda macs: {"macs": macs, "flops": 2 * macs}
    ew = lambda flops: {"macs": 0, "flops": flops}
    lora_targets = LORA_TARGETS if lora_rank > 0 and not lora_merged else ()

    def block(rows_out, queries):
        """One block's counts: every new token's rows into q, k, v; `rows_out` rows on from the attention."""
        rows = lambda name: n if name in ("q_proj", "k_proj", "v_proj") else rows_out
        layer = {name: mm(rows(name) * i * o) for name, (i, o) in shapes.items()}
        layer["qk"] = mm(batch * args.n_heads * queries * s * hd)                 # (T, hd) @ (hd, S) per head
        layer["av"] = mm(batch * args.n_heads * queries * s * hd)                 # (T, S) @ (S, hd) per head
        layer["lora"] = mm(sum(rows(t) * lora_rank * sum(shapes[t]) for t in lora_targets))  # x @ A, then @ B
        layer["rmsnorm"] = ew(RMSNORM_FLOPS * (n + rows_out) * args.dim)
        layer["rotary"] = ew(ROTARY_FLOPS * n * hd * (args.n_heads + args.n_kv_heads))
        layer["softmax"] = ew(SOFTMAX_FLOPS * batch * args.n_heads * queries * s)
        layer["swiglu"] = ew(SWIGLU_FLOPS * rows_out * args.hidden_dim)
        layer["residual"] = ew(2 * RESIDUAL_FLOPS * rows_out * args.dim)
        layer["lora_add"] = ew(sum(LORA_ADD_FLOPS * rows(t) * shapes[t][1] for t in lora_targets))
        return layer
    layer = block(n, t_new)
    last_layer = block(n_out, 1) if last_only else layer
    lm_head, final_norm = mm(n_out * args.dim * args.vocab_size), ew(RMSNORM_FLOPS * n_out * args.dim)
    blocks = lambda pick: (args.n_layers - 1) * pick(layer) + pick(last_layer)     # the sum over all blocks
    macs_linear = blocks(lambda b: sum(b[k]["macs"] for k in (*shapes, "lora"))) + lm_head["macs"]
    macs_attention = blocks(lambda b: b["qk"]["macs"] + b["av"]["macs"])
    flops_elementwise = blocks(lambda b: sum(v["flops"] for v in b.values() if v["macs"] == 0)) + final_norm["flops"]
    macs = macs_linear + macs_attention
    return {"t_new": t_new, "t_past": t_past, "batch": batch, "last_only": last_only, "lora_rank": lora_rank,
            "lora_merged": lora_merged, "layer": layer, "last_layer": last_layer, "lm_head": lm_head, "final_norm": final_norm,
            "macs_linear": macs_linear, "macs_attention": macs_attention, "macs": macs, "flops_matmul": 2 * macs,
            "flops_elementwise": flops_elementwise, "flops": 2 * macs + flops_elementwise}


# ----------------------------------------------------------------------------- conversation and variants
class ConversationFileError(ValueError):
    """A conversation file that cannot be used; names the file, the message index and the problem."""


def load_conversation(path) -> list[dict]:
    """The messages of a conversation file: {"messages": [{"role": "user"|"assistant", "content": str}, ...]},
    alternating, starting with the user (an observation) and ending with the agent."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConversationFileError(f"{path}: cannot read the conversation ({e.strerror})") from None
    except ValueError as e:
        raise ConversationFileError(f"{path}: not valid JSON ({e})") from None
    messages = data.get("messages") if isinstance(data, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ConversationFileError(f"{path}: no \"messages\" list")
    for i, m in enumerate(messages):
        role = "user" if i % 2 == 0 else "assistant"
        if not isinstance(m, dict) or m.get("role") != role or not isinstance(m.get("content"), str) \
                or not m["content"].strip():
            raise ConversationFileError(f"{path}: messages[{i}] must be a {role} message with non-empty text "
                                        f"(turns alternate user/assistant, starting with the user)")
    if len(messages) % 2:
        raise ConversationFileError(f"{path}: messages[{len(messages) - 1}] is a user turn without an agent reply")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def kept_positions(n: int, rate: float) -> list[int]:
    """The stand-in compressor's rule: ceil(rate * n) evenly spaced positions of n, the first always kept."""
    if not 0 < rate <= 1:
        raise ValueError(f"keep-rate must be in (0, 1], not {rate}")
    keep = math.ceil(round(rate * n, 9))                    # round: 0.7 * 20 is 14.000000000000002
    return [min(n - 1, int(j / rate + 1e-9)) for j in range(keep)]


def compress_stand_in(text: str, rate: float, tok) -> str:
    """Keep about `rate` of the text's tokens by the fixed rule of kept_positions (LLMLingua-2's token budget)."""
    ids = tok.encode(text, add_bos=False)
    return tok.decode([ids[i] for i in kept_positions(len(ids), rate)]) if ids else text


def prompt_variants(prompt, tok, rates=KEEP_RATES, compressed_files=(), lora_rank=16) -> list[dict]:
    """The compared settings: name, prefix messages (the prompt's turns, or none) and LoRA."""
    full = {"name": "full prompt", "prefix": prompt.turns, "lora_rank": 0, "lora_merged": True}
    if compressed_files:
        compressed = [{"name": f"compressed ({Path(f).stem})", "prefix": load_prompt(f).turns,
                       "lora_rank": 0, "lora_merged": True} for f in compressed_files]
    else:
        compressed = [{"name": f"stand-in x{r}", "lora_rank": 0, "lora_merged": True,
                       "prefix": [dict(t, content=compress_stand_in(t["content"], r, tok)) for t in prompt.turns]}
                      for r in rates]
    genpi = [{"name": "GenPI merged", "prefix": [], "lora_rank": lora_rank, "lora_merged": True},
             {"name": f"GenPI unmerged r={lora_rank}", "prefix": [], "lora_rank": lora_rank, "lora_merged": False}]
    return [full, *compressed, *genpi]


def turn_lengths(tok, prefix: list[dict], conversation: list[dict], n_turns: int) -> list[list[int]]:
    """Per turn: (tokens of the chat up to the agent's reply, with the generation prompt; tokens of the reply
    as the chat format writes it: content + end of turn)."""
    lengths = []
    for k in range(n_turns):
        before = len(tok.apply_chat(prefix + conversation[:2 * k + 1], add_generation_prompt=True))
        after = len(tok.apply_chat(prefix + conversation[:2 * k + 2], add_generation_prompt=False))
        lengths.append([before, after - before])
    return lengths


def fixed_prefix_length(tok, prefix: list[dict]) -> int:
    """Tokens before the first input that no input changes: the prompt, plus the chat format's own start
    (a default system message, the first user header). The common start of the chats of two different
    inputs. Setting (b) caches them once, before turn 1, for every variant alike."""
    a = tok.apply_chat(prefix + [{"role": "user", "content": "a"}], add_generation_prompt=False)
    b = tok.apply_chat(prefix + [{"role": "user", "content": "b"}], add_generation_prompt=False)
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def turn_calls(lengths, prefix_len: int, cached: bool) -> list[dict]:
    """The forwards of each turn: {"prefill": (t_new, t_past), "decode": [(1, t_past), ...]}. A reply of R
    tokens: the prefill's logits give the first, R - 1 one-token decode steps the rest. Without caching,
    turn k prefills its whole chat; with caching only what the cache lacks (the previous reply's last token,
    the new observation, the generation prompt)."""
    turns, in_cache = [], prefix_len
    for n_chat, n_reply in lengths:
        past = in_cache if cached else 0
        turns.append({"prefill": (n_chat - past, past), "decode": [(1, n_chat + j) for j in range(n_reply - 1)]})
        in_cache = n_chat + n_reply - 1
    return turns


# ----------------------------------------------------------------------------- latency
class UnmergedLoRA(nn.Module):
    """What an unmerged LoRA linear computes at inference, base(x) + B(A(x)) * alpha/r: a stand-in of the
    same cost for timing (lora.py is not imported; the profiler models LoRA on its own)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float = 32.0):
        super().__init__()
        w = base.weight
        self.base, self.scale = base, alpha / rank
        self.lora_a = nn.Linear(base.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x):
        return self.base(x) + self.lora_b(self.lora_a(x)) * self.scale


@contextmanager
def unmerged_lora(model, rank: int):
    """Wrap every q, k, v, o, gate, up, down linear in UnmergedLoRA for the duration; restore them after."""
    swapped = []
    for block in model.layers:
        for parent in (block.self_attn, block.mlp):
            for name in LORA_TARGETS:
                if hasattr(parent, name):
                    base = getattr(parent, name)
                    setattr(parent, name, UnmergedLoRA(base, rank))
                    swapped.append((parent, name, base))
    try:
        yield model
    finally:
        for parent, name, base in swapped:
            setattr(parent, name, base)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def time_forward(model, t_new: int, t_past: int, repeats: int) -> float:
    """Median seconds of one forward of t_new tokens after t_past cached ones (after one warm-up run). The
    cache is marked filled without computing it: values do not change the time, shapes do."""
    p = next(model.parameters())
    cache = KVCache(model.args, 1, t_past + t_new, p.dtype, p.device)
    tokens = torch.zeros(1, t_new, dtype=torch.long, device=p.device)
    times = []
    for _ in range(repeats + 1):
        cache.length, cache.next_pos[:] = t_past, t_past          # rewind to t_past "cached" tokens
        cache.valid[:, :t_past], cache.valid[:, t_past:] = True, False
        _sync(p.device)
        start = time.perf_counter()
        model(tokens, cache, last_only=True)
        _sync(p.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


FIT_PREFILL = ((32, 0), (256, 0), (32, 2048), (128, 1024))   # (t_new, t_past) shapes timed for the fit
FIT_DECODE = ((1, 64), (1, 1024), (1, 2048))


def fit_latency(model, lora_rank: int, repeats: int) -> dict:
    """Time FIT_PREFILL and FIT_DECODE, without and with an unmerged LoRA; least-squares fit of seconds on
    [1, linear MACs, attention MACs] (prefill) and [1, attention MACs] (decode: linear MACs are constant)."""
    import numpy as np
    fits = {}
    for unmerged in (False, True):
        rank = lora_rank if unmerged else 0
        with unmerged_lora(model, lora_rank) if unmerged else _nothing():
            for phase, shapes in (("prefill", FIT_PREFILL), ("decode", FIT_DECODE)):
                shapes = [(t, min(p, model.args.max_seq_len - t)) for t, p in shapes]   # fit in the context
                counts = [count_forward(model.args, t, p, rank, not unmerged, last_only=True) for t, p in shapes]
                secs = [time_forward(model, t, p, repeats) for t, p in shapes]
                cols = ["macs_linear", "macs_attention"] if phase == "prefill" else ["macs_attention"]
                x = np.array([[1.0] + [c[k] for k in cols] for c in counts])
                coef = np.linalg.lstsq(x, np.array(secs), rcond=None)[0]
                fits[(phase, unmerged)] = {"columns": ["1"] + cols, "coef": coef.tolist(),
                                           "points": [{"t_new": t, "t_past": p, "seconds": s, "fitted": float(f)}
                                                      for (t, p), s, f in zip(shapes, secs, x @ coef)]}
    return fits


@contextmanager
def _nothing():
    yield


def predict_seconds(fit: dict, count: dict) -> float:
    """The fitted seconds of one forward, from its count."""
    return max(0.0, sum(c * (1.0 if k == "1" else count[k]) for k, c in zip(fit["columns"], fit["coef"])))


# ----------------------------------------------------------------------------- the comparison
def profile(args: ModelArgs, tok, conversation, n_turns, variants, latency=None) -> dict:
    """Cost of every variant in both settings. `latency`: None, or latency(variant, calls) -> (prefill s,
    decode s). Returns {"variants": [...], "no_cache": {name: {"turns", "total"}}, "cached": {name: {"turns",
    "total", "prompt_caching"}}}."""
    out = {"variants": [], "no_cache": {}, "cached": {}}
    for v in variants:
        prompt_len = len(tok.apply_chat(v["prefix"], add_generation_prompt=False)) if v["prefix"] else 0
        prefix_len = fixed_prefix_length(tok, v["prefix"])
        lengths = turn_lengths(tok, v["prefix"], conversation, n_turns)
        out["variants"].append({"name": v["name"], "prompt_tokens": prompt_len, "cached_prefix_tokens": prefix_len,
                                "lora_rank": v["lora_rank"], "lora_merged": v["lora_merged"],
                                "chat_and_reply_tokens": lengths})
        for setting, cached in (("no_cache", False), ("cached", True)):
            turns = [turn_cost(args, calls, v, latency) for calls in turn_calls(lengths, prefix_len, cached)]
            out[setting][v["name"]] = {"turns": turns, "total": {k: _sum(t[k] for t in turns) for k in turns[0]}}
        caching = {"prefill": (prefix_len, 0), "decode": []} if prefix_len else None
        out["cached"][v["name"]]["prompt_caching"] = turn_cost(args, caching, v, latency)
    return out


def turn_cost(args, calls, v, latency) -> dict:
    """Summed counts (and latency) of one turn's forwards; `calls` None = nothing to compute."""
    res = {"new_tokens": 0, "reply_tokens": 0, "macs": 0, "flops": 0, "flops_matmul": 0, "prefill_s": None,
           "decode_s": None, "latency_s": None}
    if calls is None:
        if latency:
            res.update(prefill_s=0.0, decode_s=0.0, latency_s=0.0)
        return res
    res.update(new_tokens=calls["prefill"][0], reply_tokens=len(calls["decode"]) + 1)
    for t_new, t_past in [calls["prefill"]] + calls["decode"]:
        c = count_forward(args, t_new, t_past, v["lora_rank"], v["lora_merged"], last_only=True)
        for k in ("macs", "flops", "flops_matmul"):
            res[k] += c[k]
    if latency:
        res["prefill_s"], res["decode_s"] = latency(v, calls)
        res["latency_s"] = res["prefill_s"] + res["decode_s"]
    return res


def _sum(xs):
    xs = list(xs)
    return None if any(x is None for x in xs) else sum(xs)


def make_latency(model, mode: str, lora_rank: int, repeats: int, decode_steps: int):
    """-> (latency(variant, calls) -> (prefill seconds, decode seconds), details for the report)."""
    unmerged = lambda v: v["lora_rank"] > 0 and not v["lora_merged"]
    if mode == "fit":
        fits = fit_latency(model, lora_rank, repeats)

        def latency(v, calls):
            secs = lambda phase, t, p: predict_seconds(
                fits[(phase, unmerged(v))], count_forward(model.args, t, p, v["lora_rank"], v["lora_merged"], last_only=True))
            return secs("prefill", *calls["prefill"]), sum(secs("decode", t, p) for t, p in calls["decode"])
        return latency, {f"{phase}{' unmerged LoRA' if u else ''}": f for (phase, u), f in fits.items()}

    def latency(v, calls):   # measure: the prefill exactly; the reply's first decode steps, times its length
        with unmerged_lora(model, v["lora_rank"]) if unmerged(v) else _nothing():
            prefill = time_forward(model, *calls["prefill"], repeats)
            steps = [time_forward(model, t, p, repeats) for t, p in calls["decode"][:decode_steps]]
        return prefill, statistics.median(steps) * len(calls["decode"]) if steps else 0.0
    return latency, {"mode": "measure", "repeats": repeats, "decode_steps": decode_steps}


def saving(base, x):
    return None if base in (None, 0) or x is None else 100.0 * (base - x) / base


# ----------------------------------------------------------------------------- output
def human(x, unit=""):
    if x is None:
        return "-"
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}{unit}"
    return f"{x:.3g}{unit}"


def print_tables(res, n_turns, file=sys.stdout):
    names = [v["name"] for v in res["variants"]]
    tokens = {v["name"]: v["prompt_tokens"] for v in res["variants"]}
    cached_tokens = {v["name"]: v["cached_prefix_tokens"] for v in res["variants"]}
    w = max(len(n) for n in names) + 2
    full = names[0]
    print(f"\n(a) no caching across turns (figure 3): each turn re-processes the whole chat; MACs per turn", file=file)
    head = "".join(f"{'turn ' + str(k + 1):>9}" for k in range(n_turns))
    print(f"{'':{w}}{'prompt':>7}{head}{'MACs':>9}{'FLOPs':>9}{'latency':>9}{'save MACs':>10}{'save lat':>9}",
          file=file)
    for n in names:
        r, f = res["no_cache"][n], res["no_cache"][full]["total"]
        turns = "".join(f"{human(t['macs']):>9}" for t in r["turns"])
        print(f"{n:{w}}{tokens[n]:>7}{turns}{human(r['total']['macs']):>9}{human(r['total']['flops']):>9}"
              f"{human(r['total']['latency_s'], 's'):>9}{_pct(saving(f['macs'], r['total']['macs'])):>10}"
              f"{_pct(saving(f['latency_s'], r['total']['latency_s'])):>9}", file=file)
    print(f"\n(b) prompt and earlier turns cached (figure 4): conversation total over {n_turns} turns; "
          f"the one-time caching of the fixed start (prompt, chat format's system message) apart", file=file)
    print(f"{'':{w}}{'cached':>7}{'cache MACs':>11}{'cache lat':>10}{'MACs':>9}{'FLOPs':>9}{'latency':>9}"
          f"{'save MACs':>10}{'save lat':>9}{'save MACs incl. cache':>23}", file=file)
    for n in names:
        r, f = res["cached"][n], res["cached"][full]
        with_cache = lambda x: x["total"]["macs"] + x["prompt_caching"]["macs"]
        print(f"{n:{w}}{cached_tokens[n]:>7}{human(r['prompt_caching']['macs']):>11}"
              f"{human(r['prompt_caching']['latency_s'], 's'):>10}{human(r['total']['macs']):>9}"
              f"{human(r['total']['flops']):>9}{human(r['total']['latency_s'], 's'):>9}"
              f"{_pct(saving(f['total']['macs'], r['total']['macs'])):>10}"
              f"{_pct(saving(f['total']['latency_s'], r['total']['latency_s'])):>9}"
              f"{_pct(saving(with_cache(f), with_cache(r))):>23}", file=file)


def _pct(x):
    return "-" if x is None else f"{x:.1f}%"


def write_atomic(path: Path, write):
    """write(tmp_path) then os.replace: no half-written file on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)          # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def plot(res, n_turns, out_dir: Path, title: str) -> list[Path]:
    """fig3_no_cache.png (per-turn cost by turn) and fig4_cached.png (totals; prompt caching hatched)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, plots skipped (pip install matplotlib)")
        return []
    names = [v["name"] for v in res["variants"]]
    metrics = [("macs", "MACs"), ("flops", "FLOPs")]
    if res["no_cache"][names[0]]["turns"][0]["latency_s"] is not None:
        metrics.append(("latency_s", "latency (s)"))
    paths = []
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4))
    for ax, (key, label) in zip(axes, metrics):
        for n in names:
            ax.plot(range(1, n_turns + 1), [t[key] for t in res["no_cache"][n]["turns"]], marker="o", label=n)
        ax.set(xlabel="turn", ylabel=label, xticks=range(1, n_turns + 1))
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title}: per-turn cost without caching across turns")
    paths.append(_save(fig, out_dir / "fig3_no_cache.png"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4.5))
    for ax, (key, label) in zip(axes, metrics):
        conv = [res["cached"][n]["total"][key] for n in names]
        cache = [res["cached"][n]["prompt_caching"][key] for n in names]
        ax.bar(names, conv, label=f"{n_turns} turns")
        ax.bar(names, cache, bottom=conv, hatch="//", alpha=0.5, label="prompt caching (once)")
        ax.set(ylabel=label)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title}: conversation total with the prompt and earlier turns cached")
    paths.append(_save(fig, out_dir / "fig4_cached.png"))
    plt.close("all")
    return paths


def _save(fig, path):
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    return path


def load_tokenizer(source):
    """Only the tokenizer of a checkpoint (for --config runs): a Hugging Face directory or a GGUF file."""
    from model import CheckpointError, embedded_model_path
    from tokenizer import Tokenizer
    path = Path(source) if source else embedded_model_path()
    if path.is_dir():
        cfg = path / "tokenizer_config.json"
        if not (path / "tokenizer.json").is_file():
            raise CheckpointError(f"{path}: no tokenizer.json")
        return Tokenizer.from_file(path / "tokenizer.json", cfg if cfg.is_file() else None)
    if path.suffix == ".gguf" and path.is_file():
        import gguf
        reader = gguf.GGUFReader(str(path))
        return Tokenizer.from_gguf_fields({k: f.contents() for k, f in reader.fields.items()})
    raise CheckpointError(f"{path}: not a Hugging Face checkpoint directory or a .gguf file")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Settings: (a) no caching across turns (figure 3), (b) prompt and earlier "
                                        "turns cached (figure 4). See the module docstring for what is counted.")
    ap.add_argument("--model", help="checkpoint (HF directory or .gguf; default: the embedded SmolLM2-135M). "
                                    "With --config only its tokenizer is read")
    ap.add_argument("--config", choices=sorted(CONFIGS), help="analytic only, this shape (no weights, no latency)")
    ap.add_argument("--prompt", default="webshop", help="agent prompt file or shipped name (default webshop)")
    ap.add_argument("--conversation", default=str(CONVERSATION), help="conversation JSON (default: shipped)")
    ap.add_argument("--turns", type=int, default=5, help="turns of the conversation to profile (paper: 5)")
    ap.add_argument("--compressed", action="append", default=[], metavar="FILE",
                    help="a compressed prompt file (e.g. LLMLingua-2 output) to use instead of the stand-in; repeatable")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--latency", choices=("fit", "measure", "none"), default="fit")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads while timing (default 1: stable on a shared CPU; 0 = torch's default)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per shape after one warm-up (median)")
    ap.add_argument("--decode-steps", type=int, default=3, help="--latency measure: decode steps timed per reply")
    ap.add_argument("--json", metavar="FILE", help="write all numbers as JSON")
    ap.add_argument("--out-dir", default=str(OUT_DIR), help="where the PNG plots go (default runs/profile)")
    ap.add_argument("--no-plots", action="store_true")
    return ap.parse_args(argv)


def main(argv=None):
    opts = parse_args(argv)
    prompt = load_prompt(opts.prompt)
    conversation = load_conversation(opts.conversation)
    if not 1 <= opts.turns <= len(conversation) // 2:
        raise ValueError(f"--turns must be 1..{len(conversation) // 2}: {opts.conversation} has "
                         f"{len(conversation) // 2} turns")
    if opts.lora_rank < 1 or opts.repeats < 1 or opts.decode_steps < 1:
        raise ValueError("--lora-rank, --repeats and --decode-steps must be at least 1")
    started = time.perf_counter()
    if opts.config:
        margs, tok, model, latency, latency_info = CONFIGS[opts.config], load_tokenizer(opts.model), None, None, None
    else:
        model, tok = load_model(opts.model)
        if opts.threads > 0:
            torch.set_num_threads(opts.threads)
        margs = model.args
        latency, latency_info = (None, None) if opts.latency == "none" else \
            make_latency(model, opts.latency, opts.lora_rank, opts.repeats, opts.decode_steps)
    variants = prompt_variants(prompt, tok, KEEP_RATES, opts.compressed, opts.lora_rank)
    res = profile(margs, tok, conversation, opts.turns, variants, latency)
    title = f"{margs.name} ({'analytic, ' + opts.config if opts.config else 'measured model'})"
    print(f"{title}; {opts.turns} turns of {opts.conversation}; tokens counted with the "
          f"{'embedded SmolLM2' if not opts.model else opts.model} tokenizer")
    if latency:
        print(f"latency: {opts.latency} ({'fitted from timed shapes, see the JSON' if opts.latency == 'fit' else 'timed'})")
    print_tables(res, opts.turns)
    res.update(model=margs.name, config=opts.config, latency_mode=None if latency is None else opts.latency,
               latency_fit=_jsonable(latency_info), turns=opts.turns, conversation=str(opts.conversation),
               wall_seconds=time.perf_counter() - started)
    if opts.json:
        write_atomic(Path(opts.json), lambda tmp: Path(tmp).write_text(json.dumps(res, indent=1) + "\n"))
        print(f"wrote {opts.json}")
    if not opts.no_plots:
        for p in plot(res, opts.turns, Path(opts.out_dir), title):
            print(f"wrote {p}")
    return res


def _jsonable(x):
    return json.loads(json.dumps(x, default=str)) if x is not None else None


if __name__ == "__main__":
    try:
        main()
    except (ConversationFileError, PromptFileError, ValueError) as e:
        sys.exit(f"error: {e}")

"""Score the teacher, the bare student and GenPI adapters on the local AgentBench (paper section 6.1, appendix B, Table 1).

    python evaluate.py --task webshop --adapter runs/webshop/adapter      # one task, one adapter
    python evaluate.py                                                     # all three tasks, the first episode of each

Systems, in this order: the base model WITH the agent prompt (the upper bound, i.e. the teacher), the base model
WITHOUT it, and each --adapter without it (the GenPI student). Scores are ×100: success rate (OS, Web Browsing)
or mean reward (Web Shopping); Norm. = 100 · score / upper bound, as in Table 1. Two diagnostics stay
informative when a small model scores ~0: the valid-action rate (share of agent replies the task's own parser
reads as an action) and the agreement with the teacher's first action (share of episodes whose first parsed
action equals the with-prompt model's; episodes where the teacher's first reply has no action are left out).

An episode is AgentBench's multi-turn loop: user = first observation, agent reply (greedy), env.step(reply),
the observation becomes the next user turn, until the environment ends it (its own round limit) or the
conversation no longer fits the context with room for a reply (then it ends with score 0, counted as
"context overflow"). With the prompt, the chat is the prompt's turns + the conversation; without it, the
conversation alone. Both get the same first user message, prompt.user_message(observation): the input
slot's prefix (OS: "Now, I will start a new problem in a new OS. My problem is:") belongs to the user
input, not to the prompt being internalized (METHOD.md, "Prompt file format").

Speed: the prompt's KV cache is computed once per system (prefill_prefix); each episode keeps its own
KV cache between turns, so a turn prefills only its new tokens (section 8: caching earlier turns).
Episodes run one after another: on this CPU, re-prefilling whole conversations to batch episodes costs
more than batching saves (SmolLM2-135M, fp32, 2 shared cores: a 600-token turn prefills in ~2 s; a decode
step at a 2,000-token context takes ~0.25 s at batch 1 and ~0.35 s per row at batch 8).

Transcripts: one JSON file per episode under --out/<task>/<system>/; --json writes the summary.
"""
import argparse
import json
import os
import re
import sys
import tempfile
import time

import torch
from tqdm import tqdm

from agentbench_env import make
from agentbench_env import mind2web as mind2web_env
from agentbench_env import os_env
from agentbench_env import webshop as webshop_env
from model import (DRAFT_TOKENS, KVCache, common_prefix_length, generate,
                   load_model, prefill_prefix, set_fp16_weights)
from prompts import load_prompt

TASKS = ("os", "mind2web", "webshop")                      # Table 1's column order
TASK_TITLES = {"os": ("OS", "SR"), "mind2web": ("Web Browsing", "SR"), "webshop": ("Web Shopping", "Reward")}
DEFAULT_LIMIT = 1                                          # episodes per task: the default run takes minutes (see README)
MAX_NEW_TOKENS = 128                                       # the prompts' example replies are <= 53 tokens
CACHE_GROWTH = 1024                                        # slots added when an episode's KV cache is full
FAST_DIR = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None   # OS sandboxes on tmpfs: faster set-up


class EvalError(ValueError):
    """Bad command-line input (task file, adapter directory, limit): one clear message, exit code 2."""


# ----------------------------------------------------------------------------- actions (each env's own parser)
def parse_action(task, reply):
    """The action the task's environment reads from a reply, as a comparable tuple, or None if it reads none."""
    if task == "webshop":
        return webshop_env.parse_action(reply)                       # ("search" | "click", arg) or None
    if task == "os":
        kind, content = os_env.parse_action(reply)                   # ("bash", code) | ("commit", answer) | (None, None)
        return None if kind is None else (kind, content.strip() if content is not None else None)
    if task == "mind2web":
        letter, action = mind2web_env.parse_reply(reply)             # (letter or None, "OP value")
        return None if letter is None else (letter, " ".join(action.split()))
    raise ValueError(f"unknown task {task!r}")


def valid_action_rate(task, replies):
    """Share of replies with a parsable action; None when there are no replies."""
    return sum(parse_action(task, r) is not None for r in replies) / len(replies) if replies else None


def first_action_agreement(task, episodes, teacher_episodes):
    """Share of episodes whose first action equals the teacher's first action on the same task index,
    over the episodes where the teacher's first reply holds an action; None when there are none."""
    first = lambda ep: parse_action(task, ep["replies"][0]) if ep["replies"] else None
    teacher = {ep["task"]: first(ep) for ep in teacher_episodes}
    pairs = [(first(ep), teacher[ep["task"]]) for ep in episodes if teacher.get(ep["task"]) is not None]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else None


def normalized(score, upper):
    """Table 1's Norm.: 100 · score / upper bound (None when the upper bound is 0)."""
    return 100.0 * score / upper if upper else None


# ----------------------------------------------------------------------------- the agent: model replies

def copy_cache(model, source, size):
    """A new batch-1 cache of `size` slots holding `source`'s tokens (or empty when source is None)."""
    p = next(model.parameters())
    cache = KVCache(model.args, 1, size, p.dtype, p.device)
    return cache.expand_from(source) if source is not None else cache


def extend_cache(model, cache, new_ids):
    """Run new_ids through the model into a batch-1 cache, moving to a larger cache when it is full."""
    if not new_ids:
        return cache
    if cache.length + len(new_ids) > cache.max_len:
        cache = copy_cache(model, cache, min(cache.length + len(new_ids) + CACHE_GROWTH, model.args.max_seq_len))
    model(torch.tensor([new_ids], device=cache.k[0].device), cache, last_only=True)
    return cache


def model_agent(model, tok, turns, prefix, prefix_ids, max_new_tokens):
    """A reply function for one episode: messages (the conversation, without the prompt) -> the greedy
    reply text, or None when the chat leaves no room for max_new_tokens in the context. The chat is
    turns + messages; `prefix` is the KV cache of `turns` (prefix_ids), shared and never written."""
    state = {"ids": list(prefix_ids), "cache": None}

    @torch.inference_mode()
    def reply(messages):
        ids = tok.apply_chat(turns + messages)                           # ends with the assistant header
        if len(ids) + max_new_tokens > model.args.max_seq_len:
            return None
        if ids[:len(prefix_ids)] != prefix_ids:
            raise RuntimeError("the chat does not start with the prompt's tokens; the prefix cache cannot be used")
        n = common_prefix_length(state["ids"], ids[:-1])
        if state["cache"] is None or n < len(state["ids"]):              # first turn, or history re-tokenized
            size = min(len(ids) + CACHE_GROWTH, model.args.max_seq_len)
            state["cache"], n = copy_cache(model, prefix, size), len(prefix_ids)
        state["cache"] = extend_cache(model, state["cache"], ids[n:-1])  # only this turn's new tokens
        state["ids"] = ids[:-1]
        out = generate(model, [ids[-1:]], max_new_tokens, stop_ids=tok.stop_ids, prefix=state["cache"],
                       draft=DRAFT_TOKENS, context=[ids[:-1]])[0]
        return tok.decode(out, skip_special=True)
    return reply


def system_agents(model, tok, prompt, with_prompt, max_new_tokens):
    """-> new_agent() making one reply function per episode; the prompt's cache is computed once here."""
    turns = prompt.turns if with_prompt else []
    prefix_ids = tok.apply_chat(turns, add_generation_prompt=False) if turns else []
    if len(prefix_ids) + max_new_tokens >= model.args.max_seq_len:
        prefix = None                                                    # every episode overflows: no cache needed
    else:
        prefix = prefill_prefix(model, prefix_ids, len(prefix_ids)) if prefix_ids else None
    return lambda: model_agent(model, tok, turns, prefix, prefix_ids, max_new_tokens)


# ----------------------------------------------------------------------------- episodes
def run_episode(env, i, agent, user_message, on_turn=None):
    """Play task i of env with agent(messages) -> reply | None. Returns the episode record: task, score,
    end ("done" or "context overflow"), replies, messages (the conversation without the prompt), info."""
    messages = [{"role": "user", "content": user_message(env.reset(i))}]
    replies, score, end = [], 0.0, "done"
    try:
        while True:
            reply = agent(messages)
            if reply is None:
                score, end = 0.0, "context overflow"
                break
            replies.append(reply)
            messages.append({"role": "assistant", "content": reply})
            observation, done, score = env.step(reply)
            if on_turn is not None:
                on_turn(len(replies))
            if done:
                break
            messages.append({"role": "user", "content": observation})
    finally:
        if hasattr(env, "close"):                                        # OS: remove the sandbox
            env.close()
    return dict(task=i, score=float(score or 0.0), end=end, turns=len(replies), replies=replies,
                messages=messages, info=getattr(env, "info", None))


def run_system(env, task_ids, new_agent, prompt, desc):
    """All episodes of one system on one task, with a progress bar."""
    episodes, start = [], time.time()
    with tqdm(task_ids, desc=desc, unit="ep", leave=False, file=sys.stderr) as bar:
        for i in bar:
            episodes.append(run_episode(env, i, new_agent(), prompt.user_message,
                                        on_turn=lambda k: bar.set_postfix(task=i, turn=k)))
    return episodes, time.time() - start


def summarize(task, episodes, seconds):
    replies = [r for ep in episodes for r in ep["replies"]]
    return dict(score=100.0 * sum(ep["score"] for ep in episodes) / len(episodes),
                valid_action_rate=valid_action_rate(task, replies),
                context_overflows=sum(ep["end"] == "context overflow" for ep in episodes),
                mean_turns=sum(ep["turns"] for ep in episodes) / len(episodes),
                episodes=len(episodes), seconds=seconds)


# ----------------------------------------------------------------------------- files
def write_atomic(path, text):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_transcripts(directory, system, episodes):
    for ep in episodes:
        record = dict(system=system["name"], with_prompt=system["with_prompt"], adapter=system["adapter"], **ep)
        write_atomic(os.path.join(directory, f"task_{ep['task']:04d}.json"),
                     json.dumps(record, indent=1, ensure_ascii=False, default=str) + "\n")


# ----------------------------------------------------------------------------- tables
def fmt(x, digits=2):
    return "n/a" if x is None else f"{x:.{digits}f}"


def table1(results, tasks):
    """Rows = systems; per task its score and Norm. (the layout of the paper's Table 1)."""
    names = list(results[tasks[0]])
    head = f"{'system':<34} {'prompt':>7}" + "".join(
        f" | {TASK_TITLES[t][0] + ' ' + TASK_TITLES[t][1]:>20} {'Norm.':>7}" for t in tasks)
    lines = [head, "-" * len(head)]
    for name in names:
        row = f"{name:<34} {'with' if results[tasks[0]][name]['with_prompt'] else 'without':>7}"
        for t in tasks:
            r = results[t][name]
            row += f" | {fmt(r['score']):>20} {fmt(r['normalized']):>7}"
        lines.append(row)
    return "\n".join(lines)


def diagnostics(results, tasks):
    head = (f"{'task':<9} {'system':<34} {'episodes':>8} {'valid act.%':>11} {'agree 1st%':>10} "
            f"{'ctx overflow':>12} {'turns':>6} {'time s':>7}")
    lines = [head, "-" * len(head)]
    for t in tasks:
        for name, r in results[t].items():
            agree = "teacher" if r["first_action_agreement"] == "teacher" else fmt(
                None if r["first_action_agreement"] is None else 100 * r["first_action_agreement"], 1)
            valid = fmt(None if r["valid_action_rate"] is None else 100 * r["valid_action_rate"], 1)
            lines.append(f"{t:<9} {name:<34} {r['episodes']:>8} {valid:>11} {agree:>10} "
                         f"{r['context_overflows']:>12} {r['mean_turns']:>6.1f} {r['seconds']:>7.0f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line
def slug(text):
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "adapter"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="all", choices=TASKS + ("all",), help="task to evaluate (default: all)")
    ap.add_argument("--adapter", action="append", default=[], metavar="DIR",
                    help="a LoRA adapter directory (PEFT layout) to score without the prompt; repeatable")
    ap.add_argument("--limit", type=int, default=DEFAULT_LIMIT,
                    help=f"episodes per task: the first N tasks of the file (default {DEFAULT_LIMIT}; 0 = all)")
    ap.add_argument("--tasks", metavar="FILE", help="another task file for --task (e.g. AgentBench's OS JSON)")
    ap.add_argument("--tasks-dir", metavar="DIR", help="OS only: where the task file's {'file': ...} scripts live")
    ap.add_argument("--skip-invalid", action="store_true", help="OS only: leave out tasks that cannot be read")
    ap.add_argument("--model", metavar="PATH", help="checkpoint (HF directory or .gguf); default: embedded SmolLM2")
    ap.add_argument("--quantize", choices=("none", "nf4"), default="none", help="load the base model in NF4")
    ap.add_argument("--fp32-weights", action="store_true",
                    help="on a CPU, read the exact fp32 weights, not fp16 copies (model.set_fp16_weights; slower)")
    ap.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help=f"longest agent reply, in tokens (default {MAX_NEW_TOKENS})")
    ap.add_argument("--out", default=os.path.join("runs", "eval"), help="transcripts go to OUT/<task>/<system>/")
    ap.add_argument("--json", metavar="FILE", help="write the summary as JSON")
    ap.add_argument("--no-baselines", action="store_true",
                    help="score only the --adapter systems (no upper bound, so no Norm. or teacher agreement; "
                         "reproduce.py computes them from an earlier run's)")
    return ap.parse_args(argv)


def check_args(args):
    """Input errors the model need not be loaded for."""
    if args.limit < 0:
        raise EvalError(f"--limit must be >= 0, got {args.limit}")
    if args.max_new_tokens < 1:
        raise EvalError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.no_baselines and not args.adapter:
        raise EvalError("--no-baselines needs at least one --adapter")
    if args.tasks and args.task == "all":
        raise EvalError("--tasks needs a single --task (os, mind2web or webshop), not all")
    if args.tasks and not os.path.isfile(args.tasks):
        raise EvalError(f"{args.tasks}: task file not found")
    for directory in args.adapter:
        if not os.path.isdir(directory):
            raise EvalError(f"{directory}: adapter directory not found")
        from lora import read_config                                   # names the file and the problem
        read_config(directory)
        if not os.path.isfile(os.path.join(directory, "adapter_model.safetensors")):
            raise EvalError(f"{directory}: no adapter_model.safetensors in the adapter directory")


def load_env(task, args):
    if task == "os":
        return os_env.OSEnv(args.tasks, tasks_dir=args.tasks_dir, skip_invalid=args.skip_invalid, sandbox_dir=FAST_DIR)
    return make(task, args.tasks)


def systems_of(adapters, baselines=True):
    systems = [dict(name="upper bound (base + prompt)", slug="upper-bound", with_prompt=True, adapter=None),
               dict(name="base, no prompt", slug="no-prompt", with_prompt=False, adapter=None)] if baselines else []
    for directory in adapters:
        systems.append(dict(name=f"GenPI {directory}", slug="adapter-" + slug(directory), with_prompt=False,
                            adapter=directory))
    return systems


def load_base(args):
    model, tok = load_model(args.model, quantize=None if args.quantize == "none" else args.quantize)
    set_fp16_weights(model, not args.fp32_weights)                   # inference only
    return model, tok


def use_system(model, system, args):
    """The model set up for a system: base weights (any LoRA switched off) or the system's adapter, loaded
    into a freshly loaded model when its rank or targets differ from the LoRA layers already in place."""
    if system["adapter"] is None:
        if args.adapter:
            from lora import set_adapter_enabled
            set_adapter_enabled(model, False)                        # off = exactly the base model
        return model
    from lora import load_adapter, lora_layers, read_config, set_adapter_enabled
    cfg, layers = read_config(system["adapter"]), lora_layers(model)
    shapes = {(name.rsplit(".", 1)[1], m.lora_A.out_features) for name, m in layers.items()}
    if layers and shapes != {(target, cfg.r) for target in cfg.targets}:
        model, _ = load_base(args)
    load_adapter(model, system["adapter"])
    set_adapter_enabled(model, True)
    return model


def main(argv=None):
    args = parse_args(argv)
    tasks = list(TASKS) if args.task == "all" else [args.task]
    try:                                                               # every input error before the model loads
        check_args(args)
        envs = {t: load_env(t, args) for t in tasks}
        prompts = {t: load_prompt(t) for t in tasks}
    except (ValueError, os_env.SandboxError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    task_ids = {t: list(range(len(envs[t].tasks)))[:args.limit or None] for t in tasks}
    for index, problem in getattr(envs.get("os"), "skipped", []):
        print(f"skipped OS task {index}: {problem}", file=sys.stderr)

    systems = systems_of(args.adapter, baselines=not args.no_baselines)
    try:                                                               # the model, and every adapter tried on it
        model, tok = load_base(args)
        for system in [s for s in systems if s["adapter"]] + systems[:1]:
            model = use_system(model, system, args)
    except ValueError as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    print(f"model {model.args.name}, context {model.args.max_seq_len}; episodes: "
          + ", ".join(f"{t} {len(task_ids[t])}" for t in tasks), file=sys.stderr)

    episodes = {t: {} for t in tasks}                                  # task -> system name -> episode records
    results = {t: {} for t in tasks}
    for system in systems:                                             # teacher first: the others compare to it
        model = use_system(model, system, args)
        for t in tasks:
            new_agent = system_agents(model, tok, prompts[t], system["with_prompt"], args.max_new_tokens)
            eps, seconds = run_system(envs[t], task_ids[t], new_agent, prompts[t], f"{t} / {system['slug']}")
            write_transcripts(os.path.join(args.out, t, system["slug"]), system, eps)
            episodes[t][system["name"]] = eps
            results[t][system["name"]] = r = dict(summarize(t, eps, seconds), with_prompt=system["with_prompt"],
                                                  adapter=system["adapter"])
            print(f"{t} / {system['slug']}: {r['episodes']} episodes, score {r['score']:.2f}, {seconds:.0f} s",
                  file=sys.stderr)

    for t in tasks:
        teacher = systems[0] if systems[0]["with_prompt"] else None
        upper = results[t][teacher["name"]]["score"] if teacher else None
        for system in systems:
            r = results[t][system["name"]]
            r["normalized"] = normalized(r["score"], upper)
            r["first_action_agreement"] = "teacher" if system is teacher else None if teacher is None else \
                first_action_agreement(t, episodes[t][system["name"]], episodes[t][teacher["name"]])
    print(f"\nLocal AgentBench, {model.args.name}; scores x100, Norm. = 100 * score / upper bound (Table 1)\n")
    print(table1(results, tasks))
    print("\nDiagnostics: valid-action rate over all agent replies; agreement = first action equals the teacher's\n")
    print(diagnostics(results, tasks))
    if args.json:
        summary = dict(model=model.args.name, limit=args.limit, max_new_tokens=args.max_new_tokens, results=results)
        write_atomic(args.json, json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Synthetic training data from the agent prompt alone (paper section 5, appendix A; figures 8-14).

Four stages, each appending its records to a JSONL file in the output directory:
  1. pseudo user inputs    the generator reads the prompt p as "the code of conduct for an agent" and
                           continues a numbered list of problems primed with 5 demonstrations
                           (nucleus sampling, top-p 0.9, temperature 1.0); duplicates and invalid items
                           are dropped (inputs_rounds.jsonl -> inputs.jsonl)
  2. self role-play        one model plays the agent (p's turns + the input) and the environment (the
                           same turns with the roles swapped, plus a system line), greedy, until the
                           environment writes [END_CONVERSATION] or max turns (conversations.jsonl)
  3. AS-IS / TO-BE         the model without p ("You are a helpful assistant.") and with p, greedy; the
                           TO-BE output is the role-play's first agent turn, the same call (outputs.jsonl)
  4. reasons               the generator explains why the AS-IS output became the TO-BE one, in about
                           five sentences (appendix A.1 wording; temperature 0.7, top-p 0.9) (reasons.jsonl)
then data.jsonl (one record per sample) and quality.json (the paper's Table 4).

Each persona's prompt part is the same for every sample, so its KV cache is computed once
(`prefill_prefix`) and the samples run in batches after it; the greedy stages also check tokens guessed
from the chat itself (prompt lookup, `--draft-tokens`), which pays off where the personas copy pages and
actions. A rerun continues where a stopped run ended: finished batches are kept, a torn last line is
dropped, and every sampling seed comes from (seed, stage, batch), so a resumed run writes the same
records as an uninterrupted one.

    python synth.py --prompt prompts/webshop.txt --out runs/webshop/data -n 32
    python synth.py --prompt prompts/webshop.txt --out runs/webshop/data --benchmark
"""
import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from model import (DRAFT_TOKENS, KVCache, common_prefix_length, compile_for_inference, cut_at_stop, generate,
                   load_model, prefill_prefix, set_fp16_weights)
from prompts import AgentPrompt, example_inputs, load_prompt

END = "[END_CONVERSATION]"
LAST_TURN_TOKENS = 12          # the environment's reply after the last allowed turn: room for END only
STUDENT_SYSTEM = "You are a helpful assistant."
DOCUMENT_INTRO = "The following document is the code of conduct for an agent."
INPUT_INSTRUCTION = ("Based on the given document, generate several problems for {title} task. "
                     "Generate only problems with a numbered list. This is {k} generated Problems.")
REASON_INSTRUCTION = (  # appendix A.1
    "You are a commentator comparing the answers of two models to a question. I will give you four components: "
    "context, input, bad output, good output. Bad Output is a response provided without any context, only based "
    "on the input given. Good Output is a response provided with both context and input. Explain the reason for "
    "the change in response, referring to the context, in about five sentences.")
FILES = ("settings.json", "inputs_rounds.jsonl", "inputs.jsonl", "conversations.jsonl", "outputs.jsonl",
         "reasons.jsonl", "data.jsonl", "quality.json")


# ----------------------------------------------------------------------------- per-task settings
@dataclass
class Task:
    """What synthesis needs to know about one agent task."""
    name: str
    title: str                      # the task's name in the input-generation instruction
    max_turns: int                  # agent turns at most (paper appendix A.3)
    env_system: str                 # the environment persona's system line
    item_starts: tuple              # how a generated list item starts (primes the 135M generator)
    item_pattern: str               # regex an accepted item must match (re.search)
    agent_stops: tuple              # the agent's reply ends before these (it started to play the environment)
    env_stops: tuple                # the environment's reply ends before these (it started to play the agent)
    final_action: str               # regex the last agent turn must match (Table 4, "abnormal final action")
    max_item_chars: int = 300


WEBSHOP_OBSERVATION = ('Observation:\n"WebShop [SEP] Instruction: [SEP] {item} [SEP] Search"\n\n'
                       'Available Actions:\n{{"has_search_bar": true, "clickables": ["search"]}}')
ENDING = "When the task is done ({done}), reply only with " + END + "."
TASKS = {
    "webshop": Task(
        name="webshop", title="Web Shopping", max_turns=5,
        env_system="You are a web shopping page with Available Actions. The user is a shopping agent whose every "
                   "message ends with an action, search[keywords] or click[value]. Reply with the page the action "
                   "leads to, in the format above: \"Observation:\" with the page text joined by [SEP], then "
                   "\"Available Actions:\" with has_search_bar and clickables. "
                   + ENDING.format(done="the agent clicks [Buy Now]"),
        item_starts=("i need", "i'm looking for", "i would like", "i want"),
        item_pattern=r"^(?!.*\b(search|click|keywords?|products?|page|button|actions?|observation|thought|sep|"
                     r"b0\w+|costs?)\b)"                                   # a thing to buy, not the shop itself
                     r"(i need|i want|i would like|i'm looking for|i am looking for) [a-z0-9 ,.'&/()+-]{4,}, "
                     r"and price lower than \d+\.\d\d dollars$",
        agent_stops=("\nObservation:",), env_stops=("\nThought:", "\nAction:"),
        final_action=r"[Aa]ction: *\n* *((search|click)\[.+?\])", max_item_chars=200),
    "os": Task(
        name="os", title="OS Interaction", max_turns=10,
        env_system="You are the Linux (Ubuntu) operating system. The user is an agent that runs bash commands. "
                   "Reply only with what the command prints, as \"The output of the OS:\" and the output, or "
                   "\"The output of the OS is empty.\" when it prints nothing. "
                   + ENDING.format(done="the agent takes \"Act: finish\" or \"Act: answer(...)\""),
        item_starts=("tell me", "how many", "what is", "find", "count", "list"),
        item_pattern=r"^[^\n]{12,}$",
        agent_stops=("\nThe output of the OS",), env_stops=("\nThink:", "\nAct:"),
        final_action=r"Act: *(finish|answer\(.*\))\s*$"),            # matched against the last Act: line
    "mind2web": Task(
        name="mind2web", title="Web Browsing", max_turns=2,
        env_system="You are an HTML multi-choice QA problem. The user is an agent that answers with the letter of "
                   "a choice (\"Answer: X.\") and an action (CLICK, SELECT or TYPE, with a Value). Reply with the "
                   "next step in the format above: the HTML webpage, the task, the previous actions and the "
                   "choices. " + ENDING.format(done="the agent has answered the task"),
        item_starts=("Find", "Book", "Search for", "Check", "Buy", "Show"),
        item_pattern=r"^[A-Z][^<>\n]{10,}$",
        agent_stops=("\n'''",), env_stops=("\nThought:", "\nAnswer:"),
        final_action=r"Answer: *(A\b|[B-Z]\.?[\s\S]*Action: *(CLICK|SELECT|TYPE)\b)", max_item_chars=200),
}
GENERIC = Task(
    name="generic", title="the agent", max_turns=5,
    env_system="You are the environment the user (an agent) acts in. Reply with what the environment returns after "
               "the agent's action, in the format above. " + ENDING.format(done="the agent gives its final answer"),
    item_starts=("",), item_pattern=r"\S", agent_stops=(), env_stops=(), final_action=r"\S")


def detect_task(prompt: AgentPrompt, name: str | None = None) -> Task:
    """The task settings named by `name`, else by the prompt's file name, else the generic ones."""
    if name is not None and name not in TASKS and name != "generic":
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)} or 'generic'")
    return TASKS.get(name or prompt.name, GENERIC)


def item_of_input(task: Task, text: str) -> str:
    """A demonstration input -> the list item the generator writes (WebShop: the instruction; Mind2Web:
    the Task sentence; otherwise the input itself). Text that is already an item passes through."""
    pattern = {"webshop": r"Instruction: \[SEP\] (.*?) \[SEP\]", "mind2web": r"Task: (.*)"}.get(task.name)
    match = re.search(pattern, text) if pattern else None
    return (match.group(1) if match else text).strip()


PRICES = (10, 20, 30, 40, 50, 60, 80, 100, 150, 200)


def finish_item(task: Task, item: str) -> str:
    """Bring a generated item into the task's shape where a template can. WebShop: "<what to buy>, and
    price lower than X dollars", lowercase; the 135M generator rarely writes the price clause and often
    rambles on after the first comma, so the item is cut there and the clause added (its price picked
    from the item's hash). The demonstration's own form passes unchanged."""
    item = item.strip()
    if task.name != "webshop" or not item or re.search(r", and price lower than \d+\.\d\d dollars$", item):
        return item
    item = re.split(r"[,;.!?](\s|$)", item.lower())[0].strip()
    price = PRICES[int(hashlib.sha256(item.encode()).hexdigest(), 16) % len(PRICES)]
    return f"{item}, and price lower than {price}.00 dollars"


def input_of_item(task: Task, prompt: AgentPrompt, item: str, index: int) -> str:
    """A generated item -> the text of the input slot. WebShop: the first observation. Mind2Web: one of the
    prompt's example pages (in turn) with the new Task and no previous actions; a 135M model cannot write
    valid pages with matching choices, so the page comes from the prompt and only the task is generated."""
    if task.name == "webshop":
        return WEBSHOP_OBSERVATION.format(item=item)
    if task.name == "mind2web":
        pages = example_inputs(prompt)
        page = pages[index % len(pages)]
        page = re.sub(r"Task: .*", lambda _: "Task: " + item, page)
        return re.sub(r"Previous actions:\n[\s\S]*?\nWhat should", "Previous actions:\nNone\nWhat should", page)
    return item


def final_action_ok(task: Task, reply: str) -> bool:
    """Is the agent's last turn an action of the task's final action space? (OS: the last Act: line.)"""
    if task.name == "os":
        acts = re.findall(r"Act: *[^\n]*", reply)
        return bool(acts) and re.match(task.final_action, acts[-1]) is not None
    return re.search(task.final_action, reply) is not None


def gold_turns(prompt: AgentPrompt) -> float:
    """Agent turns per example in the prompt's shots (Table 4, "Gold Turns"), not counting an "Ok."."""
    acts = [t for t in prompt.turns if t["role"] == "assistant" and t["content"].strip().rstrip(".!").lower() != "ok"]
    return len(acts) / max(1, len(example_inputs(prompt)))


# ----------------------------------------------------------------------------- settings and durable files
@dataclass
class SynthConfig:
    """Every setting that changes the records (saved in settings.json; a rerun must match)."""
    n: int = 32
    spare_inputs: int = 0
    seed: int = 0
    batch_size: int = 16
    task: str | None = None
    max_turns: int | None = None
    per_call: int = 10
    input_tokens: int = 320
    max_input_rounds: int = 8
    agent_tokens: int = 96
    env_tokens: int = 200
    output_tokens: int = 128
    reason_tokens: int = 160
    input_temperature: float = 1.0
    reason_temperature: float = 0.7
    top_p: float = 0.9
    draft_tokens: int = DRAFT_TOKENS

    @property
    def n_inputs(self) -> int:
        """Pseudo inputs stage 1 collects: the n samples' plus the spare ones."""
        return self.n + self.spare_inputs


CONFIG_HELP = {
    "n": "samples to synthesize",
    "spare_inputs": "extra pseudo inputs made by stage 1 only, after the n (train.py's held-out inputs)",
    "seed": "seed of every sampling stage (per batch: seed, stage, batch)",
    "batch_size": "samples per generate call; one durable write per batch",
    "task": "webshop / os / mind2web / generic; None = from the prompt's file name",
    "max_turns": "agent turns at most; None = the task's (OS 10, Web Browsing 2, Web Shopping 5)",
    "per_call": "new problems asked for per list (appendix A.1: ~10)", "input_tokens": "new tokens per list",
    "max_input_rounds": "rounds of lists before giving up", "agent_tokens": "new tokens per agent turn",
    "env_tokens": "new tokens per environment turn", "output_tokens": "new tokens of the AS-IS output",
    "reason_tokens": "new tokens per reason", "input_temperature": "sampling temperature of the pseudo inputs",
    "reason_temperature": "sampling temperature of the reasons", "top_p": "nucleus sampling threshold",
    "draft_tokens": "tokens guessed by prompt lookup and checked per greedy step (0 = one token per step)"}


class SettingsMismatch(ValueError):
    """The output directory holds records made with other settings."""


def model_fingerprint(model) -> str:
    """Name plus a hash of a few weights: tells two checkpoints apart without hashing all of them."""
    w = model.embed_tokens.weight
    probe = torch.cat([w[:2].flatten(), w[-2:].flatten(), model.norm.weight.flatten()]).float().cpu()
    return f"{model.args.name}:{hashlib.sha256(probe.numpy().tobytes()).hexdigest()[:12]}"


def run_settings(prompt, task, cfg: SynthConfig, model, generator, demos) -> dict:
    return {**asdict(cfg), "task": task.name, "max_turns": cfg.max_turns or task.max_turns,
            "prompt_path": prompt.path, "prompt_sha256": hashlib.sha256(prompt.text.encode()).hexdigest(),
            "model": model_fingerprint(model), "generator": model_fingerprint(generator),
            "demos_sha256": hashlib.sha256(json.dumps(demos).encode()).hexdigest()}


def check_settings(out_dir: Path, settings: dict, overwrite: bool):
    """Start a new directory, or continue one made with the same settings; a mismatch is an error."""
    path = out_dir / "settings.json"
    if overwrite:
        for name in FILES:
            (out_dir / name).unlink(missing_ok=True)
    if path.exists():
        old = {**asdict(SynthConfig()), **json.loads(path.read_text())}   # a setting added later: its default
        changed = {k: (old.get(k), v) for k, v in settings.items() if k != "prompt_path" and old.get(k) != v}
        if changed:
            diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise SettingsMismatch(f"{out_dir} holds data made with other settings ({diff}); use another "
                                   f"--out, or --overwrite to start again")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(settings, indent=1) + "\n")


def write_atomic(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file. A torn last line (a crash mid-write) is cut off with a warning;
    a bad line anywhere else is an error."""
    if not path.exists():
        return []
    data = path.read_bytes()
    records, start = [], 0
    for number, line in enumerate(data.split(b"\n"), start=1):
        end = start + len(line) + 1
        if line.strip():
            last = end > len(data)          # no newline after it: the write did not finish
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
                if last:
                    raise ValueError("no line end")
            except ValueError as e:
                if not last and data[end:].strip():
                    raise ValueError(f"{path}, line {number}: not a JSON record ({e})") from None
                warnings.warn(f"{path}, line {number}: dropped a partial last line ({e}); it will be redone")
                with open(path, "r+b") as f:
                    f.truncate(start)
                break
            records.append(record)
        start = end
    return records


def append_jsonl(path: Path, records: list[dict]):
    """Append records durably: one write, flushed and fsynced before the next batch starts."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def batch_seed(seed: int, stage: str, index: int) -> int:
    """The seed of one batch of one stage: the same however the run was interrupted."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{stage}/{index}".encode()).digest()[:4], "little")


def batches(ids: list, size: int):
    return [ids[i:i + size] for i in range(0, len(ids), size)]


# ----------------------------------------------------------------------------- generation helpers
def continuation_ids(tok, prefix_ids: list[int], messages: list[dict], add_generation_prompt=True) -> list[int]:
    """The ids of a chat after its cached prefix. The prefix must be the start of the full chat (ChatML
    and Llama-3 turns end with special tokens, so rendering splits cleanly at a message boundary)."""
    ids = tok.apply_chat(messages, add_generation_prompt=add_generation_prompt)
    if ids[:len(prefix_ids)] != prefix_ids:
        raise ValueError("the cached prefix is not the start of the chat: render it with the same system handling")
    return ids[len(prefix_ids):]


@dataclass
class Meter:
    """Generated tokens and seconds of one stage (tokens/s in the report)."""
    tokens: int = 0
    seconds: float = 0.0
    bar: object = None           # the stage's tqdm bar, which shows the rate

    def rate(self):
        return self.tokens / self.seconds if self.seconds else 0.0


def complete(model, tok, id_lists, max_new_tokens, *, prefix=None, cache=None, stops=(), temperature=0.0,
             top_p=1.0, seed=None, meter: Meter | None = None, out_ids: list | None = None, draft=0,
             context=None) -> list[tuple[str, bool]]:
    """Continue each id list (after the cached `prefix`, or as the next tokens of the rows of `cache`)
    -> (text, finished) per row. The text runs up to and including a stop string (cut it with
    `cut_at_stop`); `finished` is False when the row ran out of tokens before a stop. `out_ids` receives
    the generated ids. `draft`, `context`: prompt-lookup guesses for greedy decoding (model.generate)."""
    start = time.perf_counter()
    outs = generate(model, id_lists, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                    stop_ids=tok.stop_ids, stop_strings=stops, tokenizer=tok, prefix=prefix, cache=cache,
                    draft=draft, context=context)
    if out_ids is not None:
        out_ids.extend(outs)
    if meter is not None:
        meter.tokens += sum(len(o) for o in outs)
        meter.seconds += time.perf_counter() - start
        if meter.bar is not None:
            meter.bar.set_postfix_str(f"{meter.rate():.1f} tok/s")
    texts = [tok.decode(o) for o in outs]
    return [(t, len(o) < max_new_tokens or any(s in t for s in stops)) for t, o in zip(texts, outs)]


def cached_prefix(model, tok, messages: list[dict]):
    """(ids, KV cache) of a chat prefix that every sample of a stage shares: computed once."""
    ids = tok.apply_chat(messages, add_generation_prompt=False)
    return ids, prefill_prefix(model, ids, len(ids))


# ----------------------------------------------------------------------------- stage 1: pseudo user inputs
def input_prefix_messages(prompt: AgentPrompt, task: Task, cfg: SynthConfig) -> list[dict]:
    """The generator's chat before its answer: p as a document, then the request (appendix A.1)."""
    return [{"role": "system", "content": f"{DOCUMENT_INTRO}\n\n{prompt.text}"},
            {"role": "user", "content": INPUT_INSTRUCTION.format(title=task.title, k=cfg.per_call)}]


def primed_list(demos: list[str], start: str) -> str:
    """The start of the generator's answer: the demonstrations as items 1..k, then item k+1's first words."""
    lines = [f"{i}. {d}" for i, d in enumerate(demos, start=1)]
    return "\n".join(lines + [f"{len(demos) + 1}. {start}".rstrip()])


def parse_items(start: str, text: str, finished: bool) -> list[str]:
    """Items of a continued list: the first completes `start`, the rest are "N. item" lines; an item the
    token limit cut off is dropped."""
    lines = (start + text).split("\n") if start else text.lstrip().split("\n")
    items = [lines[0].strip()] + [m.group(1).strip() for line in lines[1:]
                                  if (m := re.match(r"\s*\d+\s*[.)]\s*(.*)", line))]
    return items if finished else items[:-1]


def choose_demos(rng: random.Random, pool: list[str], accepted: list[str], k: int = 5) -> list[str]:
    """Up to k demonstrations: the real ones first (a sample when there are more), topped up with
    items generated so far, so that lists vary from call to call."""
    real = rng.sample(pool, min(k, len(pool)))
    extra = rng.sample(accepted, min(k - len(real), len(accepted)))
    demos = real + extra
    rng.shuffle(demos)
    return demos


def accept_items(task: Task, rounds: list[dict], pool: list[str]) -> tuple[list[str], dict]:
    """Replay every recorded list in order -> (accepted items, rejection counts)."""
    seen = [words(d) for d in pool]
    accepted, rejected = [], {"empty": 0, "too long": 0, "invalid": 0, "duplicate": 0}
    for rnd in rounds:
        for row in rnd["rows"]:
            for item in parse_items(row["start"], row["text"], row["finished"]):
                item = finish_item(task, item)
                reason = reject_reason(task, item, seen)
                if reason:
                    rejected[reason] += 1
                else:
                    accepted.append(item)
                    seen.append(words(item))
    return accepted, rejected


def words(item: str) -> set:
    """The item's words (its whole text when it has none), for near-duplicate checks."""
    return set(re.findall(r"\w+", item.lower())) or {item.strip()}


def reject_reason(task: Task, item: str, seen: list[set]) -> str | None:
    """Why an item is dropped, or None. A duplicate shares >= 80% of its words with an earlier item or a
    demonstration (the 135M generator often repeats an item with one number changed)."""
    if not item.strip():
        return "empty"
    if len(item) > task.max_item_chars:
        return "too long"
    if not re.search(task.item_pattern, item):
        return "invalid"
    w = words(item)
    if any(len(w & s) >= 0.8 * len(w | s) for s in seen):
        return "duplicate"
    return None


def generate_inputs(generator, gen_tok, prompt, task, cfg, out_dir: Path, pool: list[str], meter: Meter,
                    on_write=None) -> tuple[list[dict], dict]:
    """Stage 1: rounds of lists until n + spare_inputs valid, new items are collected -> (input records,
    item stats). Only the first n go on to the other stages.
    Each round is logged raw (inputs_rounds.jsonl); the items are a replay of the log, so a resumed run
    picks the same demonstrations and seeds as an uninterrupted one."""
    rounds_path = out_dir / "inputs_rounds.jsonl"
    rounds = read_jsonl(rounds_path)
    if [r["round"] for r in rounds] != list(range(len(rounds))):
        raise ValueError(f"{rounds_path}: rounds out of order; remove the directory or use --overwrite")
    accepted, rejected = accept_items(task, rounds, pool)
    wanted = cfg.n_inputs
    prefix = None
    bar = meter.bar = tqdm(total=wanted, desc="inputs", initial=min(len(accepted), wanted), leave=False)
    while len(accepted) < wanted:
        if len(rounds) >= cfg.max_input_rounds:
            raise RuntimeError(f"only {len(accepted)} of {wanted} valid inputs after {len(rounds)} rounds of lists "
                               f"(rejected: {rejected}); give the generator more demonstrations (--demos) or "
                               f"a larger generator (--generator)")
        prefix = prefix or cached_prefix(generator, gen_tok, input_prefix_messages(prompt, task, cfg))
        record = list_round(generator, gen_tok, prompt, task, cfg, prefix, pool, accepted, len(rounds), meter)
        append_jsonl(rounds_path, [record])
        rounds.append(record)
        accepted, rejected = accept_items(task, rounds, pool)
        bar.n = min(len(accepted), wanted)
        bar.refresh()
        if on_write:
            on_write("inputs_rounds", [record])
    bar.close()
    records = [{"id": i, "item": item, "input": input_of_item(task, prompt, item, i)}
               for i, item in enumerate(accepted[:wanted])]
    if read_jsonl(out_dir / "inputs.jsonl") != records:
        write_atomic(out_dir / "inputs.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records, {"lists": sum(len(r["rows"]) for r in rounds), "items_generated": sum(rejected.values()) +
                     len(accepted), "items_accepted": len(accepted), "rejected": rejected}


def list_round(generator, gen_tok, prompt, task, cfg, prefix, pool, accepted, r, meter) -> dict:
    """One round: a batch of primed lists continued by sampling."""
    rng = random.Random(batch_seed(cfg.seed, "inputs", r))
    rows = []
    for _ in range(min(cfg.batch_size, math.ceil(10 * cfg.n_inputs / cfg.per_call))):  # ~10x the items needed: 16
        # lists of 10 gave 25-34 valid new items from the 135M generator, and one full round beats two smaller
        # ones (train.py's 14 inputs: 7 lists needed two rounds, 46 s; a step at batch 14 took 72 ms, at 7 67 ms)
        demos, start = choose_demos(rng, pool, accepted), rng.choice(task.item_starts)
        rows.append({"start": start, "primed": primed_list(demos, start)})
    head = continuation_ids(gen_tok, prefix[0], input_prefix_messages(prompt, task, cfg))  # the assistant header
    ids = [head + gen_tok.encode(row["primed"], add_bos=False) for row in rows]
    stop = f"\n{len(demos) + 1 + cfg.per_call}."      # the item after the `per_call` new ones (same k in a round)
    outs = complete(generator, gen_tok, ids, cfg.input_tokens, prefix=prefix[1], stops=(stop,),
                    temperature=cfg.input_temperature, top_p=cfg.top_p, seed=batch_seed(cfg.seed, "lists", r),
                    meter=meter)
    return {"round": r, "rows": [{"start": row["start"], "text": cut_at_stop(text, (stop,)), "finished": done}
                                 for row, (text, done) in zip(rows, outs)]}


# ----------------------------------------------------------------------------- stage 2: self role-play
def flip(role: str) -> str:
    return {"user": "assistant", "assistant": "user"}[role]


def swap_roles(prompt: AgentPrompt, task: Task) -> list[dict]:
    """The environment persona's prompt (figure 2): a system line, then p's turns with the roles swapped,
    the first user turn (the instruction) dropped: the agent's turns become user messages, the
    environment's observations assistant messages. The shot ends the way a finished task should: with
    the termination token after the agent's final action."""
    swapped = [{"role": flip(t["role"]), "content": t["content"]} for t in prompt.turns[1:]]
    return [{"role": "system", "content": task.env_system}] + swapped + [{"role": "assistant", "content": END}]


def agent_messages(prompt: AgentPrompt, conversation: list[dict]) -> list[dict]:
    """The agent persona's chat: p's turns, then the conversation (its first user message holds the input)."""
    return [dict(t) for t in prompt.turns] + [dict(m) for m in conversation]


def environment_messages(prompt: AgentPrompt, task: Task, conversation: list[dict]) -> list[dict]:
    """The environment persona's chat: the swapped prompt, then the conversation with the roles swapped
    (its input is the environment's first page/problem; the agent's last action is the user message)."""
    return swap_roles(prompt, task) + [{"role": flip(m["role"]), "content": m["content"]} for m in conversation]


def roleplay(first_messages: list[str], agent_reply, env_reply, max_turns: int) -> list[dict]:
    """Alternate agent -> environment for every sample until the environment writes END or the agent has
    had max_turns turns. `agent_reply(conversations)` / `env_reply(conversations, last_turn)`: reply texts
    (after the last allowed turn only END matters, so the environment may answer briefly). Returns per
    sample the conversation (ending with an agent turn), its agent turns and why it ended."""
    convs = [[{"role": "user", "content": m}] for m in first_messages]
    ended = [None] * len(convs)
    for turn in range(max_turns):
        active = [i for i, e in enumerate(ended) if e is None]
        if not active:
            break
        for i, reply in zip(active, agent_reply([convs[i] for i in active])):
            convs[i].append({"role": "assistant", "content": reply})
        for i, obs in zip(active, env_reply([convs[i] for i in active], turn == max_turns - 1)):
            if END in obs:
                ended[i] = "end_token"
            elif turn == max_turns - 1:
                ended[i] = "max_turns"       # truncated: the observation after the last allowed turn is dropped
            else:
                convs[i].append({"role": "user", "content": obs})
    return [{"conversation": c, "turns": sum(m["role"] == "assistant" for m in c), "ended_by": e}
            for c, e in zip(convs, ended)]


def model_replier(model, tok, build_messages, prefix_messages, max_new_tokens, stops, meter, use_cache=True,
                  draft=0):
    """conversations -> greedy replies of the persona whose chat is build_messages(conversation).

    With the cache (section 8's caching, twice over): the persona's prompt part (prefix_messages) is
    prefilled once and shared; the batch of conversations keeps one KV cache row each across turns, so a
    turn feeds only what is new since the persona last spoke (the other persona's reply and the chat
    markup), and the persona's own last reply stays cached as generated, up to where its rendering in
    the chat differs. Without the cache every chat runs in full (the benchmark's plain loop). On the last
    turn a reply is cut to a few tokens: only whether it opens with END is used. `draft`: prompt-lookup
    guesses per step, looked up in the persona's whole chat (model.generate)."""
    if not use_cache:
        def plain_reply(conversations, last_turn=False):
            n_new = min(max_new_tokens, LAST_TURN_TOKENS) if last_turn else max_new_tokens
            ids = [tok.apply_chat(build_messages(c)) for c in conversations]
            outs = complete(model, tok, ids, n_new, stops=stops + (END,), meter=meter)
            return [cut_at_stop(text, stops).strip() for text, _ in outs]
        return plain_reply

    prefix_ids, prefix_cache = cached_prefix(model, tok, prefix_messages)
    room = model.args.max_seq_len - len(prefix_ids)                  # slots a row may use after the prefix
    state = {"keys": [], "fed": [], "cache": None}    # per row: its conversation, the ids in its cache row

    def reply(conversations, last_turn=False):
        n_new = min(max_new_tokens, LAST_TURN_TOKENS) if last_turn else max_new_tokens
        ids = [continuation_ids(tok, prefix_ids, build_messages(c)) for c in conversations]
        if max(len(x) for x in ids) + n_new > room:
            raise ValueError(f"a conversation of {len(prefix_ids) + max(len(x) for x in ids)} tokens leaves no "
                             f"room for {n_new} new tokens in the context of {model.args.max_seq_len}")
        keys, cache = [id(c) for c in conversations], state["cache"]
        if cache is not None and all(k in state["keys"] for k in keys):
            rows = [state["keys"].index(k) for k in keys]
            fed = [state["fed"][r] for r in rows]
        else:                                                           # a new batch of conversations
            cache, rows, fed = None, [], [[] for _ in ids]
        kept = [min(common_prefix_length(f, x), len(x) - 1) for f, x in zip(fed, ids)]   # >= 1 new token
        new = [x[n:] for x, n in zip(ids, kept)]
        spare = n_new * (2 if draft else 1)       # a rejected guess leaves its slot unused (see model.generate)
        slots = (cache.length if cache is not None else 0) + max(len(x) for x in new) + spare + 1
        if cache is None or slots > room:                              # start over: every row in full
            cache = KVCache(model.args, len(ids), min(room, max(len(x) for x in ids) + 4 * (n_new + 64)),
                            prefix_cache.k[0].dtype, prefix_cache.k[0].device, shared=prefix_cache)
            kept, new = [0] * len(ids), ids
        elif slots > cache.max_len or rows != list(range(cache.batch)):  # grow, or some conversations ended
            cache = cache.select(rows, max_len=min(room, slots + 4 * (n_new + 64)) if slots > cache.max_len else None)
        cache.keep_first(kept)
        out_ids = []
        outs = complete(model, tok, new, n_new, cache=cache, stops=stops + (END,), meter=meter, out_ids=out_ids,
                        draft=draft, context=[prefix_ids + x[:n] for x, n in zip(ids, kept)])
        in_cache = cache.valid.sum(1).tolist()                          # a finished row's last tokens are padding
        state.update(keys=keys, cache=cache,
                     fed=[(x + o)[:n] for x, o, n in zip(ids, out_ids, in_cache)])
        return [cut_at_stop(text, stops).strip() for text, _ in outs]     # an END stays in the text
    return reply


def personas(model, tok, prompt, task, cfg, meter, use_cache=True):
    """(agent_reply, env_reply) backed by the model, each with its prefix cache."""
    agent = model_replier(model, tok, lambda c: agent_messages(prompt, c), prompt.turns, cfg.agent_tokens,
                          task.agent_stops, meter, use_cache, cfg.draft_tokens)
    env = model_replier(model, tok, lambda c: environment_messages(prompt, task, c), swap_roles(prompt, task),
                        cfg.env_tokens, task.env_stops, meter, use_cache, cfg.draft_tokens)
    return agent, env


def generate_conversations(model, tok, prompt, task, cfg, out_dir, inputs, meter, on_write=None, replies=None):
    """Stage 2: role-play every input, batch by batch; a batch is written when all its samples end."""
    path = out_dir / "conversations.jsonl"
    done = {r["id"]: r for r in read_jsonl(path)}
    todo = [b for b in batches(inputs, cfg.batch_size) if any(x["id"] not in done for x in b)]
    if todo and replies is None:
        replies = personas(model, tok, prompt, task, cfg, meter)
    bar = meter.bar = tqdm(total=len(inputs), initial=len(inputs) - sum(len(b) for b in todo), desc="role-play",
                           leave=False)
    for batch in todo:
        results = roleplay([prompt.user_message(x["input"]) for x in batch], *replies, cfg.max_turns or task.max_turns)
        new = [{"id": x["id"], **r} for x, r in zip(batch, results) if x["id"] not in done]
        append_jsonl(path, new)
        done.update((r["id"], r) for r in new)
        bar.update(len(batch))
        if on_write:
            on_write("conversations", new)
    bar.close()
    return [done[x["id"]] for x in inputs]


# ----------------------------------------------------------------------------- stage 3: AS-IS / TO-BE outputs
def student_messages(prompt: AgentPrompt, user_input: str) -> list[dict]:
    """The model without p: a plain system line and the same user message the agent saw."""
    return [{"role": "system", "content": STUDENT_SYSTEM}, {"role": "user", "content": prompt.user_message(user_input)}]


def generate_outputs(model, tok, prompt, cfg, out_dir, inputs, conversations, meter, on_write=None):
    """Stage 3: AS-IS (no p) outputs, greedy, batched. TO-BE = the role-play's first agent turn: the same
    greedy call on prompt.messages(input) with the same prefix cache, so it is not run twice."""
    path = out_dir / "outputs.jsonl"
    done = {r["id"]: r for r in read_jsonl(path)}
    teacher = {c["id"]: c["conversation"][1]["content"] for c in conversations}
    todo = [b for b in batches(inputs, cfg.batch_size) if any(x["id"] not in done for x in b)]
    bar = meter.bar = tqdm(total=len(inputs), initial=len(inputs) - sum(len(b) for b in todo), desc="outputs",
                           leave=False)
    for batch in todo:
        ids = [tok.apply_chat(student_messages(prompt, x["input"])) for x in batch]
        outs = complete(model, tok, ids, cfg.output_tokens, meter=meter, draft=cfg.draft_tokens)
        new = [{"id": x["id"], "student_output": text.strip(), "teacher_output": teacher[x["id"]]}
               for x, (text, _) in zip(batch, outs) if x["id"] not in done]
        append_jsonl(path, new)
        done.update((r["id"], r) for r in new)
        bar.update(len(batch))
        if on_write:
            on_write("outputs", new)
    bar.close()
    return [done[x["id"]] for x in inputs]


# ----------------------------------------------------------------------------- stage 4: reasons
def reason_prefix_messages(prompt: AgentPrompt) -> list[dict]:
    """Appendix A.1's instruction and the context p: the part of the reason chat every sample shares."""
    return [{"role": "system", "content": f"{REASON_INSTRUCTION}\n\n### Context:\n{prompt.text}"}]


def reason_messages(prompt: AgentPrompt, user_input: str, student: str, teacher: str) -> list[dict]:
    body = (f"### Input:\n{prompt.user_message(user_input)}\n\n### Bad Output:\n{student}\n\n"
            f"### Good Output:\n{teacher}\n\n### Reason:")
    return reason_prefix_messages(prompt) + [{"role": "user", "content": body}]


def generate_reasons(generator, gen_tok, prompt, cfg, out_dir, inputs, outputs, meter, on_write=None):
    """Stage 4: why the output changed, sampled (temperature 0.7, top-p 0.9), batched after the cached context."""
    path = out_dir / "reasons.jsonl"
    done = {r["id"]: r for r in read_jsonl(path)}
    out_of = {o["id"]: o for o in outputs}
    all_batches = batches(inputs, cfg.batch_size)
    todo = [k for k, b in enumerate(all_batches) if any(x["id"] not in done for x in b)]
    prefix = cached_prefix(generator, gen_tok, reason_prefix_messages(prompt)) if todo else None
    bar = meter.bar = tqdm(total=len(inputs), initial=len(inputs) - sum(len(all_batches[k]) for k in todo),
                           desc="reasons", leave=False)
    for k in todo:
        batch = all_batches[k]
        chats = [reason_messages(prompt, x["input"], out_of[x["id"]]["student_output"],
                                 out_of[x["id"]]["teacher_output"]) for x in batch]
        ids = [continuation_ids(gen_tok, prefix[0], c) for c in chats]
        outs = complete(generator, gen_tok, ids, cfg.reason_tokens, prefix=prefix[1], temperature=cfg.reason_temperature,
                        top_p=cfg.top_p, seed=batch_seed(cfg.seed, "reasons", k), meter=meter)
        new = [{"id": x["id"], "reason": text.strip()} for x, (text, _) in zip(batch, outs) if x["id"] not in done]
        append_jsonl(path, new)
        done.update((r["id"], r) for r in new)
        bar.update(len(batch))
        if on_write:
            on_write("reasons", new)
    bar.close()
    return [done[x["id"]] for x in inputs]


# ----------------------------------------------------------------------------- quality report (Table 4)
def quality_report(prompt, task, conversations, item_stats, max_turns) -> dict:
    n = max(1, len(conversations))
    last_agent = [[m for m in c["conversation"] if m["role"] == "assistant"][-1]["content"] for c in conversations]
    return {"samples": len(conversations),
            "gold_turns": round(gold_turns(prompt), 2),
            "avg_turns": round(sum(c["turns"] for c in conversations) / n, 2),
            "max_turns": max_turns,
            "hit_max_turns": round(sum(c["ended_by"] == "max_turns" for c in conversations) / n, 4),
            "abnormal_termination": round(sum(c["ended_by"] != "end_token" for c in conversations) / n, 4),
            "abnormal_final_action": round(sum(not final_action_ok(task, r) for r in last_agent) / n, 4),
            "inputs": item_stats}


def format_report(report: dict, speeds: dict) -> str:
    pct = lambda x: f"{100 * x:.1f}%"
    s = report["inputs"]
    rows = [("samples", report["samples"]), ("gold turns (in prompt)", report["gold_turns"]),
            ("avg. turns", report["avg_turns"]), (f"hit max turns ({report['max_turns']})", pct(report["hit_max_turns"])),
            ("abnormal termination (no end token)", pct(report["abnormal_termination"])),
            ("abnormal final action", pct(report["abnormal_final_action"])),
            ("inputs: lists / items generated / accepted", f"{s['lists']} / {s['items_generated']} / {s['items_accepted']}"),
            ("inputs rejected", ", ".join(f"{k} {v}" for k, v in s["rejected"].items()))]
    rows += [(f"{stage} tokens/s", f"{v['tokens_per_s']:.1f} ({v['tokens']} tokens, {v['seconds']:.0f} s)")
             for stage, v in speeds.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# ----------------------------------------------------------------------------- the pipeline
def read_demos(path) -> list[str]:
    """Real demonstration inputs: one per line, or JSONL (a string, or an object with "input")."""
    demos = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith(("{", '"')):
            try:
                value = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}, line {number}: not valid JSON ({e})") from None
            value = value.get("input") if isinstance(value, dict) else value
            if not isinstance(value, str):
                raise ValueError(f"{path}, line {number}: expected a string or an object with an \"input\" string")
            demos.append(value)
        else:
            demos.append(line.strip())
    return demos


def synthesize(prompt, out_dir, n, model, tok, generator=None, gen_tok=None, *, demos=(), overwrite=False,
               on_write=None, quiet=False, **settings) -> list[dict]:
    """Run (or resume) the four stages into out_dir -> the data records (also in data.jsonl).
    `settings`: fields of SynthConfig. `generator` defaults to `model` (the same loaded weights).
    `on_write(stage, records)` is called after every durable write."""
    prompt = prompt if isinstance(prompt, AgentPrompt) else load_prompt(prompt)
    cfg = SynthConfig(n=n, **settings)
    task = detect_task(prompt, cfg.task)
    max_turns = cfg.max_turns or task.max_turns
    if cfg.n < 1 or max_turns < 1 or cfg.batch_size < 1:
        raise ValueError(f"n ({cfg.n}), max_turns ({max_turns}) and batch_size ({cfg.batch_size}) must be >= 1")
    generator, gen_tok = (generator, gen_tok) if generator is not None else (model, tok)
    pool = [item_of_input(task, x) for x in list(example_inputs(prompt)) + list(demos)]
    out_dir = Path(out_dir)
    settings_record = run_settings(prompt, task, cfg, model, generator, pool)
    check_settings(out_dir, settings_record, overwrite)
    meters = {stage: Meter() for stage in ("inputs", "role-play", "outputs", "reasons")}

    inputs, item_stats = generate_inputs(generator, gen_tok, prompt, task, cfg, out_dir, pool, meters["inputs"], on_write)
    inputs = inputs[:cfg.n]                                  # the spare inputs stop here (see spare_inputs)
    conversations = generate_conversations(model, tok, prompt, task, cfg, out_dir, inputs, meters["role-play"], on_write)
    outputs = generate_outputs(model, tok, prompt, cfg, out_dir, inputs, conversations, meters["outputs"], on_write)
    reasons = generate_reasons(generator, gen_tok, prompt, cfg, out_dir, inputs, outputs, meters["reasons"], on_write)

    keep = ("task", "model", "generator", "seed", "prompt_sha256", "max_turns")
    records = [{"id": x["id"], "input": x["input"], "item": x["item"], "conversation": c["conversation"],
                "turns": c["turns"], "ended_by": c["ended_by"], "student_output": o["student_output"],
                "teacher_output": o["teacher_output"], "reason": r["reason"],
                "settings": {k: settings_record[k] for k in keep}}
               for x, c, o, r in zip(inputs, conversations, outputs, reasons)]
    write_atomic(out_dir / "data.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    report = quality_report(prompt, task, conversations, item_stats, max_turns)
    speeds = {k: {"tokens": m.tokens, "seconds": round(m.seconds, 1), "tokens_per_s": round(m.rate(), 1)}
              for k, m in meters.items() if m.tokens}
    write_atomic(out_dir / "quality.json", json.dumps({**report, "throughput_this_run": speeds}, indent=1) + "\n")
    if not quiet:
        print(format_report(report, speeds))
    return records


def spare_inputs(out_dir) -> list[str]:
    """The pseudo inputs stage 1 made beyond the n samples (SynthConfig.spare_inputs): train.py's
    held-out inputs for its before/after check, never role-played or trained on."""
    n = json.loads((Path(out_dir) / "settings.json").read_text())["n"]
    return [r["input"] for r in read_jsonl(Path(out_dir) / "inputs.jsonl")[n:]]


# ----------------------------------------------------------------------------- benchmark
def timed_roleplay(model, tok, prompt, task, cfg, inputs: list[str], batched=True):
    """Role-play the inputs (batched with the prefix caches, or one at a time without them) ->
    (conversations, generated tokens, seconds)."""
    meter, start = Meter(), time.perf_counter()
    agent, env = personas(model, tok, prompt, task, cfg, meter, use_cache=batched)
    messages = [prompt.user_message(x) for x in inputs]
    if batched:
        convs = roleplay(messages, agent, env, cfg.max_turns or task.max_turns)
    else:
        convs = [roleplay([m], agent, env, cfg.max_turns or task.max_turns)[0] for m in messages]
    return convs, meter.tokens, time.perf_counter() - start


def benchmark(model, tok, prompt, task, cfg, inputs: list[str]) -> dict:
    """Role-play tokens/s: batched with prefix caches vs one sample at a time without them, same samples;
    with cfg.draft_tokens > 0, also batched with caches but without the prompt-lookup guesses."""
    results, arms = {}, [("batched+prefix-cache", True, cfg.draft_tokens), ("one-at-a-time, no cache", False, 0)]
    if cfg.draft_tokens:
        arms.insert(1, ("batched+prefix-cache, no drafts", True, 0))
    for name, batched, draft in arms:
        convs, tokens, seconds = timed_roleplay(model, tok, prompt, task, replace(cfg, draft_tokens=draft), inputs,
                                                batched)
        results[name] = {"tokens": tokens, "seconds": round(seconds, 1),
                         "tokens_per_s": round(tokens / seconds, 2), "conversations": convs}
    fast, slow = results["batched+prefix-cache"], results["one-at-a-time, no cache"]
    plain = results.get("batched+prefix-cache, no drafts", fast)
    return {"samples": len(inputs), "max_turns": cfg.max_turns or task.max_turns,
            "speedup": round(fast["tokens_per_s"] / slow["tokens_per_s"], 2),
            "draft_speedup": round(fast["tokens_per_s"] / plain["tokens_per_s"], 2),
            "same_conversations": fast["conversations"] == slow["conversations"] == plain["conversations"],
            **{k: {kk: vv for kk, vv in v.items() if kk != "conversations"} for k, v in results.items()}}


# ----------------------------------------------------------------------------- command line
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--prompt", default="prompts/webshop.txt", help="agent prompt file (or os/webshop/mind2web)")
    ap.add_argument("--out", default=None, help="output directory; None = runs/<prompt name>/data")
    ap.add_argument("-n", type=int, default=SynthConfig.n, help=CONFIG_HELP["n"])
    ap.add_argument("--model", default=None, help="model of the role-play and outputs; None = embedded SmolLM2")
    ap.add_argument("--generator", default=None, help="model of the inputs and reasons; None = --model")
    ap.add_argument("--demos", default=None, help="file of real demonstration inputs (lines or JSONL)")
    ap.add_argument("--overwrite", action="store_true", help="delete earlier records in --out first")
    ap.add_argument("--benchmark", action="store_true", help="measure the role-play stage, batched+cached vs plain")
    ap.add_argument("--bench-samples", type=int, default=4, help="samples the benchmark role-plays")
    ap.add_argument("--fp32-weights", action="store_true",
                    help="on a CPU, read the exact fp32 weights, not fp16 copies (model.set_fp16_weights; slower)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                    help="prefills and decoding steps through graphs compiled by inductor (model.compile_for_inference; "
                         "the first run compiles for minutes, later ones read inductor's cache)")
    ap.add_argument("--freeze", action="store_true",
                    help="with --compile: the decoding steps' graphs take the block weights as constants "
                         "(compile_for_inference(freeze=True)): batched steps ~1.1x faster on a CPU, but 90-100 s more "
                         "compiling in every run; for long runs")
    for f in SynthConfig.__dataclass_fields__.values():
        if f.name != "n":
            kind = int if "int" in str(f.type) else float if "float" in str(f.type) else str
            ap.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default, help=CONFIG_HELP[f.name])
    args = ap.parse_args(argv)
    if args.freeze and not args.compile:
        ap.error("--freeze needs --compile")

    prompt = load_prompt(args.prompt)
    settings = {f: getattr(args, f) for f in SynthConfig.__dataclass_fields__ if f != "n"}
    model, tok = load_model(args.model)
    generator, gen_tok = load_model(args.generator) if args.generator else (None, None)
    for m in (model, generator or model):
        set_fp16_weights(m, not args.fp32_weights)
        if args.compile and (why_not := compile_for_inference(m, freeze=args.freeze)):
            print(f"inference uncompiled: {why_not}")
    demos = read_demos(args.demos) if args.demos else []
    out = Path(args.out or f"runs/{prompt.name}/data")
    if args.benchmark:
        cfg = SynthConfig(n=args.bench_samples, **settings)
        task = detect_task(prompt, cfg.task)
        saved = read_jsonl(out / "inputs.jsonl")
        inputs = [r["input"] for r in saved][:args.bench_samples] or \
            [input_of_item(task, prompt, item_of_input(task, x), i) for i, x in
             enumerate((example_inputs(prompt) * args.bench_samples)[:args.bench_samples])]
        result = benchmark(model, tok, prompt, task, cfg, inputs)
        print(json.dumps(result, indent=1))
        print(f"role-play speed-up, batched + prefix cache vs one at a time: {result['speedup']:.1f}x"
              f" (of which prompt-lookup drafts: {result['draft_speedup']:.2f}x)")
        return
    start = time.perf_counter()
    records = synthesize(prompt, out, args.n, model, tok, generator, gen_tok, demos=demos,
                         overwrite=args.overwrite, **settings)
    print(f"{len(records)} records in {out / 'data.jsonl'} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, RuntimeError, OSError) as e:
        sys.exit(f"error: {e}")

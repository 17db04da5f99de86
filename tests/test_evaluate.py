"""Tests of evaluate.py: the episode loop on real environments with scripted agents, the metrics on
hand-made cases, the KV-cached agent against generation from scratch, and the whole CLI on a tiny model."""
import json
import os
import shutil

import pytest
import torch

import evaluate
from agentbench_env.mind2web import Mind2WebEnv
from agentbench_env.webshop import WebShopEnv
from conftest import save_tiny_llama
from model import generate, load_model
from prompts import load_prompt, parse_prompt


def act(action):
    return f"Thought:\nI think I should do this.\n\nAction:\n{action}"


def scripted(replies):
    """An agent that plays a fixed list of replies, one per turn, and checks it is shown a growing chat."""
    def agent(messages):
        k = sum(m["role"] == "assistant" for m in messages)
        assert [m["role"] for m in messages] == ["user", "assistant"] * k + ["user"]
        return replies[k]
    return agent


# ----------------------------------------------------------------------------- episodes with scripted agents
@pytest.fixture(scope="module")
def webshop():
    return WebShopEnv()


@pytest.fixture(scope="module")
def mind2web():
    return Mind2WebEnv()


def buyer_plan(env, i):
    """The optimal buyer's replies: search the instruction, page to the goal, open it, pick options, buy."""
    goal = env.tasks[i]
    page = env.search(goal["instruction_text"]).index(goal["asin"]) // 10
    return ([act(f"search[{goal['instruction_text']}]")] + [act("click[Next >]")] * page
            + [act(f"click[{goal['asin']}]")] + [act(f"click[{v}]") for v in goal["goal_options"].values()]
            + [act("click[Buy Now]")])


def test_webshop_optimal_buyer_reaches_reward_one(webshop):
    prompt = load_prompt("webshop")
    for i in (0, 10, 20):
        plan = buyer_plan(webshop, i)
        ep = evaluate.run_episode(webshop, i, scripted(plan), prompt.user_message)
        assert ep["score"] == 1.0 and ep["end"] == "done" and ep["turns"] == len(plan)
        assert ep["info"]["reason"] == "bought"
        assert ep["messages"][0]["content"] == webshop.reset(i)          # empty input prefix: the observation
        assert ep["messages"][1::2] == [{"role": "assistant", "content": r} for r in plan]
        assert ep["messages"][2]["content"].startswith("Observation:\n") and len(ep["messages"]) == 2 * len(plan)
        assert evaluate.valid_action_rate("webshop", ep["replies"]) == 1.0


def test_webshop_invalid_reply_ends_with_zero(webshop):
    ep = evaluate.run_episode(webshop, 3, scripted(["I would like to buy boots."]), lambda x: x)
    assert (ep["score"], ep["turns"], ep["info"]["reason"]) == (0.0, 1, "invalid action")
    assert evaluate.valid_action_rate("webshop", ep["replies"]) == 0.0


def right_reply(step):
    reply = f"Thought: the right element.\nAnswer: {step['answer']}."
    if step["answer"] != "A":
        reply += f"\nAction: {step['action']}" + (f"\nValue: {step['value']}" if step["action"] != "CLICK" else "")
    return reply


def test_mind2web_right_answer_one_wrong_answer_zero(mind2web):
    prompt = load_prompt("mind2web")
    for i in range(5):
        step = mind2web.tasks[i]
        right = evaluate.run_episode(mind2web, i, scripted([right_reply(step)]), prompt.user_message)
        wrong_letter = "B" if step["answer"] != "B" else "C"
        wrong = evaluate.run_episode(mind2web, i, scripted([f"Answer: {wrong_letter}.\nAction: CLICK"]),
                                     prompt.user_message)
        assert (right["score"], wrong["score"]) == (1.0, 0.0)
        assert right["turns"] == wrong["turns"] == 1


def test_context_overflow_ends_with_zero(mind2web):
    ep = evaluate.run_episode(mind2web, 0, lambda messages: None, lambda x: x)
    assert (ep["score"], ep["end"], ep["turns"], ep["replies"]) == (0.0, "context overflow", 0, [])


def test_os_episode_bash_then_answer(tmp_path):
    from agentbench_env.os_env import OSEnv, SandboxError
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps([{"description": "How many lines does /root/f have?",
                                  "create": {"init": "printf 'a\\nb\\nc\\n' > /root/f"},
                                  "evaluation": {"match": "3"}}]))
    try:
        env = OSEnv(str(tasks), sandbox_dir=evaluate.FAST_DIR)
    except SandboxError as e:
        pytest.skip(f"bubblewrap sandbox not usable here: {e}")
    prompt = load_prompt("os")
    replies = ["Think: count them.\n\nAct: bash\n\n```bash\nwc -l < /root/f\n```", "Think: done.\n\nAct: answer(3)"]
    ep = evaluate.run_episode(env, 0, scripted(replies), prompt.user_message)
    assert (ep["score"], ep["turns"]) == (1.0, 2) and env.sandbox is None     # closed after the episode
    assert ep["messages"][0]["content"] == prompt.input_prefix + "\n\n" + "How many lines does /root/f have?"
    assert ep["messages"][2]["content"] == "The output of the OS:\n\n3"


# ----------------------------------------------------------------------------- metrics on hand-made cases
def test_normalized_score():
    assert evaluate.normalized(44.46, 54.16) == pytest.approx(82.09, abs=0.005)   # Table 1, GenPI on WebShop
    assert evaluate.normalized(17.36, 17.36) == 100.0
    assert evaluate.normalized(3.0, 0.0) is None


def test_valid_action_rate_per_task_parser():
    assert evaluate.valid_action_rate("webshop", [act("search[red shoes]"), act("click[Buy Now]"),
                                                  "Action: click [Buy Now]", "I buy it."]) == 0.5
    assert evaluate.valid_action_rate("os", ["Act: bash\n\n```bash\nls\n```", "Act: finish", "Act: answer(4)",
                                             "ls -la", "Act: dance"]) == 0.6
    assert evaluate.valid_action_rate("mind2web", ["Answer: B.\nAction: CLICK", "Answer: A.", "B. CLICK"]) == 2 / 3
    assert evaluate.valid_action_rate("os", []) is None


def test_first_action_agreement():
    teacher = [dict(task=0, replies=[act("search[red shoes]"), act("click[b01]")]),
               dict(task=1, replies=[act("search[tea]")]),
               dict(task=2, replies=["no action"]),                      # left out: the teacher has no action
               dict(task=3, replies=[act("search[hat]")])]
    student = [dict(task=0, replies=[act("search[red shoes]")]),         # same first action (later ones ignored)
               dict(task=1, replies=["Action: search[coffee]"]),         # different argument
               dict(task=2, replies=["no action"]),
               dict(task=3, replies=[])]                                 # overflowed before replying
    assert evaluate.first_action_agreement("webshop", student, teacher) == pytest.approx(1 / 3)
    # OS compares the parsed action: whitespace around the code does not matter, the command does
    t = [dict(task=0, replies=["Act: bash\n\n```bash\nls /root\n```"]), dict(task=1, replies=["Act: answer(3)"])]
    s = [dict(task=0, replies=["Think: x\nAct: bash\n\n```bash\nls /root \n```"]), dict(task=1, replies=["Act: answer(4)"])]
    assert evaluate.first_action_agreement("os", s, t) == 0.5
    m = [dict(task=0, replies=["Answer: C.\nAction: TYPE\nValue: new  york"])]
    assert evaluate.first_action_agreement("mind2web", [dict(task=0, replies=["Answer: C.\nAction: TYPE\nValue: new york"])], m) == 1.0
    assert evaluate.first_action_agreement("mind2web", [dict(task=0, replies=["Answer: D.\nAction: TYPE\nValue: new york"])], m) == 0.0
    assert evaluate.first_action_agreement("webshop", student, [dict(task=0, replies=["none"])]) is None


# ----------------------------------------------------------------------------- the model agent
@pytest.fixture(scope="module")
def long_tiny_dir(tmp_path_factory):
    """The tiny random Llama with a context long enough for the agent prompts (byte-level tokens)."""
    d = tmp_path_factory.mktemp("tiny_long")
    save_tiny_llama(d, max_position_embeddings=16384, initializer_range=0.5)
    return d


@pytest.fixture(scope="module")
def long_tiny(long_tiny_dir):
    return load_model(long_tiny_dir, dtype=torch.float32, device="cpu")


SMALL_PROMPT = parse_prompt("<USER>:\nYou are an agent in a shell. Reply with Act: bash or Act: answer(x).\n\n"
                            "<AGENT>:\nOk.\n\n<USER>:\nNow, my problem is:")


def test_cached_agent_replies_equal_generation_from_scratch(long_tiny, monkeypatch):
    """Each turn reuses the prompt's cache and the episode's earlier turns (growing the cache when full), yet
    replies exactly as greedy generation over the whole re-tokenized chat; the shared prompt cache is never written."""
    monkeypatch.setattr(evaluate, "CACHE_GROWTH", 8)
    model, tok = long_tiny
    scratch = lambda chat: tok.decode(generate(model, [tok.apply_chat(chat)], 6, stop_ids=tok.stop_ids)[0],
                                      skip_special=True)
    prompt = SMALL_PROMPT
    new_agent = evaluate.system_agents(model, tok, prompt, True, max_new_tokens=6)
    agent = new_agent()
    messages = [{"role": "user", "content": prompt.user_message("count the files in /etc")}]
    for observation in ("The output of the OS:\n\n42", "The output of the OS:\n\n" + "y" * 40, "empty", None):
        reply = agent(messages)
        assert reply == scratch(prompt.turns + messages)
        if observation:
            messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": observation}]
    second = new_agent()                                                # a new episode starts from the prompt again
    assert second(messages[:1]) == scratch(prompt.turns + messages[:1])
    other = [{"role": "user", "content": prompt.user_message("something else")}]   # history changed: restart
    assert second(other) == scratch(prompt.turns + other)
    no_prompt = evaluate.system_agents(model, tok, prompt, False, max_new_tokens=6)()
    assert no_prompt(messages) == scratch(messages)


def test_agent_returns_none_when_the_chat_does_not_fit(tiny_model):
    model, tok = tiny_model
    context, prompt = model.args.max_seq_len, load_prompt("os")
    assert len(tok.apply_chat(prompt.turns)) > context                  # byte-level tokens: the prompt is too long
    agent = evaluate.system_agents(model, tok, prompt, True, max_new_tokens=8)()
    assert agent([{"role": "user", "content": "hi"}]) is None
    short = evaluate.system_agents(model, tok, prompt, False, max_new_tokens=8)()
    assert isinstance(short([{"role": "user", "content": "hi"}]), str)
    fits = context - 8 - len(tok.apply_chat([{"role": "user", "content": ""}]))   # room for 8 new tokens, exactly
    assert isinstance(short([{"role": "user", "content": "x" * fits}]), str)
    assert short([{"role": "user", "content": "x" * (fits + 1)}]) is None


# ----------------------------------------------------------------------------- the command line
def read_json(path):
    with open(path) as f:
        return json.load(f)


def test_cli_runs_on_tiny_model_and_writes_transcripts(long_tiny_dir, tmp_path, capsys):
    out, summary = tmp_path / "eval", tmp_path / "summary.json"
    code = evaluate.main(["--task", "mind2web", "--limit", "2", "--model", str(long_tiny_dir), "--out", str(out),
                          "--json", str(summary), "--max-new-tokens", "4"])
    assert code == 0
    results = read_json(summary)["results"]["mind2web"]
    assert list(results) == ["upper bound (base + prompt)", "base, no prompt"]
    for r in results.values():                                           # garbage replies: no action, score 0
        assert (r["score"], r["episodes"], r["valid_action_rate"], r["mean_turns"]) == (0.0, 2, 0.0, 1.0)
        assert r["normalized"] is None                                   # the upper bound is 0
    env, prompt = Mind2WebEnv(), load_prompt("mind2web")
    for system in ("upper-bound", "no-prompt"):
        files = sorted(os.listdir(out / "mind2web" / system))
        assert files == ["task_0000.json", "task_0001.json"]
        record = read_json(out / "mind2web" / system / "task_0001.json")
        assert record["messages"][0]["content"] == prompt.user_message(env.reset(1))
        assert record["messages"][1]["role"] == "assistant" and record["score"] == 0.0
    printed = capsys.readouterr().out
    assert "Web Browsing SR" in printed and "Norm." in printed and "valid act." in printed


@pytest.mark.slow
def test_cli_webshop_with_an_adapter(long_tiny_dir, tmp_path, capsys):
    """A random adapter changes the replies without the prompt; base systems run with it switched off."""
    from lora import LoRAConfig, add_lora, save_adapter
    model, _ = load_model(long_tiny_dir, dtype=torch.float32, device="cpu")
    add_lora(model, LoRAConfig(r=4, alpha=8))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    save_adapter(model, tmp_path / "adapter", LoRAConfig(r=4, alpha=8))
    args = ["--task", "webshop", "--limit", "2", "--model", str(long_tiny_dir), "--max-new-tokens", "6"]
    assert evaluate.main(args + ["--out", str(tmp_path / "a"), "--adapter", str(tmp_path / "adapter"),
                                 "--json", str(tmp_path / "a.json")]) == 0
    assert evaluate.main(args + ["--out", str(tmp_path / "b")]) == 0
    results = read_json(tmp_path / "a.json")["results"]["webshop"]
    assert len(results) == 3 and all(r["score"] == 0.0 for r in results.values())
    replies = lambda run, system: [read_json(tmp_path / run / "webshop" / system / f"task_000{i}.json")["replies"]
                                   for i in range(2)]
    adapter_dir = "adapter-" + evaluate.slug(str(tmp_path / "adapter"))
    assert replies("a", "no-prompt") == replies("b", "no-prompt")        # adapter off = the base model
    assert replies("a", "upper-bound") == replies("b", "upper-bound")
    assert replies("a", adapter_dir) != replies("a", "no-prompt")


def test_bad_input_is_one_clear_error_before_loading_the_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--task", "chess"])
    assert e.value.code == 2 and "invalid choice: 'chess'" in capsys.readouterr().err
    missing = str(tmp_path / "nowhere")
    no_model = ["--model", str(tmp_path / "no_model_here")]            # would fail later if it were loaded
    assert evaluate.main(["--task", "mind2web", "--adapter", missing] + no_model) == 2
    assert capsys.readouterr().err.strip() == f"evaluate.py: error: {missing}: adapter directory not found"
    (tmp_path / "empty_adapter").mkdir()
    assert evaluate.main(["--task", "mind2web", "--adapter", str(tmp_path / "empty_adapter")] + no_model) == 2
    assert "adapter_config.json" in capsys.readouterr().err
    bad = tmp_path / "steps.json"
    bad.write_text(json.dumps([{"task": "x", "html": "<a>", "previous_actions": [], "choices": ["a"]}]))
    assert evaluate.main(["--task", "mind2web", "--tasks", str(bad)] + no_model) == 2
    assert capsys.readouterr().err.strip() == f"evaluate.py: error: {bad}: task 0: missing field 'answer'"
    assert evaluate.main(["--tasks", str(bad)] + no_model) == 2
    assert "--tasks needs a single --task" in capsys.readouterr().err
    assert evaluate.main(["--task", "webshop", "--tasks", str(tmp_path / "none.json")] + no_model) == 2
    assert "task file not found" in capsys.readouterr().err
    assert evaluate.main(["--task", "webshop", "--limit", "-1"] + no_model) == 2
    assert evaluate.main(["--task", "mind2web"] + no_model) == 2         # and a bad model path is one line too
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "no_model_here" in err and "Traceback" not in err

"""Tests of agentbench_env/mind2web.py: prompt format, AgentBench's parser and the step-success metric."""
import json
from collections import Counter

import pytest

from agentbench_env import mind2web
from agentbench_env.mind2web import Mind2WebEnv, action_f1, parse_reply


@pytest.fixture(scope="module")
def env():
    return Mind2WebEnv()


def right_reply(step):
    reply = f"Thought: I should act on the right element.\nAnswer: {step['answer']}."
    if step["answer"] != "A":
        reply += f"\nAction: {step['action']}"
        if step["action"] != "CLICK":
            reply += f"\nValue: {step['value']}"
    return reply


def run(env, i, reply):
    env.reset(i)
    obs, done, score = env.step(reply)
    assert obs is None and done
    return score


def test_shipped_steps_cover_the_kinds(env):
    steps = env.tasks
    assert len(steps) >= 100
    answers = Counter(s["answer"] for s in steps)
    actions = Counter(s["action"] for s in steps)
    assert answers["A"] >= 10 and all(actions[op] >= 10 for op in ("CLICK", "SELECT", "TYPE"))
    assert len({s["domain"] for s in steps}) >= 6


def test_prompt_format(env):
    i = next(k for k, s in enumerate(env.tasks) if len(s["previous_actions"]) >= 2)
    step = env.tasks[i]
    prompt = env.reset(i)
    head, tail = prompt.split("\n'''\n\n")
    assert head == "'''\n" + step["html"]
    lines = tail.split("\n")
    assert lines[0] == "Based on the HTML webpage above, try to complete the following task:"
    assert lines[1] == f"Task: {step['task']}"
    assert lines[2] == "Previous actions:"
    n = len(step["previous_actions"])
    assert lines[3:3 + n] == step["previous_actions"] and " -> " in lines[3]
    assert lines[3 + n] == ("What should be the next action? Please select from the following choices "
                            "(If the correct action is not in the page above, please select A. "
                            "'None of the above'):")
    assert lines[4 + n:6 + n] == ["", "A. None of the above"]
    assert lines[6 + n:-1] == [f"{chr(66 + k)}. {c}" for k, c in enumerate(step["choices"])]
    assert lines[-1] == ""
    first = next(k for k, s in enumerate(env.tasks) if not s["previous_actions"])
    assert "Previous actions:\nNone\nWhat should" in env.reset(first)


def test_right_answers_succeed_on_every_step(env):
    assert all(run(env, i, right_reply(s)) == 1.0 for i, s in enumerate(env.tasks))


def test_wrong_element_fails(env):
    for i, s in enumerate(env.tasks[:40]):
        wrong = "B" if s["answer"] != "B" else "C"
        reply = right_reply(s).replace(f"Answer: {s['answer']}.", f"Answer: {wrong}.")
        assert run(env, i, reply) == 0.0
        assert env.info["element_acc"] == 0.0


def test_right_element_wrong_value_or_action_fails(env):
    i = next(k for k, s in enumerate(env.tasks) if s["action"] == "TYPE")
    s = env.tasks[i]
    assert run(env, i, right_reply(s).replace(f"Value: {s['value']}", "Value: somewhere else")) == 0.0
    assert env.info["element_acc"] == 1.0 and env.info["action_f1"] < 1.0
    assert run(env, i, right_reply(s).replace("Action: TYPE", "Action: CLICK")) == 0.0
    j = next(k for k, s in enumerate(env.tasks) if s["action"] == "CLICK")
    assert run(env, j, right_reply(env.tasks[j]) + "\nValue: extra") == 0.0  # F1 of CLICK vs CLICK extra = 2/3


def test_none_of_the_above_steps(env):
    a_steps = [i for i, s in enumerate(env.tasks) if s["answer"] == "A"]
    for i in a_steps:
        assert run(env, i, "Thought: nothing fits.\nAnswer: A.") == 1.0
        assert run(env, i, "Answer: B.\nAction: CLICK") == 0.0
    other = next(i for i, s in enumerate(env.tasks) if s["answer"] != "A")
    assert run(env, other, "Answer: A.") == 0.0


def test_parser_robustness(env):
    assert parse_reply("Answer: C.\nAction: SELECT\nValue: Pickup   \n") == ("C", "SELECT Pickup")
    assert parse_reply("  blah\nAnswer: D.\nAction: CLICK\n") == ("D", "CLICK ")
    assert parse_reply("Answer: B. Action: TYPE Value: Brooklyn") == ("B", "TYPE Brooklyn")
    assert parse_reply("answer: c") == (None, " ")
    assert parse_reply(None) == (None, " ")
    i = next(k for k, s in enumerate(env.tasks) if s["answer"] != "A")
    for junk in [None, "", "I don't know", "Answer: Z", "Answer:C", "C.\nAction: CLICK", "\x00\n\n"]:
        assert run(env, i, junk) == 0.0
    for junk in [None, "", "nothing"]:  # AgentBench reads these as A; here no answer never scores
        assert run(env, next(k for k, s in enumerate(env.tasks) if s["answer"] == "A"), junk) == 0.0


def test_action_f1_hand_computed():
    assert action_f1("SELECT Pickup", "SELECT Pickup") == 1.0
    assert action_f1("CLICK ", "CLICK") == 1.0
    # {SELECT, Dine, in} vs {SELECT, Pickup}: p = 1/3, r = 1/2, F1 = 0.4
    assert action_f1("SELECT Dine in", "SELECT Pickup") == pytest.approx(0.4)
    assert action_f1("TYPE brooklyn", "TYPE Brooklyn") == pytest.approx(0.5)  # case-sensitive
    assert action_f1("", "CLICK") == 0.0 and action_f1(" ", "") == 1.0


def test_malformed_task_file_gives_one_clear_error(tmp_path):
    steps = json.load(open(mind2web.STEPS_FILE))[:4]
    bad = [dict(s) for s in steps]
    del bad[2]["answer"]
    path = tmp_path / "steps.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"task 2: missing field 'answer'"):
        Mind2WebEnv(tasks_file=str(path))
    bad = [dict(s) for s in steps]
    bad[0]["answer"] = chr(66 + len(bad[0]["choices"]))
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"task 0: field 'answer'"):
        Mind2WebEnv(tasks_file=str(path))
    path.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match="expected a JSON list"):
        Mind2WebEnv(tasks_file=str(path))


def test_step_before_reset_is_an_error(env):
    env.reset(0)
    env.step("Answer: A.")
    with pytest.raises(RuntimeError):
        env.step("Answer: A.")

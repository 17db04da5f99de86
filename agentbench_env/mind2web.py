"""Web Browsing: Mind2Web multiple-choice steps as AgentBench v0.2 runs them (paper section 6.1, appendix B, figure 6).

Each step of data/mind2web_steps.json (written for this project by data/make_webshop_data.py)
is one episode of one round. The user turn is AgentBench's: the simplified HTML between ''' lines,
then "Based on the HTML webpage above, try to complete the following task:", the task, up to 5
previous actions and the choices, "A. None of the above" first. The reply is read with
AgentBench's parser: `Answer: (A|B|C|D|E|F)`, `Action: (CLICK|SELECT|TYPE)`, `Value: (.*)$`.

Step success (Mind2Web / AgentBench metric): the right element AND an action F1 of 1, the F1
taken over the whitespace tokens of "OP value" (case-sensitive; value only for SELECT/TYPE).
Steps whose right element was pruned from the page have answer "A": they succeed when the reply
answers A, whatever its action. Unlike AgentBench, which reads a reply without `Answer:` as A,
a reply with no `Answer:` letter scores 0 here (no parsable action never scores).

    env = Mind2WebEnv(); prompt = env.reset(0); _, done, score = env.step("Answer: C.\\nAction: CLICK")
"""
import os
import re

from agentbench_env import load_records

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
STEPS_FILE = os.path.join(DATA_DIR, "mind2web_steps.json")
PREVIOUS_K = 5  # AgentBench dataloader previous_k
OPS = ("CLICK", "SELECT", "TYPE")
STEP_FIELDS = {"task": str, "html": str, "previous_actions": list, "choices": list, "answer": str}


def load_steps(path):
    """A JSON list of steps; one clear error naming the step index and field otherwise."""
    steps = load_records(path, STEP_FIELDS, "task")
    for i, step in enumerate(steps):
        check_step(step, i, path)
    return steps


def check_step(step, i, path):
    """The rules beyond field types: a valid answer letter, and an action (and value) unless it is A."""
    where = f"{path}: task {i}"
    letters = [chr(65 + k) for k in range(len(step["choices"]) + 1)]
    if step["answer"] not in letters:
        raise ValueError(f"{where}: field 'answer' is {step['answer']!r}, not one of {letters}")
    if step["answer"] == "A":
        return
    if step.get("action") not in OPS:
        raise ValueError(f"{where}: field 'action' must be one of {OPS} when the answer is not A")
    if step["action"] != "CLICK" and not step.get("value"):
        raise ValueError(f"{where}: missing field 'value' for a {step['action']} step")


def format_prompt(step):
    """AgentBench: f"'''\\n{seq_context}\\n'''\\n\\n{seq_in}" (dataloader.format_input_multichoice)."""
    prev = step["previous_actions"][-PREVIOUS_K:]
    seq_in = ("Based on the HTML webpage above, try to complete the following task:\n"
              f"Task: {step['task']}\n"
              "Previous actions:\n" + ("".join(f"{a}\n" for a in prev) if prev else "None\n")
              + "What should be the next action? Please select from the following choices "
              "(If the correct action is not in the page above, please select A. 'None of the above'):\n\n"
              "A. None of the above\n")
    seq_in += "".join(f"{chr(66 + k)}. {c}\n" for k, c in enumerate(step["choices"]))
    return f"'''\n{step['html']}\n'''\n\n{seq_in}"


def parse_reply(text):
    """AgentBench postprocess_action_llm -> (letter or None, "OP value")."""
    text = (text or "").strip()
    letter = re.search(r"Answer: (A|B|C|D|E|F)", text)
    action = re.search(r"Action: (CLICK|SELECT|TYPE)", text)
    value = re.search(r"Value: (.*)$", text, re.MULTILINE)
    action = action.group(1) if action else ""
    value = value.group(1) if value else ""
    return (letter.group(1) if letter else None), action.strip() + " " + value.strip()


def target_action(step):
    """The label AgentBench builds from the target "X.\\nAction: OP\\nValue: v" (no Value for CLICK)."""
    value = step.get("value", "") if step["action"] != "CLICK" else ""
    return step["action"] + " " + value.strip()


def action_f1(pred, label):
    """Mind2Web / AgentBench calculate_f1: F1 over sets of whitespace tokens."""
    pred, label = set(pred.strip().split()), set(label.strip().split())
    if not pred and not label:
        return 1.0
    if not pred or not label:
        return 0.0
    tp = len(pred & label)
    if tp == 0:
        return 0.0
    precision, recall = tp / len(pred), tp / len(label)
    return 2 * precision * recall / (precision + recall)


def score_step(step, reply):
    """{"element_acc", "action_f1", "success"} of one reply to one step."""
    letter, pred_action = parse_reply(reply)
    if letter is None:
        return dict(element_acc=0.0, action_f1=0.0, success=0.0, pred=None)
    if step["answer"] == "A":
        ok = float(letter == "A")
        return dict(element_acc=ok, action_f1=ok, success=ok, pred=(letter, pred_action))
    element_acc = float(letter == step["answer"])
    f1 = action_f1(pred_action, target_action(step))
    success = float(element_acc == 1.0 and f1 >= 1.0)
    return dict(element_acc=element_acc, action_f1=f1, success=success, pred=(letter, pred_action))


class Mind2WebEnv:
    """tasks: steps. reset(i) -> the user turn; step(reply) -> (None, True, step success 0/1)."""

    def __init__(self, tasks_file=None):
        self.tasks = load_steps(tasks_file or STEPS_FILE)
        self.current, self.info = None, None

    def reset(self, i):
        self.current, self.info = self.tasks[i], None
        return format_prompt(self.current)

    def step(self, reply):
        if self.current is None:
            raise RuntimeError("Mind2WebEnv.step called before reset() or after the episode ended")
        self.info = score_step(self.current, reply)
        self.current = None
        return None, True, self.info["success"]

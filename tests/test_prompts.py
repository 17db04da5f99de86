"""Tests for prompts/: the three AgentBench v0.2 agent prompts (paper appendix B, figures 5-7) and their parser.

The expected strings are copied from AgentBench v0.2 (os_interaction/task.py ONE_SHOT, webshop/task.py,
data/mind2web/prompt/llm_prompt_cot.json), not produced by the parser.
    .venv/bin/python -m pytest tests/test_prompts.py
"""
import json
import os
import re
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prompts import (PROMPT_DIR, AgentPrompt, PromptFileError, check_fits, example_inputs, load_prompt,  # noqa: E402
                     parse_prompt)

OS_QUESTION = 'tell me how many files are in the directory "/etc"?'
OS_PREFIX = "Now, I will start a new problem in a new OS. My problem is:"
WEBSHOP_FIRST_OBSERVATION = (
    'Observation:\n"WebShop [SEP] Instruction: [SEP] i need a long lasting 6.76 fl oz bottle of l\'eau d\'issey, '
    'and price lower than 100.00 dollars [SEP] Search"\n\n'
    'Available Actions:\n{"has_search_bar": true, "clickables": ["..."]}')
MIND2WEB_TASKS = [
    "Check for pickup restaurant available in Boston, NY on March 18, 5pm with just one guest",
    "Compare the fare types to book a 1-adult ticket from Springfiels, IL to Austin, TX for April 29th 2023",
    "Find a mini van at Brooklyn City from April 5th to April 8th for a 22 year old renter.",
]


def roles(prompt):
    return [t["role"] for t in prompt.turns]


# --- the shipped files ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["os", "webshop", "mind2web"])
def test_shipped_file_is_canonical_and_round_trips(name):
    p = load_prompt(name)
    assert p.name == name and p.path == os.path.join(PROMPT_DIR, name + ".txt")
    with open(p.path, encoding="utf-8") as f:
        assert f.read() == p.text + "\n"          # written in canonical form: text is the file as written
    again = parse_prompt(p.text)
    assert again.turns == p.turns and again.input_prefix == p.input_prefix
    n = len(p.turns)
    assert roles(p) == ["user", "assistant"] * (n // 2) and n % 2 == 0
    # the paper's OCR damage must not be in the files
    for bad in ["I'will", "Reywords", "wc -1", "/ etc", "\\$", "Buv", "<1i", "S31.36", "diu=2", "combobx", "{user"]:
        assert bad not in p.text, bad


def test_os_prompt_matches_agentbench_one_shot():
    p = load_prompt("os")
    assert len(p.turns) == 6                      # figure 5: instruction+question, then 2 more user/agent rounds
    first = p.turns[0]["content"]
    assert first.startswith("You are an assistant that will act like a person, I will play the role of linux(ubuntu) "
                            "operating system.")
    assert 'take exact one of the three actions: "bash", "finish" or "answer".\n\n1. If you think' in first
    assert "Think: put your thought here.\n\nAct: bash\n\n```bash\n# put your bash code here\n```\n\n2. If" in first
    assert "Act: answer(Your answer to the question should be put in this pair of parentheses)\n\nIf the output" in first
    assert first.endswith("only exact one of the three actions in each turn.\n\nNow, my problem is:\n\n" + OS_QUESTION)
    assert p.turns[1]["content"] == ("Think: To count the files in /etc, I need to print all the files in it.\n\n"
                                     "Act: bash\n\n```bash\nls /etc\n```")
    assert p.turns[2]["content"] == ("The output of the OS:\ncpi cron.hourly fuse.conf iproute2 lvm networkd-dispatcher "
                                     "protocols selinux tmpfiles.d [truncated because the output is too long]")
    assert p.turns[3]["content"] == ("Think: The output has been truncated because it is too long, so I need to count "
                                     "files by script directly.\n\nAct: bash\n\n```bash\nls -1 /etc | wc -l\n```")
    assert p.turns[4]["content"] == "The output of the OS:\n220"
    assert p.turns[5]["content"] == "Think: Now I get the answer, it is 220.\n\nAct: answer(220)"
    assert p.input_prefix == OS_PREFIX and p.joiner == "\n\n"
    assert p.user_message("count the lines of /etc/passwd") == OS_PREFIX + "\n\ncount the lines of /etc/passwd"


def test_webshop_prompt_matches_agentbench_one_shot():
    p = load_prompt("webshop")
    assert len(p.turns) == 2 + 8                  # instruction + "Ok.", then the 1-shot episode of 4 rounds
    assert p.turns[0]["content"].startswith("You are web shopping.\nI will give you instructions about what to do.")
    assert "Keywords in search are up to you, but the value in click must be a value in the list" in p.turns[0]["content"]
    assert p.turns[0]["content"].endswith("Your response should use the following format:\n\n"
                                          "Thought:\nI think ...\n\nAction:\nclick[something]")
    assert p.turns[1]["content"] == "Ok."
    assert p.turns[2]["content"] == WEBSHOP_FIRST_OBSERVATION
    assert p.turns[-1]["content"] == ("Thought:\nI think I should click on the 'Buy Now' button to purchase the product."
                                      "\n\nAction:\nclick[Buy Now]")
    # AgentBench's action regex reads the expected action out of every agent turn of the shot
    actions = [re.search(r"[Aa]ction: *\n* *((search|click)\[.+?])", t["content"]).group(1)
               for t in p.turns[3::2]]
    assert actions == ["search[l'eau d'issey 6.76 fl oz bottle price < 100.00]", "click[B000VOHH8I]",
                       "click[6.76 fl oz (pack of 1)]", "click[Buy Now]"]
    # every observation: "Observation:\n<page>\n\nAvailable Actions:\n<json>"; clickables elided as in AgentBench
    pages = [t["content"] for t in p.turns[2::2]]
    available = [json.loads(page.split("\n\nAvailable Actions:\n")[1]) for page in pages]
    assert [a["has_search_bar"] for a in available] == [True, False, False, False]
    assert [len(a["clickables"]) for a in available] == [1, 12, 8, 8]   # search / back, next, 10 items / 8 on item page
    assert len(re.findall(r"\[SEP\] (B0[0-9A-Z]{8}) \[SEP\]", pages[1])) == 10
    assert "[SEP] $31.36 [SEP]" in pages[1] and "B000C214CO" in pages[1] and "$53.99" in pages[1]
    assert p.input_prefix == "" and p.joiner == ""
    assert p.user_message("Observation:\nx") == "Observation:\nx"


def test_mind2web_prompt_matches_agentbench_cot_shots():
    p = load_prompt("mind2web")
    assert len(p.turns) == 6                      # 3 shots of (question, answer)
    answers = [re.search(r"Answer: ([A-F])\.", t["content"]).group(1) for t in p.turns[1::2]]
    assert answers == ["C", "A", "D"]
    assert p.turns[1]["content"] == ("Thought: I need to select pickup restaurant first.\nAnswer: C.\n"
                                     "Action: SELECT\nValue: Pickup")
    assert p.turns[3]["content"] == ("Thought: There are no elements that allow setting the date or viewing the fare, "
                                     "so there is no correct action.\nAnswer: A.")
    assert p.turns[5]["content"] == ("Thought: The search has already been set to Brooklyn. Next, I should choose "
                                     "pick-up date.\nAnswer: D.\nAction: CLICK")
    for turn, task in zip(p.turns[0::2], MIND2WEB_TASKS):
        text = turn["content"]
        assert text.startswith("'''\n<html>") and "</html>\n'''\n\nBased on the HTML webpage above" in text
        assert f"\nTask: {task}\nPrevious actions:\n" in text
        assert "please select A. 'None of the above'):\n\nA. None of the above\nB. " in text
        assert re.findall(r"^([A-D])\. ", text, re.M) == ["A", "B", "C", "D"]
    combobox = "[combobox]  Enter your departing city, airport name, or airpor... -> TYPE: SPRINGFIELD\n"
    assert combobox in p.turns[2]["content"]
    assert p.input_prefix == "" and p.joiner == ""


def test_example_inputs_of_shipped_prompts():
    assert example_inputs(load_prompt("os")) == [OS_QUESTION]
    assert example_inputs(load_prompt("webshop")) == [WEBSHOP_FIRST_OBSERVATION]
    m2w = load_prompt("mind2web")
    assert example_inputs(m2w) == [m2w.turns[0]["content"], m2w.turns[2]["content"], m2w.turns[4]["content"]]


# --- the parser on hand-written text -------------------------------------------------------------------------------

SMALL = """<USER>:
Answer with one word.

Rules:
  - be short

<AGENT>:
Ok.

<USER>:
Capital of France?
<AGENT>:
Paris


<USER>:
Question:
"""


def test_small_prompt_exact_messages():
    p = parse_prompt(SMALL, source="dir/small.txt")
    assert p.turns == [
        {"role": "user", "content": "Answer with one word.\n\nRules:\n  - be short"},
        {"role": "assistant", "content": "Ok."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ]
    assert p.input_prefix == "Question:" and p.joiner == "\n\n" and p.name == "small" and p.path == "dir/small.txt"
    assert p.messages("Capital of Peru?") == p.turns + [{"role": "user", "content": "Question:\n\nCapital of Peru?"}]
    assert p.text == ("<USER>:\nAnswer with one word.\n\nRules:\n  - be short\n\n<AGENT>:\nOk.\n\n<USER>:\n"
                      "Capital of France?\n\n<AGENT>:\nParis\n\n<USER>:\nQuestion:")
    assert example_inputs(p) == ["Capital of France?"]   # the user turn after the "Ok." acknowledgement


def test_messages_returns_copies_and_empty_slot():
    p = parse_prompt("<USER>:\nhi\n<AGENT>:\nhello\n<USER>:\n")
    msgs = p.messages("next")
    msgs[0]["content"] = "changed"
    assert p.turns[0]["content"] == "hi"
    assert msgs[-1] == {"role": "user", "content": "next"} and p.joiner == ""
    assert p.text == "<USER>:\nhi\n\n<AGENT>:\nhello\n\n<USER>:"
    assert example_inputs(p) == ["hi"]                   # no prefix, no acknowledgement: every user turn


def test_crlf_and_bom_parse_like_lf(tmp_path):
    path = tmp_path / "win.txt"
    path.write_bytes(b"\xef\xbb\xbf" + SMALL.replace("\n", "\r\n").encode("utf-8"))
    p, ref = load_prompt(path), parse_prompt(SMALL)
    assert p.turns == ref.turns and p.input_prefix == ref.input_prefix and p.text == ref.text


MALFORMED = [
    ("just some text\nwith no markers\n", 1, "no <USER>: or <AGENT>: marker"),
    ("", 1, "no <USER>: or <AGENT>: marker"),
    ("\nhello\n<USER>:\nhi\n<AGENT>:\nok\n<USER>:\n", 2, "text before the first"),
    ("<USER>:\nhi\n<AGENT>:\n\n\n<USER>:\n", 3, "empty <AGENT>: turn"),
    ("<USER>:\n\n<AGENT>:\nok\n<USER>:\n", 1, "empty <USER>: turn"),
    ("<USER>:\nhi\n\n<USER>:\nagain\n<AGENT>:\nok\n<USER>:\n", 4, "two <USER>: turns in a row"),
    ("<USER>:\nhi\n<AGENT>:\nok\n<AGENT>:\nmore\n<USER>:\n", 5, "two <AGENT>: turns in a row"),
    ("<AGENT>:\nhello\n<USER>:\n", 1, "first turn must be <USER>:"),
    ("<USER>:\nhi\n<AGENT>:\nok\n", 3, "last block must be <USER>:"),
    ("<USER>:\nhi\n<AGENT>: ok\n<USER>:\n", 3, "text on the marker line"),
    ("<USER>:\nhi\x00there\n<AGENT>:\nok\n<USER>:\n", 2, "NUL byte"),
]


@pytest.mark.parametrize("text,line,problem", MALFORMED)
def test_malformed_text_names_line_and_problem(text, line, problem):
    with pytest.raises(PromptFileError) as info:
        parse_prompt(text, source="bad.txt")
    message = str(info.value)
    assert message.startswith(f"bad.txt, line {line}: ") and problem in message
    assert info.value.line == line and isinstance(info.value, ValueError)


def test_file_errors_name_file_and_line(tmp_path):
    with pytest.raises(PromptFileError, match="missing.txt: file not found"):
        load_prompt(tmp_path / "missing.txt")
    with pytest.raises(PromptFileError, match="is a directory"):
        load_prompt(tmp_path)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("<USER>:\nhi\n<AGENT>:\ncaf\xe9\n<USER>:\n".encode("latin-1"))
    with pytest.raises(PromptFileError, match=r"latin1.txt, line 4: not valid UTF-8 \(byte 0xe9"):
        load_prompt(bad)
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"<USER>:\n\x89PNG\x00\x00\x01")
    with pytest.raises(PromptFileError, match=r"blob.bin, line 2: NUL byte"):
        load_prompt(binary)


def test_check_fits():
    p = parse_prompt(SMALL, source="small.txt")
    check_fits(p, n_tokens=1000, max_len=2048)
    with pytest.raises(PromptFileError) as info:
        check_fits(p, n_tokens=1593, max_len=1024)
    assert "small.txt" in str(info.value) and "1593" in str(info.value) and "1024" in str(info.value)
    with pytest.raises(PromptFileError):
        check_fits(p, n_tokens=2048, max_len=2048)      # no room left for the input


def test_agent_prompt_is_plain_data():
    p = AgentPrompt(turns=[], input_prefix="", joiner="", path="x", name="x", text="<USER>:")
    assert p.messages("hi") == [{"role": "user", "content": "hi"}]


def test_import_pulls_in_no_torch_and_no_project_module():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys, prompts; bad = [m for m in ('torch', 'model', 'tokenizer', 'synth', 'loss', 'train') "
            "if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

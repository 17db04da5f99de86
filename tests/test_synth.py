"""Tests for synth.py (paper section 5, appendix A): the role swap, the role-play loop, prefix caching of
chats, durable/resumable stages and the quality metrics. A tiny random Llama stands in for the model.

    .venv/bin/python -m pytest tests/test_synth.py -q
"""
import json

import pytest
import torch

import synth
from conftest import save_tiny_llama
from prompts import load_prompt, parse_prompt
from synth import END, GENERIC, TASKS

TOY = """<USER>:
You are a toy agent. Answer with Action: go[place].

<AGENT>:
Ok.

<USER>:
Observation: room one

<AGENT>:
Action: go[north]

<USER>:
Observation: room two

<AGENT>:
Action: stop[]

<USER>:
"""
TINY = dict(batch_size=2, per_call=2, input_tokens=300, agent_tokens=6, env_tokens=6, output_tokens=6,
            reason_tokens=6, max_turns=2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model runs fastest on one thread; on a shared CPU, spinning OpenMP threads cost ~30x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompt") / "toy.txt"
    path.write_text(TOY)
    return load_prompt(path)


@pytest.fixture(scope="module")
def tiny_long(tmp_path_factory):
    """The tiny random Llama of conftest with a 2,048-token context (its byte-level tokens make chats long)."""
    from model import load_model
    d = tmp_path_factory.mktemp("tiny_long")
    save_tiny_llama(d, max_position_embeddings=2048)
    return load_model(d, dtype=torch.float32, device="cpu")


# --- the role swap (figure 2) ------------------------------------------------------------------------------------

def test_swap_roles_builds_the_environment_prompt(toy):
    assert synth.detect_task(toy) is GENERIC
    assert synth.swap_roles(toy, GENERIC) == [
        {"role": "system", "content": GENERIC.env_system},
        {"role": "user", "content": "Ok."},
        {"role": "assistant", "content": "Observation: room one"},
        {"role": "user", "content": "Action: go[north]"},
        {"role": "assistant", "content": "Observation: room two"},
        {"role": "user", "content": "Action: stop[]"},
        {"role": "assistant", "content": END},
    ]


def test_agent_and_environment_messages(toy):
    conversation = [{"role": "user", "content": "Observation: hall"}, {"role": "assistant", "content": "Action: go[up]"},
                    {"role": "user", "content": "Observation: roof"}, {"role": "assistant", "content": "Action: stop[]"}]
    assert synth.agent_messages(toy, conversation[:3]) == [
        {"role": "user", "content": "You are a toy agent. Answer with Action: go[place]."},
        {"role": "assistant", "content": "Ok."},
        {"role": "user", "content": "Observation: room one"},
        {"role": "assistant", "content": "Action: go[north]"},
        {"role": "user", "content": "Observation: room two"},
        {"role": "assistant", "content": "Action: stop[]"},
        {"role": "user", "content": "Observation: hall"},
        {"role": "assistant", "content": "Action: go[up]"},
        {"role": "user", "content": "Observation: roof"},
    ]
    assert synth.environment_messages(toy, GENERIC, conversation) == synth.swap_roles(toy, GENERIC) + [
        {"role": "assistant", "content": "Observation: hall"},
        {"role": "user", "content": "Action: go[up]"},
        {"role": "assistant", "content": "Observation: roof"},
        {"role": "user", "content": "Action: stop[]"},
    ]


def test_swap_roles_of_the_os_prompt_drops_the_instruction():
    p = load_prompt("os")
    env = synth.swap_roles(p, TASKS["os"])
    assert [m["role"] for m in env] == ["system"] + ["user", "assistant"] * 3
    assert env[1]["content"].startswith("Think: To count the files in /etc")
    assert env[2]["content"].startswith("The output of the OS:\ncpi cron.hourly")
    assert env[4]["content"] == "The output of the OS:\n220"
    assert env[5]["content"] == "Think: Now I get the answer, it is 220.\n\nAct: answer(220)"
    assert env[6]["content"] == END


# --- the role-play loop --------------------------------------------------------------------------------------------

def scripted(replies):
    """A reply function that answers each conversation from a script keyed by its first message."""
    calls = []

    def reply(conversations, last_turn=False):
        calls.append([c[0]["content"] for c in conversations])
        return [replies[c[0]["content"]][(len(c) - 1) // 2] for c in conversations]
    return reply, calls


def test_roleplay_ends_on_the_end_token_and_on_max_turns():
    agent, agent_calls = scripted({"a": ["a1", "a2", "a3"], "b": ["b1", "b2", "b3"]})
    env, _ = scripted({"a": ["oa1", f"done {END}", "x"], "b": ["ob1", "ob2", "ob3"]})
    out = synth.roleplay(["a", "b"], agent, env, max_turns=3)
    assert out[0] == {"turns": 2, "ended_by": "end_token", "conversation": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "oa1"}, {"role": "assistant", "content": "a2"}]}
    assert out[1] == {"turns": 3, "ended_by": "max_turns", "conversation": [
        {"role": "user", "content": "b"}, {"role": "assistant", "content": "b1"}, {"role": "user", "content": "ob1"},
        {"role": "assistant", "content": "b2"}, {"role": "user", "content": "ob2"},
        {"role": "assistant", "content": "b3"}]}                      # ob3 (after the last allowed turn) is dropped
    assert agent_calls == [["a", "b"], ["a", "b"], ["b"]]             # a finished conversation leaves the batch


def test_roleplay_with_one_turn_asks_the_environment_once():
    agent, _ = scripted({"a": ["a1"]})
    env, env_calls = scripted({"a": [END]})
    out = synth.roleplay(["a"], agent, env, max_turns=1)
    assert out[0]["ended_by"] == "end_token" and out[0]["turns"] == 1 and len(env_calls) == 1


# --- prefix caching of chats ---------------------------------------------------------------------------------------

def test_cached_prefix_plus_continuation_is_the_full_chat(tiny_model, toy):
    from tokenizer import ChatFormat, Tokenizer
    _, tok = tiny_model
    # the same tokenizer with SmolLM2's habit of inserting a default system line
    smol = Tokenizer(tok.backend, ChatFormat(**{**tok.chat.__dict__, "default_system": "You are SmolLM."}))
    conv = [{"role": "user", "content": "Observation: hall"}, {"role": "assistant", "content": "Action: go[up]"}]
    cfg = synth.SynthConfig()
    for t in (tok, smol):
        cases = [(toy.turns, synth.agent_messages(toy, conv[:1])),
                 (synth.swap_roles(toy, GENERIC), synth.environment_messages(toy, GENERIC, conv)),
                 (synth.reason_prefix_messages(toy), synth.reason_messages(toy, "x", "bad", "good")),
                 (synth.input_prefix_messages(toy, GENERIC, cfg), synth.input_prefix_messages(toy, GENERIC, cfg))]
        for prefix_messages, full in cases:
            prefix = t.apply_chat(prefix_messages, add_generation_prompt=False)
            assert prefix + synth.continuation_ids(t, prefix, full) == t.apply_chat(full)
    agent_prefix = smol.apply_chat(toy.turns, add_generation_prompt=False)
    assert smol.decode(agent_prefix).startswith("<|im_start|>system\nYou are SmolLM.<|im_end|>")
    with pytest.raises(ValueError, match="not the start of the chat"):
        synth.continuation_ids(smol, tok.apply_chat(toy.turns, add_generation_prompt=False), toy.messages("x"))


@pytest.mark.parametrize("draft", [0, 4])
def test_cached_personas_reply_like_full_chats(tiny_long, toy, draft):
    """Batched replies with the prefix caches and per-conversation caches kept across turns (each turn
    feeds only its new tokens), with or without prompt-lookup guesses, are the replies of each full chat
    run alone (greedy, one token per step)."""
    model, tok = tiny_long
    cfg = synth.SynthConfig(agent_tokens=24, env_tokens=24, draft_tokens=draft)
    firsts = [toy.user_message("Observation: hall"), toy.user_message("Observation: a longer corridor"),
              toy.user_message("Observation: a room with a very long description of the four walls")]
    cached = synth.roleplay(firsts, *synth.personas(model, tok, toy, GENERIC, cfg, synth.Meter()), max_turns=3)
    plain = synth.personas(model, tok, toy, GENERIC, cfg, synth.Meter(), use_cache=False)
    alone = [synth.roleplay([f], *plain, max_turns=3)[0] for f in firsts]
    assert cached == alone
    assert all(r["turns"] == 3 and r["ended_by"] == "max_turns" for r in cached)


# --- pseudo inputs -------------------------------------------------------------------------------------------------

def test_primed_list_and_parse_items():
    assert synth.primed_list(["i need a", "i want b"], "i need") == "1. i need a\n2. i want b\n3. i need"
    text = " red hat, and price lower than 20.00 dollars\n4. i want blue socks\nsome chatter\n5) i need a lamp"
    assert synth.parse_items("i need", text, finished=True) == [
        "i need red hat, and price lower than 20.00 dollars", "i want blue socks", "i need a lamp"]
    assert synth.parse_items("i need", text, finished=False)[-1] == "i want blue socks"   # the cut item goes


def test_accept_items_counts_rejections():
    task = TASKS["webshop"]
    pool = ["i need a red hat, and price lower than 20.00 dollars"]
    rounds = [{"round": 0, "rows": [{"start": "i need", "finished": True, "text":
               " a red hat, and price lower than 20.00 dollars\n3. i want blue socks, and price lower than 10.00 "
               "dollars\n4. I want blue socks, and price lower than 10.00 dollars.\n5. \n6. Buy 3 things <b>\n7. i "
               + "x" * 300}]}]
    accepted, rejected = synth.accept_items(task, rounds, pool)
    assert accepted == ["i want blue socks, and price lower than 10.00 dollars"]
    assert rejected == {"empty": 1, "too long": 1, "invalid": 1, "duplicate": 2}


def test_webshop_and_mind2web_inputs_keep_the_prompt_format():
    ws = load_prompt("webshop")
    obs = synth.input_of_item(TASKS["webshop"], ws, "i need a lamp, and price lower than 30.00 dollars", 0)
    assert obs == ('Observation:\n"WebShop [SEP] Instruction: [SEP] i need a lamp, and price lower than 30.00 dollars '
                   '[SEP] Search"\n\nAvailable Actions:\n{"has_search_bar": true, "clickables": ["search"]}')
    assert synth.item_of_input(TASKS["webshop"], obs) == "i need a lamp, and price lower than 30.00 dollars"
    m2w = load_prompt("mind2web")
    page = synth.input_of_item(TASKS["mind2web"], m2w, "Find a red car in Boston", 1)
    assert "Task: Find a red car in Boston\nPrevious actions:\nNone\nWhat should be the next action?" in page
    assert "B. <li id=0 tab heading level 3 search and> <span> Hotel" in page and "SPRINGFIELD" not in page
    assert synth.item_of_input(TASKS["mind2web"], page) == "Find a red car in Boston"


# --- quality metrics (Table 4) -------------------------------------------------------------------------------------

@pytest.mark.parametrize("task,reply,ok", [
    ("webshop", "Thought:\nI think I should buy.\n\nAction:\nclick[Buy Now]", True),
    ("webshop", "Thought:\nI think I should search.\n\nAction:\nsearch[red lamp]", True),
    ("webshop", "I would buy the lamp.", False),
    ("os", "Think: done.\n\nAct: answer(220)", True),
    ("os", "Think: done.\n\nAct: finish", True),
    ("os", "Think: count them.\n\nAct: bash\n\n```bash\nls | wc -l\n```", False),
    ("mind2web", "Thought: pick pickup.\nAnswer: C.\nAction: SELECT\nValue: Pickup", True),
    ("mind2web", "Thought: nothing fits.\nAnswer: A.", True),
    ("mind2web", "Thought: compare.\nAnswer: B.\nAction: COMPARE", False),
])
def test_final_action(task, reply, ok):
    assert synth.final_action_ok(TASKS[task], reply) is ok


def test_quality_report_on_hand_made_conversations(toy):
    convs = [{"conversation": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "Act: finish"}],
              "turns": 1, "ended_by": "end_token"},
             {"conversation": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "Act: bash"},
                               {"role": "user", "content": "o"}, {"role": "assistant", "content": "Act: bash"}],
              "turns": 2, "ended_by": "max_turns"}]
    report = synth.quality_report(load_prompt("os"), TASKS["os"], convs, {}, 2)
    assert report["gold_turns"] == 3 and report["avg_turns"] == 1.5
    assert report["hit_max_turns"] == 0.5 and report["abnormal_termination"] == 0.5
    assert report["abnormal_final_action"] == 0.5
    assert synth.gold_turns(load_prompt("webshop")) == 4 and synth.gold_turns(load_prompt("mind2web")) == 1


# --- durable files -------------------------------------------------------------------------------------------------

def test_torn_last_line_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / "x.jsonl"
    synth.append_jsonl(path, [{"id": 0}, {"id": 1}])
    with open(path, "a") as f:
        f.write('{"id": 2, "conv')
    with pytest.warns(UserWarning, match="line 3: dropped a partial last line"):
        assert synth.read_jsonl(path) == [{"id": 0}, {"id": 1}]
    synth.append_jsonl(path, [{"id": 2}])                     # the file was cut back, so appending is clean
    assert synth.read_jsonl(path) == [{"id": 0}, {"id": 1}, {"id": 2}]
    path.write_text('{"id": 0}\nnot json\n{"id": 2}\n')
    with pytest.raises(ValueError, match=r"x.jsonl, line 2: not a JSON record"):
        synth.read_jsonl(path)


def test_read_demos(tmp_path):
    path = tmp_path / "demos.jsonl"
    path.write_text('i need socks\n"i need a hat"\n{"input": "i need a lamp"}\n\n')
    assert synth.read_demos(path) == ["i need socks", "i need a hat", "i need a lamp"]
    path.write_text('i need socks\n{"text": 3}\n')
    with pytest.raises(ValueError, match="demos.jsonl, line 2"):
        synth.read_demos(path)


# --- the whole pipeline: resume, determinism, settings -------------------------------------------------------------

def run(model, tok, prompt, out, **kw):
    return synth.synthesize(prompt, out, 4, model, tok, quiet=True, **{**TINY, **kw})


def stopper(after):
    """on_write callback that interrupts the run after `after` durable writes."""
    count = [0]

    def on_write(stage, records):
        count[0] += 1
        if count[0] == after:
            raise KeyboardInterrupt
    return on_write


def interrupt_at(stage_name):
    def on_write(stage, records):
        if stage == stage_name:
            raise KeyboardInterrupt
    return on_write


def test_interrupted_runs_resume_to_the_same_records(tiny_long, toy, tmp_path):
    model, tok = tiny_long
    reference = run(model, tok, toy, tmp_path / "ref")
    assert [r["id"] for r in reference] == [0, 1, 2, 3]
    assert all(r["turns"] == 2 and r["conversation"][1]["content"] == r["teacher_output"] for r in reference)
    assert len({r["item"] for r in reference}) == 4
    writes = []
    run(model, tok, toy, tmp_path / "count", on_write=lambda stage, recs: writes.append(stage))
    assert writes.count("conversations") == writes.count("outputs") == writes.count("reasons") == 2
    for k in (1, writes.index("conversations") + 1, len(writes) - 1):     # in inputs, role-play, reasons
        out = tmp_path / f"stop{k}"
        with pytest.raises(KeyboardInterrupt):
            run(model, tok, toy, out, on_write=stopper(k))
        assert not (out / "data.jsonl").exists()
        assert run(model, tok, toy, out) == reference
        for name in ("conversations.jsonl", "outputs.jsonl", "reasons.jsonl"):
            assert [r["id"] for r in synth.read_jsonl(out / name)] == [0, 1, 2, 3]     # nothing twice, nothing lost
    assert (tmp_path / "ref" / "data.jsonl").read_text() == (out / "data.jsonl").read_text()
    quality = json.loads((tmp_path / "ref" / "quality.json").read_text())
    assert quality["samples"] == 4 and quality["hit_max_turns"] == 1.0 and quality["avg_turns"] == 2


def test_spare_inputs_come_from_stage_1_only(tiny_long, toy, tmp_path):
    """train.py's held-out inputs: made with the n, never role-played; the n samples are the same
    inputs as a run without spares, and a directory from before the setting existed still matches."""
    model, tok = tiny_long
    out = tmp_path / "spare"
    records = run(model, tok, toy, out, spare_inputs=2)
    made = synth.read_jsonl(out / "inputs.jsonl")
    assert [r["id"] for r in records] == [0, 1, 2, 3] and len(made) == 6
    assert [r["input"] for r in records] == [r["input"] for r in made[:4]]
    assert synth.spare_inputs(out) == [r["input"] for r in made[4:]]
    assert not {r["input"] for r in made[4:]} & {r["input"] for r in records}
    for name in ("conversations.jsonl", "outputs.jsonl", "reasons.jsonl"):
        assert [r["id"] for r in synth.read_jsonl(out / name)] == [0, 1, 2, 3]
    plain = tmp_path / "plain"
    assert [r["input"] for r in run(model, tok, toy, plain)] == [r["input"] for r in records]
    settings = json.loads((plain / "settings.json").read_text())
    del settings["spare_inputs"]                                             # written by an older version
    (plain / "settings.json").write_text(json.dumps(settings))
    assert run(model, tok, toy, plain) == run(model, tok, toy, tmp_path / "plain2")


def test_a_torn_record_is_redone(tiny_long, toy, tmp_path):
    model, tok = tiny_long
    reference = run(model, tok, toy, tmp_path / "ref")
    out = tmp_path / "torn"
    with pytest.raises(KeyboardInterrupt):
        run(model, tok, toy, out, on_write=interrupt_at("outputs"))
    lines = (out / "conversations.jsonl").read_text().splitlines(keepends=True)
    (out / "conversations.jsonl").write_text("".join(lines[:-1]) + lines[-1][:20])    # a crash mid-write
    with pytest.warns(UserWarning, match="partial last line"):
        assert run(model, tok, toy, out) == reference


def test_other_settings_on_an_existing_directory_are_an_error(tiny_long, toy, tmp_path):
    model, tok = tiny_long
    synth.check_settings(tmp_path, {"seed": 0, "n": 4, "prompt_path": "a"}, overwrite=False)
    synth.check_settings(tmp_path, {"seed": 0, "n": 4, "prompt_path": "b"}, overwrite=False)   # a moved file is fine
    with pytest.raises(synth.SettingsMismatch, match=r"seed: 0 -> 1.*--overwrite"):
        synth.check_settings(tmp_path, {"seed": 1, "n": 4, "prompt_path": "a"}, overwrite=False)
    (tmp_path / "data.jsonl").write_text("{}\n")
    synth.check_settings(tmp_path, {"seed": 1, "n": 4, "prompt_path": "a"}, overwrite=True)
    assert not (tmp_path / "data.jsonl").exists()
    assert json.loads((tmp_path / "settings.json").read_text())["seed"] == 1
    out = tmp_path / "run"
    run(model, tok, toy, out)
    with pytest.raises(synth.SettingsMismatch, match="max_turns: 2 -> 3"):
        run(model, tok, toy, out, max_turns=3)


def test_too_few_valid_inputs_is_one_clear_error(tiny_long, tmp_path):
    model, tok = tiny_long
    prompt = parse_prompt(TOY.replace("toy agent", "shop"))
    with pytest.raises(RuntimeError, match=r"only \d of 4 valid inputs after 1 rounds"):
        run(model, tok, prompt, tmp_path, task="webshop", max_input_rounds=1)


def test_cached_replier_when_conversations_leave_the_batch(tiny_long, toy):
    """A conversation that ended leaves the batch; the others keep their cached rows and still reply
    exactly as their full chats do."""
    model, tok = tiny_long
    build = lambda c: synth.agent_messages(toy, c)
    cached = synth.model_replier(model, tok, build, toy.turns, 6, (), synth.Meter())
    plain = synth.model_replier(model, tok, build, toy.turns, 6, (), synth.Meter(), use_cache=False)
    convs = [[{"role": "user", "content": toy.user_message(x)}] for x in ("a", "b c d e f", "g h")]
    for turn, rows in enumerate(([0, 1, 2], [0, 2], [2])):
        batch = [convs[i] for i in rows]
        got = cached(batch)
        assert got == [plain([c])[0] for c in batch]
        for c, text in zip(batch, got):
            c += [{"role": "assistant", "content": text}, {"role": "user", "content": f"Observation: {turn} " * 3}]

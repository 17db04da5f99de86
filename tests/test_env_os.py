"""Tests for agentbench_env/os_env.py: AgentBench v0.2 OS interaction (paper section 6.1, appendix B) in bwrap.

Run: .venv/bin/python -m pytest tests/test_env_os.py   (needs bubblewrap; sandbox tests skip without it)
"""
import json
import os
import time

import pytest

from agentbench_env import make
from agentbench_env import os_env
from agentbench_env.os_env import (EMPTY_OUTPUT, OUTPUT_PREFIX, TRUNCATED, OSEnv, SandboxError, TaskFormatError,
                                   compare, format_output, load_tasks, parse_action)

DEV_TASKS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "agentbench_os_dev.json")
SHIPPED = json.load(open(os_env.DEFAULT_TASKS))
FAST_DIR = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None   # sandboxes on tmpfs: 5x faster set-up


def bash(code):
    return f"Think: let me run it.\n\nAct: bash\n\n```bash\n{code}\n```"


def answer(text):
    return f"Think: now I know.\n\nAct: answer({text})"


def output_of(obs):
    assert obs == EMPTY_OUTPUT or obs.startswith(OUTPUT_PREFIX), obs
    return obs[len(OUTPUT_PREFIX):] if obs.startswith(OUTPUT_PREFIX) else ""


def write_tasks(tmp_path, tasks, name="tasks.json"):
    path = tmp_path / name
    path.write_text(json.dumps(tasks))
    return str(path)


def new_env(tasks_file=None, **kw):
    try:
        return OSEnv(tasks_file, sandbox_dir=FAST_DIR, **kw)
    except SandboxError as e:
        pytest.skip(f"bubblewrap sandbox not usable here: {e}")


def simple_task(description="d", init="true", start=None):
    task = {"description": description, "create": {"local": "default", "init": {"code": init}},
            "evaluation": {"match": "ok"}, "labels": []}
    if start:
        task["start"] = start
    return task


# ---------------------------------------------------------------- parsing, formatting, judging (no sandbox)

def test_parse_action_follows_agentbench():
    assert parse_action("Think: x\n\nAct: bash\n\n```bash\nls /\n```") == ("bash", "ls /")
    assert parse_action("Act: bash\n```bash\na\n```\ntext\n```bash\nb\n```") == ("bash", "a\n\nb")
    assert parse_action("Think: done.\n\nAct: answer(42)") == ("commit", "42")
    assert parse_action("Act: answer(f(x) = (1))") == ("commit", "f(x) = (1)")     # first ( to last )
    assert parse_action("Act: finish") == ("commit", None)
    # the last Act: line counts
    assert parse_action("Act: bash\n```bash\nls\n```\nAct: answer(7)") == ("commit", "7")
    assert parse_action("Act: answer(7)\nAct: bash\n```bash\nls\n```") == ("bash", "ls")
    # answer without parentheses is skipped, an earlier valid action counts
    assert parse_action("Act: finish\nAct: answer 7") == ("commit", None)
    assert parse_action("The answer is 5.") == (None, None)
    assert parse_action("Act: dance") == (None, None)


def test_format_output_truncates_at_800_to_780():
    assert format_output("") == "The output of the OS is empty."
    assert format_output("hi") == "The output of the OS:\n\nhi"
    assert format_output("a" * 800) == OUTPUT_PREFIX + "a" * 800
    long = "".join(chr(ord("a") + k % 26) for k in range(801))
    assert format_output(long) == OUTPUT_PREFIX + long[:780] + "\n[truncated because the output is too long]"
    assert TRUNCATED == "\n[truncated because the output is too long]"


def test_builtin_checks_match_agentbench_scripts():
    assert compare("integer-match", "5", "5\n") and compare("integer-match", " 12 ", "12")
    assert not compare("integer-match", "5.0", "5") and not compare("integer-match", "five", "5")
    assert compare("string-match", "abc\r\n", " abc\n") and not compare("string-match", "abc", "abd")
    assert compare("size-match", "4.0K", "4096") and compare("size-match", "8K", "8.0K\n")
    assert compare("size-match", "1M", "1024K") and compare("size-match", "12", "12B")
    assert not compare("size-match", "4K", "5K") and not compare("size-match", "big", "4K")
    assert compare("containing", "the answer is 42 here", "42\n") and not compare("containing", "4", "42")
    assert compare("in", "42", "the answer is 42 here") and not compare("in", "42 here!", "42 here")


@pytest.mark.parametrize("task, field", [
    ({"create": {}, "evaluation": {"match": "x"}}, "description"),
    ({"description": "d", "create": [None], "evaluation": {"match": "x"}}, "create"),
    ({"description": "d", "evaluation": {}}, "evaluation"),
    ({"description": "d"}, "evaluation"),
    ({"description": "d", "evaluation": {"match": 3}}, "evaluation.match"),
    ({"description": "d", "evaluation": {"match": {"regex": "("}}}, "evaluation.match.regex"),
    ({"description": "d", "evaluation": {"check": [None, {"language": "python", "file": "check/integer-match.py"}]}},
     "evaluation.example"),
    ({"description": "d", "create": {"init": {"file": "init/missing.sh"}}, "evaluation": {"match": "x"}},
     "create.init[0].file"),
    ({"description": "d", "create": {"init": {"language": "c", "code": "int main(){}"}}, "evaluation": {"match": "x"}},
     "create.init[0].language"),
    ({"description": "d", "evaluation": {"check": [{"file": "check/0.sh"}]}}, "evaluation.check[0].file"),
    ({"description": "d", "evaluation": {"check": [{"language": "python", "file": "check/integer-match.py"}]}},
     "evaluation.check[0]"),
    ({"description": "d", "start": 5, "evaluation": {"match": "x"}}, "start"),
])
def test_malformed_task_gives_one_clear_error(tmp_path, task, field):
    path = write_tasks(tmp_path, [simple_task(), task])
    with pytest.raises(TaskFormatError) as e:
        load_tasks(path)
    assert f"task 1: field '{field}'" in str(e.value) and path in str(e.value)
    tasks, configs, skipped = load_tasks(path, skip_invalid=True)
    assert len(tasks) == 1 and [i for i, _ in skipped] == [1]


def test_unreadable_task_file_is_a_clear_error(tmp_path):
    with pytest.raises(TaskFormatError, match="cannot read task file"):
        load_tasks(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(TaskFormatError, match="bad.json"):
        load_tasks(str(tmp_path / "bad.json"))


def test_known_check_files_map_to_builtins_and_formats_are_read(tmp_path):
    task = {"description": "d", "create": {"init": "echo 1 > /root/a"}, "start": {"code": "sleep 9 &"},
            "evaluation": {"check": {"language": "python", "file": "whatever/dir/size-match.py"}}}
    with pytest.raises(TaskFormatError, match="needs an earlier step"):
        load_tasks(write_tasks(tmp_path, [task]))
    task["evaluation"] = {"check": [None, {"language": "python", "file": "check/in.py"}], "example": "echo hi"}
    _, [config], _ = load_tasks(write_tasks(tmp_path, [task]))
    assert config["init"] == [("bash", "echo 1 > /root/a")] and config["start"] == ("bash", "sleep 9 &")
    assert config["check"] == [None, ("check", "in")] and config["example"] == ("bash", "echo hi")
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text(json.dumps(task) + "\n" + json.dumps(simple_task()) + "\n")
    assert len(load_tasks(str(jsonl))[0]) == 2


def test_shipped_task_set_shape():
    assert len(SHIPPED) >= 40
    labels = {label for task in SHIPPED for label in task["labels"]}
    assert {"count", "search", "user", "permission", "text", "process"} <= labels
    for task in SHIPPED:
        assert task["create"]["init"]["code"].strip() and task["evaluation"]["example"]["code"].strip()
    with_example_check = [t for t in SHIPPED if t["evaluation"].get("check", [0])[0] is None]
    assert len(with_example_check) > len(SHIPPED) // 2
    assert sum("match" in t["evaluation"] for t in SHIPPED) >= 3


def test_make_builds_by_name(tmp_path):
    with pytest.raises(ValueError, match="unknown AgentBench environment"):
        make("nope")
    try:
        env = make("os", tasks_file=write_tasks(tmp_path, [simple_task("just one")]))
    except SandboxError as e:
        pytest.skip(f"bubblewrap sandbox not usable here: {e}")
    assert isinstance(env, OSEnv) and len(env.tasks) == 1


# ---------------------------------------------------------------- every shipped task, replayed

@pytest.fixture(scope="module")
def shipped():
    env = new_env(timeout=10)
    yield env
    env.close()


def wrong_answer_for(out):
    return str(int(out) + 1) if out.strip().lstrip("-").isdigit() else "no idea"


def sampled(n, every):
    """Indices 0..n-1; every `every`-th runs in the fast suite, the rest are marked slow."""
    return [pytest.param(i, marks=() if i % every == 0 else pytest.mark.slow) for i in range(n)]


@pytest.mark.parametrize("i", sampled(len(SHIPPED), 6))
def test_shipped_reference_solution_scores_one_and_wrong_answer_zero(shipped, i):
    evaluation = SHIPPED[i]["evaluation"]
    assert shipped.reset(i) == SHIPPED[i]["description"]
    obs, done, score = shipped.step(bash(evaluation["example"]["code"]))
    assert not done and score is None
    out = output_of(obs)
    assert shipped.step(answer(out)) == (None, True, 1.0)
    if isinstance(evaluation.get("match"), str):
        shipped.reset(i)
        assert shipped.step(answer(evaluation["match"])) == (None, True, 1.0)
    shipped.reset(i)          # fresh sandbox: for operation tasks the wrong answer skips the operation
    assert shipped.step(answer(wrong_answer_for(out))) == (None, True, 0.0)


# ---------------------------------------------------------------- episode rules

def test_round_limit_and_invalid_reply(tmp_path):
    env = new_env(write_tasks(tmp_path, [simple_task()]))
    env.reset(0)
    for _ in range(7):
        assert env.step(bash("echo hi")) == (OUTPUT_PREFIX + "hi", False, None)
    assert env.step(bash("echo hi")) == (None, True, 0.0)       # 8th round: limit reached
    with pytest.raises(RuntimeError, match="reset"):
        env.step(answer("ok"))
    env.reset(0)
    assert env.step("I believe the answer is ok.") == (None, True, 0.0)    # no parsable action
    env.reset(0)
    assert env.step("Act: answer( ok )") == (None, True, 1.0)              # match strips
    env.reset(0)
    assert env.step("Act: finish") == (None, True, 0.0)
    with pytest.raises(IndexError, match="out of range"):
        env.reset(1)
    env.close()


def test_output_formatting_through_the_sandbox(tmp_path):
    env = new_env(write_tasks(tmp_path, [simple_task()]))
    env.reset(0)
    assert env.step(bash("true"))[0] == EMPTY_OUTPUT
    assert env.step(bash("printf 'a%.0s' $(seq 800)"))[0] == OUTPUT_PREFIX + "a" * 800
    assert env.step(bash("printf 'a%.0s' $(seq 801)"))[0] == OUTPUT_PREFIX + "a" * 780 + TRUNCATED
    assert env.step(bash("echo out; echo err >&2"))[0] == OUTPUT_PREFIX + "out\nerr"
    assert env.step(bash("echo 'it''s' \"$((6 * 7))\" é; (exit 3)"))[0] == OUTPUT_PREFIX + "its 42 é"
    env.close()


def test_state_and_start_program_persist_between_rounds(tmp_path):
    start = "(while true; do echo x >> /root/tick; sleep 0.2; done) &"
    env = new_env(write_tasks(tmp_path, [simple_task(init="mkdir /root/work", start=start)]))
    env.reset(0)
    env.step(bash("cd /root/work && echo 5 > n && export SEEN=yes"))
    assert env.step(bash("pwd; cat n; echo $SEEN"))[0] == OUTPUT_PREFIX + "/root/work\n5\nyes"
    first = int(output_of(env.step(bash("wc -l < /root/tick"))[0]))
    time.sleep(0.7)
    second = int(output_of(env.step(bash("wc -l < /root/tick"))[0]))
    assert first >= 1 and second >= first + 2          # the start program kept writing between rounds
    root = env.sandbox.root
    env.reset(0)                                       # a fresh sandbox: nothing carried over
    assert env.sandbox.root != root and not os.path.exists(root)
    assert output_of(env.step(bash("ls /root/work; test -e /root/work/n || echo gone"))[0]) == "gone"
    env.close()


def test_custom_check_script_from_tasks_dir(tmp_path):
    (tmp_path / "check").mkdir()
    (tmp_path / "check" / "same-words.sh").write_text('[ "$(echo $1)" = "$(echo $2)" ]')
    task = {"description": "Which words are in /root/w?", "create": {"init": {"code": "echo 'a  b\nc' > /root/w"}},
            "evaluation": {"check": [None, {"file": "check/same-words.sh"}], "example": {"code": "cat /root/w"}}}
    path = write_tasks(tmp_path, [task])
    with pytest.raises(TaskFormatError, match="check/same-words.sh"):
        load_tasks(path)
    env = new_env(path, tasks_dir=str(tmp_path))
    env.reset(0)
    assert env.step(answer("a b c"))[2] == 1.0     # script got the answer and the example's output
    env.reset(0)
    assert env.step(answer("a b"))[2] == 0.0
    env.close()


# ---------------------------------------------------------------- sandbox safety

def test_rm_rf_root_leaves_host_untouched(tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text("still here")
    env = new_env(write_tasks(tmp_path, [simple_task(), simple_task()]), timeout=20)
    env.reset(0)
    env.step(bash(f"rm -rf --no-preserve-root / 2>/dev/null; rm -rf {tmp_path} /usr/bin/ls 2>/dev/null; echo done"))
    assert canary.read_text() == "still here" and os.path.exists("/usr/bin/ls") and os.path.exists("/etc/passwd")
    env.reset(1)                                       # the next task runs normally
    assert env.step(bash("ls -d /usr/bin /root; echo ok > /root/x; cat /root/x"))[0] == \
        OUTPUT_PREFIX + "/root\n/usr/bin\nok"
    assert env.step(answer("ok"))[2] == 1.0


def test_writes_outside_the_sandbox_fail_or_stay_inside(tmp_path):
    env = new_env(write_tasks(tmp_path, [simple_task()]))
    env.reset(0)
    out = output_of(env.step(bash(f"mkdir -p {tmp_path} && echo x > {tmp_path}/escape.txt && echo wrote;"
                                  " echo y > /usr/bin/escape; ls /work 2>&1 | head -1"))[0])
    assert out.startswith("wrote") and "Read-only file system" in out and "No such file" in out
    assert not (tmp_path / "escape.txt").exists() and not os.path.exists("/usr/bin/escape")
    assert os.path.exists(os.path.join(env.sandbox.root, str(tmp_path).lstrip("/"), "escape.txt"))
    env.close()


def test_no_network(tmp_path):
    env = new_env(write_tasks(tmp_path, [simple_task()]))
    env.reset(0)
    code = "import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('1.1.1.1', 80))"
    out = output_of(env.step(bash(f"python3 -c \"{code}\"; echo rc=$?"))[0])
    assert "Network is unreachable" in out and out.endswith("rc=1")
    env.close()


def test_fork_bomb_is_contained(tmp_path):
    env = new_env(write_tasks(tmp_path, [simple_task(), simple_task()]), timeout=3, max_procs=64)
    env.reset(0)
    started = time.monotonic()
    env.step(bash(":(){ :|:& };:"))
    time.sleep(0.5)
    assert len(os_env._descendants(env.sandbox.proc.pid)) <= 64 + 3     # bwrap, its init, the shell
    env.step(bash("echo alive > /root/alive"))                          # builtins need no fork
    with open(os.path.join(env.sandbox.root, "root", "alive")) as f:
        assert f.read() == "alive\n"
    pid = env.sandbox.proc.pid
    env.reset(1)
    assert not os_env._descendants(pid)                                  # everything was killed
    assert env.step(bash("echo fine"))[0] == OUTPUT_PREFIX + "fine"
    assert time.monotonic() - started < 20
    env.close()


def test_hanging_command_is_cut_at_the_timeout(tmp_path):
    env = new_env(write_tasks(tmp_path, [simple_task(start="sleep 300 &")]), timeout=1)
    env.reset(0)
    started = time.monotonic()
    assert output_of(env.step(bash("touch /root/before; echo waiting; sleep 100"))[0]) == "waiting"
    assert 1 <= time.monotonic() - started < 4
    # the killed command was the sleep only: the start program still runs
    assert output_of(env.step(bash("ls /root; pgrep -fx 'sleep 300' >/dev/null && echo bg"))[0]) == "before\nbg"
    started = time.monotonic()
    env.step(bash("while true; do :; done"))         # a builtin loop: the shell itself is replaced
    assert time.monotonic() - started < 6
    assert output_of(env.step(bash("ls /root"))[0]) == "before"       # files survive
    env.close()


def test_output_flood_is_truncated(tmp_path):
    env = new_env(write_tasks(tmp_path, [simple_task()]), timeout=2)
    env.reset(0)
    started = time.monotonic()
    assert env.step(bash("yes"))[0] == OUTPUT_PREFIX + "y\n" * 390 + TRUNCATED
    assert time.monotonic() - started < 6
    assert env.step(bash("head -c 10000000 /dev/zero | tr '\\0' b"))[0] == OUTPUT_PREFIX + "b" * 780 + TRUNCATED
    env.close()


def test_missing_bwrap_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(os_env, "_SANDBOX_CHECKED", False)
    monkeypatch.setattr(os_env.shutil, "which", lambda name: None)
    with pytest.raises(SandboxError, match="bubblewrap"):
        OSEnv(write_tasks(tmp_path, [simple_task()]))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxError, match="not installed"):
        os_env.Sandbox(parent_dir=FAST_DIR)


# ---------------------------------------------------------------- AgentBench's own dev tasks

DEV_SKIPPED = {3: "evaluation.check[0].file", 5: "evaluation.check[0].file", 10: "create", 25: "create.init[0].file"}


@pytest.fixture(scope="module")
def dev():
    if not os.path.exists(DEV_TASKS):
        pytest.skip("AgentBench dev tasks not present")
    env = new_env(DEV_TASKS, timeout=20, skip_invalid=True)
    yield env
    env.close()


def test_dev_tasks_load_or_are_reported(dev):
    with pytest.raises(TaskFormatError, match="task 3: field 'evaluation.check\\[0\\].file'.*check/0.sh"):
        load_tasks(DEV_TASKS)
    assert {i: msg.split("field '")[1].split("'")[0] for i, msg in dev.skipped} == DEV_SKIPPED
    assert len(dev.tasks) == 26 - len(DEV_SKIPPED)


@pytest.mark.parametrize("i", sampled(26 - len(DEV_SKIPPED), 4))
def test_dev_task_judges_right_and_wrong_answers(dev, i):
    config = dev.configs[i]
    dev.reset(i)
    if config["match"] is not None:
        right = config["match"]["answer"]
    else:
        right, rc = dev.sandbox.run_independent(*config["example"])     # the reference solution's output
        assert rc == 0 and right.strip()
    assert dev.step(answer(right.strip())) == (None, True, 1.0)
    dev.reset(i)
    assert dev.step(answer(wrong_answer_for(right))) == (None, True, 0.0)

"""reproduce.py: the grid's steps, skipping done steps (resume after an interruption), the seeds, and the
numbers RESULTS.md shows. The steps' commands (synth.py, train.py, evaluate.py, profile_flops.py) are
replaced by a fake that writes the files those scripts write, with known scores; the scripts themselves
have their own tests."""
import json
from pathlib import Path

import pytest

import reproduce

TEACHER_REPLY = "Thought: search first.\nAction:\nsearch[red mug]"
SCORES = {"genpi": 40.0, "sft": 30.0, "genpi_seed1": 50.0, "genpi_seed2": 60.0, "sft_seed1": 20.0, "sft_seed2": 10.0}


def arg(cmd, flag):
    return cmd[cmd.index(flag) + 1]


def fake_run(calls):
    """A stand-in for reproduce.run that writes each script's output files."""
    def run(cmd, log_path):
        script = Path(cmd[1]).name
        calls.append(script)
        if script == "synth.py":
            out = Path(arg(cmd, "--out"))
            out.mkdir(parents=True, exist_ok=True)
            (out / "data.jsonl").write_text("{}\n")
            (out / "quality.json").write_text(json.dumps({"gold_turns": 4.0, "avg_turns": 2.0, "hit_max_turns": 1.0,
                                                          "abnormal_termination": 1.0, "abnormal_final_action": 0.25}))
        elif script == "train.py":
            run_dir = Path(arg(cmd, "--runs")) / arg(cmd, "--name")
            (run_dir / "adapter").mkdir(parents=True, exist_ok=True)
            (run_dir / "train_log.jsonl").write_text(json.dumps({"step": 1, "pg": 1.5, "sft": 0.5, "total": 0.8}) + "\n")
            (run_dir / "train_config.json").write_text(json.dumps({"seed": int(arg(cmd, "--seed"))}))
        elif script == "evaluate.py":
            task, out = arg(cmd, "--task"), Path(arg(cmd, "--out"))
            if "--no-baselines" in cmd:
                adapter = arg(cmd, "--adapter")
                run_name = Path(adapter).parent.name
                systems = {f"GenPI {adapter}": ("adapter-" + reproduce.slug(adapter), SCORES[run_name],
                                                TEACHER_REPLY if run_name == "genpi" else "no action here")}
            else:
                systems = {"upper bound (base + prompt)": ("upper-bound", 80.0, TEACHER_REPLY),
                           "base, no prompt": ("no-prompt", 0.0, "hello")}
            results = {}
            for name, (slug, score, reply) in systems.items():
                (out / task / slug).mkdir(parents=True, exist_ok=True)
                (out / task / slug / "task_0000.json").write_text(json.dumps({"task": 0, "replies": [reply]}))
                results[name] = {"score": score, "valid_action_rate": 1.0, "normalized": None,
                                 "first_action_agreement": None}
            Path(arg(cmd, "--json")).write_text(json.dumps({"results": {task: results}}))
        elif script == "profile_flops.py":
            turns = lambda macs: {"turns": [{"macs": macs, "latency_s": macs / 100}]}
            Path(arg(cmd, "--json")).write_text(json.dumps({
                key: {"full prompt": turns(1000), "GenPI merged": turns(600)} for key in ("no_cache", "cached")}))
    return run


@pytest.fixture
def grid(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(reproduce, "run", fake_run(calls))
    argv = ["--only", "webshop", "--methods", "genpi,sft", "--runs", str(tmp_path / "runs"),
            "--results", str(tmp_path / "results"), "--report-file", str(tmp_path / "RESULTS.md")]
    return argv, calls, tmp_path


def test_grid_runs_each_step_once_and_reports_the_numbers(grid):
    argv, calls, tmp = grid
    assert reproduce.main(argv) == 0
    # data, baselines, 3 seeds of genpi and of sft (train + evaluate each), flops
    assert calls == ["synth.py", "evaluate.py"] + ["train.py", "evaluate.py"] * 6 + ["profile_flops.py"]
    results = tmp / "results" / "tiny" / "webshop"
    genpi = json.loads((results / "genpi.json").read_text())
    assert genpi["eval"]["normalized"] == 50.0                         # 40 / 80 upper bound
    assert genpi["eval"]["first_action_agreement"] == 1.0               # the teacher's first action
    assert json.loads((results / "sft.json").read_text())["eval"]["first_action_agreement"] == 0.0
    assert genpi["train_args"] == ["--method", "genpi"] and genpi["final_losses"] == {"pg": 1.5, "sft": 0.5, "total": 0.8}
    report = (tmp / "RESULTS.md").read_text()
    assert "| GenPI | 50.00 ± 10.00 (62.5; 3 seeds) | 44.46 (82.1) |" in report   # 40, 50, 60 over 80
    assert "| Only SFT loss | 20.00 ± 10.00 (25.0; 3 seeds) | 35.64 (65.8) |" in report
    assert "| Upper bound (base + prompt) | 80.00 | 54.16 |" in report
    assert "Web Shopping: GenPI 50.00, SFT only 20.00, no prompt 0.00: the ordering holds." in report
    assert "| Abnormal final action | 25.0% | 0.0% |" in report
    assert "| no caching of earlier turns (fig. 3) | 40.0% | 40.0% |" in report

    calls.clear()                                                       # everything done: nothing reruns
    assert reproduce.main(argv) == 0 and calls == []
    assert "**Steps done: 9 of 47**" in (tmp / "RESULTS.md").read_text()   # 3 x (data, baselines, 12 runs) + 4 seeds + flops

    stale = results / "sft_seed2.json"                                   # made with other settings: made again
    stale.write_text(json.dumps({**json.loads(stale.read_text()), "grid": {"scale": "tiny", "settings": {}}}))
    assert reproduce.main(argv) == 0 and calls == ["train.py", "evaluate.py"]


def test_an_interrupted_grid_resumes_where_it_stopped(grid):
    argv, calls, tmp = grid
    run = reproduce.run

    def interrupt_at_the_fourth_training(cmd, log_path):
        if Path(cmd[1]).name == "train.py" and calls.count("train.py") == 3:
            raise KeyboardInterrupt
        run(cmd, log_path)
    reproduce.run = interrupt_at_the_fourth_training
    with pytest.raises(KeyboardInterrupt):
        reproduce.main(argv)
    done = sorted(p.name for p in (tmp / "results" / "tiny" / "webshop").glob("*.json"))
    assert done == ["baselines.json", "data.json", "genpi.json", "genpi_seed1.json", "genpi_seed2.json"]
    reproduce.run = run
    calls.clear()
    assert reproduce.main(argv) == 0
    assert calls == ["train.py", "evaluate.py"] * 3 + ["profile_flops.py"]   # only the steps not done


def test_dry_run_lists_steps_and_bad_names_fail(grid, capsys):
    argv, calls, _ = grid
    assert reproduce.main(argv + ["--dry-run", "--seeds", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert calls == [] and len(lines) == 5 and all(line.startswith("to do") for line in lines)
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--methods", "genpi,magic"])


def test_a_step_command_is_logged_and_a_failure_stops_the_grid(tmp_path, capsys):
    import sys
    reproduce.run([sys.executable, "-c", "print('progress 1/2'); import sys; print('warn', file=sys.stderr)"],
                  tmp_path / "ok.log")
    assert (tmp_path / "ok.log").read_text().splitlines() == ["progress 1/2", "warn"]
    assert "progress 1/2" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="exit 3.*bad.log"):
        reproduce.run([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "bad.log")

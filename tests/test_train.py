"""train.py: resume after Ctrl-C gives the same losses, torchrun data-parallel gives the same adapter,
and bad input fails before any long work."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from conftest import ROOT
from lora import LoRAConfig, add_lora, lora_layers
from loss import build_samples
from model import load_model
from prompts import parse_prompt
from test_loss import PROMPT, RECORD


def records(n=8):
    out = []
    for i in range(n):
        conv = [dict(m) for m in RECORD["conversation"]]
        conv[1]["content"] = f"Action: search[red mug {i}]"
        out.append(dict(RECORD, id=i, conversation=conv))
    return out


def run(tiny_dir, run_dir, cfg, on_step=None):
    """Build the tiny model + adapter the way main() does, then train."""
    model, tok = load_model(tiny_dir, dtype=torch.float32, device="cpu")
    torch.manual_seed(cfg.seed)
    add_lora(model, LoRAConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout))
    sft, pg, teacher, _ = build_samples(tok, records(), PROMPT, cfg.method, cfg.pg_target, cfg.max_len, cfg.seed)
    rows = train.train(cfg, model, tok, sft, pg, teacher, run_dir, log=lambda *a: None, on_step=on_step)
    return rows, {k: m.lora_B.weight.detach().clone() for k, m in lora_layers(model).items()}


def test_resume_after_interrupt_continues_with_the_same_losses(tiny_dir, tmp_path):
    cfg = train.TrainConfig(epochs=3, batch_size=4, micro_batch=2, lr=1e-3, dropout=0.05, max_len=1024)
    full, full_weights = run(tiny_dir, tmp_path / "full", cfg)
    assert len(full) == 6

    def interrupt(step):
        if step == 3:                      # mid-epoch: epoch 1, first of its two steps
            raise KeyboardInterrupt
    with pytest.raises(SystemExit) as stop:
        run(tiny_dir, tmp_path / "cut", cfg, on_step=interrupt)
    assert stop.value.code == 130
    cfg.resume = True
    rest, weights = run(tiny_dir, tmp_path / "cut", cfg)
    assert [r["step"] for r in rest] == [4, 5, 6]
    for a, b in zip(rest, full[3:]):
        assert a["total"] == pytest.approx(b["total"], abs=1e-6)
    for k in weights:
        torch.testing.assert_close(weights[k], full_weights[k], atol=1e-6, rtol=0)
    log = [json.loads(line) for line in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]


def test_nonfinite_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tiny_dir, tmp_path):
    cfg = train.TrainConfig(epochs=2, batch_size=4, micro_batch=4, dropout=0.0, max_len=1024)
    model, tok = load_model(tiny_dir, dtype=torch.float32, device="cpu")
    add_lora(model, LoRAConfig(dropout=0.0))
    sft, pg, teacher, _ = build_samples(tok, records(), PROMPT, "genpi", "prompt+reason", 1024)

    def poison(step):
        if step == 2:                      # the end of epoch 0: a checkpoint exists, then the weights go bad
            next(iter(lora_layers(model).values())).lora_A.weight.data.fill_(float("nan"))
    with pytest.raises(SystemExit, match="loss is nan at step 3: training stopped; the last good checkpoint"):
        train.train(cfg, model, tok, sft, pg, teacher, tmp_path, log=lambda *a: None, on_step=poison)
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "checkpoint" / "state.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_bad_input_fails_before_loading_anything(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("<AGENT>:\nhello\n")
    with pytest.raises(SystemExit, match="bad.txt, line 1"):
        train.main(["--prompt", str(bad)])
    with pytest.raises(SystemExit, match="--method must be one of"):
        train.main(["--prompt", "prompts/os.txt", "--method", "magic"])
    with pytest.raises(SystemExit, match="--keep-dequantized must be auto, on or off"):
        train.main(["--prompt", "prompts/os.txt", "--keep-dequantized", "yes"])
    with pytest.raises(SystemExit, match="missing.txt"):
        train.main(["--prompt", str(tmp_path / "missing.txt")])


def test_boolean_flags_turn_on_and_off_and_compile_falls_back_to_eager_without_a_compiler(tiny_dir, monkeypatch):
    from lora import compile_unavailable
    from quant import keep_dequantized
    assert train.parse_args([]).compile and not train.parse_args(["--no-compile"]).compile
    assert train.parse_args(["--resume"]).resume and not train.parse_args([]).resume
    assert not train.parse_args(["--preset", "paper", "--no-compile"]).compile
    model, _ = load_model(tiny_dir, dtype=torch.float32, device="cpu", quantize="nf4")
    assert "not kept dequantized" in compile_unavailable(model)
    keep_dequantized(model)
    assert compile_unavailable(model) is None                               # this machine has g++
    monkeypatch.setenv("CXX", "no-such-compiler++")
    assert "no-such-compiler++" in compile_unavailable(model)


def test_empty_data_file_is_refused(tiny_dir, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    prompt = tmp_path / "p.txt"
    prompt.write_text(PROMPT.text + "\n")
    with pytest.raises(SystemExit, match="no records"):
        train.main(["--prompt", str(prompt), "--model", str(tiny_dir), "--data", str(tmp_path / "empty.jsonl"),
                    "--runs", str(tmp_path / "runs")])


def test_main_trains_on_the_n_and_checks_the_held_out_inputs(tiny_dir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records()))
    prompt = tmp_path / "p.txt"
    prompt.write_text(PROMPT.text + "\n")
    train.main(["--prompt", str(prompt), "--model", str(tiny_dir), "--data", str(data), "--runs", str(tmp_path),
                "--n-samples", "6", "--held-out", "2", "--epochs", "1", "--quantize", "none", "--max-len", "1024"])
    printed = capsys.readouterr().out
    assert "6 training records, 2 held out" in printed
    assert "blocks compiled by torch.compile" in printed                      # the default (--compile)
    for r in records()[6:]:                                                  # the printout shows each held-out input
        assert repr(PROMPT.user_message(r["input"]))[:60] in printed
    assert set(json.loads((tmp_path / "p" / "before_after.json").read_text())) == {
        "base, no prompt", "base + prompt", "adapter, no prompt"}


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process(tiny_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records()))
    prompt = tmp_path / "p.txt"
    prompt.write_text(PROMPT.text + "\n")
    common = ["--prompt", str(prompt), "--model", str(tiny_dir), "--data", str(data), "--runs", str(tmp_path),
              "--held-out", "0", "--epochs", "2", "--micro-batch", "1", "--dropout", "0", "--quantize", "none",
              "--max-len", "1024", "--lr", "1e-3", "--no-compile"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    one = subprocess.run([sys.executable, "train.py", *common, "--name", "one", "--batch-size", "4"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29533", "train.py", *common, "--name", "two", "--batch-size", "2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    from safetensors.torch import load_file
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert any(t.abs().sum() > 0 for k, t in a.items() if "lora_B" in k)     # training moved B off zero
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    la = [json.loads(x)["total"] for x in (tmp_path / "one" / "train_log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["total"] for x in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, abs=1e-4)


def test_generate_sharing_prefix_prefills_the_common_prefix_once(tiny_model, monkeypatch):
    model, tok = tiny_model
    id_lists = [[5, 9, 11, 13, 17, 3], [5, 9, 11, 13, 21, 4, 8], [5, 9, 11, 13, 2]]
    prefilled = []
    real = train.prefill_prefix
    monkeypatch.setattr(train, "prefill_prefix", lambda m, ids, n: prefilled.append(list(ids)) or real(m, ids, n))
    shared = train.generate_sharing_prefix(model, id_lists, 12, draft=3)
    assert prefilled == [[5, 9, 11, 13]]
    assert shared == train.generate(model, id_lists, 12)     # the greedy tokens of the rows computed whole
    assert train.generate_sharing_prefix(model, [[5, 9], [5, 9]], 4) == train.generate(model, [[5, 9], [5, 9]], 4)
    assert len(prefilled) == 1                                 # too short a common part: not worth a prefix

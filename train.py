"""Internalize an agent prompt into a LoRA adapter: `python train.py --prompt prompts/webshop.txt`.

The whole GenPI pipeline (paper sections 4-5, appendix C.4): synthesize data from the prompt alone
(synth.py; reused from runs/<name>/data when its settings match), quantize the base model to NF4, add
LoRA (r 16, alpha 32, dropout 0.05 on every block linear), train with the joint loss
L = (1 - λ)·L_PG + λ·L_SFT (loss.py), save the adapter in the PEFT layout to runs/<name>/adapter/, and
print, for a few held-out pseudo inputs, the base model without the prompt, with it, and the adapter
without it. Baselines and ablations: --method, --pg-target. Resumable (--resume) from the checkpoint
written at each epoch and on Ctrl-C; data-parallel with `torchrun --nproc_per_node N train.py ...`.
"""
import argparse
import json
import math
import os
import random
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tqdm import tqdm

import synth
from lora import (LoRAConfig, adapter_disabled, add_lora, compile_for_training, compile_unavailable, count_trainable,
                  load_adapter, lora_layers, save_adapter)
from loss import METHODS, PG_TARGETS, build_samples, collate, joint_loss, kld_loss, lm_loss, token_ce
from model import (DRAFT_TOKENS, common_prefix_length, generate, keep_freed_memory, load_model, prefill_prefix,
                   set_fp16_weights)
from prompts import PromptFileError, load_prompt
from quant import KEEP_MODES, keep_dequantized_if


@dataclass
class TrainConfig:
    prompt: str = "prompts/webshop.txt"   # the agent prompt file to internalize (<USER>: / <AGENT>: turns)
    model: str | None = None               # checkpoint for load_model; None = embedded SmolLM2
    data: str | None = None                # an existing data.jsonl to train on (default: synthesize)
    name: str | None = None                # run name; default = the prompt file's stem
    runs: str = "runs"                     # run directories go to RUNS/NAME (data/, checkpoint/, adapter/)
    method: str = "genpi"                  # genpi, sft, prepend, prepend50, seqkd, seqkd_kld, kld (Tables 1-2)
    pg_target: str = "prompt+reason"       # what the PG loss generates (Table 3 ablations)
    lam: float = 0.7                       # weight of L_SFT in the joint loss
    # The defaults are a demo sized for ~4 minutes on 2 Xeon cores with the 135M model (measured in the
    # README: a training step of 2 samples takes ~15 s there); --preset paper gives the paper's run.
    n_samples: int = 10                    # synthetic samples (paper: 1,000); README: at 8, OS shows no effect
    held_out: int = 4                      # pseudo inputs kept out of training for the before/after check
                                           # (made by synthesis stage 1 only: no role-play, outputs or reasons)
    max_turns: int = 3                     # agent turns per role-played conversation, at most the task's
                                           # (OS 10, Web Browsing 2, Web Shopping 5); 0 = the task's
    epochs: int = 2                        # paper: 10 (README: at 3 epochs of 8 samples, WebShop overfits)
    batch_size: int = 2                    # per optimizer step and process, made of micro-batches (paper: 32)
    micro_batch: int = 1                   # samples per forward pass (gradient accumulation up to batch_size)
    lr: float = 2e-3                       # paper: 1e-4 at 1,000 samples x 10 epochs; the demo has 10 steps
    warmup: float = 0.03                   # share of steps with linear warmup, then cosine decay
    weight_decay: float = 0.0              # AdamW weight decay of the LoRA weights
    grad_clip: float = 1.0                 # gradient norm clipping
    max_len: int = 2560                    # longer samples are dropped (and counted), never truncated
    r: int = 16                            # LoRA rank, on all 7 linears of every block
    alpha: float = 32                      # LoRA scale alpha / r
    dropout: float = 0.05                  # LoRA dropout
    quantize: str = "nf4"                  # "nf4" (QLoRA) or "none"
    keep_dequantized: str = "auto"         # NF4: dequantize each weight once and keep it ("on"), or in every
                                           # pass ("off"); "auto": on when that takes <= 1/8 of the device memory
    compile: bool = True                   # torch.compile the blocks for training (lora.compile_for_training):
                                           # ~25% faster steps after ~40 s of compiling (seconds once cached);
                                           # needs the NF4 weights kept and a C++ compiler (CPU) or triton (GPU),
                                           # else trains eager
    seed: int = 0                          # seeds synthesis, data order, dropout
    resume: bool = False                   # continue from RUNS/NAME/checkpoint (after Ctrl-C or a crash)
    max_steps: int = 0                     # stop after this many optimizer steps (0 = all epochs)
    fp32_weights: bool = False             # on a CPU, synthesis and the before/after check read the exact
                                           # fp32 weights, not fp16 copies (model.set_fp16_weights; slower)


PRESETS = {"paper": dict(n_samples=1000, max_turns=0, epochs=10, batch_size=32, micro_batch=4, lr=1e-4, warmup=0.03,
                         r=16, alpha=32, dropout=0.05, grad_clip=1.0, seed=0, max_len=4096)}


def field_comments(cls) -> dict:
    """name -> the comment after the field in the class's source (with its continuation lines): the
    flags' help text, written once beside the defaults."""
    import inspect
    comments, name = {}, None
    for line in inspect.getsource(cls).splitlines():
        if m := re.match(r"\s+(\w+): [^#]*#\s*(.*)", line):
            name, comments[m.group(1)] = m.group(1), m.group(2)
        elif name and (m := re.match(r"\s{12,}#\s*(.*)", line)):        # a continuation, aligned under it
            comments[name] += " " + m.group(1)
        else:
            name = None
    return comments


def parse_args(argv=None) -> TrainConfig:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    comments = field_comments(TrainConfig)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        text = f"{comments.get(f.name, '')} (default: {f.default})".strip().replace("%", "%%")
        if f.type is bool:                                                  # --flag / --no-flag
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            kind = f.type if f.type in (int, float) else str
            ap.add_argument(flag, type=kind, default=None, help=text)
    ap.add_argument("--preset", choices=sorted(PRESETS), help="the paper's settings (appendix C.4)")
    a = vars(ap.parse_args(argv))
    preset = PRESETS.get(a.pop("preset") or "", {})
    given = {k: v for k, v in a.items() if v is not None}
    return TrainConfig(**{**preset, **given})


# ----------------------------------------------------------------------------- data
def load_or_synthesize(cfg, prompt, model, tok, data_dir, is_main):
    """(training records, held-out pseudo inputs) for this prompt and model: synth.py writes them, or
    resumes, or reuses them when runs/<name>/data was made with the same settings (it refuses data made
    with other ones). The held-out inputs are stage 1's spare inputs: only their first message is needed."""
    if is_main:
        try:
            turns = min(cfg.max_turns, synth.detect_task(prompt).max_turns) if cfg.max_turns else None
            synth.synthesize(prompt, data_dir, cfg.n_samples, model, tok, seed=cfg.seed, max_turns=turns,
                             spare_inputs=cfg.held_out)
        except synth.SettingsMismatch as e:
            raise SystemExit(f"error: {e}\n(pick another --name, or delete {data_dir} to synthesize anew)")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return synth.read_jsonl(data_dir / "data.jsonl"), synth.spare_inputs(data_dir)


def batches_for_epoch(lengths, batch_size, seed, epoch):
    """Length-grouped batches: shuffle, sort by length inside chunks of 8 batches, shuffle the batches."""
    rng = random.Random(seed * 1000 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * 8
    grouped = [i for k in range(0, len(order), chunk)
               for i in sorted(order[k:k + chunk], key=lambda i: lengths[i])]
    batches = [grouped[k:k + batch_size] for k in range(0, len(grouped), batch_size)]
    rng.shuffle(batches)
    return batches


def lr_at(step, total, cfg):
    """Linear warmup then cosine decay to 0."""
    warm = max(1, math.ceil(cfg.warmup * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, model, optimizer, progress: dict):
    """Adapter + AdamW state + data position, atomically (temp file, then rename)."""
    from safetensors.torch import save_file
    tensors = {}
    for name, m in lora_layers(model).items():
        for ab in "AB":
            p = getattr(m, f"lora_{ab}").weight
            tensors[f"{name}.lora_{ab}"] = p.detach().cpu().contiguous()
            for k, v in optimizer.state.get(p, {}).items():
                tensors[f"{name}.lora_{ab}.{k}"] = v.detach().cpu().reshape(-1) if v.dim() == 0 else v.detach().cpu()
    tensors["torch_rng_state"] = torch.get_rng_state()          # so dropout masks continue as if never stopped
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "state.safetensors.tmp"
    save_file(tensors, tmp, metadata={"progress": json.dumps(progress)})
    os.replace(tmp, path / "state.safetensors")


def load_checkpoint(path: Path, model, optimizer) -> dict:
    from safetensors import safe_open
    file = path / "state.safetensors"
    try:
        with safe_open(file, framework="pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}
            progress = json.loads(f.metadata()["progress"])
    except Exception as e:
        raise SystemExit(f"error: {file}: cannot resume from this checkpoint ({e}); delete it to start over")
    torch.set_rng_state(t["torch_rng_state"])
    for name, m in lora_layers(model).items():
        for ab in "AB":
            p = getattr(m, f"lora_{ab}").weight
            p.data.copy_(t[f"{name}.lora_{ab}"])
            state = {k.rsplit(".", 1)[1]: v for k, v in t.items() if k.startswith(f"{name}.lora_{ab}.")}
            if state:
                state["step"] = state["step"].reshape(())
                optimizer.state[p] = state
    return progress


# ----------------------------------------------------------------------------- training
def train_step(model, batch, cfg, pad_id, device):
    """One micro-batch: the method's loss. Returns (loss, {name: value})."""
    sft, pg, teacher = batch
    tokens, labels = collate(sft, pad_id, device)
    if cfg.method in ("kld", "seqkd_kld"):                     # KLD needs the full logits of both models
        logits = model(tokens)
        t_tokens, t_labels = collate(teacher, pad_id, device)
        with torch.no_grad(), adapter_disabled(model):
            t_logits = model(t_tokens)
        kl = kld_loss(logits, labels, t_logits, t_labels)
        if cfg.method == "kld":
            return kl, {"kld": kl.item()}
        ce = token_ce(logits, labels)
        return ce + kl, {"sft": ce.item(), "kld": kl.item()}
    sft_loss = lm_loss(model, tokens, labels)
    if cfg.method != "genpi":
        return sft_loss, {"sft": sft_loss.item()}
    pg_loss = lm_loss(model, *collate(pg, pad_id, device))
    return joint_loss(pg_loss, sft_loss, cfg.lam), {"pg": pg_loss.item(), "sft": sft_loss.item()}


def optimizer_step(model, optimizer, params, batch, sft, pg, teacher, cfg, pad_id, world):
    """One optimizer step over this process's share of a global batch: micro-batches accumulate
    gradients, processes average them (torch.distributed), then clip and step. -> {loss name: value}."""
    device = next(model.parameters()).device
    parts = {}
    for k in range(0, len(batch), cfg.micro_batch):
        idx = batch[k:k + cfg.micro_batch]
        micro = ([sft[i] for i in idx], [pg[i] for i in idx] if pg else None,
                 [teacher[i] for i in idx] if teacher else None)
        loss, values = train_step(model, micro, cfg, pad_id, device)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()}")
        (loss * len(idx) / len(batch)).backward()
        for key, v in {**values, "total": loss.item()}.items():
            parts[key] = parts.get(key, 0.0) + v * len(idx) / len(batch)
    if world > 1:                                               # data parallel: average the LoRA gradients
        for p in params:
            if p.grad is None:                                  # this process had no sample this step
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad /= world
        logged = torch.tensor(list(parts.values()), dtype=torch.float64)
        torch.distributed.all_reduce(logged)                   # log the global batch's losses, not this share's
        parts = dict(zip(parts, (logged / world).tolist()))
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return parts


def train(cfg, model, tok, sft, pg, teacher, run_dir, rank=0, world=1, log=print, on_step=None):
    """The training loop: AdamW on the LoRA weights, warmup + cosine, gradient accumulation and clipping,
    a checkpoint at each epoch's end and on Ctrl-C, a stop on a non-finite loss. The batch order is a
    function of (seed, epoch), so a checkpoint only needs the step count. Returns the log rows."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lengths = [len(s.ids) + (len(pg[i].ids) if pg else 0) for i, s in enumerate(sft)]
    global_batch = cfg.batch_size * world
    steps_per_epoch = math.ceil(len(sft) / global_batch)
    total = steps_per_epoch * cfg.epochs
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    ckpt, log_path = run_dir / "checkpoint", run_dir / "train_log.jsonl"
    run_dir.mkdir(parents=True, exist_ok=True)
    start = 0
    if cfg.resume and (ckpt / "state.safetensors").exists():
        start = load_checkpoint(ckpt, model, optimizer)["step"]
        log(f"resumed after step {start} of {total}")
    elif rank == 0:
        log_path.unlink(missing_ok=True)
    interrupted = {"flag": False}
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.update(flag=True)) if rank == 0 else None
    rows, pad_id, step = [], tok.eos_id if tok.eos_id is not None else 0, start
    bar = tqdm(total=total, initial=start, desc="train", disable=rank != 0)
    model.train()
    try:
        for step in range(start, total):
            epoch, b = divmod(step, steps_per_epoch)
            batch = batches_for_epoch(lengths, global_batch, cfg.seed, epoch)[b][rank::world]   # this process's share
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step, total, cfg)
            t0 = time.time()
            try:
                parts = optimizer_step(model, optimizer, params, batch, sft, pg, teacher, cfg, pad_id, world)
            except FloatingPointError as e:
                raise SystemExit(f"error: {e} at step {step + 1}: training stopped; the last good checkpoint "
                                 f"is in {ckpt} (lower --lr, then --resume)")
            n_tokens = sum(lengths[i] for i in batch) * world
            row = {"step": step + 1, "epoch": epoch, **{k: round(v, 5) for k, v in parts.items()},
                   "lr": optimizer.param_groups[0]["lr"], "tokens_per_s": round(n_tokens / (time.time() - t0), 1)}
            rows.append(row)
            if rank == 0:
                with open(log_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                bar.set_postfix({k: row[k] for k in ("total", "pg", "sft", "kld") if k in row})
                bar.update(1)
                if b == steps_per_epoch - 1 or step + 1 == total:
                    save_checkpoint(ckpt, model, optimizer, {"step": step + 1})
            if on_step is not None:
                on_step(step + 1)
            if interrupted["flag"]:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        if rank == 0:
            done = rows[-1]["step"] if rows else start
            save_checkpoint(ckpt, model, optimizer, {"step": done})
            log(f"\ninterrupted: checkpoint saved after step {done}; rerun with --resume to continue")
        raise SystemExit(130)
    finally:
        bar.close()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        model.eval()
    return rows


# ----------------------------------------------------------------------------- before / after
ACTION_FORMAT = {  # a reply "follows the prompt's format" when it holds an action of the task's action space
    "webshop": r"[Aa]ction: *\n* *((search|click)\[.+?\])",
    "os": r"Act: *(bash|finish|answer\(.*\))",
    "mind2web": r"Answer: *[A-Z]\b",
}


def follows_format(task_name: str, reply: str) -> bool:
    return re.search(ACTION_FORMAT.get(task_name, r"(Action|Act|Answer): *\S"), reply) is not None


def generate_sharing_prefix(model, id_lists, max_new_tokens, **kw):
    """generate() for rows that start alike (the agent prompt, then each input): their common prefix is
    prefilled once (model.prefill_prefix) instead of once per row. 4 WebShop rows: ~1,600 tokens once
    instead of 4 times."""
    n = min(common_prefix_length(id_lists[0], x) for x in id_lists)
    n = min(n, min(len(x) for x in id_lists) - 1)             # each row keeps at least one token of its own
    if len(id_lists) < 2 or n < 2:
        return generate(model, id_lists, max_new_tokens, **kw)
    prefix = prefill_prefix(model, id_lists[0][:n], n)
    return generate(model, [x[n:] for x in id_lists], max_new_tokens, prefix=prefix,
                    context=[x[:n] for x in id_lists], **kw)


def before_after(model, tok, prompt, inputs, task_name, max_new_tokens=96, log=print):
    """For held-out pseudo inputs: base without prompt, base with prompt, adapter without prompt.
    Returns the share of replies in the prompt's action format for each."""
    users = [{"role": "user", "content": prompt.user_message(x)} for x in inputs]
    stop = dict(stop_ids=tok.stop_ids, draft=DRAFT_TOKENS)
    systems = {}
    with adapter_disabled(model):
        systems["base, no prompt"] = generate(model, [tok.apply_chat([u]) for u in users], max_new_tokens, **stop)
        systems["base + prompt"] = generate_sharing_prefix(model, [tok.apply_chat(prompt.turns + [u]) for u in users],
                                                           max_new_tokens, **stop)
    systems["adapter, no prompt"] = generate(model, [tok.apply_chat([u]) for u in users], max_new_tokens, **stop)
    rates = {}
    for name, outs in systems.items():
        systems[name] = [tok.decode(o).strip() for o in outs]
        rates[name] = sum(follows_format(task_name, t) for t in systems[name]) / len(outs)
    for i, u in enumerate(users):
        log(f"\n=== held-out input {i + 1}: {u['content'][:160]!r}")
        for name in systems:
            log(f"--- {name}:\n{systems[name][i][:300]}")
    log("\nformat-follow rate (replies in the prompt's action format): " +
        ", ".join(f"{k}: {v:.0%}" for k, v in rates.items()))
    return rates


def main(argv=None):
    cfg = parse_args(argv)
    try:
        prompt = load_prompt(cfg.prompt)                      # bad input fails here, before any long work
    except PromptFileError as e:
        raise SystemExit(f"error: {e}")
    if cfg.method not in METHODS:
        raise SystemExit(f"error: --method must be one of {', '.join(METHODS)}, not {cfg.method!r}")
    if cfg.pg_target not in PG_TARGETS:
        raise SystemExit(f"error: --pg-target must be one of {', '.join(PG_TARGETS)}, not {cfg.pg_target!r}")
    if cfg.keep_dequantized not in KEEP_MODES:                            # checked before any long work
        raise SystemExit(f"error: --keep-dequantized must be auto, on or off, not {cfg.keep_dequantized!r}")
    if cfg.method == "sft":
        cfg.lam = 1.0
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    log = print if rank == 0 else (lambda *a, **k: None)
    name = cfg.name or Path(cfg.prompt).stem
    run_dir = Path(cfg.runs) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    keep_freed_memory()                                       # no page faults on each step's temporaries
    t_start = time.time()
    model, tok = load_model(cfg.model, device=device)
    set_fp16_weights(model, not cfg.fp32_weights)             # synthesis is inference only
    task_name = synth.detect_task(prompt).name
    if cfg.data:                                              # given records: the held-out ones follow the n
        records = synth.read_jsonl(Path(cfg.data))
        if not records:
            raise SystemExit(f"error: {cfg.data}: no records (an empty or missing data file)")
        held_out = [r["input"] for r in records[cfg.n_samples:]]
    else:
        records, held_out = load_or_synthesize(cfg, prompt, model, tok, run_dir / "data", rank == 0)
    train_records, held_out = records[:cfg.n_samples], held_out[:cfg.held_out]
    log(f"data: {len(train_records)} training records, {len(held_out)} held out ({time.time() - t_start:.0f} s so far)")

    if cfg.quantize == "nf4":                                 # QLoRA: 4-bit base (reload: synthesis used full precision)
        del model
        model, tok = load_model(cfg.model, device=device, quantize="nf4")
        keep_dequantized_if(model, cfg.keep_dequantized, next(model.parameters()).dtype, device)   # demo: on
    set_fp16_weights(model, False)                            # the teacher reads the student's fp32 weights
    lora_cfg = LoRAConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout)
    torch.manual_seed(cfg.seed)                               # the same adapter init in every process
    add_lora(model, lora_cfg)
    if cfg.compile:
        why_not = compile_unavailable(model)
        if why_not:
            log(f"training uncompiled: {why_not}")
        else:
            n = compile_for_training(model, dynamic=True)          # sample lengths vary: one graph for all
            log(f"training: {n} blocks compiled by torch.compile (the first steps compile them; --no-compile: eager)")
    trainable, total = count_trainable(model)
    log(f"LoRA r={cfg.r}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
    sft, pg, teacher, report = build_samples(tok, train_records, prompt, cfg.method, cfg.pg_target,
                                             cfg.max_len, cfg.seed)
    log(f"samples: kept {report['kept']} of {report['records']}; {report['dropped_over_max_len']} dropped "
        f"for exceeding --max-len {cfg.max_len} (never truncated)")
    if not sft:
        raise SystemExit(f"error: no training sample fits --max-len {cfg.max_len}")
    (run_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    train(cfg, model, tok, sft, pg, teacher, run_dir, rank, world, log)
    if rank == 0:
        save_adapter(model, run_dir / "adapter", lora_cfg, base_name=cfg.model or model.args.name)
        log(f"adapter saved to {run_dir / 'adapter'} (PEFT layout)")
        if held_out:                                          # deployed as one would: full-precision base + adapter
            del model
            model, tok = load_model(cfg.model, device=device)
            load_adapter(model, run_dir / "adapter")
            set_fp16_weights(model, not cfg.fp32_weights)
            rates = before_after(model, tok, prompt, held_out, task_name, log=log)
            (run_dir / "before_after.json").write_text(json.dumps(rates, indent=2))
        log(f"done in {time.time() - t_start:.0f} s")
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:   # bad checkpoints, adapters, prompts, data: one clear line
        sys.exit(f"error: {e}")

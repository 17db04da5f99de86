"""Reproduce the paper's tables at this machine's scale: Table 1 (methods x tasks, normalized to the
with-prompt upper bound), Table 2 (loss ablations), Table 3 (orderings), Table 4 (synthetic data
quality) and figures 3-4 (efficiency, section 8), in one resumable command that writes RESULTS.md.

For each task prompt it synthesizes data once (synth.py), scores the with-prompt upper bound and the
no-prompt base (evaluate.py), then for every method and ablation trains an adapter on that data
(train.py --data) and scores it without the prompt. Every finished step leaves a small JSON under
results/ (scores, settings, wall time; no weights, no data): a step whose JSON exists is skipped, so
the command resumes after Ctrl-C, survives a fresh clone (commit results/), and can be split over
sittings. Adapters and transcripts stay under runs/reproduce/.

    python reproduce.py --dry-run                      # the steps, which are done, nothing run
    python reproduce.py                                # the default grid (scale "tiny")
    python reproduce.py --only webshop --methods genpi,sft
    python reproduce.py --report                       # only rewrite RESULTS.md from results/
    python reproduce.py --scale paper --model PATH     # a GPU and Llama-3-8B-Instruct: the paper's run
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from evaluate import first_action_agreement, slug, write_atomic

TASKS = ("webshop", "os", "mind2web")
TASK_TITLES = {"os": "OS", "mind2web": "Web Browsing", "webshop": "Web Shopping"}
# name -> train.py arguments: Table 1's methods, then Table 2's and Table 3's ablations
RUNS = {
    "genpi": ["--method", "genpi"], "sft": ["--method", "sft"], "prepend": ["--method", "prepend"],
    "prepend50": ["--method", "prepend50"], "seqkd": ["--method", "seqkd"], "seqkd_kld": ["--method", "seqkd_kld"],
    "kld": ["--method", "kld"],
    "pg_without_reason": ["--method", "genpi", "--pg-target", "prompt"],
    "pg_without_prompt": ["--method", "genpi", "--pg-target", "reason"],
    "pg_only": ["--method", "genpi", "--lam", "0"],                                  # w/o L_SFT
    "reason_given_prompt": ["--method", "genpi", "--pg-target", "reason_given_prompt"],
    "prompt_given_reason": ["--method", "genpi", "--pg-target", "prompt_given_reason"],
}
EXTRA_SEEDS = {"webshop": {"genpi": (1, 2), "sft": (1, 2)}}   # the noise: 3 seeds of the two main rows
SCALES = {  # train.py settings, synthetic samples, evaluation episodes per task
    "tiny": dict(train=["--epochs", "1", "--batch-size", "2", "--max-turns", "2"], samples=4,
                 limit={"os": 3, "webshop": 3, "mind2web": 10}, max_new_tokens=96),
    "demo": dict(train=["--max-turns", "3"], samples=10, limit={"os": 5, "webshop": 5, "mind2web": 20},
                 max_new_tokens=128),
    "paper": dict(train=["--preset", "paper"], samples=1000, limit={"os": 0, "webshop": 0, "mind2web": 0},
                  max_new_tokens=512),
}
PAPER = {  # Llama-3-8B-Instruct, 1,000 samples (Tables 1-4): OS SR, WB SR, WS reward
    "upper bound": (17.36, 17, 54.16), "no prompt": (None, None, None),
    "kld": (0, 0, 0), "seqkd": (3.47, 15, 38.79), "seqkd_kld": (4.86, 15, 40.26), "prepend": (0, 0, 0),
    "prepend50": (13.19, 12, 31.09), "sft": (15.97, 12, 35.64), "genpi": (17.36, 14, 44.46),
    "pg_without_reason": (14.58, 14, 38.41), "pg_without_prompt": (13.19, 13, 32.34),
    "pg_only": (0, 0, 0), "reason_given_prompt": (14.58, 14, 36.26), "prompt_given_reason": (15.27, 13, 35.51),
}
PAPER_TABLE4 = {"gold_turns": (3, 1, 4), "avg_turns": (2.71, 1.03, None), "hit_max_turns": (0.016, 0.017, None),
                "abnormal_termination": (0, 0, 0), "abnormal_final_action": (0.052, 0.039, 0)}
PAPER_COLUMNS = {"os": 0, "mind2web": 1, "webshop": 2}
ROW_TITLES = {
    "upper bound": "Upper bound (base + prompt)", "no prompt": "Base, no prompt", "kld": "KLD", "seqkd": "SeqKD",
    "seqkd_kld": "SeqKD + KLD", "prepend": "Prompt prepending 100%", "prepend50": "Prompt prepending 50%",
    "sft": "Only SFT loss", "genpi": "GenPI", "pg_without_reason": "PG w/o reason", "pg_without_prompt": "PG w/o prompt",
    "pg_only": "w/o L_SFT (PG only)",
    "reason_given_prompt": "P(r \\| p, x, y)", "prompt_given_reason": "P(p \\| x, y, r)",   # "\\|": a literal | in a Markdown table
}


# ----------------------------------------------------------------------------- the steps
def run(cmd, log_path: Path):
    """Run one step's command, its output to the terminal and to log_path; a failure stops the grid."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + " ".join(cmd), flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}                       # progress bars as they come
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        while chunk := os.read(proc.stdout.fileno(), 4096):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            log.write(chunk)
    if proc.wait() != 0:
        raise SystemExit(f"reproduce.py: step failed (exit {proc.returncode}); its log: {log_path}")


def steps(args):
    """The grid, in order: (result JSON, function that runs the step and returns its result)."""
    scale, py = SCALES[args.scale], sys.executable
    model = ["--model", args.model] if args.model else []
    out = []
    for task in args.only:
        work, res = Path(args.runs) / task, Path(args.results) / task
        prompt, data = f"prompts/{task}.txt", work / "data"
        limit = ["--limit", str(scale["limit"][task]), "--max-new-tokens", str(scale["max_new_tokens"])]

        def synthesize(task=task, prompt=prompt, data=data):
            train_args = scale["train"]                                 # synthesize as many turns as train.py would
            turns = ["--max-turns", train_args[train_args.index("--max-turns") + 1]] if "--max-turns" in train_args else []
            run([py, "synth.py", "--prompt", prompt, "--out", str(data), "-n", str(scale["samples"]), "--seed", "0",
                 *turns, *model], data / "synth.log")
            return {"quality": json.loads((data / "quality.json").read_text()), "samples": scale["samples"]}
        out.append((res / "data.json", synthesize))

        def baselines(task=task, work=work, limit=limit):
            summary = work / "eval_baselines.json"
            run([py, "evaluate.py", "--task", task, *limit, "--out", str(work / "eval"), "--json", str(summary),
                 *model], work / "eval_baselines.log")
            results = json.loads(summary.read_text())["results"][task]
            teacher = read_episodes(work / "eval" / task / "upper-bound")
            return {"upper bound": results["upper bound (base + prompt)"], "no prompt": results["base, no prompt"],
                    "teacher_first_replies": {ep["task"]: ep["replies"][:1] for ep in teacher}}
        out.append((res / "baselines.json", baselines))

        for name in args.methods:
            for seed in (0, *EXTRA_SEEDS.get(task, {}).get(name, ())):
                if seed >= args.seeds:
                    continue
                run_name = name if seed == 0 else f"{name}_seed{seed}"

                def train_and_score(task=task, name=name, seed=seed, run_name=run_name, work=work, res=res,
                                    prompt=prompt, data=data, limit=limit):
                    start = time.time()
                    run([py, "train.py", "--prompt", prompt, "--data", str(data / "data.jsonl"), "--runs", str(work),
                         "--name", run_name, *RUNS[name], "--seed", str(seed),
                         "--n-samples", str(scale["samples"]), "--held-out", "0", *scale["train"], *model],
                        work / run_name / "train.log")
                    trained = time.time() - start
                    adapter, summary = work / run_name / "adapter", work / run_name / "eval.json"
                    run([py, "evaluate.py", "--task", task, *limit, "--adapter", str(adapter), "--no-baselines",
                         "--out", str(work / "eval"), "--json", str(summary), *model], work / run_name / "eval.log")
                    (score,) = json.loads(summary.read_text())["results"][task].values()
                    base = json.loads((res / "baselines.json").read_text())
                    teacher = [{"task": int(i), "replies": r} for i, r in base["teacher_first_replies"].items()]
                    episodes = read_episodes(work / "eval" / task / ("adapter-" + slug(str(adapter))))
                    score["first_action_agreement"] = first_action_agreement(task, episodes, teacher)
                    upper = base["upper bound"]["score"]
                    score["normalized"] = 100 * score["score"] / upper if upper else None
                    log = [json.loads(line) for line in (work / run_name / "train_log.jsonl").read_text().splitlines()]
                    return {"run": name, "train_args": RUNS[name], "seed": seed, "eval": score,
                            "final_losses": {k: v for k, v in log[-1].items() if k in ("pg", "sft", "kld", "total")},
                            "train_seconds": trained, "settings": json.loads((work / run_name / "train_config.json").read_text())}
                out.append((res / f"{run_name}.json", train_and_score))

    def flops():
        target = Path(args.runs) / "flops.json"
        run([py, "profile_flops.py", "--json", str(target), "--out-dir", str(Path(args.results) / "plots"), *model],
            Path(args.runs) / "flops.log")
        return json.loads(target.read_text())
    if not args.no_flops:
        out.append((Path(args.results) / "flops.json", flops))
    return out


def read_episodes(directory: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(directory.glob("task_*.json"))]


# ----------------------------------------------------------------------------- RESULTS.md
def load_results(results: Path) -> dict:
    """path relative to results/ (e.g. 'webshop/genpi') -> its JSON."""
    return {str(p.relative_to(results).with_suffix("")): json.loads(p.read_text()) for p in sorted(results.rglob("*.json"))}


def num(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def ours_cell(res, task, name):
    """'score (norm.)' of one row of one task, or mean ± sd over seeds when there are several."""
    if name in ("upper bound", "no prompt"):
        base = res.get(f"{task}/baselines")
        if not base:
            return "-"
        r = base[name]
        return f"{r['score']:.2f}" + (
            "" if name == "upper bound" else f" ({num(r['normalized'], 1)})")
    runs = [v for k, v in res.items() if k == f"{task}/{name}" or k.startswith(f"{task}/{name}_seed")]
    if not runs:
        return "-"
    scores = [r["eval"]["score"] for r in runs]                 # evaluate.py's scores are x100 already
    norms = [r["eval"]["normalized"] for r in runs]
    norm = "-" if None in norms else num(statistics.mean(norms), 1)
    if len(runs) == 1:
        return f"{scores[0]:.2f} ({norm})"
    return f"{statistics.mean(scores):.2f} ± {statistics.stdev(scores):.2f} ({norm}; {len(runs)} seeds)"


def paper_cell(task, name):
    value = PAPER[name][PAPER_COLUMNS[task]]
    if value is None:
        return "-"
    upper = PAPER["upper bound"][PAPER_COLUMNS[task]]
    return f"{value}" + ("" if name == "upper bound" else f" ({100 * value / upper:.1f})")


def score_table(res, tasks, names):
    head = "| | " + " | ".join(f"{TASK_TITLES[t]}: ours | paper" for t in tasks) + " |"
    lines = [head, "|---|" + "---|---|" * len(tasks)]
    for name in names:
        lines.append(f"| {ROW_TITLES[name]} | " + " | ".join(f"{ours_cell(res, t, name)} | {paper_cell(t, name)}"
                                                             for t in tasks) + " |")
    return "\n".join(lines)


def diagnostics_table(res, tasks):
    lines = ["| task | run | valid actions | first action = teacher's | final losses | train s | step s |",
             "|---|---|---|---|---|---|---|"]
    for key, r in res.items():
        task, _, run_name = key.partition("/")
        if task not in tasks or "eval" not in r:
            continue
        e, pct = r["eval"], lambda x: "-" if x is None else f"{100 * x:.0f}%"
        losses = ", ".join(f"{k} {v:.3f}" for k, v in r["final_losses"].items())
        lines.append(f"| {TASK_TITLES[task]} | {run_name} | {pct(e['valid_action_rate'])} | "
                     f"{pct(e['first_action_agreement'])} | {losses} | {r['train_seconds']:.0f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def quality_table(res, tasks):
    rows = [("gold_turns", "Gold turns (in prompt)", num), ("avg_turns", "Avg. turns", num),
            ("hit_max_turns", "Hit the max-turn limit", lambda x: "-" if x is None else f"{100 * x:.1f}%"),
            ("abnormal_termination", "Abnormal termination", lambda x: "-" if x is None else f"{100 * x:.1f}%"),
            ("abnormal_final_action", "Abnormal final action", lambda x: "-" if x is None else f"{100 * x:.1f}%")]
    lines = ["| | " + " | ".join(f"{TASK_TITLES[t]}: ours | paper" for t in tasks) + " |",
             "|---|" + "---|---|" * len(tasks)]
    for key, title, f in rows:
        cells = []
        for t in tasks:
            q = res.get(f"{t}/data", {}).get("quality", {})
            cells.append(f"{f(q.get(key))} | {f(PAPER_TABLE4[key][PAPER_COLUMNS[t]])}")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def efficiency_lines(res, results_dir):
    flops = res.get("flops")
    if not flops:
        return ["(profile_flops.py has not run yet)"]
    lines = ["| setting | GenPI saving vs full prompt, MACs | latency |", "|---|---|---|"]
    for key, title in (("no_cache", "no caching of earlier turns (fig. 3)"), ("cached", "prompt and turns cached (fig. 4)")):
        full, genpi = flops[key]["full prompt"]["turns"], flops[key]["GenPI merged"]["turns"]
        saving = lambda k: 100 * (1 - sum(t[k] for t in genpi) / sum(t[k] for t in full))
        latency = f"{saving('latency_s'):.1f}%" if "latency_s" in full[0] else "-"
        lines.append(f"| {title} | {saving('macs'):.1f}% | {latency} |")
    lines.append(f"\nPaper (Llama-3-8B, cached): 39% MACs, 17% latency. Plots: {results_dir}/plots/fig3_no_cache.png, "
                 f"{results_dir}/plots/fig4_cached.png")
    return lines


def mean_score(res, task, name):
    if name == "no prompt":
        base = res.get(f"{task}/baselines")
        return base["no prompt"]["score"] if base else None
    runs = [v["eval"]["score"] for k, v in res.items() if k == f"{task}/{name}" or k.startswith(f"{task}/{name}_seed")]
    return statistics.mean(runs) if runs else None


def ordering_lines(res, tasks):
    """The paper's headline ordering, GenPI > SFT only > no prompt, task by task."""
    lines = []
    for t in tasks:
        g, s, n = (mean_score(res, t, name) for name in ("genpi", "sft", "no prompt"))
        if None in (g, s, n):
            lines.append(f"- {TASK_TITLES[t]}: not all three rows have run yet.")
            continue
        verdict = "holds" if g > s > n else "does not hold"
        lines.append(f"- {TASK_TITLES[t]}: GenPI {g:.2f}, SFT only {s:.2f}, no prompt {n:.2f}: the ordering {verdict}.")
    return lines


def write_report(args, res, path: Path, n_steps: int):
    tasks = [t for t in TASKS if any(k.startswith(t + "/") for k in res)]
    seconds = sum(r.get("seconds", 0) for r in res.values())
    commands = list(dict.fromkeys(r.get("command", "?") for r in res.values()))     # in order of first use
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    import torch
    text = [
        "# Results: the paper's tables on this machine",
        "",
        f"Produced by `python reproduce.py{'' if args.scale == 'tiny' else ' --scale ' + args.scale}`, in "
        f"{len(commands)} sitting(s): {', '.join(f'`{c}`' for c in commands) or 'none yet'}; report written at commit {commit or 'unknown'} "
        f"on {platform.machine()} with {torch.get_num_threads()} threads, torch {torch.__version__}. "
        f"**Steps done: {len(res)} of {n_steps}**; their wall time: {seconds / 60:.0f} min. Scale "
        f"`{args.scale}`: {SCALES[args.scale]['samples']} synthetic samples, train.py "
        f"`{' '.join(SCALES[args.scale]['train'])}`, episodes per task {SCALES[args.scale]['limit']}. Model: "
        f"{args.model or 'embedded SmolLM2-135M-Instruct'} (the paper: Llama-3-8B-Instruct, 1,000 samples).",
        "",
        "Scores: OS and Web Browsing success rate x100, Web Shopping reward x100; in brackets the score "
        "normalized to the upper bound (Norm. = 100 x score / upper bound; '-' when the upper bound is 0).",
        "",
        "## GenPI > SFT only > no prompt?", "", *ordering_lines(res, tasks), "",
        "## Table 1: methods", "", score_table(res, tasks, ["upper bound", "no prompt", "kld", "seqkd", "seqkd_kld",
                                                            "prepend", "prepend50", "sft", "genpi"]),
        "", "## Table 2: loss ablations", "",
        score_table(res, tasks, ["genpi", "pg_without_reason", "pg_without_prompt", "sft", "pg_only"]),
        "", "## Table 3: orderings", "", score_table(res, tasks, ["genpi", "reason_given_prompt", "prompt_given_reason"]),
        "", "## Diagnostics of every trained run", "", diagnostics_table(res, tasks),
        "", "## Table 4: synthetic data quality", "", quality_table(res, tasks),
        "", "## Efficiency (figures 3-4, section 8)", "", *efficiency_lines(res, args.results), "",
    ]
    write_atomic(str(path), "\n".join(text))
    print(f"wrote {path}")


# ----------------------------------------------------------------------------- command line
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(TASKS), help="tasks, comma-separated (default: all three)")
    ap.add_argument("--methods", default=",".join(RUNS), help="runs, comma-separated (default: all): " + ", ".join(RUNS))
    ap.add_argument("--seeds", type=int, default=3, help="seeds of GenPI and SFT only on Web Shopping (default 3)")
    ap.add_argument("--scale", choices=sorted(SCALES), default="tiny", help="tiny (default), demo or paper")
    ap.add_argument("--model", help="checkpoint for every step (default: the embedded SmolLM2)")
    ap.add_argument("--runs", default="runs/reproduce", help="adapters, data and transcripts go to RUNS/<scale> (not committed)")
    ap.add_argument("--results", default="results", help="the small per-step JSONs go to RESULTS/<scale> (commit them)")
    ap.add_argument("--report-file", help="default: RESULTS.md for the default scale, else RESULTS-<scale>.md")
    ap.add_argument("--no-flops", action="store_true", help="skip profile_flops.py")
    ap.add_argument("--dry-run", action="store_true", help="list the steps and which are done; run nothing")
    ap.add_argument("--report", action="store_true", help="only write the report from the results present")
    args = ap.parse_args(argv)
    args.results, args.runs = str(Path(args.results) / args.scale), str(Path(args.runs) / args.scale)
    if args.report_file is None:
        args.report_file = "RESULTS.md" if args.scale == "tiny" else f"RESULTS-{args.scale}.md"
    args.only = [t.strip() for t in args.only.split(",") if t.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [t for t in args.only if t not in TASKS] + [m for m in args.methods if m not in RUNS]
    if bad:
        ap.error(f"unknown task or method: {', '.join(bad)} (tasks: {', '.join(TASKS)}; methods: {', '.join(RUNS)})")
    return args


def sitting_command() -> str:
    return " ".join(["python", "reproduce.py", *sys.argv[1:]]) if Path(sys.argv[0]).name == "reproduce.py" \
        else "reproduce.main()"


def grid_identity(args) -> dict:
    """What a result depends on besides its step: a result made with other settings is not reused."""
    return {"scale": args.scale, "settings": SCALES[args.scale], "model": args.model}


def is_done(path: Path, identity: dict) -> bool:
    return path.exists() and json.loads(path.read_text()).get("grid") == identity


def main(argv=None):
    args = parse_args(argv)
    grid, identity = steps(args), grid_identity(args)
    if args.dry_run:
        for path, _ in grid:
            print(f"{'done ' if is_done(path, identity) else 'to do'}  {path}")
        return 0
    if not args.report:
        for i, (path, step) in enumerate(grid):
            if is_done(path, identity):
                continue
            print(f"\n=== step {i + 1}/{len(grid)}: {path}", flush=True)
            start = time.time()
            result = {**step(), "seconds": time.time() - start, "grid": identity, "command": sitting_command()}
            write_atomic(str(path), json.dumps(result, indent=1) + "\n")
    full = steps(parse_args(["--scale", args.scale]))                   # every task, method and seed
    write_report(args, load_results(Path(args.results)), Path(args.report_file), len(full))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Mask ablation: the paper's Table 2 in miniature, every strategy x several seeds, with confidence intervals.

    python -m tools.ablate                                  # embedded benchmark, 8 strategies x 3 seeds -> runs/ablation/
    python -m tools.ablate --seeds 0,1,2,3,4 --steps 200    # more seeds / longer runs
    python -m tools.ablate --model DIR --data train.jsonl --probe-data probe.jsonl --out results/
    python -m tools.ablate --quick                          # tiny sizes, a minute on a laptop (what the tests run)

Every strategy trains with identical data, base decoder, hyper-parameters and seeds (train.py's own loop, one
process); only --mask differs. "oracle" is the untrained base under the causal mask (the paper's Oracle row).
A finished (strategy, seed) run is not recomputed: rerunning the command resumes the ablation.

Writes to --out:
    table.md       Table 2's layout (mean +- std over seeds per task, then the average), and paired differences of
                   the average AUC against the Oracle, causal and scheduler rows, and GG-SM against ggsm_zero (its
                   gradient guidance replaced by zeros), with 95% t-intervals (paired by seed)
    curves.png     training loss per strategy against the optimizer step (mean over seeds), GG-SM phases shaded,
                   and the mean future-attention weight per step beneath it
    stability.png  per strategy: the loss's spread over a sliding window and the gradient norm per step
    results.json   every number above
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

import checkpoint as ckpt
import data
import ggsm
import probe
import train

STRATEGIES = ("oracle",) + tuple(ggsm.STRATEGIES)  # the untrained Oracle row, then Table 2's strategies
# two-sided 95% Student-t quantiles t_{0.975, df}; df > 30 uses the normal 1.96
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated subset of the strategies")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (data and base decoder stay fixed)")
    p.add_argument("--model", default="tiny", help="HF folder, or 'tiny' (built once from the training data)")
    p.add_argument("--data", default=None, help="training JSONL; default: the embedded synthetic benchmark")
    p.add_argument("--probe-data", default=None, help="labelled JSONL (required with --data)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: train.py's)")
    p.add_argument("--out", default="runs/ablation", help="results folder (runs/, table.md, curves.png, ...)")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a fast check")
    p.add_argument("--train-args", default="", help="extra train.py flags, quoted, applied to every run")
    return p.parse_args(argv)


def mean_ci(x):
    """Mean, sample std and the 95% t-interval half-width of a 1-D sample."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n < 2:
        return float(x.mean()), float("nan"), float("nan")
    sd = float(x.std(ddof=1))
    t = T975[n - 2] if n - 1 <= len(T975) else 1.96
    return float(x.mean()), sd, t * sd / math.sqrt(n)


def run_one(strategy, seed, args, base_argv, out):
    """Train (unless oracle) and probe one (strategy, seed); returns its probe.json, reusing a finished run."""
    run_dir = os.path.join(out, "runs", f"{strategy}-seed{seed}")
    done = os.path.join(run_dir, "probe.json")
    if os.path.isfile(done):
        with open(done) as f:
            return json.load(f)
    t0 = time.time()
    if strategy == "oracle":
        probe.main(["--model", base_argv["model"], "--data", base_argv["probe"], "--out", done,
                    "--seed", str(seed), "--name", "oracle"])
    elif ckpt.find_checkpoint(run_dir):  # interrupted mid-training: continue it
        train.main(["--out", run_dir, "--resume"])
    else:
        train.main(["--model", base_argv["model"], "--data", base_argv["train"], "--probe-data", base_argv["probe"],
                    "--mask", strategy, "--seed", str(seed), "--out", run_dir, "--log-every", "1", "--no-oracle"]
                   + base_argv["extra"])  # the Oracle row is its own run here
    with open(done) as f:
        result = json.load(f)
    result["wall_s"] = time.time() - t0
    ckpt.write_json(done, result)
    return result


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    return [rec for _, rec in data.read_jsonl(path)]  # a damaged line is named by file:line


def summarise(results, strategies, seeds):
    """results[(strategy, seed)] = probe.json -> per-strategy mean/std per task, and paired differences."""
    tasks = [t for t in data.TASKS if any(t in r["tasks"] and "auc" in r["tasks"][t] for r in results.values())]
    table = {}
    for s in strategies:
        row = {}
        for t in tasks:
            vals = [results[(s, k)]["tasks"][t]["auc"] for k in seeds if "auc" in results[(s, k)]["tasks"].get(t, {})]
            row[t] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan"),
                      "per_seed": vals}
        avgs = [float(np.mean([results[(s, k)]["tasks"][t]["auc"] for t in tasks])) for k in seeds]
        m, sd, _ = mean_ci(avgs)
        row["avg"] = {"mean": m, "std": sd, "per_seed": avgs}
        table[s] = row
    # every row against the untrained Oracle, the causal and the scheduler rows; GG-SM against its own control
    pairs = [(s, ref) for ref in ("oracle", "causal", "scheduler") if ref in table for s in strategies if s != ref]
    pairs += [("ggsm", "ggsm_zero")] if {"ggsm", "ggsm_zero"} <= set(table) else []
    diffs = {}
    for s, ref in pairs:
        d = np.array(table[s]["avg"]["per_seed"]) - np.array(table[ref]["avg"]["per_seed"])  # paired by seed
        m, sd, hw = mean_ci(d)
        diffs[f"{s} - {ref}"] = {"mean": m, "std": sd, "ci95": [m - hw, m + hw], "per_seed": d.tolist(),
                                 "excludes_zero": bool(hw == hw and (m - hw > 0 or m + hw < 0))}
    return tasks, table, diffs


def write_table(path, tasks, table, diffs, seeds):
    head = ["Method"] + tasks + ["Avg"]
    lines = [f"AUC, mean ± std over seeds {','.join(map(str, seeds))}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s, row in table.items():
        cells = [f"{row[t]['mean']:.4f} ± {row[t]['std']:.4f}" for t in tasks + ["avg"]]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", "Paired difference of the average AUC (per seed), 95% t-interval:", "",
              "| Difference | Mean | 95% CI | Excludes 0 |", "|---|---|---|---|"]
    for name, d in diffs.items():
        lines.append(f"| {name} | {d['mean']:+.4f} | [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] | "
                     f"{'yes' if d['excludes_zero'] else 'no'} |")
    text = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


def plot(out, strategies, seeds, schedule_info):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curves = {s: [read_metrics(os.path.join(out, "runs", f"{s}-seed{k}")) for k in seeds] for s in strategies if s != "oracle"}

    def mean_series(runs, key):
        n = min((len(r) for r in runs), default=0)
        if n == 0:
            return np.array([]), np.array([])
        steps = np.array([rec["step"] for rec in runs[0][:n]])
        return steps, np.mean([[rec[key] for rec in r[:n]] for r in runs], axis=0)

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    warm, total = schedule_info
    for ax in (ax1, ax2):  # GG-SM phases
        ax.axvspan(0, warm, color="tab:orange", alpha=0.10, label="GG-SM warm-up" if ax is ax1 else None)
        ax.axvspan(warm, total, color="tab:green", alpha=0.07, label="GG-SM ramp" if ax is ax1 else None)
    for s, runs in curves.items():
        x, y = mean_series(runs, "loss")
        ax1.plot(x, y, label=s, lw=1.2)
        x, w = mean_series(runs, "future_weight")
        ax2.plot(x, w, label=s, lw=1.2)
    ax1.set_ylabel("InfoNCE loss (mean over seeds)")
    ax1.legend(fontsize=8, ncol=3)
    ax2.set_ylabel("mean future-attention weight")
    ax2.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=110)
    plt.close(fig)

    stability = {}
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for s, runs in curves.items():
        x, y = mean_series(runs, "loss")
        if len(y) < 2:
            continue
        win = max(2, min(10, len(y) // 5))
        spread = np.array([np.std(y[max(0, i - win + 1): i + 1]) for i in range(len(y))])
        x2, g = mean_series(runs, "grad_norm")
        ax1.plot(x, spread, label=s, lw=1.0)
        ax2.plot(x2, g, label=s, lw=1.0)
        stability[s] = {"loss_window_std_mean": float(spread.mean()), "grad_norm_max": float(g.max()),
                        "grad_norm_median": float(np.median(g))}
    ax1.set_ylabel("loss std over a sliding window")
    ax2.set_ylabel("gradient norm (pre-clip)")
    ax2.set_xlabel("optimizer step")
    ax1.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "stability.png"), dpi=110)
    plt.close(fig)
    return stability


def main(argv=None):
    args = get_args(argv)
    strategies = [s for s in args.strategies.split(",") if s]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        sys.exit(f"error: --strategies: unknown {unknown}; choose from {', '.join(STRATEGIES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = args.out
    os.makedirs(out, exist_ok=True)
    t_start = time.time()

    # sizes: the embedded default's, or tiny ones for --quick
    extra = args.train_args.split() if args.train_args else []
    size = ["--synthetic-train", "64", "--synthetic-probe", "300", "--tiny-hidden", "32", "--tiny-layers", "2",
            "--tiny-heads", "4", "--tiny-kv-heads", "2", "--tiny-vocab", "400", "--tiny-steps", "5",
            "--max-len", "96", "--answer-max-len", "24", "--batch-size", "16", "--micro-batch", "16"] if args.quick else []
    steps = args.steps or (4 if args.quick else None)
    targs = train.get_args(size + extra + (["--steps", str(steps)] if steps else []))

    # the data and the base decoder are made once (train.py's own setup) and shared by every run
    targs.cache, targs.data, targs.probe_data, targs.model = out, args.data, args.probe_data, args.model
    train_path, probe_path = train.prepare_paths(targs, False, True, print)
    if probe_path is None:
        sys.exit("error: --probe-data is needed with --data")
    model_dir = train.prepare_model(targs, lambda: train.load_train_records(targs, train_path, print), train_path,
                                    False, True, torch.device("cpu"), print)
    # the text form, as the Oracle row (probe.py --model) reads it: train.py's --event-modalities auto would take
    # the event form where --max-len cuts many events (--quick's 96 tokens do), and the rows would not be paired
    base = {"model": model_dir, "train": train_path, "probe": probe_path,
            "extra": ["--event-modalities", ""] + size + extra + (["--steps", str(steps)] if steps else [])}

    results = {}
    total = len(strategies) * len(seeds)
    for i, (s, k) in enumerate([(s, k) for k in seeds for s in strategies]):
        print(f"[ablation {i + 1}/{total}] {s} seed {k}", flush=True)
        results[(s, k)] = run_one(s, k, args, base, out)

    tasks, table, diffs = summarise(results, strategies, seeds)
    text = write_table(os.path.join(out, "table.md"), tasks, table, diffs, seeds)
    warm = round(targs.mask_warmup * targs.steps)
    stability = plot(out, strategies, seeds, (warm, targs.steps))
    summary = {"strategies": strategies, "seeds": seeds, "tasks": tasks, "table": table, "differences": diffs,
               "stability": stability, "wall_s": time.time() - t_start,
               "runs": {f"{s}-seed{k}": r for (s, k), r in results.items()},
               "settings": {"model": model_dir, "data": train_path, "probe_data": probe_path, "train_args": base["extra"]}}
    ckpt.write_json(os.path.join(out, "results.json"), summary)
    print(text)
    print(f"ablation written to {out} in {time.time() - t_start:.0f}s")
    return summary


if __name__ == "__main__":
    main()

"""
The probe's fit time against scikit-learn (a benchmark, not a test): prints a markdown table, --out writes JSON.

    python -m tools.bench_probe [--n 20000 --d 256 --features mixed|lowrank --C 1.0 --reps 5 --out bench_probe.json]

Measures the fit time of probe.LogisticRegression (NumPy, damped Newton) against scikit-learn's
LogisticRegression(solver="lbfgs") at the same C on the same standardised features (synthetic Gaussian features,
well conditioned or low-rank, labels from a logistic model; users split into train and test by probe.split_users,
probe.TEST_FRAC held out). Newton's iteration count hardly depends on conditioning; L-BFGS's does.
Repetitions are interleaved (ours, sklearn, sklearn-tight, ours, ...) so drifts in machine load hit all solvers
alike; medians are reported. Also reported: held-out AUC of each fit, the objective each reaches (the same function
for both), the largest coefficient difference, and the time of one full fit_probe (CV over probe.DEFAULT_CS x 5
folds, then the refit).

scikit-learn is a dev requirement (requirements-dev.txt), imported only here.
"""
import argparse
import os
import platform
import statistics
import time

import numpy as np

import probe
from checkpoint import write_json


def synthetic_features(n, d, seed=0, kind="mixed"):
    """Gaussian features with labels from a logistic model. kind "mixed": mildly correlated (identity
    plus a small random mixing), well conditioned after standardisation; "lowrank": d//8 latent
    factors plus 0.1 isotropic noise, anisotropic like pooled LLM embeddings, ill conditioned."""
    rng = np.random.default_rng(seed)
    if kind == "mixed":
        X = rng.normal(size=(n, d)) @ (np.eye(d) + 0.3 * rng.normal(size=(d, d)) / np.sqrt(d))
    elif kind == "lowrank":
        k = max(1, d // 8)
        X = rng.normal(size=(n, k)) @ rng.normal(size=(k, d)) + 0.1 * rng.normal(size=(n, d))
    else:
        raise ValueError(f"synthetic_features: kind must be 'mixed' or 'lowrank', got {kind!r}")
    w = rng.normal(size=d)
    z = (X - X.mean(0)) / X.std(0) @ w
    z *= 2.0 / z.std()  # signal strength fixed: a test AUC around 0.85
    y = (z + rng.logistic(size=n) > 0).astype(np.int64)
    return X, y


def objective(X, y, coef, intercept, C):
    """sum_i log(1 + exp(-s_i z_i)) + ||w||^2 / (2C): the function both solvers minimise."""
    s, z = 2 * y - 1, X @ coef + intercept
    return float(np.logaddexp(0, -s * z).sum() + 0.5 / C * coef @ coef)


def bench_probe(args):
    """-> the JSON result; prints the table."""
    from sklearn import __version__ as sk_version
    from sklearn.linear_model import LogisticRegression as SkLogisticRegression

    load = os.getloadavg()  # other processes on the machine skew timings: reported with the results
    X, y = synthetic_features(args.n, args.d, args.seed, args.features)
    is_test = probe.split_users([f"u{i}" for i in range(args.n)])
    mean, scale = probe.standardise(X[~is_test])
    Xtr, ytr = (X[~is_test] - mean) / scale, y[~is_test]
    Xte, yte = (X[is_test] - mean) / scale, y[is_test]
    solvers = {
        "ours (Newton, tol 1e-12)": lambda: probe.LogisticRegression(C=args.C).fit(Xtr, ytr),
        "sklearn lbfgs (tol 1e-4, default)": lambda: SkLogisticRegression(C=args.C, max_iter=10000).fit(Xtr, ytr),
        "sklearn lbfgs (tol 1e-10)": lambda: SkLogisticRegression(C=args.C, tol=1e-10, max_iter=10000).fit(Xtr, ytr),
    }
    times = {name: [] for name in solvers}
    fitted = {}
    for name, fit in solvers.items():  # one warm-up fit each (BLAS threads, caches, imports)
        fitted[name] = fit()
    for _ in range(args.reps):  # interleaved repetitions
        for name, fit in solvers.items():
            t0 = time.perf_counter()
            fitted[name] = fit()
            times[name].append(time.perf_counter() - t0)
    ref_name = "ours (Newton, tol 1e-12)"
    ref_t = statistics.median(times[ref_name])
    ref_coef = fitted[ref_name].coef_
    rows = []
    for name, m in fitted.items():
        coef = np.ravel(m.coef_)
        intercept = float(np.ravel(m.intercept_)[0])
        rows.append({
            "solver": name,
            "median_s": statistics.median(times[name]),
            "times_s": times[name],
            "ratio_to_ours": statistics.median(times[name]) / ref_t,
            "test_auc": probe.roc_auc(yte, Xte @ coef + intercept),
            "objective": objective(Xtr, ytr, coef, intercept, args.C),
            "max_rel_coef_diff_to_ours": float(np.abs(coef - ref_coef).max() / np.abs(ref_coef).max()),
            "iterations": int(np.ravel(getattr(m, "n_iter_", [0]))[0]),
        })
    t0 = time.perf_counter()
    p = probe.fit_probe(X[~is_test], ytr, folds=5, seed=args.seed)
    cv_s = time.perf_counter() - t0
    cv = {"seconds": cv_s, "Cs": list(probe.DEFAULT_CS), "folds": 5, "chosen_C": p.C,
          "test_auc": probe.roc_auc(yte, p.decision_function(X[is_test]))}

    print(f"probe fit: {int((~is_test).sum())} train x {args.d} standardised '{args.features}' features "
          f"({int(is_test.sum())} test users), C={args.C}, {args.reps} interleaved reps, median time")
    print(f"numpy {np.__version__}, scikit-learn {sk_version}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"load average before {load[0]:.2f}, after {os.getloadavg()[0]:.2f}\n")
    print("| solver | median s | time / ours | test AUC | objective | max rel coef diff | iters |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['solver']} | {r['median_s']:.3f} | {r['ratio_to_ours']:.2f} | {r['test_auc']:.6f} | "
              f"{r['objective']:.6f} | {r['max_rel_coef_diff_to_ours']:.1e} | {r['iterations']} |")
    print(f"\nfit_probe (CV over {len(probe.DEFAULT_CS)} C x 5 folds + refit): {cv_s:.2f} s, "
          f"chosen C={p.C:g}, test AUC {cv['test_auc']:.6f}")
    return {"section": "probe", "n": args.n, "d": args.d, "features": args.features, "C": args.C, "reps": args.reps,
            "n_train": int((~is_test).sum()), "n_test": int(is_test.sum()),
            "numpy": np.__version__, "sklearn": sk_version, "cpus": os.cpu_count(),
            "load_average_before": load[0], "load_average_after": os.getloadavg()[0],
            "solvers": rows, "fit_probe": cv}



def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20000, help="users (split into train and test by the probe's hash split)")
    p.add_argument("--d", type=int, default=256, help="embedding dimension")
    p.add_argument("--features", choices=("mixed", "lowrank"), default="mixed",
                   help="mixed: well-conditioned; lowrank: anisotropic, embedding-like")
    p.add_argument("--C", type=float, default=1.0, help="inverse L2 penalty, scikit-learn's C")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per solver (after one warm-up)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    result = bench_probe(args)
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()

"""
Linear probing of frozen user embeddings: the evaluation of the paper's Table 2. After the embedding, NumPy only.

    embeddings ─▶ split_users (hash of user_id) ─▶ standardise (train stats) ─▶ LogisticRegression
               (penalty C by stratified K-fold CV AUC on train users) ─▶ roc_auc on test users ─▶ table

Protocol (the paper leaves the probe unspecified; these are our fixed choices):
- split: a user is a probe-test user iff sha256(salt + ":" + user_id) maps below TEST_FRAC = 0.5: the id alone
  decides, for every task, whatever the file's order. Half the users: on the embedded benchmark's 5,000 probe
  users, 0.2 -> 0.5 takes the standard error of a trained encoder's mean AUC from 0.0065 to 0.0044.
- every mean AUC comes with a standard error, by bootstrap over the test users (bootstrap_mean_auc).
- L2 logistic regression, scikit-learn's LogisticRegression(C=C) objective, C chosen by stratified CV AUC on the
  training users (ties -> smaller C), refitted on all of them; features z-scored with the training users' stats.
- a task with one class in either split is reported with a "status" and left out of the average.

References: arXiv 2602.10622 (Table 2, linear probing, ROC-AUC); Mann & Whitney (1947) for the rank
form of the AUC; Boyd & Vandenberghe, Convex Optimization §9.5 (damped Newton, Newton decrement).

    python probe.py --checkpoint RUN_DIR/checkpoint --data probe.jsonl --out probe.json
    python probe.py --checkpoint RUN_DIR/checkpoint --export-peft OUT    # or --export-merged OUT (tools/export.py)
    python -m tools.bench_probe --n 20000 --d 256      # fit time against scikit-learn
    probe.encode(checkpoint_dir, records) -> (N, E) user embeddings, from Python
"""

import copy
import hashlib
import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

import checkpoint as ckpt
from checkpoint import load_embeddings, save_embeddings  # noqa: F401 (probe's public names)
import data
import model

# paper [probe]: linear probing, ROC-AUC, nothing else specified; the protocol above is this project's
TEST_FRAC = 0.5  # share of the probe users held out as test users (module docstring)
DEFAULT_CS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # log grid of scikit-learn-style C

# -----------------------------------------------------------------------------
# ROC-AUC by ranks

def roc_auc(labels, scores) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative),
    ties counted one half. Computed as the Mann-Whitney U statistic from average ranks:
        AUC = (sum of positive ranks - n1 (n1 + 1) / 2) / (n1 n0).
    labels: 0/1 (or bool), scores: finite floats, both 1-D of the same length."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"roc_auc: labels and scores must be 1-D, got shapes {y.shape} and {s.shape}")
    if len(y) != len(s):
        raise ValueError(f"roc_auc: {len(y)} labels but {len(s)} scores")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError(f"roc_auc: labels must be 0/1, got values {np.unique(y)[:5]}")
    if not np.all(np.isfinite(s)):
        raise ValueError("roc_auc: scores contain NaN or inf")
    y = y.astype(bool)
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        raise ValueError(f"roc_auc: needs both classes, got {n1} positives and {n0} negatives")
    # average ranks (1-based): a run of equal scores at sorted positions [start, end) gets (start+1+end)/2
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    new_value = np.r_[True, s_sorted[1:] != s_sorted[:-1]]
    starts = np.flatnonzero(new_value)
    ends = np.r_[starts[1:], len(s)]
    ranks = np.empty(len(s))
    ranks[order] = ((starts + 1 + ends) / 2.0)[np.cumsum(new_value) - 1]
    u = ranks[y].sum() - n1 * (n1 + 1) / 2.0  # Mann-Whitney U of the positives
    return float(u / (n1 * n0))

# -----------------------------------------------------------------------------
# L2 logistic regression, damped Newton

def _log1pexp(z):
    return np.logaddexp(0.0, z)  # log(1 + e^z) without overflow

def _expit(z):
    return np.exp(-np.logaddexp(0.0, -z))  # 1 / (1 + e^-z), full relative precision at both tails

class LogisticRegression:
    """Binary logistic regression with an L2 penalty on the weights (not the intercept):

        minimise  f(w, b) = sum_i log(1 + exp(-s_i (x_i.w + b))) + ||w||^2 / (2C),   s_i = 2 y_i - 1

    which is scikit-learn's LogisticRegression(C=C) objective. Solver: Newton's method on the
    (d+1)-dim parameter [w, b] with a backtracking (Armijo) line search. The penalty makes f strongly
    convex in w, so the optimum is finite even on separable data, and damped Newton converges to it
    globally, quadratically near the end. Cost per iteration: the Hessian X^T diag(p(1-p)) X, n d^2
    multiply-adds (float32 BLAS syrk in row chunks), and a (d+1)^2 solve; 5-10 iterations from a cold
    start, 2-4 from a warm one (measured: 100k x 1024, 6 iterations, 20 s on two shared CPU cores;
    16k x 256, 0.2 s). Memory: X in float64 plus a float32 copy.
    When d > n the fit runs in the n-dim row space of X (X = U S V^T, features U S, w = V w'): exact,
    because the optimum satisfies w = C X^T (y - p), which lies in that row space, and ||V w'|| = ||w'||.

    fit(X, y, init=None) -> self;  decision_function(X) -> (n,)
    coef_ (d,), intercept_ float, n_iter_ int, objective_ float
    """

    def __init__(self, C=1.0, tol=1e-12, max_iter=100, chunk_rows=16384):
        if not C > 0:
            raise ValueError(f"LogisticRegression: C must be > 0, got {C}")
        self.C, self.tol, self.max_iter, self.chunk_rows = float(C), tol, max_iter, chunk_rows

    def fit(self, X, y, init=None):
        """init: optional (coef (d,), intercept) warm start, e.g. the solution at a nearby C."""
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y)
        if X.ndim != 2 or y.ndim != 1 or len(X) != len(y):
            raise ValueError(f"LogisticRegression.fit: need X (n, d) and y (n,), got {X.shape} and {y.shape}")
        if not np.all((y == 0) | (y == 1)):
            raise ValueError("LogisticRegression.fit: y must be 0/1")
        if not np.all(np.isfinite(X)):
            raise ValueError("LogisticRegression.fit: X contains NaN or inf")
        y = y.astype(np.float64)
        if y.min() == y.max():
            raise ValueError(f"LogisticRegression.fit: y has a single class ({int(y[0])})")
        n, d = X.shape
        if init is None:
            p = y.mean()
            w0, b0 = np.zeros(d), math.log(p / (1 - p))  # the optimum of the intercept-only model
        else:
            w0, b0 = np.asarray(init[0], dtype=np.float64), float(init[1])
        if d > n:
            _, _, Vt = np.linalg.svd(X, full_matrices=False)  # X = U S Vt, Vt (n, d)
            Z = X @ Vt.T  # (n, n) = U S
            w, b = self._newton(Z, y, Vt @ w0, b0)
            self.coef_ = Vt.T @ w
        else:
            self.coef_, b = self._newton(X, y, w0, b0)
        self.intercept_ = float(b)
        return self

    def _objective(self, X, s, w, b):
        z = X @ w + b
        return np.sum(_log1pexp(-s * z)) + 0.5 / self.C * (w @ w), z

    def _newton(self, X, y, w, b):
        n, d = X.shape
        s = 2.0 * y - 1.0  # labels as -1 / +1
        # The Hessian only steers the step; the float64 gradient and objective decide where it stops,
        # so X^T diag(v) X is formed in float32 (twice the BLAS speed, half the memory). The fixed
        # point is the exact optimum; the ~1e-6 relative error in H costs at most one more iteration.
        X32 = X.astype(np.float32)
        f, z = self._objective(X, s, w, b)
        self.n_iter_ = 0
        for it in range(self.max_iter):
            p = _expit(z)
            r = p - y
            g = np.r_[X.T @ r + w / self.C, r.sum()]  # gradient (d+1,)
            v = np.exp(-_log1pexp(z) - _log1pexp(-z))  # p (1 - p), no cancellation at the tails
            H = np.empty((d + 1, d + 1))
            H[:d, :d] = 0.0
            sqrt_v = np.sqrt(v).astype(np.float32)
            for i in range(0, n, self.chunk_rows):  # X^T diag(v) X in row chunks: memory chunk_rows x d
                A = X32[i:i + self.chunk_rows] * sqrt_v[i:i + self.chunk_rows, None]
                H[:d, :d] += A.T @ A  # A.T @ A of one buffer runs as BLAS syrk (half a gemm)
            H[:d, :d][np.diag_indices(d)] += 1.0 / self.C
            H[:d, d] = H[d, :d] = X.T @ v
            H[d, d] = v.sum() + 1e-12 * n  # tiny ridge on the intercept only so H stays invertible
            step = np.linalg.solve(H, g)  # Newton direction (H is symmetric positive definite)
            decrement = g @ step  # Newton decrement^2 ~ 2 (f - f*)
            if not np.isfinite(decrement) or decrement <= 0:
                break  # numerically at the optimum (H ill-conditioned beyond float64)
            # backtracking line search (Armijo): halve until f drops by at least 1e-4 of the model decrease
            t = 1.0
            while t > 1e-10:
                w_new, b_new = w - t * step[:d], b - t * step[d]
                f_new, z_new = self._objective(X, s, w_new, b_new)
                if f_new <= f - 1e-4 * t * decrement:
                    break
                t *= 0.5
            else:
                break  # no decrease possible in float64: converged to machine precision
            w, b, f, z = w_new, b_new, f_new, z_new
            self.n_iter_ = it + 1
            if decrement / 2 <= self.tol * max(1.0, abs(f)):
                break  # f - f* was below tol (relative) before this step; quadratic convergence beyond
        self.objective_ = float(f)
        return w, b

    def decision_function(self, X):
        return np.asarray(X, dtype=np.float64) @ self.coef_ + self.intercept_

# -----------------------------------------------------------------------------
# probe fitting: standardisation, cross-validated penalty

def standardise(X_train):
    """Per-column mean and scale of the training rows; apply as (X - mean) / scale to any split.
    Constant columns get scale 1 (they become 0, not NaN)."""
    X_train = np.asarray(X_train, dtype=np.float64)
    mean = X_train.mean(axis=0)
    scale = X_train.std(axis=0)
    scale[scale < 1e-12 * max(1.0, float(np.abs(mean).max(initial=0.0)))] = 1.0
    return mean, scale

def stratified_folds(y, folds, seed=0):
    """Fold id in [0, folds) per row; each class is shuffled and dealt round-robin, so every fold
    has (nearly) the class ratio of y. The dealing goes on from one class to the next, so fold sizes
    differ by at most one."""
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=np.int64)
    dealt = 0
    for c in (0, 1):
        idx = rng.permutation(np.flatnonzero(y == c))
        fold[idx] = (dealt + np.arange(len(idx))) % folds
        dealt += len(idx)
    return fold

@dataclass
class Probe:
    """A fitted probe: standardisation of the training users + logistic regression at the chosen C."""
    mean: np.ndarray
    scale: np.ndarray
    model: LogisticRegression
    C: float
    cv_auc: dict = field(default_factory=dict)  # C -> mean held-out AUC over folds

    def decision_function(self, X):
        return self.model.decision_function((np.asarray(X, dtype=np.float64) - self.mean) / self.scale)

def fit_probe(X_train, y_train, Cs=DEFAULT_CS, folds=5, seed=0) -> Probe:
    """Choose C by stratified K-fold cross-validation ROC-AUC on the training users only (features
    standardised with each fold's own training rows), then refit on all training users.
    folds is lowered to the minority class count when that is smaller (each fold needs a positive
    and a negative to have an AUC); fewer than 2 of either class is an error.
    Cost: folds x len(Cs) fits, each warm-started from the previous (smaller) C, plus the refit."""
    X = np.asarray(X_train, dtype=np.float64)
    y = np.asarray(y_train).astype(np.int64)
    Cs = sorted(float(c) for c in Cs)  # ascending: each C warm-starts from the stronger penalty before it
    if len(Cs) == 0:
        raise ValueError("fit_probe: empty grid Cs")
    n_min = int(min(y.sum(), len(y) - y.sum()))
    if n_min < 2:
        raise ValueError(f"fit_probe: need at least 2 users of each class, got {int(y.sum())} positives of {len(y)}")
    cv_auc = {}
    k = min(folds, n_min)
    if len(Cs) > 1 and k >= 2:
        fold = stratified_folds(y, k, seed)
        scores = np.zeros((k, len(Cs)))
        for j in range(k):
            tr, va = fold != j, fold == j
            mean, scale = standardise(X[tr])
            Xtr, Xva = (X[tr] - mean) / scale, (X[va] - mean) / scale
            init = None
            for i, C in enumerate(Cs):
                m = LogisticRegression(C=C).fit(Xtr, y[tr], init=init)
                init = (m.coef_, m.intercept_)
                scores[j, i] = roc_auc(y[va], m.decision_function(Xva))
        cv_auc = dict(zip(Cs, scores.mean(axis=0).tolist()))
        best = Cs[int(np.argmax(scores.mean(axis=0)))]  # argmax takes the first maximum: the smaller C
    else:
        best = Cs[0]
    mean, scale = standardise(X)
    model = LogisticRegression(C=best).fit((X - mean) / scale, y)
    return Probe(mean=mean, scale=scale, model=model, C=best, cv_auc=cv_auc)

# -----------------------------------------------------------------------------
# tasks: split, probe, table

def split_users(user_ids, test_frac=None, salt="probe") -> np.ndarray:
    """is_test (n,) bool: sha256("{salt}:{user_id}") read as a uniform number in [0, 1) is below
    test_frac (default TEST_FRAC). Depends on the id alone (not on order, not on Python's per-process hash)."""
    test_frac = TEST_FRAC if test_frac is None else test_frac
    if not 0.0 < test_frac < 1.0:
        raise ValueError(f"split_users: test_frac must be in (0, 1), got {test_frac}")
    out = np.empty(len(user_ids), dtype=bool)
    for i, uid in enumerate(user_ids):
        h = hashlib.sha256(f"{salt}:{uid}".encode("utf-8")).digest()
        out[i] = int.from_bytes(h[:8], "big") / 2.0**64 < test_frac
    return out

def task_order(names):
    """The paper's task order, then any other task names sorted."""
    names = set(names)
    return [t for t in data.TASKS if t in names] + sorted(names - set(data.TASKS))

def probe_tasks(embeddings, user_ids, labels, tasks=None, Cs=DEFAULT_CS, folds=5, seed=0,
                test_frac=None, salt="probe", scores_out=None) -> dict:
    """Probe every task: {task: {"auc", "n_train", "n_test", "positive_rate", "C"}} or, when a split
    lacks a class, {task: {"status": ..., "n_train", "n_test", "positive_rate"}}.
    embeddings (N, E); user_ids: N unique ids; labels: N dicts task -> 0/1 (absent or None = no label).
    tasks: which tasks (default: every task named in labels, in the paper's order).
    scores_out: a dict to fill with {task: (test users' row numbers, their labels, their scores)}, for
    bootstrap_mean_auc."""
    X = np.asarray(embeddings)
    if X.ndim != 2 or not (len(X) == len(user_ids) == len(labels)):
        raise ValueError(f"probe_tasks: embeddings {X.shape}, {len(user_ids)} user_ids, {len(labels)} labels "
                         "must agree on the number of users")
    if len(set(user_ids)) != len(user_ids):
        raise ValueError("probe_tasks: user_ids are not unique")
    if tasks is None:
        tasks = task_order({t for lab in labels for t in lab})
    is_test = split_users(user_ids, test_frac, salt)
    results = {}
    for task in tasks:
        rows, ys = [], []
        for i, lab in enumerate(labels):
            v = lab.get(task)
            if v is None:
                continue
            if v not in (0, 1):  # also accepts True/False and 0.0/1.0
                raise ValueError(f"probe_tasks: user {user_ids[i]!r} task {task!r}: label {v!r} is not 0/1")
            rows.append(i)
            ys.append(int(v))
        rows, y = np.asarray(rows, dtype=np.int64), np.asarray(ys, dtype=np.int64)
        te = is_test[rows]
        y_tr, y_te = y[~te], y[te]
        res = {"n_train": int(len(y_tr)), "n_test": int(len(y_te)),
               "positive_rate": float(y.mean()) if len(y) else None}
        if len(y) == 0:
            res["status"] = "no users with this label"
        elif len(np.unique(y_te)) < 2:
            res["status"] = "single class in test split"
        elif min(y_tr.sum(), len(y_tr) - y_tr.sum()) < 2:
            res["status"] = "single class in train split"  # (or a lone user of one class: nothing to fit)
        else:
            probe = fit_probe(X[rows[~te]], y_tr, Cs=Cs, folds=folds, seed=seed)
            s_te = probe.decision_function(X[rows[te]])
            res["auc"] = roc_auc(y_te, s_te)
            res["C"] = probe.C
            if scores_out is not None:
                scores_out[task] = (rows[te], y_te, s_te)
        results[task] = res
    return results

def mean_auc(tasks: dict):
    """Mean AUC over the tasks that have one (status entries are not averaged); None if none."""
    aucs = [r["auc"] for r in tasks.values() if "auc" in r]
    return float(np.mean(aucs)) if aucs else None

def format_table(rows) -> str:
    """Markdown table in the layout of Table 2. rows: (name, probe_tasks' dict, or a probe.json dict whose
    "mean_auc_se" is printed as Avg ± SE); columns: the tasks in the paper's order, then Avg; "—" where none."""
    ses = [t.get("mean_auc_se") if isinstance(t.get("tasks"), dict) else None for _, t in rows]
    rows = [(name, t["tasks"] if isinstance(t.get("tasks"), dict) else t) for name, t in rows]
    cols = task_order({task for _, t in rows for task in t})
    lines = ["| Method | " + " | ".join(cols) + " | Avg |", "|---" * (len(cols) + 2) + "|"]
    for (name, t), se in zip(rows, ses):
        cells = [f"{t[c]['auc']:.4f}" if c in t and "auc" in t[c] else "—" for c in cols]
        avg = mean_auc(t)
        cells.append("—" if avg is None else f"{avg:.4f}" + (f" ± {se:.4f}" if se is not None else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

def _auc_by_groups(y, scores, rows):
    """Precomputes what a weighted AUC needs (sort once, reweight many times): -> f(weights per user row)."""
    order = np.argsort(scores, kind="mergesort")
    s, y, rows = scores[order], np.asarray(y)[order].astype(np.float64), rows[order]
    group = np.cumsum(np.r_[True, s[1:] != s[:-1]]) - 1  # tied scores share a group

    def auc(user_weights):
        w = user_weights[rows]
        w_pos, w_neg = np.bincount(group, w * y), np.bincount(group, w * (1.0 - y))
        below = np.cumsum(w_neg) - w_neg  # negative weight strictly below each group
        return float((w_pos * (below + 0.5 * w_neg)).sum() / (w_pos.sum() * w_neg.sum()))

    return auc

def bootstrap_mean_auc(score_sets, n_boot=1000, seed=0):
    """Mean AUC over tasks on n_boot bootstrap resamples of the probe-test users, drawn jointly for every task
    and for every row compared (rows must share the split: the same users of the same file). A resampled
    user counts as often as drawn (the weighted Mann-Whitney AUC, ties one half). score_sets: a list of
    probe_tasks' scores_out, one per row. -> (n_boot, rows) array; its std (ddof 1) per column is the standard
    error of that row's mean AUC, and the std of a column difference the paired standard error."""
    tasks = [t for t in score_sets[0] if all(t in s for s in score_sets)]
    if not tasks:
        return np.full((n_boot, len(score_sets)), np.nan)
    users = np.unique(np.concatenate([score_sets[0][t][0] for t in tasks]))
    aucs = [[_auc_by_groups(s[t][1], s[t][2], s[t][0]) for t in tasks] for s in score_sets]
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, len(score_sets)))
    with np.errstate(invalid="ignore", divide="ignore"):  # a resample without a class gives nan, skipped
        for b in range(n_boot):
            drawn = users[rng.integers(len(users), size=len(users))]
            weights = np.bincount(drawn, minlength=int(users.max()) + 1).astype(np.float64)  # times each user was drawn
            out[b] = [np.nanmean([f(weights) for f in row]) for row in aucs]
    return out

# -----------------------------------------------------------------------------
# embeddings (saved and loaded by checkpoint.py)

def progress(done, total, text, stream=None):
    """Progress of `done` of `total` items: on a terminal one line rewritten in place (the caller ends it); elsewhere
    (a log, a pipe) a plain line at the first item, each quarter and the last (every item when total is None)."""
    stream = sys.stderr if stream is None else stream
    if stream.isatty():
        print(f"\r{text}\033[K", end="", file=stream, flush=True)
    elif total is None or done in {1, total} | {math.ceil(total * q / 4) for q in (1, 2, 3)}:
        print(text, file=stream, flush=True)

def embed_users(encoder, batches, mask_fn, device) -> np.ndarray:
    """(N, E) float32 embeddings, in batch order, of the users of batches (data.Side, or data.Batch: its .user)
    by the frozen encoder in eval mode. mask_fn(attention_mask, dtype, history=...): e.g. Strategy.inference_mask;
    None: the encoder's default (causal)."""
    dtype = next(encoder.parameters()).dtype
    total = len(batches) if hasattr(batches, "__len__") else None
    was_training = encoder.training
    encoder.eval()  # no dropout in the embeddings
    out = []
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                side = (batch.user if hasattr(batch, "user") else batch).to(device)
                mask = None if mask_fn is None else mask_fn(side.attention_mask, dtype, history=side.history)
                emb = encoder(side.input_ids, side.attention_mask, side.pool_index, mask=mask,
                              vectors=side.vectors, vector_pos=side.vector_pos)
                out.append(emb.float().cpu().numpy())
                n_users = sum(len(e) for e in out)
                progress(i + 1, total, f"embedding: batch {i + 1}/{total if total is not None else '?'}, {n_users} users")
    finally:
        encoder.train(was_training)
    if sys.stderr.isatty():
        print(file=sys.stderr)  # end the line progress() rewrote in place
    if not out:
        raise ValueError("embed_users: no batches")
    return np.concatenate(out, axis=0)

def embed_dataset(encoder, ds, strategy, device, batch_size=64):
    """Embeddings (N, E) of an encoded dataset (data.UserDataset, or tools/cache.py's EncodedDataset) in its order,
    under the strategy's inference mask. Users are batched by length (less padding); the result does not depend
    on the batching (tests/test_probe.py)."""
    order = np.argsort(ds.lengths, kind="stable")
    batches = [data.collate([ds[int(j)] for j in order[i:i + batch_size]]) for i in range(0, len(ds), batch_size)]
    emb = embed_users(encoder, batches, strategy.inference_mask, device)
    out = np.empty_like(emb)
    out[order] = emb
    return out

def embed_records(encoder, template, strategy, records, device, batch_size=64):
    """embed_dataset of records (dicts) encoded in memory, in their order."""
    return embed_dataset(encoder, data.UserDataset(records, template, with_answer=False), strategy, device, batch_size)

def encode(checkpoint_dir, records, batch_size=64, device=None, skip_bad=False):
    """User embeddings of a trained encoder: (N, E) float32 NumPy, row i = record i (file order), each row
    L2-normalised, computed under the strategy's inference mask; the numbers `probe.py --export` writes.

        import probe
        E = probe.encode("runs/default/checkpoint", "users.jsonl")                      # (N, E)
        E = probe.encode("runs/default/checkpoint", [{"events": [{"modality": "bill", "text": "gym 80"}]}])

    records: a JSONL path, or a list of record dicts (neither `answer` nor `labels` needed, `user_id` optional). A
    record the encoder cannot read (an unknown modality, a vector of another length) is an error naming file:line
    (or records[i]); skip_bad=True skips such lines of a file (reported), the rows then follow the records kept."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder, template, strategy, state = load(checkpoint_dir, device)
    spec = state["spec"]
    if isinstance(records, (str, os.PathLike)):
        where = os.fspath(records)
        records, report = data.load_records(where, skip_bad=skip_bad, vector_dims=spec.vector_dims,
                                            modalities=spec.modalities)
    else:
        checked, dims = [], dict(spec.vector_dims)
        for i, rec in enumerate(records):
            rec = copy.deepcopy(rec)  # validate_record normalises in place; the caller's dicts stay as given
            try:
                data.validate_record(rec, dims, modalities=spec.modalities)
            except ValueError as e:
                raise ValueError(f"records[{i}]: {e}") from None
            rec["user_id"] = str(rec["user_id"]) if rec.get("user_id") is not None else f"records[{i}]"
            checked.append(rec)
        if not checked:
            raise ValueError("encode: no records")
        records, where = checked, "records"
        report = data.LoadReport(vector_dims=dims)
    unknown = sorted(set(report.vector_dims) - set(spec.vector_dims))
    if unknown:  # a modality the encoder knows as text only, given vectors here: it has no adapter for them
        raise ValueError(f"encode: {where}: modalities {unknown} carry vectors, but the encoder has adapters for "
                         f"{sorted(spec.vector_dims)} only")
    return embed_records(encoder, template, strategy, records, device, batch_size)

def load(checkpoint_dir, device):
    """A run's checkpoint folder -> (encoder with LoRA merged, template, strategy, state): ready to embed."""
    encoder, template, strategy, state = ckpt.load_checkpoint(checkpoint_dir, device)
    model.merge_lora(encoder)  # W + (alpha / r) B A once: the same function, cheaper to run
    return encoder, template, strategy, state

# -----------------------------------------------------------------------------
# the results table: the trained row, the Oracle and hand-made rows, the paired differences

def report_probe(embeddings, records, name, out=None, checkpoint=None, seed=0, baseline=None, test_frac=None,
                 features=(), events_cut=None):
    """Probe every task, print the Table 2 rows with their mean AUC's bootstrap standard error, write probe.json;
    -> its dict. baseline: (name, embeddings) of the same users, e.g. the Oracle: probed alike, stored under its
    name, and the difference of mean AUCs with its paired bootstrap standard error under "delta". features: (name,
    X) rows of the same users (hand_made_rows), stored under "baselines"; "delta_best_baseline" is the paired
    difference against the best of them that holds no embedding."""
    ids, labels = [r["user_id"] for r in records], [r.get("labels") or {} for r in records]
    rows = [(name, embeddings)] + ([baseline] if baseline else []) + list(features)
    results, scores = [], []
    for row_name, emb in rows:
        scores.append({})
        tasks = probe_tasks(emb, ids, labels, seed=seed, test_frac=test_frac, scores_out=scores[-1])
        results.append({"tasks": tasks, "mean_auc": mean_auc(tasks), "mask": row_name})
    boot = bootstrap_mean_auc(scores, seed=seed)
    for r, col in zip(results, boot.T):
        r["mean_auc_se"] = float(np.nanstd(col, ddof=1))
    result = dict(results[0], checkpoint=checkpoint, **({"events": events_cut} if events_cut else {}))
    for t, r in result["tasks"].items():
        if "status" in r:
            print(f"probe: task {t}: {r['status']} (not averaged)", file=sys.stderr)
    print(format_table([(r["mask"], r) for r in results[::-1]]))

    def paired(k, key):  # row 0 against row k: the difference of mean AUCs and its paired bootstrap SE
        result[key] = {"vs": results[k]["mask"], "mean_auc": result["mean_auc"] - results[k]["mean_auc"],
                       "se": float(np.nanstd(boot[:, 0] - boot[:, k], ddof=1))}
        print(f"{name} - {results[k]['mask']}: {result[key]['mean_auc']:+.4f} mean AUC "
              f"(paired bootstrap SE over test users {result[key]['se']:.4f})")
    if baseline:
        result[baseline[0]] = results[1]
        paired(1, "delta")
    if features:
        first = 1 + bool(baseline)
        result["baselines"] = {r["mask"]: r for r in results[first:]}
        hand = [k for k in range(first, len(rows)) if not rows[k][0].startswith(name + " +")]
        paired(max(hand, key=lambda k: results[k]["mean_auc"] or 0.0), "delta_best_baseline")
    if out:
        ckpt.write_json(out, result)
    return result

def labelled_users(data_path, template, cache_root=None, skip_bad=False, records=None):
    """-> (dataset, records: user ids and labels) of data_path encoded by template: from an encoded cache under
    cache_root (tools/cache.py; built on first use, one per template), or in memory (cache_root None; records: the
    file's, when already read); the same embeddings."""
    if cache_root is None:
        records = records or data.load_records(data_path, skip_bad=skip_bad, require=("labels",))[0]  # warns itself
        return data.UserDataset(records, template, with_answer=False), records
    from tools import cache  # reading the users from disk is a tool's job, not the probe's
    folder = cache.ensure(data_path, cache_root, {"template": cache.template_fingerprint(template)},
                          lambda report: template, require=("labels",), skip_bad=skip_bad, with_answer=False,
                          log=lambda m: print(m, file=sys.stderr))
    report = cache.read_report(folder)
    if report.n_bad:  # said while building; said again when the cache is reused
        print(f"warning: {report}", file=sys.stderr)
    ds = cache.EncodedDataset(folder, template)
    return ds, ds.records()

def run(encoder, template, strategy, data_path, device, name, checkpoint=None, out=None, skip_bad=False,
        batch_size=64, export=None, seed=0, baseline_spec=None, cache_root=None, test_frac=None, baselines=True):
    """Embed the labelled users of data_path and probe them (train.py calls this at the end of a run). With
    baseline_spec (e.g. checkpoint.oracle_spec(run's spec)), that untrained encoder is probed on the same users
    too, as the "oracle" row with the paired difference. cache_root: see labelled_users."""
    # the file's records, read once, where the texts are needed: the in-memory path, the hand-made rows
    full = data.load_records(data_path, skip_bad=skip_bad, require=("labels",))[0] \
        if baselines or cache_root is None else None
    ds, records = labelled_users(data_path, template, cache_root, skip_bad, full)
    baseline = None
    if baseline_spec is not None:
        torch.manual_seed(seed)  # the untrained adapters' init, as probe.py --model --seed
        b_encoder, b_template, b_strategy = ckpt.build_encoder(baseline_spec, device)
        b_ds = labelled_users(data_path, b_template, cache_root, skip_bad, full)[0]  # its own tokens: no <GLOBAL>, say
        baseline = ("oracle", embed_dataset(b_encoder, b_ds, b_strategy, device, batch_size))
    emb = embed_dataset(encoder, ds, strategy, device, batch_size)
    if export:
        save_embeddings(export, emb, [r["user_id"] for r in records], {"mask": name, "checkpoint": checkpoint})
    features = hand_made_rows(full, records, name, emb) if baselines else ()
    cut = {"events_cut": ds.n_cut, "per_user": ds.n_cut / len(ds), "max_len": template.max_len}  # by the template
    return report_probe(emb, records, name, out, checkpoint, seed, baseline, test_frac, features, cut)


def hand_made_rows(full, records, name, embeddings):
    """From the full records of the embedded users (records, checked): a bag of events with the tabular vectors, the
    tabular vectors, the embedding beside the bag (does it add to them?). The probe z-scores columns: no rescaling."""
    if [r["user_id"] for r in full] != [r["user_id"] for r in records]:
        raise ValueError("hand-made features: the users read for them are not those embedded")
    tab, bag = data.tabular_vectors(full), data.bag_of_events(full)
    bag = bag if tab is None else np.hstack([bag, tab])
    rows = [("bag of events", bag)] + ([("tabular", tab)] if tab is not None else [])
    return rows + [(f"{name} + bag", np.hstack([embeddings, bag]))]

def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="Linear probe of user embeddings (the paper's Table 2 protocol).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a run's checkpoint/ folder (train.py)")
    src.add_argument("--model", help="an untrained HF folder: the Oracle row (causal mask, no LoRA)")
    src.add_argument("--embeddings", help="a .safetensors file written by --export: probe without re-embedding")
    p.add_argument("--data", default=None, help="labelled users (JSONL with 'labels'); needed unless only exporting")
    p.add_argument("--out", default=None, help="probe.json to write")
    p.add_argument("--export", default=None, help="also write the embeddings (with user ids) to this .safetensors")
    p.add_argument("--export-peft", metavar="OUT", help="with --checkpoint: write a PEFT LoRA adapter folder (tools/export.py)")
    p.add_argument("--export-merged", metavar="OUT", help="with --checkpoint: write a Hugging Face folder, LoRA merged (tools/export.py)")
    p.add_argument("--name", default=None, help="row name in the table (default: the mask strategy)")
    p.add_argument("--batch-size", type=int, default=64, help="users per forward pass")
    p.add_argument("--max-len", type=int, default=256, help="user-side token budget for --model")
    p.add_argument("--preamble", default="", type=data.preamble_text, help="the template's opening sentence for --model: 'paper', any text, or '' (none)")
    p.add_argument("--event-modalities", default="", help="for --model: comma-separated modalities in event form (one position per event), as the run to compare with")
    p.add_argument("--seed", type=int, default=0, help="CV folds (and, for --model, the untrained adapters' init)")
    p.add_argument("--test-frac", type=float, default=TEST_FRAC, help="share of the users held out as probe-test users")
    p.add_argument("--skip-bad", action="store_true", help="skip invalid JSONL lines (reported)")
    p.add_argument("--no-baselines", action="store_true", help="probe the embeddings only, without the hand-made rows")
    p.add_argument("--data-cache", metavar="DIR|off", help="where --data is tokenized once and memory-mapped by later runs "
                   "(tools/cache.py); default: an 'encoded' folder beside it; 'off': read and encode it in memory")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    args = p.parse_args(argv)
    try:
        if args.export_peft or args.export_merged:
            if not args.checkpoint:
                sys.exit("error: --export-peft / --export-merged need --checkpoint")
            from tools import export  # writing other libraries' formats is a tool's job
            for out, write in ((args.export_peft, export.export_peft), (args.export_merged, export.export_merged)):
                if out:
                    print(f"wrote {out} ({write(args.checkpoint, out)['load']['how']})", file=sys.stderr)
            if args.data is None:
                return None
        if args.data is None:
            sys.exit("error: --data is required (labelled JSONL), unless only exporting with --export-peft / --export-merged")
        if not os.path.isfile(args.data):
            sys.exit(f"error: --data {args.data}: no such file")
        if args.embeddings:
            records, _ = data.load_records(args.data, skip_bad=args.skip_bad, require=("labels",))
            emb, ids, meta = load_embeddings(args.embeddings)
            pos = {u: i for i, u in enumerate(ids)}
            missing = [r["user_id"] for r in records if r["user_id"] not in pos]
            if missing:
                sys.exit(f"error: {args.embeddings}: no embedding for users {missing[:5]} of {args.data}")
            return report_probe(emb[[pos[r["user_id"]] for r in records]], records,
                                args.name or meta.get("mask", "embeddings"), args.out, meta.get("checkpoint"),
                                args.seed, test_frac=args.test_frac)
        torch.manual_seed(args.seed)
        if args.checkpoint:
            encoder, template, strategy, state = load(args.checkpoint, args.device)
            name = args.name or state["spec"].mask
        else:  # the Oracle row: the untrained base under the causal mask (adapters and new token rows untrained)
            if not os.path.isfile(os.path.join(args.model, "config.json")):
                sys.exit(f"error: --model {args.model}: no config.json")
            report = data.load_records(args.data, skip_bad=args.skip_bad, require=("labels",))[1]  # the modalities
            spec = ckpt.RunSpec(os.path.abspath(args.model), report.modalities, report.vector_dims, max_len=args.max_len,
                                preamble=args.preamble, event_modalities=[m for m in args.event_modalities.split(",") if m])
            encoder, template, strategy = ckpt.build_encoder(spec, args.device)
            name = args.name or "oracle"
        root = None if args.data_cache == "off" else args.data_cache or \
            os.path.join(os.path.dirname(os.path.abspath(args.data)), "encoded")
        return run(encoder, template, strategy, args.data, args.device, name, args.checkpoint, args.out, args.skip_bad,
                   args.batch_size, args.export, args.seed, cache_root=root, test_frac=args.test_frac,
                   baselines=not args.no_baselines)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")

if __name__ == "__main__":
    main()

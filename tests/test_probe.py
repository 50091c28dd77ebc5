"""Tests for probe.py: ROC-AUC, the NumPy logistic regression and its cross-validation against
scikit-learn (the reference), the user split, task handling, the table with its hand-made rows, embedding files."""

import hashlib
import json
import random

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression as SkLogisticRegression
from sklearn.metrics import roc_auc_score

import data
import ggsm
import probe
from probe import (LogisticRegression, fit_probe, format_table, load_embeddings, mean_auc, probe_tasks,
                   roc_auc, save_embeddings, split_users, standardise, stratified_folds)
from tools import synthetic, tiny_decoder


def logistic_data(n, d, seed, informative=None, noise=1.0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, size=d) + rng.normal(size=d)  # unscaled, offset
    w = rng.normal(size=d)
    if informative is not None:
        w[informative:] = 0.0
    z = (X - X.mean(0)) / X.std(0) @ w
    y = (z + noise * rng.logistic(size=n) > 0.3).astype(np.int64)
    return X, y


def sklearn_fit(X, y, C):
    # tight tolerance so the reference sits at the optimum too
    return SkLogisticRegression(C=C, tol=1e-12, max_iter=100000).fit(X, y)


# ---------------------------------------------------------------- roc_auc


@pytest.mark.parametrize("seed", range(6))
def test_roc_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 3000))
    y = (rng.random(n) < rng.uniform(0.05, 0.95)).astype(int)
    y[:2] = [0, 1]
    scores = {
        "integer (many ties)": rng.integers(0, 5, size=n),
        "rounded floats": np.round(rng.normal(size=n) + y, 1),
        "continuous": rng.normal(size=n) + 0.5 * y,
        "constant": np.zeros(n),
    }
    for name, s in scores.items():
        got, ref = roc_auc(y, s), roc_auc_score(y, s)
        assert abs(got - ref) <= 1e-12, f"{name}: roc_auc {got!r} vs sklearn roc_auc_score {ref!r}"
    assert roc_auc(y.astype(bool), scores["continuous"]) == roc_auc(y, scores["continuous"])


def test_roc_auc_small_cases_and_errors():
    assert roc_auc([0, 1], [0.1, 0.9]) == 1.0
    assert roc_auc([0, 1], [0.9, 0.1]) == 0.0
    assert roc_auc([0, 1, 0, 1], [1, 1, 1, 1]) == 0.5  # all tied: one half
    assert roc_auc([0, 0, 1], [1, 2, 2]) == 0.75  # one win, one tie
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="3 labels but 2 scores"):
        roc_auc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="0/1"):
        roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([0, 1], [0.1, np.nan])


# ---------------------------------------------------------------- logistic regression


@pytest.mark.parametrize("n,d,C", [(1500, 30, 1.0), (400, 60, 0.05), (80, 200, 0.5), (600, 8, 1e4)])
def test_logistic_regression_matches_sklearn(n, d, C):
    # (80, 200) takes the d > n row-space path
    X, y = logistic_data(n + 400, d, seed=d)
    mean, scale = standardise(X[:n])
    Xtr, Xte = (X[:n] - mean) / scale, (X[n:] - mean) / scale
    ours = LogisticRegression(C=C).fit(Xtr, y[:n])
    ref = sklearn_fit(Xtr, y[:n], C)
    coef_err = np.abs(ours.coef_ - ref.coef_[0]).max() / np.abs(ref.coef_).max()
    assert coef_err < 1e-3, f"coef max rel err vs sklearn {coef_err:.2e}"
    assert abs(ours.intercept_ - ref.intercept_[0]) < 1e-3 * max(1.0, abs(ref.intercept_[0]))
    auc, auc_ref = roc_auc(y[n:], ours.decision_function(Xte)), roc_auc(y[n:], ref.decision_function(Xte))
    assert abs(auc - auc_ref) < 1e-3, f"test AUC {auc} vs sklearn {auc_ref}"
    # our objective is sklearn's: evaluate it at sklearn's solution, ours must be no larger
    s, z = 2 * y[:n] - 1, Xtr @ ref.coef_[0] + ref.intercept_[0]
    f_ref = np.logaddexp(0, -s * z).sum() + 0.5 / C * ref.coef_[0] @ ref.coef_[0]
    assert ours.objective_ <= f_ref + 1e-9 * f_ref, (ours.objective_, f_ref)
    assert ours.n_iter_ < ours.max_iter


def test_logistic_regression_separable_stays_finite():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 6))
    X[:, 0] += np.where(rng.random(300) < 0.4, 3.0, -3.0)  # two clusters with a wide gap along x0
    y = (X[:, 0] > 0).astype(int)
    for C in (1.0, 1e3, 1e8):  # weak penalties: the unpenalised optimum would be at infinity
        m = LogisticRegression(C=C).fit(X, y)
        assert np.all(np.isfinite(m.coef_)) and np.isfinite(m.intercept_) and np.isfinite(m.objective_)
        assert m.n_iter_ < m.max_iter, f"C={C}: no convergence in {m.max_iter} iterations"
        assert roc_auc(y, m.decision_function(X)) == 1.0
        assert np.all((m.decision_function(X) > 0) == y)
    # the optimum is finite and grows with C like log C, not diverging
    small, big = LogisticRegression(C=1.0).fit(X, y), LogisticRegression(C=1e8).fit(X, y)
    assert np.linalg.norm(small.coef_) < np.linalg.norm(big.coef_) < 1e3


def test_logistic_regression_bad_input():
    X = np.zeros((4, 2))
    with pytest.raises(ValueError, match="single class"):
        LogisticRegression().fit(X, [1, 1, 1, 1])
    with pytest.raises(ValueError, match="0/1"):
        LogisticRegression().fit(X, [0, 1, 2, 1])
    with pytest.raises(ValueError, match=r"\(4, 2\) and \(3,\)"):
        LogisticRegression().fit(X, [0, 1, 1])
    with pytest.raises(ValueError, match="C must be > 0"):
        LogisticRegression(C=0.0)


def test_warm_start_reaches_same_optimum():
    X, y = logistic_data(500, 20, seed=3)
    X = (X - X.mean(0)) / X.std(0)
    cold = LogisticRegression(C=0.3).fit(X, y)
    near = LogisticRegression(C=0.1).fit(X, y)
    warm = LogisticRegression(C=0.3).fit(X, y, init=(near.coef_, near.intercept_))
    np.testing.assert_allclose(warm.coef_, cold.coef_, rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------- standardisation and CV


def test_standardise_uses_train_only_and_keeps_constant_columns():
    X = np.array([[1.0, 5.0, 0.0], [3.0, 5.0, 1.0], [5.0, 5.0, 2.0]])
    mean, scale = standardise(X)
    np.testing.assert_allclose(mean, [3.0, 5.0, 1.0])
    np.testing.assert_allclose(scale, [np.std([1, 3, 5]), 1.0, np.std([0, 1, 2])])
    Z = (X - mean) / scale
    assert np.all(np.isfinite(Z)) and np.all(Z[:, 1] == 0)


def test_stratified_folds_keep_class_ratio():
    y = np.r_[np.ones(23), np.zeros(77)].astype(int)
    fold = stratified_folds(y, 5, seed=1)
    for j in range(5):
        assert (fold == j).sum() == 20 and y[fold == j].sum() in (4, 5)


def test_fit_probe_cv_matches_sklearn_and_prefers_penalty_on_noise():
    # 3 informative features + 297 noise features, 200 users: large C overfits the noise
    X, y = logistic_data(200, 300, seed=0, informative=3, noise=0.5)
    Cs = (1e-3, 1e-2, 1e-1, 1.0, 100.0)
    p = fit_probe(X, y, Cs=Cs, folds=4, seed=0)
    assert p.C < max(Cs), f"CV chose the weakest penalty C={p.C}: {p.cv_auc}"
    assert p.C == max(p.cv_auc, key=lambda c: (p.cv_auc[c], -c))
    # reference: the same folds, standardise on each fold's train rows, sklearn's fit, sklearn's AUC
    fold = stratified_folds(y, 4, seed=0)
    for C in Cs:
        aucs = []
        for j in range(4):
            tr, va = fold != j, fold == j
            mu, sd = X[tr].mean(0), X[tr].std(0)
            ref = sklearn_fit((X[tr] - mu) / sd, y[tr], C)
            aucs.append(roc_auc_score(y[va], ref.decision_function((X[va] - mu) / sd)))
        assert abs(p.cv_auc[C] - np.mean(aucs)) < 1e-3, (C, p.cv_auc[C], np.mean(aucs))
    # the refit: standardised on all training users, sklearn at the chosen C
    mu, sd = X.mean(0), X.std(0)
    ref = sklearn_fit((X - mu) / sd, y, p.C)
    rng = np.random.default_rng(1)
    X_new = X[rng.permutation(len(X))] + rng.normal(size=X.shape)
    np.testing.assert_allclose(p.decision_function(X_new), ref.decision_function((X_new - mu) / sd),
                               rtol=1e-4, atol=1e-6)


def test_fit_probe_needs_two_of_each_class():
    X = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(ValueError, match="at least 2 users of each class"):
        fit_probe(X, np.r_[1, np.zeros(9)].astype(int))
    p = fit_probe(X, np.r_[1, 1, 1, np.zeros(7)].astype(int), Cs=(0.1, 1.0), folds=5)  # folds -> 3
    assert p.C in (0.1, 1.0) and len(p.cv_auc) == 2


# ---------------------------------------------------------------- split


def test_split_users_stable_and_fraction():
    ids = [f"u{i}" for i in range(5000)]
    is_test = split_users(ids, test_frac=0.2)
    assert abs(is_test.mean() - 0.2) < 0.025
    rng = random.Random(0)
    perm = list(range(len(ids)))
    rng.shuffle(perm)
    shuffled = split_users([ids[i] for i in perm], test_frac=0.2)
    assert np.array_equal(shuffled, is_test[perm]), "split changed when the users were reordered"
    assert np.array_equal(split_users(ids[100:200], test_frac=0.2), is_test[100:200]), "split changed on a subset"
    # the documented rule, written out independently
    ref = [int.from_bytes(hashlib.sha256(f"probe:{u}".encode()).digest()[:8], "big") / 2**64 < 0.2 for u in ids[:50]]
    assert is_test[:50].tolist() == ref
    other = split_users(ids, test_frac=0.2, salt="other")
    assert (other != is_test).mean() > 0.2
    assert abs(split_users(ids, test_frac=0.5).mean() - 0.5) < 0.03
    assert np.array_equal(split_users(ids), split_users(ids, test_frac=probe.TEST_FRAC)) and probe.TEST_FRAC == 0.5
    with pytest.raises(ValueError, match="test_frac"):
        split_users(ids, test_frac=1.0)


# ---------------------------------------------------------------- tasks and table


def make_users(n=600, seed=0):
    rng = np.random.default_rng(seed)
    E = rng.normal(size=(n, 12))
    ids = [f"user-{i}" for i in range(n)]
    is_test = split_users(ids)
    labels = []
    for i in range(n):
        lab = {"movie": int(E[i, 0] + 0.5 * rng.logistic() > 0)}  # learnable from E
        if i % 3:  # only two thirds of the users have a food label
            lab["food"] = int(E[i, 1] - E[i, 2] + rng.logistic() > 0.5)
        lab["power"] = 1 if is_test[i] else int(rng.random() < 0.5)  # every test user positive
        lab["custom_task"] = None  # present but unlabelled everywhere
        labels.append(lab)
    return E, ids, labels


def test_probe_tasks_results_and_single_class():
    E, ids, labels = make_users()
    Cs = (0.01, 1.0)
    res = probe_tasks(E, ids, labels, Cs=Cs, folds=3)
    assert list(res) == ["power", "food", "movie", "custom_task"], "paper's order, then others"
    assert res["power"]["status"] == "single class in test split" and "auc" not in res["power"]
    assert res["custom_task"]["status"] == "no users with this label"
    assert res["movie"]["auc"] > 0.8 and res["food"]["auc"] > 0.6
    assert res["food"]["n_train"] + res["food"]["n_test"] == sum(1 for i in range(600) if i % 3)
    is_test = split_users(ids)
    for task in ("movie", "food"):
        rows = [i for i, lab in enumerate(labels) if lab.get(task) is not None]
        y = np.array([labels[i][task] for i in rows])
        te = is_test[rows]
        assert res[task]["n_test"] == te.sum() and res[task]["positive_rate"] == pytest.approx(y.mean())
        # independent recomputation: sklearn at the chosen C on train-standardised features, sklearn's AUC
        X = E[rows]
        mu, sd = X[~te].mean(0), X[~te].std(0)
        ref = sklearn_fit((X[~te] - mu) / sd, y[~te], res[task]["C"])
        auc_ref = roc_auc_score(y[te], ref.decision_function((X[te] - mu) / sd))
        assert abs(res[task]["auc"] - auc_ref) < 1e-3, (task, res[task]["auc"], auc_ref)
    assert mean_auc(res) == pytest.approx((res["movie"]["auc"] + res["food"]["auc"]) / 2)
    # reordering the users changes nothing
    perm = np.random.default_rng(1).permutation(len(ids))
    res2 = probe_tasks(E[perm], [ids[i] for i in perm], [labels[i] for i in perm], tasks=["movie"], Cs=Cs, folds=3)
    assert res2["movie"]["n_test"] == res["movie"]["n_test"]
    assert abs(res2["movie"]["auc"] - res["movie"]["auc"]) < 0.02  # only the CV fold shuffle differs


def test_probe_tasks_bad_input():
    E = np.zeros((3, 2))
    with pytest.raises(ValueError, match="must agree"):
        probe_tasks(E, ["a", "b"], [{}, {}, {}])
    with pytest.raises(ValueError, match="not unique"):
        probe_tasks(E, ["a", "b", "a"], [{}, {}, {}])
    with pytest.raises(ValueError, match=r"user 'b' task 'movie': label 3 is not 0/1"):
        probe_tasks(E, ["a", "b", "c"], [{"movie": 1}, {"movie": 3}, {}])


def test_format_table_layout():
    run_a = {"food": {"auc": 0.81234}, "concert": {"auc": 0.5}, "zeta": {"auc": 0.7},
             "movie": {"status": "single class in test split", "n_train": 3, "n_test": 1}}
    run_b = {"tasks": {"concert": {"auc": 0.6}, "login": {"auc": 0.9}}, "mean_auc": 0.75}
    expected = "\n".join([
        "| Method | concert | login | food | movie | zeta | Avg |",
        "|---|---|---|---|---|---|---|",
        "| w/ GG-SM | 0.5000 | — | 0.8123 | — | 0.7000 | 0.6708 |",
        "| Oracle | 0.6000 | 0.9000 | — | — | — | 0.7500 |",
    ])
    assert format_table([("w/ GG-SM", run_a), ("Oracle", run_b)]) == expected


def test_task_order_is_the_papers_then_sorted():
    data = pytest.importorskip("data")
    assert probe.task_order(["zeta", "movie", "alpha", "concert"]) == ["concert", "movie", "alpha", "zeta"]
    assert probe.task_order(data.TASKS) == list(data.TASKS)


# ---------------------------------------------------------------- embeddings on disk


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_embeddings_round_trip(tmp_path, dtype):
    E = np.random.default_rng(0).normal(size=(5, 7)).astype(dtype)
    ids = ["u1", "ü-2", "u 3", "4", 'u"5']
    path = tmp_path / "emb.safetensors"
    save_embeddings(path, E, ids, metadata={"mask": "ggsm"})
    E2, ids2, meta = load_embeddings(path)
    assert E2.dtype == dtype and np.array_equal(E2, E) and ids2 == ids and meta == {"mask": "ggsm"}
    assert not (tmp_path / "emb.safetensors.tmp").exists()
    with pytest.raises(ValueError, match="do not match"):
        save_embeddings(path, E, ids[:4])


# ---------------------------------------------------------------- embedding users with the encoder

STRATEGIES = tuple(ggsm.STRATEGIES)


@pytest.fixture(scope="module")
def tiny_encoder_and_users(tmp_path_factory):
    torch = pytest.importorskip("torch")
    data, model = pytest.importorskip("data"), pytest.importorskip("model")
    _, probe_path = synthetic.write_synthetic(tmp_path_factory.mktemp("users"), n_train=0, n_probe=7, seed=0)
    records, report = data.load_records(probe_path, require=("labels",))
    short = dict(records[0], user_id="short")  # two text events and the tabular vector: a very short user
    short["events"] = [e for e in records[0]["events"] if "text" in e][:2] + [e for e in records[0]["events"] if "vector" in e]
    records.append(short)
    tok = tiny_decoder.train_tokenizer(tiny_decoder.record_texts(records), vocab_size=300)
    vocab = tok.get_vocab_size()  # the "checkpoint" vocabulary: the template's tags get ids beyond it
    # no opening sentence: the test needs one user much shorter than the others, and a 300-token BPE spells it long
    template = data.Template(tok, report.modalities, {"tabular": 8}, max_len=160, global_token=True, preamble="")
    torch.manual_seed(0)
    cfg = model.ModelConfig(model_type="qwen2", vocab_size=vocab, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    encoder = model.UserEncoder(model.Decoder(cfg), template.special_token_ids, {"tabular": 8})
    ds = data.UserDataset(records, template, with_answer=False)
    return encoder, ds


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_embed_users_does_not_depend_on_the_batch(tiny_encoder_and_users, strategy):
    # A user's embedding is the same alone (no padding) and right-padded in a batch of much longer
    # users, under every strategy's inference mask.
    import torch
    import data
    import ggsm
    encoder, ds = tiny_encoder_and_users
    strategy_obj = ggsm.STRATEGIES[strategy](total_steps=4, warmup_steps=2, n_layers=2, hidden_size=32, n_heads=4)
    L = max(ds.lengths)
    if strategy_obj.wants_gradients(0):  # non-uniform learnt future weights, frozen after warm-up
        g = torch.randn(1, L, 32, generator=torch.Generator().manual_seed(1))
        for step in range(2):
            strategy_obj.accumulate(g * (step + 1), torch.ones(1, L, dtype=torch.long))
            strategy_obj.end_step(step)
    by_length = sorted(range(len(ds)), key=lambda i: ds.lengths[i])
    order = [by_length[0]] + by_length[-3:] + by_length[1:-3]  # shortest user first, with the longest three
    assert ds.lengths[order[0]] * 2 < ds.lengths[order[1]], "the test needs users of very different lengths"
    batches = [data.collate([ds[i] for i in order[:4]]), data.collate([ds[i] for i in order[4:]])]
    alone = [data.collate([ds[i]]) for i in order]
    encoder.train()
    E_batched = probe.embed_users(encoder, batches, strategy_obj.inference_mask, "cpu")
    E_alone = probe.embed_users(encoder, alone, strategy_obj.inference_mask, "cpu")
    assert encoder.training, "embed_users must restore the encoder's mode"
    assert E_batched.shape == (len(ds), 32) and E_batched.dtype == np.float32
    diff = np.abs(E_batched - E_alone).max()
    assert diff <= 1e-5, f"{strategy}: embedding alone vs padded in a batch: max |diff| {diff:.2e}"
    # the same numbers as a direct, gradient-free call of the encoder on the batch
    encoder.eval()
    with torch.no_grad():
        side = batches[0].user
        ref = encoder(side.input_ids, side.attention_mask, side.pool_index,
                      mask=strategy_obj.inference_mask(side.attention_mask, torch.float32, history=side.history),
                      vectors=side.vectors, vector_pos=side.vector_pos)
    np.testing.assert_allclose(E_batched[:4], ref.numpy(), rtol=0, atol=1e-6)
    # the masks must matter: a causal and a bidirectional encoder do not embed alike
    if strategy == "bidirectional":
        E_causal = probe.embed_users(encoder, alone, ggsm.STRATEGIES["causal"](total_steps=4).inference_mask, "cpu")
        assert np.abs(E_causal - E_alone).max() > 1e-3



class _Stream:
    """A text stream that says whether it is a terminal."""

    def __init__(self, tty):
        self.tty, self.text = tty, ""

    def isatty(self):
        return self.tty

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_progress_is_a_few_lines_off_a_terminal(tiny_encoder_and_users, capsys):
    off, on = _Stream(False), _Stream(True)
    for done in range(1, 16):
        probe.progress(done, 15, f"embedding: batch {done}/15", stream=off)
        probe.progress(done, 15, f"embedding: batch {done}/15", stream=on)
    assert "\r" not in off.text
    assert off.text.splitlines() == [f"embedding: batch {k}/15" for k in (1, 4, 8, 12, 15)]
    assert on.text.count("\r") == 15 and "\n" not in on.text  # in place on a terminal, as before
    # embed_users under pytest's capture (not a terminal): whole lines, one per milestone
    import data
    encoder, ds = tiny_encoder_and_users
    batches = [data.collate([ds[i]]) for i in range(len(ds))]  # 8 users, one per batch
    capsys.readouterr()
    probe.embed_users(encoder, batches, None, "cpu")
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines() == [f"embedding: batch {k}/8, {k} users" for k in (1, 2, 4, 6, 8)], err


# ---------------------------------------------------------------- standard errors by bootstrap over test users

def test_weighted_auc_matches_sklearn_sample_weight():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(size=300) + y, 1)  # rounding makes many ties
    rows = rng.permutation(300) + 7
    w = rng.integers(0, 4, 400).astype(float)
    got = probe._auc_by_groups(y, s, rows)(w)
    assert got == pytest.approx(roc_auc_score(y, s, sample_weight=w[rows]), abs=1e-12)
    assert probe._auc_by_groups(y, s, rows)(np.ones(400)) == pytest.approx(probe.roc_auc(y, s), abs=1e-12)


def test_bootstrap_mean_auc_equals_explicit_resampling():
    """Against a naive bootstrap that duplicates the drawn users and calls roc_auc, with the same draws."""
    rng = np.random.default_rng(1)
    n = 120
    y = {"a": rng.integers(0, 2, n), "b": rng.integers(0, 2, n)}
    rows = {"a": np.arange(n), "b": np.arange(0, n, 2)}  # task b is labelled for half of the users only
    sets = [{t: (rows[t], y[t][:len(rows[t])], rng.normal(size=len(rows[t])) + k * y[t][:len(rows[t])])
             for t in ("a", "b")} for k in (0.5, 1.0)]
    got = probe.bootstrap_mean_auc(sets, n_boot=20, seed=3)
    draws = np.random.default_rng(3)
    for b in range(20):
        drawn = draws.integers(n, size=n)  # the users are 0..n-1, so a draw is a row number
        for k, st in enumerate(sets):
            aucs = []
            for t, (r, yy, ss) in st.items():
                pos = {int(u): i for i, u in enumerate(r)}
                idx = [pos[int(u)] for u in drawn if int(u) in pos]
                aucs.append(probe.roc_auc(yy[idx], ss[idx]))
            assert got[b, k] == pytest.approx(np.mean(aucs), abs=1e-12)
    big = probe.bootstrap_mean_auc(sets, n_boot=300, seed=0)
    se = big.std(axis=0, ddof=1)
    assert np.all((se > 0.01) & (se < 0.1))  # ~ sqrt(AUC (1 - AUC) / n) for 60-120 users per task
    assert (big[:, 1] - big[:, 0]).std(ddof=1) < se.sum()  # the paired SE: both rows on the same draws


def test_hand_made_rows_in_the_table_and_probe_json(tmp_path, capsys):
    """The bag of events (with the tabular vectors), the tabular vectors and the embedding beside the bag are probed
    on the same users and split as the embedding, stored under "baselines"; delta_best_baseline is the paired
    difference against the better of the two hand-made rows (never the row that holds the embedding)."""
    _, path = synthetic.write_synthetic(str(tmp_path), 0, 300, seed=0)
    records, _ = data.load_records(path, require=("labels",))
    emb = np.random.default_rng(0).normal(size=(len(records), 8))
    rows = probe.hand_made_rows(records, records, "ggsm", emb)
    assert [n for n, _ in rows] == ["bag of events", "tabular", "ggsm + bag"]
    bag = data.bag_of_events(records)
    np.testing.assert_array_equal(rows[0][1], np.hstack([bag, data.tabular_vectors(records)]))
    np.testing.assert_array_equal(rows[2][1][:, :8], emb)
    out = probe.report_probe(emb, records, "ggsm", out=str(tmp_path / "p.json"), features=rows,
                             events_cut={"events_cut": 3, "per_user": 0.01, "max_len": 256})
    saved = json.load(open(tmp_path / "p.json"))
    assert set(saved["baselines"]) == {"bag of events", "tabular", "ggsm + bag"} and saved["events"]["events_cut"] == 3
    best = max(("bag of events", "tabular"), key=lambda n: saved["baselines"][n]["mean_auc"])
    assert saved["delta_best_baseline"]["vs"] == best
    assert saved["delta_best_baseline"]["mean_auc"] == pytest.approx(out["mean_auc"] - saved["baselines"][best]["mean_auc"])
    assert saved["baselines"]["bag of events"]["mean_auc"] > out["mean_auc"] + 0.05  # words carry the labels; noise not
    table = capsys.readouterr().out
    assert "| bag of events |" in table and f"ggsm - {best}:" in table
    with pytest.raises(ValueError, match="not those embedded"):
        probe.hand_made_rows(records, records[1:], "ggsm", emb[1:])

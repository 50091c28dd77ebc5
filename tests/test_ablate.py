"""tools/ablate.py quick mode: every strategy reported, intervals recomputed by hand, valid plots, resumable."""
import json
import math
import os

import numpy as np
import pytest

from tools import ablate


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ablation"))
    summary = ablate.main(["--quick", "--seeds", "0,1", "--out", out])
    return out, summary


def test_every_strategy_in_table_and_json(quick):
    out, _ = quick
    with open(os.path.join(out, "table.md")) as f:
        table = f.read()
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    for s in ablate.STRATEGIES:
        assert f"| {s} |" in table, f"{s} missing from table.md"
        assert s in res["table"], f"{s} missing from results.json"
        for k in (0, 1):
            assert f"{s}-seed{k}" in res["runs"]
    assert "ggsm - causal" in res["differences"] and "ggsm - scheduler" in res["differences"]


def test_intervals_match_hand_computation(quick):
    out, _ = quick
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    tasks = res["tasks"]
    for ref in ("causal", "scheduler"):
        d = res["differences"][f"ggsm - {ref}"]
        per_seed = []
        for k in (0, 1):  # recompute each seed's average AUC from the raw probe results
            g = res["runs"][f"ggsm-seed{k}"]["tasks"]
            r = res["runs"][f"{ref}-seed{k}"]["tasks"]
            per_seed.append(sum(g[t]["auc"] for t in tasks) / len(tasks) - sum(r[t]["auc"] for t in tasks) / len(tasks))
        m = (per_seed[0] + per_seed[1]) / 2
        sd = abs(per_seed[0] - per_seed[1]) / math.sqrt(2)   # sample std of two numbers
        half = 12.706 * sd / math.sqrt(2)                   # t_{0.975, 1 df}
        assert d["mean"] == pytest.approx(m, abs=1e-12)
        assert d["ci95"][0] == pytest.approx(m - half, abs=1e-9) and d["ci95"][1] == pytest.approx(m + half, abs=1e-9)
    assert ablate.mean_ci([1.0, 2.0, 3.0, 4.0])[2] == pytest.approx(3.182 * np.std([1, 2, 3, 4], ddof=1) / 2)


def test_plots_are_png(quick):
    out, _ = quick
    for name in ("curves.png", "stability.png"):
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", f"{name} is not a PNG"


def test_finished_runs_are_not_recomputed(quick, monkeypatch):
    out, first = quick

    def boom(*a, **k):
        raise AssertionError("a finished run was recomputed")

    monkeypatch.setattr(ablate.train, "main", boom)
    monkeypatch.setattr(ablate.probe, "main", boom)
    again = ablate.main(["--quick", "--seeds", "0,1", "--out", out])
    assert again["table"]["ggsm"]["avg"]["mean"] == first["table"]["ggsm"]["avg"]["mean"]

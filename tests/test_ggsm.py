"""
Tests for ggsm.py: every strategy's mask on a padded L = 5 batch against hand-written matrices, the
gradient importance against a direct per-column computation, the GG-SM ramp end points, checkpoint
round trips, cross-rank agreement under gloo, and the masked InfoNCE against a naive loop of Eq. 6-8.

    python -m pytest -q tests/test_ggsm.py
"""

import functools
import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import data
import ggsm
import train

X = "X"  # blocked (finfo.min) in the hand-written matrices; numbers are attention weights w = exp(M_ij)
AM = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # one full row, one with 2 pads on the right
LN3, LN4, LN9 = math.log(3), math.log(4), math.log(9)  # sigmoid: 0.75, 0.8, 0.9

CAUSAL = [[1, X, X, X, X],
          [1, 1, X, X, X],
          [1, 1, 1, X, X],
          [1, 1, 1, 1, X],
          [1, 1, 1, 1, 1]]
CAUSAL_PADDED = [[1, X, X, X, X],
                 [1, 1, X, X, X],
                 [1, 1, 1, X, X],
                 [1, 1, 1, X, X],  # padded query rows: finite, they see the real keys before them
                 [1, 1, 1, X, X]]
BIDIR = [[1, 1, 1, 1, 1]] * 5
WINDOW1 = [[1, 1, X, X, X],
           [1, 1, 1, X, X],
           [1, 1, 1, 1, X],
           [1, 1, 1, 1, 1],
           [1, 1, 1, 1, 1]]
WINDOW3 = [[1, 1, 1, 1, X],
           [1, 1, 1, 1, 1],
           [1, 1, 1, 1, 1],
           [1, 1, 1, 1, 1],
           [1, 1, 1, 1, 1]]
GQ = [[1, 1, 1, 1, 1],  # row 0 = <GLOBAL>: sees everything
      [1, 1, X, X, X],
      [1, 1, 1, X, X],
      [1, 1, 1, 1, X],
      [1, 1, 1, 1, 1]]
GGSM_HALF = [[1, .5, .5, .5, .5],  # t = 0: no gradients yet, sigma(0) = 0.5 on every future key
             [1, 1, .5, .5, .5],
             [1, 1, 1, .5, .5],
             [1, 1, 1, 1, .5],
             [1, 1, 1, 1, 1]]
GGSM_WARM = [[1, .75, .8, .9, .5],  # sigma(I) with I = (ln3, ln3, ln4, ln9, 0) from the previous step
             [1, 1, .8, .9, .5],
             [1, 1, 1, .9, .5],
             [1, 1, 1, 1, .5],
             [1, 1, 1, 1, 1]]
GGSM_FROZEN = [[1, .9, .8, .75, .9],  # frozen at the end of step T_warm-1: I2 = (0, ln9, ln4, ln3, ln9)
               [1, 1, .8, .75, .9],
               [1, 1, 1, .75, .9],
               [1, 1, 1, 1, .9],
               [1, 1, 1, 1, 1]]
GGSM_MID = [[1, .95, .9, .875, .95],  # alpha = 0.5: w = 0.5 * w_frozen + 0.5
            [1, 1, .9, .875, .95],
            [1, 1, 1, .875, .95],
            [1, 1, 1, 1, .95],
            [1, 1, 1, 1, 1]]
GGSM_MID_PADDED = [[1, .95, .9, X, X],
                   [1, 1, .9, X, X],
                   [1, 1, 1, X, X],
                   [1, 1, 1, X, X],
                   [1, 1, 1, X, X]]
MLP_INIT = [[1, .02, .02, .02, .02],
            [1, 1, .02, .02, .02],
            [1, 1, 1, .02, .02],
            [1, 1, 1, 1, .02],
            [1, 1, 1, 1, 1]]


HIST = torch.tensor([[1, 4], [0, 2]])  # [start, end) of each row's user-history segment (row 1: 3 real tokens)


def relaxed_in_history(w, n_real, start, end, L=5):
    """Naive loop: 1 on the past, w_j on a future key j when start <= i < j < end, blocked otherwise and on pads."""
    return [[X if j >= n_real else 1 if j <= i else w[j] if start <= i and j < end else X for j in range(L)]
            for i in range(L)]


def padded(M, n_real):
    """The same matrix for a sequence with n_real tokens: padded key columns blocked (query rows unchanged)."""
    return [[v if j < n_real else X for j, v in enumerate(r)] for r in M]


def expected_additive(rows, dtype=torch.float32):
    out = torch.empty(len(rows), len(rows[0]), dtype=torch.float64)
    for i, r in enumerate(rows):
        for j, v in enumerate(r):
            out[i, j] = torch.finfo(dtype).min if v == X else math.log(v)
    return out


def show(m):
    return "\n".join(" ".join(" X   " if v <= torch.finfo(m.dtype).min / 2 else f"{math.exp(v):.3f}" for v in r) for r in m.double().tolist())


def assert_mask(mask, expected_rows, name, dtype=torch.float32):
    """mask (L, L); blocked entries must be exactly finfo(dtype).min, the others log w within atol."""
    atol = 1e-6 if dtype == torch.float32 else 2e-2  # bf16 keeps 8 bits: log 0.02 = -3.912 -> -3.906
    exp = expected_additive(expected_rows, dtype)
    got = mask.double()
    msg = f"{name}: got (weights, X = blocked)\n{show(mask)}\nexpected\n{show(exp.to(mask.dtype))}"
    blocked = exp <= torch.finfo(dtype).min / 2
    assert torch.equal(got[blocked], exp[blocked]), msg
    assert torch.equal(got <= torch.finfo(dtype).min / 2, blocked), msg
    assert torch.allclose(got[~blocked], exp[~blocked], atol=atol, rtol=0), msg


def assert_batch(mask, full_rows, name, padded_rows=None, dtype=torch.float32):
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == dtype, f"{name}: shape {tuple(mask.shape)} dtype {mask.dtype}"
    assert torch.isfinite(mask).all(), f"{name}: mask has -inf/nan"
    assert_mask(mask[0, 0], full_rows, f"{name} [full row]", dtype)
    assert_mask(mask[1, 0], padded_rows or padded(full_rows, 3), f"{name} [padded row]", dtype)


def grad_with_norms(norms, D=2):
    """(B, L) target norms -> (B, L, D) gradient whose rows have exactly those L2 norms."""
    direction = torch.tensor([0.6, 0.8] + [0.0] * (D - 2), dtype=torch.float64)
    return torch.tensor(norms, dtype=torch.float64)[..., None] * direction


# gradients whose per-column mean over REAL rows is I = (ln3, ln3, ln4, ln9, 0); the padded entries of
# row 1 are huge, the column-1 entries differ per row (a sum would give 2 ln3, a max 2 ln3)
G1 = grad_with_norms([[LN3, 2 * LN3, LN4, LN9, 0.0], [LN3, 0.0, LN4, 1e6, 1e6]])
G2 = grad_with_norms([[0.0, LN9, LN4, LN3, LN9], [0.0, LN9, LN4, 1e6, 1e6]])  # I2 = (0, ln9, ln4, ln3, ln9)


def run_ggsm_warmup(strategy, total=10, warm=4, **options):
    """Steps 0..warm-1 with G1 at every step but the last, which sees G2 (the one that gets frozen).
    hybrid_mask runs with segment="all" (every future key) unless options say otherwise."""
    if strategy == "hybrid_mask":
        options = {"segment": "all", **options}
    s = ggsm.STRATEGIES[strategy](total_steps=total, warmup_steps=warm, n_layers=2, **options)
    history = HIST if options.get("segment") == "history" else None
    masks = {}
    for t in range(warm):
        masks[t] = s.train_mask(t, AM, torch.float32, history=history)
        assert s.wants_gradients(t)
        s.accumulate(G2 if t == warm - 1 else G1, AM)
        s.end_step(t)
    assert not s.wants_gradients(warm)
    return s, masks


# -----------------------------------------------------------------------------
# pure masks


def test_pure_masks_hand_written():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert_batch(ggsm.causal_mask(AM, dtype), CAUSAL, "causal", CAUSAL_PADDED, dtype)
        assert_batch(ggsm.bidirectional_mask(AM, dtype), BIDIR, "bidirectional", dtype=dtype)
        assert_batch(ggsm.window_mask(AM, 0, dtype), CAUSAL, "window 0", dtype=dtype)
        assert_batch(ggsm.window_mask(AM, 1, dtype), WINDOW1, "window 1", dtype=dtype)
        assert_batch(ggsm.window_mask(AM, 3, dtype), WINDOW3, "window 3", dtype=dtype)
        assert_batch(ggsm.global_query_mask(AM, dtype), GQ, "global query", dtype=dtype)
    w = torch.tensor([0.3, 0.95, 0.9, 0.875, 0.95])  # column 0 is never a future key
    m = ggsm.soft_future_mask(AM, w, torch.float32)
    assert_batch(m, GGSM_MID, "soft_future", GGSM_MID_PADDED)


def test_masks_never_nan_even_for_all_pad_rows():
    am = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    w = torch.tensor([0.0, 0.0, 0.5, 1.0, 1e-30])  # w = 0 must not give log(0) = -inf
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for m in (ggsm.causal_mask(am, dtype), ggsm.bidirectional_mask(am, dtype), ggsm.window_mask(am, 2, dtype),
                  ggsm.global_query_mask(am, dtype), ggsm.soft_future_mask(am, w, dtype)):
            assert torch.isfinite(m).all()
            scores = torch.randn(2, 1, 5, 5, dtype=dtype) + m
            assert not torch.isnan(torch.softmax(scores.float(), -1)).any()


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="causal_mask"):
        ggsm.causal_mask(torch.ones(5), torch.float32)
    with pytest.raises(ValueError, match="float additive mask"):
        ggsm.causal_mask(torch.ones(2, 5), torch.float32)
    with pytest.raises(ValueError, match="soft_future_mask"):
        ggsm.soft_future_mask(AM, torch.ones(4), torch.float32)
    with pytest.raises(ValueError, match="window_mask"):
        ggsm.window_mask(AM, -1)
    with pytest.raises(ValueError, match="warmup_steps"):
        ggsm.STRATEGIES["ggsm"](10, 10, n_layers=2)
    with pytest.raises(ValueError, match="n_layers"):
        ggsm.STRATEGIES["ggsm"](10, 2)
    with pytest.raises(ValueError, match="info_nce"):
        ggsm.info_nce(torch.randn(3, 4), torch.randn(4, 4), 0.05, 0.1)
    imp = ggsm.GradientImportance()
    imp.accumulate(torch.ones(1, 3, 2), torch.tensor([[0, 1, 1]]))  # left padding
    with pytest.raises(ValueError, match="padding must be on the right"):
        imp.end_step()
    with pytest.raises(ValueError, match="retain_grad"):
        imp.accumulate(None, AM)


# -----------------------------------------------------------------------------
# every strategy at t = 0, last warm-up step, mid-ramp, after T_total, and at inference


def future_weight(s, t, am=torch.ones(1, 5, dtype=torch.long)):
    """The logged mean future weight of strategy s's user mask at step t (tensor masks only)."""
    return ggsm.mean_future_weight(s.train_mask(t, am), am)


def test_mean_future_weight_by_hand():
    # the GGSM_MID mask on AM: row 0 has 10 future pairs with weights .95 .9 .875 .95 (x 1, 2, 3, 4 pairs),
    # row 1 (3 tokens) has 3 real future pairs: .95, .9, .9; padded keys and padded queries do not count
    m = ggsm.soft_future_mask(AM, torch.tensor([0.3, 0.95, 0.9, 0.875, 0.95]))
    by_hand = (1 * .95 + 2 * .9 + 3 * .875 + 4 * .95 + .95 + .9 + .9) / 13
    assert ggsm.mean_future_weight(m, AM) == pytest.approx(by_hand, rel=1e-6)
    assert ggsm.mean_future_weight(ggsm.causal_mask(AM), AM) == 0.0
    assert ggsm.mean_future_weight(ggsm.bidirectional_mask(AM, torch.bfloat16), AM) == 1.0
    heads = torch.cat([ggsm.causal_mask(AM), ggsm.bidirectional_mask(AM)], dim=1)  # (2, 2, 5, 5): heads averaged
    assert ggsm.mean_future_weight(heads, AM) == pytest.approx(0.5)
    assert math.isnan(ggsm.mean_future_weight(ggsm.causal_mask(AM[:, :1]), AM[:, :1]))  # no pair j > i


def test_causal_bidirectional_strategies():
    for strategy, rows in (("causal", CAUSAL), ("bidirectional", BIDIR)):
        s = ggsm.STRATEGIES[strategy](total_steps=10, warmup_steps=4)
        for t in (0, 3, 7, 10, 25):
            assert_batch(s.train_mask(t, AM), rows, f"{strategy} t={t}")
            assert_batch(s.train_mask(t, AM, tower="answer"), rows, f"{strategy} answer t={t}")
        assert_batch(s.inference_mask(AM), rows, f"{strategy} inference")
        assert s.capture_layer is None and s.module is None and not s.wants_gradients(0)


def window_by_hand(n_real, delta, L=5):
    """Naive loop: key j visible to query i when j <= i + delta and j is a real token."""
    return [[1 if j < n_real and j <= i + delta else X for j in range(L)] for i in range(L)]


def test_scheduler():
    s = ggsm.STRATEGIES["scheduler"](total_steps=10, warmup_steps=4)
    # each row's own length n: delta(t) = floor(n t / 10); the full row (n = 5): t=0 -> 0, t=3 -> 1, t=7 -> 3;
    # the padded row (n = 3): t=3 -> 0, t=7 -> 2
    for t, rows, d3 in ((0, CAUSAL, 0), (3, WINDOW1, 0), (7, WINDOW3, 2), (10, BIDIR, 3), (11, BIDIR, 3)):
        for tower in ("user", "answer"):
            m = s.train_mask(t, AM, tower=tower)
            assert_mask(m[0, 0], rows, f"scheduler {tower} t={t} [full row]")
            assert_mask(m[1, 0], window_by_hand(3, d3), f"scheduler {tower} t={t} [padded row]")
    assert_batch(s.inference_mask(AM), BIDIR, "scheduler inference")
    assert [s.window_delta(t, 5) for t in range(11)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    assert future_weight(s, 0) == 0.0 and future_weight(s, 10) == 1.0
    assert future_weight(s, 3) == pytest.approx(4 / 10)  # 4 of the 10 future pairs are 1 apart


def test_scheduler_window_is_the_users_own():
    """A user's window depends on its own length only: adding a longer batch-mate (more padding) changes nothing."""
    s = ggsm.STRATEGIES["scheduler"](total_steps=10)
    short = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0, 0, 0]])  # 4 tokens, padded to the batch-mate's 10
    alone = torch.ones(1, 4, dtype=torch.long)
    mates = torch.cat([short, torch.ones(1, 10, dtype=torch.long)])
    for t in range(11):
        m_alone = s.train_mask(t, alone)[0, 0]  # (4, 4)
        m_batch = s.train_mask(t, mates)[0, 0, :4, :4]  # the short user's real block, in a batch of L = 10
        assert torch.equal(m_alone, m_batch), f"t={t}: the short user's mask depends on its batch-mate"
        assert_mask(s.train_mask(t, mates)[1, 0], window_by_hand(10, (10 * t) // 10, L=10), f"long user t={t}")
    with pytest.raises(ValueError, match="window_mask"):
        ggsm.window_mask(AM, torch.tensor([1, -1]))


def test_ggsm_schedule_hand_written():
    s, masks = run_ggsm_warmup("ggsm")
    assert s.phase(0) == "warmup" and s.phase(3) == "warmup" and s.phase(4) == "ramp" and s.phase(10) == "bidirectional"
    assert_batch(masks[0], GGSM_HALF, "ggsm t=0")
    assert_batch(masks[1], GGSM_WARM, "ggsm t=1")
    assert_batch(masks[3], GGSM_WARM, "ggsm t=3 (last warm-up step: uses step 2's gradients)")
    assert_batch(s.train_mask(4, AM), GGSM_FROZEN, "ggsm t=4 (ramp start = frozen, incl. step 3's gradients)")
    assert_batch(s.train_mask(7, AM), GGSM_MID, "ggsm t=7 (alpha = 0.5)", GGSM_MID_PADDED)
    assert_batch(s.train_mask(10, AM), BIDIR, "ggsm t=10")
    assert_batch(s.train_mask(50, AM), BIDIR, "ggsm t=50")
    assert_batch(s.inference_mask(AM), BIDIR, "ggsm inference")
    # answer tower: the same column weights at the answer's own length (official code: same bias on both)
    am3 = torch.tensor([[1, 1, 1], [1, 1, 0]])
    ans = s.train_mask(7, am3, tower="answer")
    assert_mask(ans[0, 0], [[1, .95, .9], [1, 1, .9], [1, 1, 1]], "ggsm answer t=7")
    assert_mask(ans[1, 0], [[1, .95, X], [1, 1, X], [1, 1, X]], "ggsm answer t=7 padded")
    # longer than any seen position: fallback = mean of the frozen importance (0 + ln9 + ln4 + ln3 + ln9) / 5
    fallback = 1 / (1 + math.exp(-(2 * LN9 + LN4 + LN3) / 5))
    w = s.future_weights(4, 7)
    assert torch.allclose(w[5:], torch.full((2,), fallback)), w
    # logs: Figure 1's average future weight, mean over the 10 pairs j > i of w_j (column j has j pairs)
    fresh = ggsm.STRATEGIES["ggsm"](total_steps=10, warmup_steps=4, n_layers=2)
    assert future_weight(fresh, 0) == pytest.approx(0.5)  # the logged value is the mask's own
    assert future_weight(s, 7) == pytest.approx((1 * .95 + 2 * .9 + 3 * .875 + 4 * .95) / 10)


def test_hybrid_mask_schedule():
    s, masks = run_ggsm_warmup("hybrid_mask")
    assert_batch(masks[0], GGSM_HALF, "hybrid_mask t=0")
    assert_batch(masks[3], GGSM_WARM, "hybrid_mask t=3")
    for t in (4, 7, 10, 100):  # frozen, never ramped
        assert s.phase(t) == "frozen"
        assert_batch(s.train_mask(t, AM), GGSM_FROZEN, f"hybrid_mask t={t}")
    assert_batch(s.inference_mask(AM), GGSM_FROZEN, "hybrid_mask inference")


def test_hybrids_relax_causality_over_the_history_segment_only():
    """Paper A.4: a hybrid "selectively relaxes causality over the user-history segment": future keys open only
    with query and key both in [start, end); the instruction, query, <USER> and the answer tower stay causal."""
    s, masks = run_ggsm_warmup("hybrid_mask", segment="history")
    w_half, w_frozen = [.5] * 5, s.future_weights(4, 5).tolist()
    for name, mask, w in (("t=0", masks[0], w_half), ("t=7", s.train_mask(7, AM, history=HIST), w_frozen),
                          ("inference", s.inference_mask(AM, history=HIST), w_frozen)):
        for b, n_real in enumerate((5, 3)):
            assert_mask(mask[b, 0], relaxed_in_history(w, n_real, *HIST[b].tolist()), f"hybrid_mask {name} row {b}")
    assert_batch(s.train_mask(7, AM, tower="answer"), CAUSAL, "hybrid_mask answer", CAUSAL_PADDED)
    assert_batch(s.inference_mask(AM, tower="answer"), CAUSAL, "hybrid_mask answer inference", CAUSAL_PADDED)
    with pytest.raises(ValueError, match="needs history"):
        s.train_mask(7, AM)
    # hybrid_mlp: its 0.02 start, inside the segment only
    m = ggsm.STRATEGIES["hybrid_mlp"](total_steps=10, n_layers=2, hidden_size=8)
    h = torch.randn(2, 5, 8)
    for layer in (0, 1):
        mask = m.train_mask(0, AM, history=HIST)(layer, h)
        for b, n_real in enumerate((5, 3)):
            assert_mask(mask[b, 0], relaxed_in_history([.02] * 5, n_real, *HIST[b].tolist()), f"hybrid_mlp layer {layer} row {b}")
    assert_batch(m.train_mask(0, AM, tower="answer"), CAUSAL, "hybrid_mlp answer", CAUSAL_PADDED)
    with pytest.raises(ValueError, match="segment must be"):
        ggsm.STRATEGIES["hybrid_mlp"](total_steps=10, n_layers=2, hidden_size=8, segment="future")
    # segment="all" keeps the former opening of every future key (covered above by the GGSM_FROZEN / MLP_INIT rows)
    assert ggsm.history_segment(HIST, 5).tolist() == [[False, True, True, True, False], [True, True, False, False, False]]


@pytest.mark.parametrize("strategy", ["hybrid_mask", "hybrid_mlp"])
def test_hybrid_history_segment_in_the_decoder(strategy):
    """Through the decoder: a changed query token (after the segment) leaves every earlier hidden state as it was,
    a changed late history token reaches the earlier history positions but not the token before the segment."""
    enc, cfg = tiny_encoder("token")
    s = ggsm.STRATEGIES[strategy](total_steps=10, warmup_steps=2, n_layers=2, hidden_size=16)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 40, (1, 8), generator=g)
    am = torch.ones(1, 8, dtype=torch.long)
    hist = torch.tensor([[1, 5]])  # position 0 stands for <GLOBAL> / the opening sentence, 5.. for the query

    def hidden(ids):
        with torch.no_grad():
            return enc.decoder(ids, mask=s.train_mask(0, am, history=hist))[0]  # (8, D)

    base = hidden(ids)
    query, late = ids.clone(), ids.clone()
    query[0, 6] = (ids[0, 6] + 1) % 40
    late[0, 4] = (ids[0, 4] + 1) % 40
    assert torch.equal(hidden(query)[:6], base[:6]), "a query token reached the history"
    change = (hidden(late) - base).abs().amax(-1)  # (8,)
    assert change[0] == 0, "the token before the segment saw a history token after it"
    assert (change[1:4] > 1e-6).all(), f"history positions 1-3 did not see history token 4: {change}"
    s_all = ggsm.STRATEGIES[strategy](total_steps=10, warmup_steps=2, n_layers=2, hidden_size=16, segment="all")
    with torch.no_grad():
        h_all = enc.decoder(ids, mask=s_all.train_mask(0, am))[0]
        h_all_q = enc.decoder(query, mask=s_all.train_mask(0, am))[0]
    assert (h_all_q[:6] - h_all[:6]).abs().amax() > 1e-6, "segment='all' opens the query to the history, as before"


def test_hybrid_gq_schedule():
    s = ggsm.STRATEGIES["hybrid_gq"](total_steps=10, warmup_steps=4)
    for t in (0, 3, 7, 10):
        assert_batch(s.train_mask(t, AM), GQ, f"hybrid_gq t={t}")
        assert_batch(s.train_mask(t, AM, tower="answer"), CAUSAL, f"hybrid_gq answer t={t}", CAUSAL_PADDED)
    assert_batch(s.inference_mask(AM), GQ, "hybrid_gq inference")
    assert_batch(s.inference_mask(AM, tower="answer"), CAUSAL, "hybrid_gq answer inference", CAUSAL_PADDED)
    assert future_weight(s, 0) == pytest.approx(4 / 10)


def test_hybrid_mlp_schedule_starts_nearly_causal_and_learns():
    torch.manual_seed(0)
    s = ggsm.STRATEGIES["hybrid_mlp"](total_steps=10, warmup_steps=4, n_layers=2, hidden_size=8, segment="all")
    assert isinstance(s.module, ggsm.HybridMLPBias)
    h = torch.randn(2, 5, 8)
    for t in (0, 3, 7, 10):
        mask = s.train_mask(t, AM, torch.float32)
        assert callable(mask)
        for layer in (0, 1):
            assert_batch(mask(layer, h), MLP_INIT, f"hybrid_mlp t={t} layer {layer}")
    assert ggsm.mean_future_weight(s.train_mask(0, AM)(0, h), AM) == pytest.approx(0.02)
    assert_batch(s.inference_mask(AM, torch.bfloat16)(1, h.bfloat16()), MLP_INIT, "hybrid_mlp bf16", dtype=torch.bfloat16)
    # the bias is a function of h_i: after a few optimizer steps pushing row 0's future weight up and
    # row 3's down, the two rows differ, and the mask stays in the (0, 1) weight range
    h = torch.randn(1, 5, 8)
    am = torch.ones(1, 5, dtype=torch.long)
    for _ in range(10):
        m = s.train_mask(0, am)(0, h)[0, 0]  # (5, 5)
        loss = -m[0, 1:].mean() + m[3, 4]
        s.module.zero_grad()
        loss.backward()
        with torch.no_grad():  # plain sign-SGD (torch.optim imports dynamo: seconds of test time)
            for p in s.module.mlps[0].parameters():  # only layer 0's MLP is used here
                p -= 0.01 * p.grad.sign()
    w = s.train_mask(0, am)(0, h)[0, 0].exp().detach()
    assert w[0, 1] > 0.03 and w[3, 4] < 0.015, w
    assert torch.allclose(w[0, 1:], w[0, 1].expand(4)) and (w.tril() == torch.ones(5, 5).tril()).all()
    assert (w <= 1).all() and (w.triu(1)[w.triu(1) > 0] < 1).all() and (w > 0).all()


def test_ggsm_ramp_endpoints_exact():
    s, _ = run_ggsm_warmup("ggsm", total=13, warm=3)
    w_frozen = torch.sigmoid(torch.tensor([0.0, LN9, LN4, LN3, LN9], dtype=torch.float64)).float()
    assert torch.equal(s.future_weights(3, 5), w_frozen)  # alpha = 0 at t = T_warm: exactly the frozen weights
    alpha = (12 - 3) / (13 - 3)
    assert torch.allclose(s.future_weights(12, 5), (1 - alpha) * w_frozen + alpha, atol=0, rtol=1e-7)
    assert torch.equal(s.train_mask(13, AM), ggsm.bidirectional_mask(AM))  # t = T_total: exactly bidirectional
    weights = [future_weight(s, t) for t in range(3, 14)]
    assert all(b > a for a, b in zip(weights, weights[1:])) and weights[-1] == 1.0


def test_ggsm_without_warmup_never_takes_log_zero():
    # official code: frozen buffer empty -> log(alpha), a ValueError at alpha = 0; here w starts at sigma(0)
    s = ggsm.STRATEGIES["ggsm"](total_steps=4, warmup_steps=0, n_layers=2)
    assert s.phase(0) == "ramp" and not s.wants_gradients(0)
    assert_batch(s.train_mask(0, AM), GGSM_HALF, "ggsm T_warm=0 t=0")
    assert torch.isfinite(s.train_mask(0, AM, torch.float16)).all()


def test_forgotten_end_step_is_an_error():
    s = ggsm.STRATEGIES["ggsm"](total_steps=10, warmup_steps=2, n_layers=2)
    with pytest.raises(RuntimeError, match="end_step"):
        s.train_mask(5, AM)


# -----------------------------------------------------------------------------
# gradient importance


def test_importance_equals_sigmoid_of_per_column_norms():
    torch.manual_seed(0)
    imp = ggsm.GradientImportance()
    expected_sum, expected_cnt = [0.0] * 7, [0] * 7
    for L, lengths in ((7, (7, 3, 5)), (4, (2, 4))):  # two micro-steps of different lengths
        am = torch.tensor([[1] * n + [0] * (L - n) for n in lengths])
        g = torch.randn(len(lengths), L, 6) * 3
        g[am == 0] = 1e4  # padded rows must not count
        imp.accumulate(g, am)
        for b, n in enumerate(lengths):
            for j in range(n):
                expected_sum[j] += math.sqrt(sum(float(x) ** 2 for x in g[b, j]))
                expected_cnt[j] += 1
    imp.end_step()
    I = [s_ / c for s_, c in zip(expected_sum, expected_cnt)]
    want = torch.tensor([1 / (1 + math.exp(-x)) for x in I])
    assert torch.allclose(imp.weights(7), want, atol=1e-6), (imp.weights(7), want)
    # fallback for unseen positions: mean importance of the seen ones
    assert torch.allclose(imp.weights(9)[7:], torch.tensor(1 / (1 + math.exp(-sum(I) / 7))).expand(2), atol=1e-6)
    assert imp.updates == 1 and imp._sum is None


def test_importance_ema_and_normalisation():
    am = torch.ones(1, 3, dtype=torch.long)
    imp = ggsm.GradientImportance(ema=0.75)
    imp.accumulate(grad_with_norms([[2.0, 4.0, 8.0]]), am)
    imp.end_step()
    assert torch.allclose(imp.importance, torch.tensor([2.0, 4.0, 8.0], dtype=torch.float64))  # first sighting
    imp.accumulate(grad_with_norms([[0.0, 0.0, 0.0, 4.0]]), torch.ones(1, 4, dtype=torch.long))
    imp.end_step()
    assert torch.allclose(imp.importance, torch.tensor([1.5, 3.0, 6.0, 4.0], dtype=torch.float64))  # EMA 0.75
    imp.end_step()  # a step without gradients (e.g. all micro-batches skipped) changes nothing
    assert imp.updates == 2
    x = imp.importance
    for how, want in (("none", x), ("max", x / 6.0), ("mean", x / x.mean()), ("zscore", (x - x.mean()) / x.std(unbiased=False))):
        imp.normalize = how
        assert torch.allclose(imp.weights(4).double(), torch.sigmoid(want), atol=1e-6), how
    imp.normalize = "zscore"
    w = imp.weights(4)
    assert w.min() < 0.5 < w.max()  # zscore spreads the weights on both sides of sigma(0)
    with pytest.raises(ValueError, match="normalize"):
        ggsm.GradientImportance(normalize="softmax")


# -----------------------------------------------------------------------------
# checkpoints


def _roundtrip(sd, tmp_path, name):
    """Tensors through safetensors, plain numbers through JSON, like a checkpoint."""
    tensors = {k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}
    numbers = {k: v for k, v in sd.items() if not isinstance(v, torch.Tensor)}
    save_file(tensors, str(tmp_path / f"{name}.safetensors"))
    (tmp_path / f"{name}.json").write_text(json.dumps(numbers))
    return {**load_file(str(tmp_path / f"{name}.safetensors")), **json.loads((tmp_path / f"{name}.json").read_text())}


def test_state_dict_round_trip(tmp_path):
    for strategy in ("ggsm", "hybrid_mask"):
        s, _ = run_ggsm_warmup(strategy)
        fresh = ggsm.STRATEGIES[strategy](total_steps=10, warmup_steps=4, n_layers=2, segment="all")
        fresh.load_state_dict(_roundtrip(s.state_dict(), tmp_path, strategy))
        for t in (4, 7, 9):
            assert torch.equal(fresh.train_mask(t, AM), s.train_mask(t, AM)), (strategy, t)
        assert torch.equal(fresh.inference_mask(AM), s.inference_mask(AM))
    # mid-warm-up checkpoint: no frozen weights yet, the importance carries on
    s = ggsm.STRATEGIES["ggsm"](total_steps=10, warmup_steps=4, n_layers=2)
    s.accumulate(G1, AM); s.end_step(0)
    fresh = ggsm.STRATEGIES["ggsm"](total_steps=10, warmup_steps=4, n_layers=2)
    fresh.load_state_dict(_roundtrip(s.state_dict(), tmp_path, "mid"))
    assert "frozen_importance" not in s.state_dict() and fresh.importance.updates == 1
    assert_batch(fresh.train_mask(1, AM), GGSM_WARM, "ggsm after resume t=1")
    # hybrid_mlp: the MLP weights travel with the schedule
    torch.manual_seed(1)
    m = ggsm.STRATEGIES["hybrid_mlp"](10, 0, n_layers=2, hidden_size=8, segment="all")
    for p in m.module.parameters():
        p.data.normal_()
    fresh = ggsm.STRATEGIES["hybrid_mlp"](10, 0, n_layers=2, hidden_size=8, segment="all")
    fresh.load_state_dict(_roundtrip(m.state_dict(), tmp_path, "mlp"))
    h = torch.randn(2, 5, 8)
    assert torch.equal(fresh.train_mask(0, AM)(1, h), m.train_mask(0, AM)(1, h))
    with pytest.raises(KeyError, match="missing keys"):
        fresh.load_state_dict({})
    assert ggsm.STRATEGIES["causal"](10).state_dict() == {}


# -----------------------------------------------------------------------------
# two ranks, different gradients, one mask


def _gloo_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # different gradients on each rank
        s = ggsm.STRATEGIES["ggsm"](total_steps=8, warmup_steps=3, n_layers=2)
        L = 6 if rank == 0 else 4  # and different lengths
        am = torch.ones(2, L, dtype=torch.long)
        am[1, L - 2:] = 0
        grads = []
        for t in range(3):
            for micro in range(2):
                g = torch.rand(2, L, 4) * (rank + 1)
                grads.append(g)
                s.accumulate(g, am)
            s.end_step(t)
        full = torch.ones(2, 6, dtype=torch.long)
        save_file({"mask": s.train_mask(5, full).contiguous(), "frozen": s.frozen,
                   "last_grads": torch.stack(grads[-2:]), "am": am}, os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_two_rank_gloo_masks_identical(tmp_path):
    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert torch.equal(r0["mask"], r1["mask"]) and torch.equal(r0["frozen"], r1["frozen"])
    # and the frozen importance is the mean over both ranks' real rows of the last warm-up step
    sums, cnts = torch.zeros(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    for r in (r0, r1):
        for g in r["last_grads"]:
            n = g.double().norm(dim=-1) * r["am"]  # (2, L)
            sums[:n.shape[1]] += n.sum(0)
            cnts[:n.shape[1]] += r["am"].sum(0)
    assert torch.allclose(r0["frozen"], sums / cnts)
    # without the all-reduce rank 0 would have used its own rows only
    n0 = sum(g.double().norm(dim=-1) * r0["am"] for g in r0["last_grads"]).sum(0) / (2 * r0["am"].sum(0))
    assert not torch.allclose(r0["frozen"][:6], n0, atol=1e-3)


# -----------------------------------------------------------------------------
# masked InfoNCE (Eq. 6-8)


def naive_info_nce(U, A, tau, margin, same_side):
    """Eq. 6-8 with Python loops and floats; returns the loss and how many terms the margin dropped."""
    def cos(x, y):
        return sum(a * b for a, b in zip(x, y)) / math.sqrt(sum(a * a for a in x) * sum(b * b for b in y))
    U, A = U.tolist(), A.tolist()
    N, total, dropped = len(U), 0.0, 0
    for i in range(N):
        pos = cos(U[i], A[i])
        Z = math.exp(pos / tau)
        pairs = [(U[i], A[j]) for j in range(N) if j != i]
        if same_side:
            pairs += [(U[i], U[j]) for j in range(N) if j != i] + [(A[i], A[j]) for j in range(N) if j != i]
        for x, y in pairs:
            s = cos(x, y)
            if s > pos + margin:  # m_ij = 0
                dropped += 1
            else:
                Z += math.exp(s / tau)
        total += -math.log(math.exp(pos / tau) / Z)
    return total / N, dropped


def _embeddings(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    U = torch.randn(6, 5, generator=g, dtype=dtype)
    A = U + 0.8 * torch.randn(6, 5, generator=g, dtype=dtype)  # positives correlated with their user
    A[2] = U[0] + 0.01  # a false negative for u_0 -> a_2
    U[4] = U[3] * 1.5 + 0.02  # near-duplicate users: u-u and, through their answers, a-a terms
    A[5] = A[1] * 0.9 + 0.05  # (a pure rescale would tie s(u_1, a_5) with the positive at margin 0)
    return U, A


def test_info_nce_matches_naive_loop():
    U, A = _embeddings()
    for same_side in (True, False):
        for tau, margin in ((0.05, 0.1), (0.5, 0.0), (1.0, 10.0)):
            want, dropped = naive_info_nce(U, A, tau, margin, same_side)
            got = ggsm.info_nce(torch.nn.functional.normalize(U, dim=-1), torch.nn.functional.normalize(A, dim=-1), tau, margin, same_side)
            assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-10), (same_side, tau, margin)
            if margin < 1:
                assert dropped > 0, "the case must exercise the margin mask"
    # float32 input works and agrees
    got32 = ggsm.info_nce(U.float(), A.float(), 0.05, 0.1)
    assert got32.dtype == torch.float32 and got32.item() == pytest.approx(naive_info_nce(U, A, 0.05, 0.1, True)[0], rel=1e-4)
    # no negative at all (N = 1): loss is -log(1) = 0
    assert ggsm.info_nce(U[:1], A[:1], 0.05, 0.1).item() == pytest.approx(0.0, abs=1e-12)


def test_info_nce_gradient_finite_differences():
    U, A = _embeddings()
    for same_side in (True, False):
        u, a = U.clone().requires_grad_(), A.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda x, y: ggsm.info_nce(x, y, 0.1, 0.1, same_side), (u, a), eps=1e-6, atol=1e-6)
        loss = ggsm.info_nce(u, a, 0.05, 0.1, same_side)
        loss.backward()
        assert torch.isfinite(u.grad).all() and torch.isfinite(a.grad).all()


# -----------------------------------------------------------------------------
# with the decoder (model.py): where dL/dh is taken, and a few training steps under every strategy

model = pytest.importorskip("model")


def tiny_encoder(pooling, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = model.ModelConfig(model_type="qwen2", vocab_size=40, hidden_size=16, intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    dec = model.Decoder(cfg).to(dtype)
    with torch.no_grad():  # random init small enough that attention is near uniform: sharpen it
        for p in dec.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model.UserEncoder(dec, special_token_ids=[40], vector_dims={}, pooling=pooling), cfg


def importance_after_one_step(enc, strategy_layer, ids, am, pool, answers):
    s = ggsm.STRATEGIES["ggsm"](total_steps=10, warmup_steps=2, n_layers=2, capture_layer=strategy_layer)
    u, h = enc(ids, am, pool, mask=s.train_mask(0, am), return_layer=s.capture_layer)  # h.grad: filled by backward
    ggsm.info_nce(u, answers, 0.05, 0.1).backward()
    per_row = h.grad.double().norm(dim=-1)  # (B, L)
    s.accumulate(h.grad, am)
    s.end_step(0)
    return s.importance.importance, per_row


def test_capture_layer_default_varies_literal_final_layer_is_degenerate():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, (4, 7), generator=g)
    ids[:, -1] = 40  # <USER> pooled at the last position
    full = torch.ones(4, 7, dtype=torch.long)
    pool = torch.full((4,), 6)
    answers = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=-1)
    for pooling in ("mean", "token"):
        enc, cfg = tiny_encoder(pooling)
        # default: the input of the last block; the importance differs from position to position
        imp, _ = importance_after_one_step(enc, "last-block", ids, full, pool, answers)
        assert imp.numel() == 7 and (imp > 0).all() and imp.std() / imp.mean() > 0.05, (pooling, imp)
        # literal (the paper's "Last Hidden"): the final normed output
        imp, per_row = importance_after_one_step(enc, cfg.num_hidden_layers, ids, full, pool, answers)
        if pooling == "mean":  # dL/dh_j = dL/dpool / n: the same for every position of a row
            assert torch.allclose(per_row, per_row[:, :1].expand(-1, 7), rtol=1e-5), per_row
            assert torch.allclose(imp, imp[0].expand(7), rtol=1e-5) and imp[0] > 0, imp
        else:  # zero except at the pooled <USER> token
            assert (imp[:6] == 0).all() and imp[6] > 0, imp
            w = ggsm.GradientImportance(); w.importance = imp
            assert (w.weights(7)[:6] == 0.5).all()  # the mask would be sigma(0) = 0.5 on every other column


class SignSGD(torch.optim.Optimizer):
    """p -= lr * sign(grad): the same plain update for every strategy (AdamW would import dynamo: seconds)."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    assert torch.isfinite(p.grad).all()
                    p -= g["lr"] * p.grad.sign().to(p.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_trains_under_every_strategy(dtype):
    g = torch.Generator().manual_seed(1)
    B, Lu, La = 4, 7, 4
    ids = torch.randint(0, 40, (B, Lu), generator=g)
    lens = torch.tensor([7, 5, 6, 3])
    am = (torch.arange(Lu)[None] < lens[:, None]).long()
    ids[torch.arange(B), lens - 1] = 40  # <USER> at the last real token
    aids = torch.randint(0, 40, (B, La), generator=g)
    alens = torch.tensor([4, 2, 3, 4])
    aam = (torch.arange(La)[None] < alens[:, None]).long()
    history = torch.stack([torch.zeros(B, dtype=torch.long), lens - 2], 1)  # (B, 2): all but the query token and <USER>
    batch = data.Batch(data.Side(ids, am, lens - 1, {}, {}, history), data.Side(aids, aam, alens - 1, {}, {}),
                       [], [], torch.arange(B))
    loss_fn = functools.partial(ggsm.info_nce, tau=0.05, margin=0.1)
    for strategy in ggsm.STRATEGIES:
        enc, cfg = tiny_encoder("token", dtype)
        s = ggsm.STRATEGIES[strategy](total_steps=4, warmup_steps=2, n_layers=cfg.num_hidden_layers,
                                      hidden_size=cfg.hidden_size, n_heads=cfg.num_attention_heads)
        towers = train.DualTower(enc, s.module)
        params = [p for p in towers.parameters() if p.requires_grad]
        opt = SignSGD(params, lr=0.05)
        before = [p.detach().clone() for p in params]
        phases = []
        for step in range(5):  # passes warm-up, ramp / window, and the bidirectional end
            phases.append(s.phase(step))
            out = train.train_step(towers, s, opt, [batch], step, loss_fn, clip=0)
            fw = train.future_weight(out["masks"])
            assert math.isfinite(out["loss"]) and 0 <= fw <= 1, (strategy, dtype, step, fw, out["loss"])
        changed = sum(not torch.equal(p, b) for p, b in zip(params, before))
        assert changed > 0 and all(torch.isfinite(p).all() for p in params), strategy
        with torch.no_grad():
            e = enc(ids, am, lens - 1, mask=s.inference_mask(am, dtype, history=history))
        assert torch.isfinite(e).all() and e.shape == (B, 16), (strategy, phases)
        if strategy == "ggsm":
            assert phases == ["warmup", "warmup", "ramp", "ramp", "bidirectional"]
            assert s.frozen is not None and s.frozen.numel() == Lu


def test_readme_strategy_example_runs_inside_ggsm():
    """The README's "Adding a mask strategy" block, run in ggsm.py's namespace, adds a working strategy."""
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    block = readme.split("### Adding a mask strategy", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert len(block.strip().splitlines()) < 30
    namespace = dict(vars(ggsm), STRATEGIES=dict(ggsm.STRATEGIES))
    exec(block, namespace)
    s = namespace["STRATEGIES"]["head_future"](total_steps=4, n_layers=2, hidden_size=8, n_heads=3)
    m = s.train_mask(0, AM)(1, torch.randn(2, 5, 8))
    assert m.shape == (2, 3, 5, 5)
    w = torch.sigmoid(torch.tensor(-2.944)).item()  # 0.05003
    for head in range(3):
        assert_batch(m[:, head:head + 1], [[1 if j <= i else w for j in range(5)] for i in range(5)], f"head {head}")


def test_readme_deviation_rows_are_marked_in_the_code():
    """Every row of docs/deviations.md's two tables (paper / official code / this implementation, and the defaults
    that depart from the paper) has a '# paper [aspect]:' or '# official code [aspect]:' comment where it is
    implemented, and every such comment names a row: the table and the code agree."""
    import glob
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(root, "docs", "deviations.md"), encoding="utf-8").read()
    section = readme.split("## Paper, official code, this implementation", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ")} - {"aspect"}
    rows = {r for r in rows if not set(r) <= set("-")}
    assert len(rows) >= 25, rows
    marks = {}
    for path in glob.glob(os.path.join(root, "*.py")) + glob.glob(os.path.join(root, "tools", "*.py")):
        for m in re.finditer(r"^ *# (paper|official code) \[([^\]]+)\]:", open(path, encoding="utf-8").read(), re.M):
            marks.setdefault(m.group(2), []).append(os.path.basename(path))
    assert not rows - set(marks), f"docs/deviations.md rows without a mark in the code: {sorted(rows - set(marks))}"
    assert not set(marks) - rows, f"marks in the code without a docs/deviations.md row: {sorted(set(marks) - rows)}"


def test_batch_diagnostics_by_hand():
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])  # not unit length: re-normalised
    d = ggsm.batch_diagnostics(u, a, margin=0.1)
    assert d["alignment"] == pytest.approx(1 / 3)  # positives 1, 0, 0
    assert d["cos_uu"] == pytest.approx(-1 / 3) and d["cos_aa"] == pytest.approx(1 / 3)
    # ||u_i - u_j||^2 = 2 (orthogonal, 4 ordered pairs) or 4 (opposite, 2 ordered pairs)
    assert d["uniformity"] == pytest.approx(math.log((4 * math.exp(-4) + 2 * math.exp(-8)) / 6))
    p = torch.tensor([math.sqrt(2), 1.0]) / (1 + math.sqrt(2))  # singular values of u: sqrt 2, 1
    assert d["effective_rank"] == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    # thresholds pos + 0.1 = (1.1, 0.1, 0.1): u2.a3 = 1 and a2.a1 = 1 exceed theirs; no user pair does
    assert d["drop_ua"] == pytest.approx(1 / 6) and d["drop_aa"] == pytest.approx(1 / 6) and d["drop_uu"] == 0.0
    # the drop rates are info_nce's own: dropping exactly those terms by hand gives its loss
    tau = 0.5
    keep_ua = torch.ones(3, 3, dtype=torch.bool); keep_ua[1, 2] = False
    keep_aa = torch.ones(3, 3, dtype=torch.bool); keep_aa[1, 0] = False
    un, an = torch.nn.functional.normalize(u, dim=-1), torch.nn.functional.normalize(a, dim=-1)
    total = 0.0
    for i in range(3):
        z = math.exp(float(un[i] @ an[i]) / tau)
        pos = z
        for j in range(3):
            if j != i:
                z += math.exp(float(un[i] @ an[j]) / tau) * keep_ua[i, j] + math.exp(float(un[i] @ un[j]) / tau)
                z += math.exp(float(an[i] @ an[j]) / tau) * keep_aa[i, j]
        total += -math.log(pos / z)
    assert ggsm.info_nce(u, a, tau, 0.1).item() == pytest.approx(total / 3, rel=1e-6)
    collapsed = ggsm.batch_diagnostics(torch.ones(8, 4), torch.ones(8, 4), 0.1)
    assert collapsed["effective_rank"] == pytest.approx(1.0) and collapsed["cos_uu"] == pytest.approx(1.0)
    assert collapsed["uniformity"] == pytest.approx(0.0, abs=1e-12)


def test_ggsm_zero_is_ggsm_with_a_constant_half_warmup():
    s = ggsm.STRATEGIES["ggsm_zero"](total_steps=10, warmup_steps=4, n_layers=2)
    for t in range(4):
        assert not s.wants_gradients(t)
        assert_batch(s.train_mask(t, AM), GGSM_HALF, f"ggsm_zero t={t}")
        s.end_step(t)
    # ramp from 0.5: t = 7 is alpha = 0.5, w = 0.75 on every future key
    assert_batch(s.train_mask(7, AM), [[1 if j <= i else .75 for j in range(5)] for i in range(5)], "ggsm_zero t=7")
    assert_batch(s.train_mask(10, AM), BIDIR, "ggsm_zero t=10")
    assert_batch(s.inference_mask(AM), BIDIR, "ggsm_zero inference")
    fresh = ggsm.STRATEGIES["ggsm_zero"](total_steps=10, warmup_steps=4, n_layers=2)
    fresh.load_state_dict(s.state_dict())
    assert torch.equal(fresh.train_mask(7, AM), s.train_mask(7, AM))

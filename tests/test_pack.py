"""Packed rows (pack.py): the layout by hand, the block-diagonal mask against a naive loop, and the packed path
against the padded one: the same hidden states, embeddings, losses, gradients and GG-SM importance for every
strategy, to 1e-5."""
import functools
import json
import os

import numpy as np
import pytest
import torch

import data
import ggsm
import model
import pack
import probe
import train
from tools import synthetic, tiny_decoder

MIN = torch.finfo(torch.float32).min


def right_padded(lengths, L=None):
    L = L or max(lengths)
    return (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).long()  # (B, L)


def test_layout_by_hand():
    """First-fit decreasing into rows as long as the longest user; positions restart per user."""
    p = pack.Packing(right_padded([3, 5, 2, 1, 4]))
    # longest first: 5 -> row 0; 4 -> row 1; 3 -> row 2; 2 -> row 2 (3 + 2 = 5); 1 -> row 1 (4 + 1)
    assert (p.R, p.Lp) == (3, 5)
    assert p.rows == [2, 0, 2, 1, 1] and p.offsets == [0, 0, 3, 4, 0]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert p.attention_mask.tolist() == [[1] * 5] * 3
    assert p.slots() == 15 and 5 * 5 == 25  # against the padded batch


def test_pack_unpack_round_trip_and_gradients():
    am = right_padded([4, 1, 3, 4, 2], L=6)  # a longer L than any user: all-pad columns too
    p = pack.Packing(am)
    x = torch.randn(5, 6, 3, requires_grad=True)
    y = p.pack(x)
    assert y.shape == (p.R, p.Lp, 3)
    back = p.unpack(y)
    assert torch.equal(back, x * am[..., None])  # tokens back in place, zeros at the padded slots
    for b, n in enumerate(p.lengths):  # every token at its slot, by hand
        r, o = p.rows[b], p.offsets[b]
        assert torch.equal(y[r, o:o + n], x[b, :n])
    (back * torch.arange(6.0)[None, :, None]).sum().backward()
    assert torch.equal(x.grad, (torch.arange(6.0)[None, :, None] * am[..., None]).expand(5, 6, 3))


def test_mask_is_block_diagonal_by_a_naive_loop():
    am = right_padded([3, 5, 2, 1, 4])
    p = pack.Packing(am)
    m = torch.randn(5, 2, 5, 5)  # two heads, any values: the blocks are copied, not recomputed
    got = p.mask(m)
    want = torch.full((p.R, 2, p.Lp, p.Lp), MIN)
    for r in range(p.R):
        for i in range(p.Lp):
            for j in range(p.Lp):
                for b in range(5):  # the user that holds slot i of row r, if any
                    o, n = p.offsets[b], p.lengths[b]
                    if p.rows[b] == r and o <= i < o + n and o <= j < o + n:
                        want[r, :, i, j] = m[b, :, i - o, j - o]
    assert torch.equal(got, want)
    assert torch.equal(p.mask(m[:1]), pack.Packing(am).mask(m[:1].expand(5, -1, -1, -1)))  # broadcast batch dim


def test_bad_inputs():
    with pytest.raises(ValueError, match="right-padded"):
        pack.Packing(torch.tensor([[0, 1, 1]]))
    with pytest.raises(ValueError, match="integer/bool"):
        pack.Packing(torch.ones(2, 3))
    with pytest.raises(ValueError, match="not broadcastable"):
        pack.Packing(right_padded([2, 3])).mask(torch.zeros(2, 1, 4, 4))
    dec = model.Decoder(small_config())
    with pytest.raises(ValueError, match="pass the mask"):
        dec(input_ids=torch.zeros(1, 3, dtype=torch.long), position_ids=torch.zeros(1, 3, dtype=torch.long))


def small_config(**kw):
    return model.ModelConfig(**{**dict(model_type="qwen2", vocab_size=40, hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2), **kw})


@pytest.mark.parametrize("impl", ["sdpa", "manual"])
@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
def test_packed_decoder_equals_each_user_alone(impl, family):
    """Each user run alone (no padding at all, positions 0..n-1) against all of them packed, under a random
    soft mask per user: the same hidden states to 1e-5 (HF's Mask4DTestFP32 pattern)."""
    torch.manual_seed(0)
    dec = model.Decoder(small_config(model_type=family)).eval()
    dec.attn_impl = impl
    lengths = [6, 2, 5, 3, 1]
    am = right_padded(lengths)
    ids = torch.randint(0, 40, am.shape) * am
    m = torch.log(torch.rand(5, 1, 6, 6)).clamp(min=-8)  # a different soft mask for every user
    p = pack.Packing(am)
    with torch.no_grad():
        h = p.decode(dec, m, ids)
        for b, n in enumerate(lengths):
            alone = dec(input_ids=ids[b:b + 1, :n], mask=m[b:b + 1, :, :n, :n])
            torch.testing.assert_close(h[b:b + 1, :n], alone, atol=1e-5, rtol=1e-5)


def encoder_with_adapter(seed=0):
    torch.manual_seed(seed)
    dec = model.Decoder(small_config())
    with torch.no_grad():  # sharper than the HF init, so that attention (and so the mask) matters
        for p in dec.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.add_lora(dec, r=2, alpha=4)
    with torch.no_grad():
        for m in dec.modules():
            if isinstance(m, model.LoRALinear):
                m.lora_B.normal_(0, 0.1)
    return model.UserEncoder(dec, special_token_ids=[40, 41], vector_dims={"tab": 3}, pooling="token"), dec.config


def make_batch(seed=2):
    """6 users (one <VEC> placeholder each for most, the global token before <USER>) and their answers."""
    g = torch.Generator().manual_seed(seed)
    lens, alens = [9, 3, 7, 2, 6, 4], [4, 2, 3, 4, 1, 2]
    am, aam = right_padded(lens), right_padded(alens)
    ids = torch.randint(0, 40, am.shape, generator=g) * am
    ids[torch.arange(6), torch.tensor(lens) - 1] = 40  # <USER> last
    rows = [0, 2, 4, 5]
    pos = torch.tensor([[r, 1] for r in rows])  # (N, 2): the <VEC> slot
    history = torch.stack([torch.zeros(6, dtype=torch.long), torch.tensor(lens) - 1], 1)
    user = data.Side(ids, am, torch.tensor(lens) - 1, {"tab": torch.randn(len(rows), 3, generator=g)}, {"tab": pos},
                     history)
    aids = torch.randint(0, 40, aam.shape, generator=g) * aam
    answer = data.Side(aids, aam, torch.tensor(alens) - 1, {}, {})
    return data.Batch(user, answer, [], [], torch.arange(6))


@pytest.mark.parametrize("strategy", sorted(ggsm.STRATEGIES))
def test_train_steps_packed_equal_padded(strategy):
    """Five train steps (GG-SM: warm-up with gradient capture, ramp, bidirectional) with packed rows and with
    padded ones: the same losses, gradients, parameters and strategy state to 1e-5."""
    batch = make_batch()
    runs = []
    for packed in (False, True):
        enc, cfg = encoder_with_adapter()
        enc.pack = packed
        s = ggsm.STRATEGIES[strategy](total_steps=4, warmup_steps=2, n_layers=2, hidden_size=16, n_heads=4)
        if s.module is not None:
            torch.manual_seed(5)
            for p in s.module.parameters():
                p.data.normal_(0, 0.5)  # a non-trivial per-layer future bias
        towers = train.DualTower(enc, s.module)
        params = [p for p in towers.parameters() if p.requires_grad]
        # lr 0.02: at 0.05 these sharpened weights amplify the round-off of a different row layout to 1e-5 by step 5
        opt = torch.optim.SGD(params, lr=0.02)
        losses, grads = [], []
        step_ = opt.step

        def record(o=opt, step_=step_):
            grads.append([p.grad.clone() for p in params if p.grad is not None])
            step_()
        opt.step = record
        for step in range(5):
            out = train.train_step(towers, s, opt, [batch], step, functools.partial(ggsm.info_nce, tau=0.1, margin=0.1))
            losses.append((out["loss"], train.future_weight(out["masks"]), out["tokens"]))
        runs.append((losses, grads, [p.detach().clone() for p in params], s.state_dict()))
    (l1, g1, p1, s1), (l2, g2, p2, s2) = runs
    for a, b in zip(l1, l2):
        assert a[0] == pytest.approx(b[0], abs=1e-5) and a[1] == pytest.approx(b[1], abs=1e-6) and a[2] == b[2]
    for step, (a, b) in enumerate(zip(g1, g2)):
        assert len(a) == len(b) == len(p1)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=f"{strategy} step {step}")
    for x, y in zip(p1, p2):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    for k in s1:
        if isinstance(s1[k], torch.Tensor):
            torch.testing.assert_close(s1[k], s2[k], atol=1e-6, rtol=1e-5, msg=f"{strategy} state {k}")
        else:
            assert s1[k] == s2[k], (strategy, k)
    if strategy == "ggsm":
        assert s2["importance"] is not None and s2["importance"].numel() == 9  # indexed by the position in each user


@pytest.mark.parametrize("strategy", sorted(ggsm.STRATEGIES))
def test_probe_embeddings_packed_equal_padded(strategy):
    batch = make_batch(seed=3)
    enc, cfg = encoder_with_adapter(seed=1)
    s = ggsm.STRATEGIES[strategy](total_steps=4, warmup_steps=2, n_layers=2, hidden_size=16, n_heads=4)
    out = []
    for packed in (False, True):
        enc.pack = packed
        out.append(probe.embed_users(enc, [batch, batch.user], s.inference_mask, "cpu"))
    assert out[0].shape == (12, 16)
    np.testing.assert_allclose(out[0], out[1], atol=1e-5, rtol=1e-5)


def test_causal_lm_build_packed_equals_padded(tmp_path):
    """The small decoder's causal-LM pretraining (tools/tiny_decoder.py) packed and padded: the same losses and
    the same weights after three steps, to round-off."""
    path, _ = synthetic.write_synthetic(str(tmp_path / "syn"), 24, 0, seed=0)
    records, report = data.load_records(path, require=("answer",))
    out = {}
    for flag in ("--pack", "--no-pack"):
        args = train.get_args([flag, "--tiny-hidden", "32", "--tiny-layers", "2", "--tiny-heads", "2",
                               "--tiny-kv-heads", "1", "--tiny-vocab", "300", "--tiny-steps", "3", "--tiny-batch", "8",
                               "--max-len", "96"])
        folder = tiny_decoder.build(args, records, report, str(tmp_path / flag), "cpu", lambda m: None)
        stats = json.load(open(os.path.join(folder, "pretrain.json")))
        out[flag] = (stats["first_loss"], stats["last_loss"], model.Decoder.from_pretrained(folder).state_dict())
    (f1, l1, w1), (f2, l2, w2) = out.values()
    assert f1 == pytest.approx(f2, abs=1e-5) and l1 == pytest.approx(l2, abs=1e-5)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-5, rtol=1e-4, msg=k)


def test_best_capacity_minimises_the_cost_by_brute_force():
    """best_capacity against every candidate's packed batch built and costed directly; a cheap attention (wide
    model) takes longer, fuller rows, a dear one (narrow model) rows of the longest user."""
    lengths = [132, 248, 90, 160, 41, 200, 120, 77]
    am = right_padded(lengths)
    for key in (3.6e-4, 1.3e-3, 0.0):
        cap = pack.best_capacity(lengths, key)
        costs = {}
        for f in (1.0, 1.25, 1.5, 2.0):
            p = pack.Packing(am, capacity=int(f * 248))
            costs[int(f * 248)] = p.R * p.Lp * (1 + key * p.Lp)
        assert costs[cap] == min(costs.values()), (key, cap, costs)
        p = pack.Packing(am, key_cost=key)
        assert p.R * p.Lp * (1 + key * p.Lp) == costs[cap] and p.slots() <= pack.Packing(am).slots()
    assert pack.best_capacity(lengths, 1.0) == 248  # attention dominating: no longer rows
    assert pack.Packing(am, key_cost=0.0).slots() < pack.Packing(am).slots()  # free attention: fuller rows

"""
Tests for the benchmarks (tools/bench_model.py, tools/bench_data.py, tools/bench_probe.py). The comparison with transformers + peft is only meaningful if both sides do the same
work, so the reference here is transformers itself: on a tiny random Qwen2 checkpoint written by
save_pretrained, our Decoder + LoRA and transformers + peft (with our LoRA values copied in) must give the
same InfoNCE loss and the same LoRA gradient on the same right-padded batch under the same soft 4D mask.
Then the quick mode of every section runs end to end and writes the JSON the README table comes from.
No timing is asserted.

    python -m pytest -q tests/test_bench.py
"""
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("sklearn")

import data  # noqa: E402
import model  # noqa: E402
from tools import bench_data, bench_model, bench_probe  # noqa: E402

NO_AUTOCAST = torch.autocast("cpu", enabled=False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return bench_model.write_checkpoint(str(tmp_path_factory.mktemp("ckpt")), "quick", seed=0)


@pytest.fixture(scope="module")
def pair(ckpt):
    ours = bench_model.load_ours(ckpt, r=8, alpha=16, device="cpu", seed=0)
    theirs = bench_model.load_theirs(ckpt, r=8, alpha=16, device="cpu", lora_from=ours.module)
    return ours, theirs


def test_same_loss_and_lora_gradient(pair):
    ours, theirs = pair
    vocab = bench_model.SIZES["quick"]["vocab_size"]
    batch = bench_model.random_batch(B=5, L=24, A=8, vocab=vocab, seed=3, device="cpu")
    assert batch["user"]["am"].sum(1).min() < 24, "the batch must contain padding"
    name = "model.layers.1.mlp.down_proj.lora_A"
    keys = {"ours": name, "theirs": "base_model.model." + name + ".default.weight"}
    loss, grad = {}, {}
    for c in (ours, theirs):
        c.module.zero_grad(set_to_none=True)
        out = bench_model.contrastive_loss(c, batch, torch.float32, NO_AUTOCAST)
        out.backward()
        loss[c.name] = out.item()
        grad[c.name] = dict(c.module.named_parameters())[keys[c.name]].grad.clone()
        c.module.zero_grad(set_to_none=True)
    assert abs(loss["ours"] - loss["theirs"]) <= 1e-4, f"loss ours {loss['ours']} vs transformers+peft {loss['theirs']}"
    assert grad["theirs"].abs().max() > 1e-6, "LoRA gradient is zero: lora_B was not made random"
    diff = (grad["ours"] - grad["theirs"]).abs().max().item()
    torch.testing.assert_close(grad["ours"], grad["theirs"], rtol=1e-4, atol=1e-6,
                               msg=f"LoRA gradient vs transformers+peft: max diff {diff:.2e}")


def test_hidden_states_match_on_real_tokens(pair):
    """The pooled rows are real tokens; every real token's hidden state matches (pads are never compared)."""
    ours, theirs = pair
    b = bench_model.random_batch(B=3, L=16, A=0, vocab=bench_model.SIZES["quick"]["vocab_size"], seed=5, device="cpu")["user"]
    mask = bench_model.soft_mask(b["am"], torch.float32)
    with torch.no_grad():
        h_ours, h_theirs = ours.hidden(b["ids"], mask), theirs.hidden(b["ids"], mask)
    real = b["am"].bool()
    torch.testing.assert_close(h_ours[real], h_theirs[real], rtol=1e-4, atol=1e-5)


def test_lora_copy_is_strict(ckpt):
    """A module without the same LoRA layers cannot be mirrored silently."""
    bad = torch.nn.Module()
    bad.lora_A = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(RuntimeError, match="LoRA names differ"):
        bench_model.load_theirs(ckpt, 8, 16, "cpu", lora_from=bad)


def test_pad_side_pads_and_refuses_long():
    side = data.Side(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long),
                     torch.tensor([4, 4]), {}, {})
    padded = bench_model.pad_side(side, 8, pad_id=0)
    assert padded.input_ids.shape == (2, 8) and padded.attention_mask[:, 5:].sum() == 0
    assert padded.input_ids[:, :5].eq(1).all()
    with pytest.raises(ValueError, match="longer than the pad length"):
        bench_model.pad_side(side, 4, pad_id=0)


def test_quick_all_writes_expected_json(tmp_path):
    out = tmp_path / "bench_model.json"
    bench_model.main(["all", "--quick", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["sections"] == ["train", "embed", "ggsm", "padding", "embedded", "paperlike"]
    for key in ("model", "lora", "device", "torch", "transformers", "peft", "threads", "reps",
                "load_average_before", "load_average_after", "table"):
        assert key in res, key
    p = res["parity"]
    assert p["loss_abs_diff"] <= 1e-4 and p["grad_max_abs"] > 0
    assert p["grad_max_abs_diff"] <= 1e-4 * p["grad_max_abs"] + 1e-6
    for sec, rate in (("train", "tokens_per_s"), ("embed", "users_per_s")):
        r = res[sec]
        assert set(r[rate]) == {"ours", "theirs"} and all(v > 0 for v in r[rate].values())
        assert r["throughput_ratio"] == pytest.approx(r[rate]["ours"] / r[rate]["theirs"])
        assert all(len(r["times_s"][k]) == res["reps"] for k in ("ours", "theirs"))
        for side in ("ours", "theirs"):
            assert r["memory"][side]["step_peak_mb"] > 0  # a training / inference step allocates something
    assert set(res["ggsm"]["median_s"]) == {"bidirectional", "ggsm"} and "overhead" in res["ggsm"]
    pad = res["padding"]
    w = bench_model.WORK["padding"][1]
    assert pad["padded"]["token_slots"] == pad["steps"] * w["B"] * w["pad_to"] * 2  # both towers padded
    assert pad["dynamic"]["nonpad_tokens"] == pad["padded"]["nonpad_tokens"]  # the same users, the same tokens
    assert pad["dynamic"]["token_slots"] < pad["padded"]["token_slots"]
    # padded keys are masked and positions are unchanged, so the padded epoch computes the same losses
    assert pad["max_loss_diff"] <= 1e-4
    assert {row["section"] for row in res["table"]} == {"parity", "limit", "train", "embed", "ggsm", "padding", "embedded",
                                                        "paperlike"}
    assert res["peak_matmul_flops"] > 1e8
    for name in ("embedded", "paperlike"):  # the same users on both sides; ours packed computes fewer slots
        wl = res[name]
        assert wl["token_slots"]["ours"] <= wl["token_slots"]["theirs"] and wl["tokens"] <= wl["token_slots"]["ours"]
        for kind in ("train", "embed"):
            r = wl[kind]
            assert all(len(r["times_s"][k]) == res["reps"] for k in ("ours", "theirs"))
            assert all(0 < f < 1 for f in r["limit_fraction"].values())
            for k in ("ours", "theirs"):
                assert r["limit_fraction"][k] == pytest.approx(r["model_flops"] / r["total_s"][k] / r["peak_flops"])
            assert r["peak_flops"] <= res["peak_matmul_flops"]
    assert res["paperlike"]["token_slots"]["ours"] < 0.9 * res["paperlike"]["token_slots"]["theirs"]  # long-tailed
    s = res["summary"]
    assert set(s) == {"train_equal_padding_ratio", "train_embedded_ratio", "train_paperlike_ratio", "memory_ratio",
                      "embed_ratio", "ggsm_overhead", "limit_fraction_ours", "limit_fraction_theirs"}
    assert s["train_embedded_ratio"] == res["embedded"]["train"]["throughput_ratio"]
    assert s["ggsm_overhead"] == res["ggsm"]["overhead"] and s["memory_ratio"] > 0


@pytest.mark.parametrize("lengths", [[7], [5, 12]])
def test_model_flops_match_torch_flop_counter(lengths):
    """bench_model.model_flops against torch's FlopCounterMode on our decoder with LoRA (manual attention, so that Q K^T
    and P V are counted matmuls; the input embeddings need a gradient, as the new token rows make them in
    training): forward alone, and forward + backward to the activations and the LoRA factors."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg = bench_model.SIZES["quick"]
    dec = model.Decoder(model.ModelConfig(model_type="qwen2", **cfg))
    dec.attn_impl = "manual"
    model.add_lora(dec, r=4, alpha=8)
    for train in (False, True):
        counted = 0
        for n in lengths:  # each user alone: its own n x n block
            x = torch.randn(1, n, cfg["hidden_size"], requires_grad=train)
            with FlopCounterMode(display=False) as fc:
                h = dec(inputs_embeds=x, mask=torch.zeros(1, 1, n, n))
                if train:
                    h.sum().backward()
            counted += fc.get_total_flops()
        assert bench_model.model_flops(cfg, 4, lengths, train=train) == counted, train


def test_probe_section_still_runs(tmp_path):
    out = tmp_path / "probe.json"
    bench_probe.main(["--n", "600", "--d", "8", "--reps", "1", "--out", str(out)])
    res = json.loads(out.read_text())
    ours = res["solvers"][0]
    # same objective: ours (tight Newton) reaches at most scikit-learn's value
    assert ours["objective"] <= min(s["objective"] for s in res["solvers"]) + 1e-6
    assert 0.5 < ours["test_auc"] <= 1.0


def test_events_section_runs(tmp_path):
    """tools.bench_data events on a few synthetic users and a small decoder built as train.py builds it: the event
    form is shorter by exactly the text tokens it replaces with one position per event."""
    import train
    from tools import synthetic, tiny_decoder
    train_path, _ = synthetic.write_synthetic(str(tmp_path / "data"), 24, 0, seed=1)
    args = train.get_args(["--data", train_path, "--tiny-hidden", "32", "--tiny-layers", "2", "--tiny-heads", "4",
                           "--tiny-kv-heads", "2", "--tiny-vocab", "400", "--tiny-steps", "2", "--tiny-batch", "8"])
    records, report = data.load_records(train_path, require=("answer",))
    model_dir = tiny_decoder.build(args, records, report, str(tmp_path / "tiny"), torch.device("cpu"), lambda m: None)
    out = tmp_path / "events.json"
    bench_data.main(["events", "--model", model_dir, "--data", train_path, "--max-len", "10000", "--batch", "8",
                "--reps", "1", "--threads", "1", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["event_modalities"] == ["app", "bill", "minipro", "search", "spm"]
    t = data.Template(f"{model_dir}/tokenizer.json", report.modalities, report.vector_dims, max_len=10000)
    text_tokens = [sum(len(t.tokenizer.encode(data.event_piece(e["text"]), add_special_tokens=False).ids) - 1
                       for e in r["events"] if e.get("text") is not None) for r in records]
    assert res["text"]["mean_length"] - res["event"]["mean_length"] == pytest.approx(sum(text_tokens) / len(records))
    assert res["text"]["n_cut_events"] == res["event"]["n_cut_events"] == 0
    assert all(res[f]["users_per_s"] > 0 and len(res[f]["times_s"]) == 1 for f in ("text", "event"))


@pytest.mark.parametrize("section", ["softmask", "scaling"])
def test_sections_outside_all_run(tmp_path, section):
    out = tmp_path / f"{section}.json"
    res = bench_model.main([section, "--quick", "--out", str(out)])
    assert json.loads(out.read_text())["sections"] == [section]
    if section == "softmask":
        sm = res["softmask"]
        assert set(sm["median_s"]) == {"fp32 mask", "bf16 mask"} and all(len(v) == res["reps"] for v in sm["times_s"].values())
        assert sm["overhead"] == pytest.approx(sm["median_s"]["fp32 mask"] / sm["median_s"]["bf16 mask"] - 1)
    else:
        assert [pt["L"] for pt in res["scaling"]["points"]] == list(bench_model.WORK["scaling"][1]["lengths"])


def test_levers_section_runs(tmp_path):
    out = tmp_path / "levers.json"
    before = (model.LoRALinear.forward, model.SDPA_GQA)
    bench_model.main(["levers", "--quick", "--out", str(out)])
    res = json.loads(out.read_text())["levers"]
    assert set(res["cost"]) == {"all on", "no packing", "KV heads copied", "LoRA scaled at width out"}
    assert res["cost"]["all on"] == 0 and all(len(v) == 2 for v in res["times_s"].values())
    # every lever is restored afterwards
    assert (model.LoRALinear.forward, model.SDPA_GQA) == before

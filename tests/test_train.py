"""train.py end to end: DDP equals one process, resume equals an uninterrupted run, the causal-LM builder,
the default job in miniature, early argument errors and the non-finite-loss stop."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import checkpoint as ckpt
import data
import train
from tools import synthetic, tiny_decoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--tiny-hidden", "32", "--tiny-layers", "2", "--tiny-heads", "4", "--tiny-kv-heads", "2",
        "--tiny-vocab", "400", "--tiny-steps", "4", "--tiny-batch", "8", "--max-len", "96", "--answer-max-len", "24"]
NO_PREAMBLE = ["--preamble", ""]  # a 400-token BPE spells the opening sentence in ~140 tokens: no room at --max-len 96


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Synthetic users and a small decoder built by train.py's own causal-LM objective (shared by the tests)."""
    root = tmp_path_factory.mktemp("train")
    train_path, probe_path = synthetic.write_synthetic(str(root / "data"), 48, 160, seed=3)
    args = train.get_args(["--data", train_path] + TINY + NO_PREAMBLE)
    records, report = data.load_records(train_path, require=("answer",))
    model_dir = tiny_decoder.build(args, records, report, str(root / "tiny"), torch.device("cpu"), lambda m: None)
    return {"root": root, "train": train_path, "probe": probe_path, "model": model_dir}


def run(argv, nproc=1, env=None):
    cmd = [sys.executable, "train.py"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py"]
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    p = subprocess.run(cmd + argv, cwd=ROOT, capture_output=True, text=True, env=e, timeout=300)
    assert p.returncode == 0, f"{' '.join(cmd + argv)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def max_diff(a, b):
    """Largest difference over the tensors, relative to each tensor's scale where it exceeds 1 (GG-SM's
    importance under --standardize is O(100): float32 round-off there is ~1e-4 in absolute terms)."""
    assert a.keys() == b.keys(), f"different tensors: {sorted(a.keys() ^ b.keys())[:5]}"
    return max(((a[k].double() - b[k].double()).abs().max() / a[k].double().abs().max().clamp(min=1)).item() for k in a
               if a[k].numel())  # an empty tensor (an event-form run's unused row table) has no difference


def common(w, out, *extra):
    # --new-lr-mult 1: every group at 5e-3 (x5 gives the adapters 2.5e-2, which turns the standardisation's
    # round-off over 4 users into 2e-5 after 4 steps; the two groups still exist)
    return ["--model", w["model"], "--data", w["train"], "--no-probe", "--out", out, "--log-every", "1",
            "--max-len", "96", "--answer-max-len", "24", "--lr", "5e-3", "--new-lr-mult", "1", "--preamble", "",
            "--event-modalities", "", *extra]  # the text form (auto would pick the event form: 96 tokens cut a lot)


@pytest.mark.parametrize("mask, micro, extra", [("ggsm", 4, ["--no-standardize"]), ("hybrid_mlp", 2, ["--no-standardize"]),
                                                ("ggsm", 4, ["--standardize"])])
def test_two_ranks_equal_one_rank(workdir, mask, micro, extra):
    """2-process gloo run == 1-process run with the same global batch (losses and final weights), GG-SM
    warm-up and ramp included (hybrid_mlp: with gradient accumulation and the trainable mask MLPs), and
    both ranks end with identical parameters (--standardize: its running statistics too, from global-batch
    statistics). Standardisation over a few users divides by small batch deviations and amplifies round-off
    (hybrid_mlp with it, 4 users per micro-step: 6e-5 after 4 steps; GG-SM: 1e-5), so the first two cases test
    the distributed logic without it, and the third standardises over 8 users (no accumulation)."""
    r1, r2 = (str(workdir["root"] / f"{n}-{mask}-{micro}") for n in ("one", "two"))
    args = ["--mask", mask, "--steps", "4", "--mask-warmup", "0.5", "--batch-size", "8"] + extra
    run(common(workdir, r1, *args, "--micro-batch", str(2 * micro)))
    run(common(workdir, r2, *args, "--micro-batch", str(micro)), nproc=2)
    l1, l2 = losses(r1), losses(r2)
    assert len(l1) == len(l2) == 4
    assert max(abs(x - y) for x, y in zip(l1, l2)) < 1e-5, f"losses differ: {l1} vs {l2}"
    w1 = load_file(os.path.join(r1, "checkpoint", "trainable.safetensors"))
    w2 = load_file(os.path.join(r2, "checkpoint", "trainable.safetensors"))
    d = max_diff(w1, w2)
    assert d < 1e-5, f"final weights differ by {d}"
    if extra == ["--standardize"]:  # the statistics moved away from their initial (0, 1)
        assert w1["encoder.standardize.user.running_var"].sub(1).abs().max() > 0.01
    with open(os.path.join(r2, "checkpoint", "state.json")) as f:
        state = json.load(f)
    assert state["replica_max_diff"] == 0.0, f"ranks diverged: {state['replica_max_diff']}"


def test_resume_matches_uninterrupted(workdir):
    """Killed after the step-3 checkpoint and resumed == never stopped (LoRA dropout on, so RNG state matters)."""
    a, b = str(workdir["root"] / "full"), str(workdir["root"] / "resumed")
    args = ["--mask", "ggsm", "--steps", "6", "--mask-warmup", "0.34", "--batch-size", "8", "--micro-batch", "4",
            "--ckpt-every", "3", "--lora-dropout", "0.1"]
    run(common(workdir, a, *args))
    run(common(workdir, b, *args, "--halt-after", "3"))
    with open(os.path.join(b, "checkpoint", "state.json")) as f:
        assert json.load(f)["step"] == 3
    run(["--out", b, "--resume", "--no-probe"])
    wa = load_file(os.path.join(a, "checkpoint", "trainable.safetensors"))
    wb = load_file(os.path.join(b, "checkpoint", "trainable.safetensors"))
    assert max_diff(wa, wb) < 1e-6, f"resumed weights differ by {max_diff(wa, wb)}"
    assert losses(a)[3:] == pytest.approx(losses(b)[3:], abs=1e-6)


def test_causal_lm_builder_lowers_loss_and_loads(workdir, tmp_path):
    args = train.get_args(["--data", workdir["train"]] + TINY[:-6] + ["--tiny-steps", "30", "--max-len", "96",
                                                                        "--answer-max-len", "24"] + NO_PREAMBLE)
    records, report = data.load_records(workdir["train"], require=("answer",))
    out = tiny_decoder.build(args, records, report, str(tmp_path / "lm"), torch.device("cpu"), lambda m: None)
    with open(os.path.join(out, "pretrain.json")) as f:
        stats = json.load(f)
    assert stats["last_loss"] < stats["first_loss"] - 0.5, stats  # nats per token, far beyond batch noise
    import model
    dec = model.Decoder.from_pretrained(out)
    tpl = data.Template(os.path.join(out, "tokenizer.json"), report.modalities, report.vector_dims, max_len=96, preamble="")
    ids = torch.tensor([tpl.encode_user(records[0])["input_ids"]])
    assert ids.max() < dec.config.vocab_size  # the template's special tokens are in the built vocabulary
    assert torch.isfinite(dec.logits(dec(input_ids=ids))).all()


def test_default_job_in_miniature(tmp_path):
    """`python train.py` with reduced sizes: builds data and decoder, trains GG-SM, probes all nine tasks."""
    out = tmp_path / "run"
    result = train.main(["--cache", str(tmp_path / "cache"), "--out", str(out), "--synthetic-train", "64",
                         "--synthetic-probe", "240", "--steps", "3", "--batch-size", "16", "--micro-batch", "8"] + TINY
                        + ["--max-len", "256", "--preamble", "paper"])  # the paper's template, its opening sentence included
    with open(out / "probe.json") as f:
        pj = json.load(f)
    assert set(pj["tasks"]) == set(data.TASKS)
    assert pj["mask"] == "ggsm" and result["mean_auc"] == pj["mean_auc"]
    # the untrained Oracle row of the same decoder, on the same users, with the paired difference
    assert pj["oracle"]["mask"] == "oracle" and set(pj["oracle"]["tasks"]) == set(data.TASKS)
    assert pj["delta"]["mean_auc"] == pytest.approx(pj["mean_auc"] - pj["oracle"]["mean_auc"])
    assert 0 < pj["delta"]["se"] < 0.2 and 0 < pj["mean_auc_se"] < 0.2 and 0 < pj["oracle"]["mean_auc_se"] < 0.2
    for name in ("args.json", "metrics.jsonl", "checkpoint/trainable.safetensors", "checkpoint/state.json"):
        assert (out / name).exists(), name
    with open(out / "checkpoint" / "state.json") as f:
        assert json.load(f)["spec"]["preamble"] == data.PREAMBLE


@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent-model"], "no config.json"),
    (["--data", "/nonexistent.jsonl"], "no such file"),
    (["--batch-size", "10", "--micro-batch", "4"], "not a multiple"),
])
def test_bad_arguments_fail_early(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(argv + ["--out", str(tmp_path / "r"), "--cache", str(tmp_path / "c")])
    assert message in str(e.value)
    assert not (tmp_path / "c").exists(), "work started before the arguments were checked"


def test_unknown_mask_and_missing_answers_rejected(workdir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.get_args(["--mask", "sideways"])
    bad = tmp_path / "noanswer.jsonl"
    rec = json.loads(open(workdir["train"]).readline())
    rec.pop("answer")
    bad.write_text(json.dumps(rec) + "\n")
    with pytest.raises(SystemExit) as e:
        train.main(["--model", workdir["model"], "--data", str(bad), "--out", str(tmp_path / "r")])
    assert "noanswer.jsonl:1" in str(e.value) and "answer" in str(e.value)


def test_nonfinite_loss_stops_and_keeps_checkpoint(workdir, tmp_path, monkeypatch):
    out = str(tmp_path / "nan")
    real = train.ggsm.info_nce
    calls = {"n": 0}

    def poisoned(*a, **k):  # finite for the first 2 optimizer steps, then NaN
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] > 2 else loss

    monkeypatch.setattr(train.ggsm, "info_nce", poisoned)
    with pytest.raises(SystemExit) as e:
        train.main(common(workdir, out, "--steps", "5", "--batch-size", "8", "--micro-batch", "8", "--ckpt-every", "2"))
    assert e.value.code == 2
    with open(os.path.join(out, "checkpoint", "state.json")) as f:
        assert json.load(f)["step"] == 2  # the last good checkpoint survives
    assert not os.path.exists(os.path.join(out, "checkpoint.tmp"))


def test_checkpoint_tensors_checked_on_load(workdir):
    """Loading a checkpoint into the wrong model names the offending tensor; hybrid_mlp's MLPs are saved once."""
    records, report = data.load_records(workdir["train"], require=("answer",))
    for mask in ("ggsm", "hybrid_mlp"):
        args = train.get_args(["--model", workdir["model"], "--mask", mask])
        encoder, _, strategy = ckpt.build_encoder(train.make_spec(args, workdir["model"], report))
        tensors, plain = ckpt.trainable_tensors(encoder, strategy)
        ckpt.load_trainable(encoder, strategy, dict(tensors), plain)  # the round trip itself is accepted
    mlp = [k for k in tensors if not k.startswith("encoder.")]
    assert mlp and all(k.startswith("strategy.mlp.") for k in mlp)  # one copy of each MLP weight
    assert len(mlp) == len(strategy.module.state_dict())
    key = next(k for k in tensors if "lora_A" in k)
    bad = dict(tensors, **{key: torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=key.split("encoder.", 1)[1].replace(".", r"\.")):
        ckpt.load_trainable(encoder, strategy, bad, plain)
    missing = {k: v for k, v in tensors.items() if k != key}
    with pytest.raises(ValueError, match="missing"):
        ckpt.load_trainable(encoder, strategy, missing, plain)
    with pytest.raises(ValueError, match="unexpected"):
        ckpt.load_trainable(encoder, strategy, dict(tensors, **{"mask.layers.0.weight": torch.zeros(1)}), plain)
    with pytest.raises(KeyError, match=r"HybridMLP.load_state_dict: missing keys \[\], unexpected keys \['mlp.extra'\]"):
        ckpt.load_trainable(encoder, strategy, dict(tensors, **{"strategy.mlp.extra": torch.zeros(1)}), plain)


def test_run_spec_names_missing_and_unexpected_fields(workdir):
    _, report = data.load_records(workdir["train"], require=("answer",))
    spec = train.make_spec(train.get_args(["--model", workdir["model"]]), workdir["model"], report).to_dict()
    assert ckpt.RunSpec.from_dict(json.loads(json.dumps(spec))) == ckpt.RunSpec(**spec)  # JSON round trip
    broken = {k: v for k, v in spec.items() if k != "pooling"}
    broken["global_token"] = True
    with pytest.raises(ValueError, match=r"missing fields \['pooling'\], unexpected fields \['global_token'\]"):
        ckpt.RunSpec.from_dict(broken, where="state.json")
    with pytest.raises(ValueError, match="unknown mask strategy 'prefix'"):
        ckpt.RunSpec.from_dict(dict(spec, mask="prefix"))


def test_probe_cli_export_then_reprobe(workdir, tmp_path):
    """probe.py --model (the Oracle row) with --export, then --embeddings: same table without re-embedding."""
    import probe
    emb = str(tmp_path / "emb.safetensors")
    first = probe.main(["--model", workdir["model"], "--data", workdir["probe"], "--out", str(tmp_path / "a.json"),
                        "--export", emb, "--max-len", "96"] + NO_PREAMBLE)
    again = probe.main(["--embeddings", emb, "--data", workdir["probe"], "--out", str(tmp_path / "b.json")])
    assert first["mask"] == "oracle" and again["mask"] == "oracle"
    assert set(first["tasks"]) == set(data.TASKS)
    assert again["tasks"] == first["tasks"] and again["mean_auc"] == first["mean_auc"]
    with pytest.raises(SystemExit, match="no state.json"):
        probe.main(["--checkpoint", str(tmp_path), "--data", workdir["probe"]])


# -----------------------------------------------------------------------------
# a new mask strategy is one class and one dict entry (the README's "Adding a mask strategy")

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import ggsm  # noqa: E402


class HeadFuture(ggsm.Strategy):
    """Each head of each layer learns one weight w = sigmoid(logit) for all its future keys (starts at 0.05)."""

    def __init__(self, **settings):
        super().__init__(**settings)
        self.module = nn.ParameterDict({"logit": nn.Parameter(torch.full((self.n_layers, self.n_heads), -2.944))})

    def train_mask(self, step, attention_mask, dtype=torch.float32, tower="user", history=None):
        bi = ggsm.bidirectional_mask(attention_mask)                           # (B, 1, L, L)
        future = ggsm.causal_mask(attention_mask) < bi                         # (B, 1, L, L): j > i, real key

        def mask(layer_idx, h):
            log_w = F.logsigmoid(self.module["logit"][layer_idx]).view(1, -1, 1, 1)  # (1, heads, 1, 1)
            return (bi + future * log_w).to(dtype)                             # (B, heads, L, L)
        return mask

    def inference_mask(self, attention_mask, dtype=torch.float32, tower="user", history=None):
        return self.train_mask(self.total_steps, attention_mask, dtype, tower, history)

    def state_dict(self):
        return {"logit": self.module["logit"].detach().clone()}

    def load_state_dict(self, state):
        self.module["logit"].data.copy_(state["logit"])


def test_a_strategy_defined_here_trains_resumes_and_probes(workdir, monkeypatch):
    """Inserted into ggsm.STRATEGIES, and nothing else: train.py trains it (its module too), checkpoints, resumes,
    probes; probe.py rebuilds it from the checkpoint and gets the same table."""
    import probe
    monkeypatch.setitem(ggsm.STRATEGIES, "head_future", HeadFuture)
    out = str(workdir["root"] / "head-future")
    argv = ["--model", workdir["model"], "--data", workdir["train"], "--probe-data", workdir["probe"], "--out", out,
            "--mask", "head_future", "--steps", "4", "--batch-size", "8", "--micro-batch", "4", "--log-every", "1",
            "--max-len", "96", "--answer-max-len", "24", "--lr", "5e-2", "--event-modalities", ""] + NO_PREAMBLE
    assert train.main(argv + ["--halt-after", "2"]) is None
    with open(os.path.join(out, "checkpoint", "state.json")) as f:
        assert json.load(f)["step"] == 2
    result = train.main(["--out", out, "--resume"])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rec = [json.loads(line) for line in f]
    assert [r["step"] for r in rec] == [0, 1, 2, 3]
    assert rec[0]["future_weight"] == pytest.approx(0.05, abs=1e-3)  # the mask as used, logged without any branch
    logit = load_file(os.path.join(out, "checkpoint", "trainable.safetensors"))["strategy.logit"]
    assert logit.shape == (2, 4) and (logit != -2.944).any(), "the strategy's module was not trained"
    again = probe.main(["--checkpoint", os.path.join(out, "checkpoint"), "--data", workdir["probe"]])
    assert again["mask"] == "head_future" and again["tasks"] == result["tasks"]


def test_metrics_carry_diagnostics_and_a_collapse_warns(tmp_path, capsys):
    args = train.get_args(["--out", str(tmp_path), "--steps", "4", "--log-every", "1"])
    strategy = ggsm.STRATEGIES["causal"](total_steps=4)
    keys = {"alignment", "cos_uu", "cos_aa", "uniformity", "effective_rank", "drop_ua", "drop_uu", "drop_aa"}
    healthy = (torch.eye(8), torch.eye(8))
    collapsed = (torch.ones(8, 4), torch.ones(8, 4))
    # near-parallel but not identical (as a collapsed run measures: rank > 2, cosine 0.99): warns by the cosine
    g = torch.Generator().manual_seed(0)
    parallel = (torch.ones(8, 16) + 0.15 * torch.randn(8, 16, generator=g), torch.eye(8, 16))
    diag = ggsm.batch_diagnostics(*parallel, 0.1)
    assert diag["effective_rank"] > 2 and diag["cos_uu"] > 0.95
    for step, pair in ((0, healthy), (1, collapsed), (2, parallel)):
        out = dict(loss=1.0, grad_norm=1.0, tokens=10, masks=[], embeddings=[pair])  # what train_step returns
        train.log_step(args, step, out, 1e-3, strategy, {"t": 0.0, "tokens": 0}, 1, lambda m: None)
        err = capsys.readouterr().err
        assert ("collapsing" in err) == (step > 0), err
        # stderr is not a terminal here: the progress bar is a plain line (4 steps: every step is a quarter)
        assert "\r" not in err and f"] {step + 1}/4 loss 1.0000\n" in err, err
        if step == 1:
            assert "effective rank 1.00" in err and "ln N = 3.466" in err  # --batch-size 32
    with open(tmp_path / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f]
    assert [r["step"] for r in recs] == [0, 1, 2] and all(keys <= r.keys() for r in recs)
    assert recs[0]["effective_rank"] == pytest.approx(8.0) and recs[1]["cos_uu"] == pytest.approx(1.0)


def test_event_form_trains_resumes_and_probes(workdir):
    """--event-modalities: one position per event of those modalities (the frozen base embeddings pooled over the
    event's tokens, then the modality adapter); trains, resumes and probes; probe.py rebuilds the same template.
    The spliced vector of an event is adapter(mean of the frozen rows of its tokens), checked by hand."""
    import probe
    out = str(workdir["root"] / "events")
    argv = ["--model", workdir["model"], "--data", workdir["train"], "--probe-data", workdir["probe"], "--out", out,
            "--event-modalities", "bill,search", "--steps", "3", "--batch-size", "8", "--micro-batch", "4",
            "--log-every", "1", "--max-len", "96", "--answer-max-len", "24", "--lr", "5e-2"] + NO_PREAMBLE
    assert train.main(argv + ["--halt-after", "1"]) is None
    result = train.main(["--out", out, "--resume"])
    with open(os.path.join(out, "checkpoint", "state.json")) as f:
        spec = ckpt.RunSpec.from_dict(json.load(f)["spec"])
    assert spec.event_modalities == ["bill", "search"]
    sd = load_file(os.path.join(out, "checkpoint", "trainable.safetensors"))
    assert {"encoder.adapters.bill.fc1.weight", "encoder.adapters.search.fc1.weight"} <= set(sd)
    again = probe.main(["--checkpoint", os.path.join(out, "checkpoint"), "--data", workdir["probe"]])
    assert again["tasks"] == result["tasks"]
    # the rebuilt template: bill and search events are single positions whose vectors are the frozen token means
    encoder, template, _ = ckpt.build_encoder(spec)
    rec = data.load_records(workdir["probe"], require=("labels",))[0][0]
    text = data.Template(os.path.join(workdir["model"], "tokenizer.json"), template.modalities, {"tabular": 8},
                         max_len=10_000, preamble="")
    enc_ev, enc_txt = template.encode_user(rec), text.encode_user(rec)
    bills = [e["text"] for e in sorted((e for e in rec["events"] if e["modality"] == "bill"), key=lambda e: e["time"])]
    W = encoder.decoder.model.embed_tokens.weight.detach().float()
    keep = len(enc_ev["vectors"]["bill"])  # the most recent bill events that fit in --max-len
    for b, v in zip(bills[-keep:], enc_ev["vectors"]["bill"]):
        ids = text.tokenizer.encode(data.event_piece(b), add_special_tokens=False).ids
        assert torch.allclose(torch.as_tensor(v), W[ids].mean(0), atol=1e-6)
    assert len(enc_ev["input_ids"]) < len(enc_txt["input_ids"])
    # and the encoder splices adapter(vector) at those positions
    batch = data.collate([data.UserDataset([rec], template, with_answer=False)[0]])
    x = encoder.embed(batch.user.input_ids, batch.user.vectors, batch.user.vector_pos)
    col = enc_ev["vector_pos"]["bill"][0]
    with torch.no_grad():
        want = encoder.adapters["bill"](torch.as_tensor(enc_ev["vectors"]["bill"][0])[None])[0]
    assert torch.allclose(x[0, col], want, atol=1e-6)


def test_mask_option_reaches_the_strategy_and_the_spec(workdir):
    """--mask-option key=value (repeatable; values read as JSON where they parse) goes to Strategy(**options) and into
    the checkpoint's spec, after the alias flags (a later --mask-option wins), so a forked strategy takes options
    without editing train.py."""
    args = train.get_args(["--mask-option", "capture_layer=final", "--mask-option", "ema=0.9", "--importance-norm",
                           "max", "--mask-option", "my-width=3", "--mask-option", "tag=wide"] + TINY)
    opts = train.mask_options(args)
    assert opts == {"capture_layer": "final", "ema": 0.9, "normalize": "max", "segment": "history", "my_width": 3,
                    "tag": "wide"}
    report = data.load_records(workdir["train"], require=("answer",))[1]
    spec = train.make_spec(args, workdir["model"], report)
    assert spec.mask_options == opts and ckpt.RunSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    _, _, strategy = ckpt.build_encoder(spec)
    assert strategy.capture_layer == 2  # 'final' = n_layers
    assert {"my_width": 3, "tag": "wide"}.items() <= strategy.options.items()  # what GG-SM does not take itself
    for bad in ("noequals", "=3"):
        with pytest.raises(SystemExit):
            train.get_args(["--mask-option", bad])


def test_event_form_from_the_cache_and_auto(workdir):
    """The event form read from the encoded cache gives the in-memory run's losses, weights and probe (trained row
    and its same-form Oracle). --event-modalities auto: at --max-len 96 the text form cuts most events, so every
    modality without vectors takes the event form (said in the log); at --max-len 2000 nothing is cut, text form."""
    a, b, c = (str(workdir["root"] / n) for n in ("ev-mem", "ev-cache", "ev-auto"))
    cache_dir = str(workdir["root"] / "ev-encoded")
    args = ["--steps", "3", "--batch-size", "8", "--micro-batch", "4", "--probe-data", workdir["probe"]]
    with_probe = lambda out, *extra: [x for x in common(workdir, out, *args, *extra) if x != "--no-probe"]  # noqa: E731
    run(with_probe(a, "--event-modalities", "bill,search", "--data-cache", "off"))
    p = run(with_probe(b, "--event-modalities", "bill,search", "--data-cache", cache_dir))
    kinds = lambda: sorted(n.split("-")[0] for n in os.listdir(cache_dir))  # noqa: E731
    assert kinds() == ["probe", "train"]  # the event form of both files, cached
    assert losses(a) == losses(b)
    wa, wb = (load_file(os.path.join(r, "checkpoint", "trainable.safetensors")) for r in (a, b))
    assert max_diff(wa, wb) == 0.0
    pa, pb = (json.load(open(os.path.join(r, "probe.json"))) for r in (a, b))
    assert pa["mean_auc"] == pb["mean_auc"] and pa["oracle"]["mean_auc"] == pb["oracle"]["mean_auc"]
    p = run(with_probe(c, "--event-modalities", "auto", "--data-cache", cache_dir))
    assert "--event-modalities auto: the text form cuts more than 25% of the events: the event form (one position " \
           "per event) for bill,minipro,spm,app,search" in p.stdout, p.stdout
    with open(os.path.join(c, "checkpoint", "state.json")) as f:
        assert json.load(f)["spec"]["event_modalities"] == ["bill", "minipro", "spm", "app", "search"]
    assert kinds() == ["probe", "probe", "train", "train", "train"]  # + the text form (to count its cuts), the chosen
    p = run(common(workdir, str(workdir["root"] / "ev-auto-long"), *args[:-2], "--event-modalities", "auto",
                   "--max-len", "2000", "--steps", "1"))
    assert "--event-modalities auto" not in p.stdout and "cuts" not in p.stdout
    with open(os.path.join(workdir["root"] / "ev-auto-long", "checkpoint", "state.json")) as f:
        assert json.load(f)["spec"]["event_modalities"] == []

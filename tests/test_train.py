"""train.py end to end: DDP equals one process, resume equals an uninterrupted run, the causal-LM builder,
the default job in miniature, early argument errors and the non-finite-loss stop."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import data
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--tiny-hidden", "32", "--tiny-layers", "2", "--tiny-heads", "4", "--tiny-kv-heads", "2",
        "--tiny-vocab", "400", "--tiny-steps", "4", "--tiny-batch", "8", "--max-len", "96", "--answer-max-len", "24"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Synthetic users and a small decoder built by train.py's own causal-LM objective (shared by the tests)."""
    root = tmp_path_factory.mktemp("train")
    train_path, probe_path = data.write_synthetic(str(root / "data"), 48, 160, seed=3)
    args = train.get_args(["--data", train_path] + TINY)
    records, report = data.load_records(train_path, require=("answer",))
    model_dir = train.build_tiny_decoder(args, records, report, str(root / "tiny"), torch.device("cpu"), lambda m: None)
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
    assert a.keys() == b.keys(), f"different tensors: {sorted(a.keys() ^ b.keys())[:5]}"
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def common(w, out, *extra):
    return ["--model", w["model"], "--data", w["train"], "--no-probe", "--out", out, "--log-every", "1",
            "--max-len", "96", "--answer-max-len", "24", "--lr", "5e-3", *extra]


@pytest.mark.parametrize("mask, micro", [("ggsm", 4), ("hybrid_mlp", 2)])
def test_two_ranks_equal_one_rank(workdir, mask, micro):
    """2-process gloo run == 1-process run with the same global batch (losses and final weights), GG-SM
    warm-up and ramp included (hybrid_mlp: with gradient accumulation and the trainable mask MLPs), and
    both ranks end with identical parameters."""
    r1, r2 = str(workdir["root"] / f"one-{mask}"), str(workdir["root"] / f"two-{mask}")
    args = ["--mask", mask, "--steps", "4", "--mask-warmup", "0.5", "--batch-size", "8"]
    run(common(workdir, r1, *args, "--micro-batch", str(2 * micro)))
    run(common(workdir, r2, *args, "--micro-batch", str(micro)), nproc=2)
    l1, l2 = losses(r1), losses(r2)
    assert len(l1) == len(l2) == 4
    assert max(abs(x - y) for x, y in zip(l1, l2)) < 1e-5, f"losses differ: {l1} vs {l2}"
    w1 = load_file(os.path.join(r1, "checkpoint", "trainable.safetensors"))
    w2 = load_file(os.path.join(r2, "checkpoint", "trainable.safetensors"))
    d = max_diff(w1, w2)
    assert d < 1e-5, f"final weights differ by {d}"
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
                                                                        "--answer-max-len", "24"])
    records, report = data.load_records(workdir["train"], require=("answer",))
    out = train.build_tiny_decoder(args, records, report, str(tmp_path / "lm"), torch.device("cpu"), lambda m: None)
    with open(os.path.join(out, "pretrain.json")) as f:
        stats = json.load(f)
    assert stats["last_loss"] < stats["first_loss"] - 0.5, stats  # nats per token, far beyond batch noise
    import model
    dec = model.Decoder.from_pretrained(out)
    tpl = data.Template(os.path.join(out, "tokenizer.json"), report.modalities, report.vector_dims, max_len=96)
    ids = torch.tensor([tpl.encode_user(records[0])["input_ids"]])
    assert ids.max() < dec.config.vocab_size  # the template's special tokens are in the built vocabulary
    assert torch.isfinite(dec.logits(dec(input_ids=ids))).all()


def test_default_job_in_miniature(tmp_path):
    """`python train.py` with reduced sizes: builds data and decoder, trains GG-SM, probes all nine tasks."""
    out = tmp_path / "run"
    result = train.main(["--cache", str(tmp_path / "cache"), "--out", str(out), "--synthetic-train", "64",
                         "--synthetic-probe", "240", "--steps", "3", "--batch-size", "16", "--micro-batch", "8"] + TINY)
    with open(out / "probe.json") as f:
        pj = json.load(f)
    assert set(pj["tasks"]) == set(data.TASKS)
    assert pj["mask"] == "ggsm" and result["mean_auc"] == pj["mean_auc"]
    for name in ("args.json", "metrics.jsonl", "checkpoint/trainable.safetensors", "checkpoint/state.json"):
        assert (out / name).exists(), name


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
    """Loading a checkpoint into the wrong model names the offending tensor."""
    import model
    import probe
    args = train.get_args(["--model", workdir["model"], "--mask", "ggsm"])
    records, report = data.load_records(workdir["train"], require=("answer",))
    cfg = model.ModelConfig.from_hf_config(os.path.join(workdir["model"], "config.json"))
    encoder, _, schedule = probe.build_encoder(train.make_spec(args, workdir["model"], report, cfg.num_hidden_layers))
    tensors, plain = probe.trainable_tensors(encoder, schedule)
    probe.load_trainable(encoder, schedule, dict(tensors), plain)  # the round trip itself is accepted
    key = next(k for k in tensors if "lora_A" in k)
    bad = dict(tensors, **{key: torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=key.split("encoder.", 1)[1].replace(".", r"\.")):
        probe.load_trainable(encoder, schedule, bad, plain)
    missing = {k: v for k, v in tensors.items() if k != key}
    with pytest.raises(ValueError, match="missing"):
        probe.load_trainable(encoder, schedule, missing, plain)
    with pytest.raises(ValueError, match="unexpected"):
        probe.load_trainable(encoder, schedule, dict(tensors, **{"mask.layers.0.weight": torch.zeros(1)}), plain)


def test_probe_cli_export_then_reprobe(workdir, tmp_path):
    """probe.py --model (the Oracle row) with --export, then --embeddings: same table without re-embedding."""
    import probe
    emb = str(tmp_path / "emb.safetensors")
    first = probe.main(["--model", workdir["model"], "--data", workdir["probe"], "--out", str(tmp_path / "a.json"),
                        "--export", emb, "--max-len", "96"])
    again = probe.main(["--embeddings", emb, "--data", workdir["probe"], "--out", str(tmp_path / "b.json")])
    assert first["mask"] == "oracle" and again["mask"] == "oracle"
    assert set(first["tasks"]) == set(data.TASKS)
    assert again["tasks"] == first["tasks"] and again["mean_auc"] == first["mean_auc"]
    with pytest.raises(SystemExit, match="no state.json"):
        probe.main(["--checkpoint", str(tmp_path), "--data", workdir["probe"]])

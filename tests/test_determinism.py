"""Same seed, same thread count, same numbers: two training runs at 2 threads end with identical trainable tensors
Each run is a fresh interpreter with torch.set_num_threads(2), so the multi-threaded CPU kernels run as
they do in `python train.py` on a 2-core machine, on the default path (packed rows, SDPA with enable_gqa,
best_capacity)."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import data
import train
from test_train import NO_PREAMBLE, ROOT, TINY
from tools import synthetic, tiny_decoder


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Synthetic users and a small decoder (built once, so the runs below differ in nothing but their run folder)."""
    root = tmp_path_factory.mktemp("determinism")
    train_path, _ = synthetic.write_synthetic(str(root / "data"), 48, 16, seed=5)
    args = train.get_args(["--data", train_path] + TINY + NO_PREAMBLE)
    records, report = data.load_records(train_path, require=("answer",))
    model_dir = tiny_decoder.build(args, records, report, str(root / "tiny"), torch.device("cpu"), lambda m: None)
    return {"root": root, "train": train_path, "model": model_dir}


def run_two_threads(argv):
    code = "import sys, torch, train; torch.set_num_threads(2); train.main(sys.argv[1:])"
    p = subprocess.run([sys.executable, "-c", code] + argv, cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="2"), timeout=300)
    assert p.returncode == 0, f"train.main({argv}) failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"


@pytest.mark.parametrize("mask", ["ggsm", "hybrid_mlp"])
def test_same_seed_runs_agree_at_two_threads(workdir, mask):
    """16 users of up to 96 tokens per forward at width 32: the user tower's (B, L, D) tensors hold over 32,768
    values, the size from which torch's CPU index_put_(accumulate=True) splits its work over threads and adds with
    atomic adds in any order (the backward of indexing special_embeds did so: these runs then differed by 1e-8 to
    1e-4, every time). 4 steps: GG-SM's warm-up (importance collected), then its ramp under the frozen importance."""
    runs = []
    for name in ("a", "b"):
        out = str(workdir["root"] / f"{mask}-{name}")
        run_two_threads(["--model", workdir["model"], "--data", workdir["train"], "--no-probe", "--out", out,
                         "--mask", mask, "--steps", "4", "--mask-warmup", "0.5", "--batch-size", "16",
                         "--micro-batch", "16", "--max-len", "96", "--answer-max-len", "24", "--preamble", "",
                         "--seed", "3", "--event-modalities", ""])  # the text form: auto would cut users to ~46
        runs.append(load_file(os.path.join(out, "checkpoint", "trainable.safetensors")))
    a, b = runs
    assert a.keys() == b.keys()
    differ = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not differ, f"same seed, same thread count, different tensors: {differ}"

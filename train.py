"""Contrastive training of a decoder-only user encoder under every attention-mask strategy of the paper.

    python train.py                                     # embedded default: synthetic users + small decoder, GG-SM, probe
    torchrun --standalone --nproc_per_node=N train.py --model DIR|tiny --data train.jsonl --probe-data probe.jsonl \
             --mask {causal,bidirectional,scheduler,ggsm,hybrid_mask,hybrid_mlp,hybrid_gq} --steps S --out RUN_DIR
    python train.py --out RUN_DIR --resume              # continue a stopped run where it left off

One optimizer step:
    batch (global, split over ranks and micro-steps) -> MaskSchedule.train_mask(step) -> user tower and answer tower
    through one shared LoRA backbone -> embeddings gathered across ranks -> InfoNCE (Eq. 6-8) -> backward
    -> GG-SM importance from the user tower's dL/dh (all-reduced) -> clip -> AdamW -> checkpoint.

`--model tiny` first trains a small decoder with a causal-LM objective on the data's own text (a `tokenizers`
BPE tokenizer plus a Qwen2-layout decoder saved as config.json + model.safetensors + tokenizer.json), so the
contrastive stage starts, like the paper's, from a causally pretrained decoder loaded through the same
`Decoder.from_pretrained` path as a real checkpoint.

References: arXiv 2602.10622 (GG-SM); nanoGPT / nanochat train scripts (loop, DDP, argparse);
open_clip (gathering embeddings across ranks with the local gradient kept).
"""
import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import ggsm
import model
import probe

MASKS = ("causal", "bidirectional", "scheduler", "ggsm", "hybrid_mask", "hybrid_mlp", "hybrid_gq")
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data
    p.add_argument("--data", default=None, help="training JSONL (with answers); default: the embedded synthetic benchmark")
    p.add_argument("--probe-data", default=None, help="labelled JSONL probed after training; default: the synthetic probe users when --data is not given")
    p.add_argument("--synthetic-train", type=int, default=3000, help="users in the embedded benchmark's training file")
    p.add_argument("--synthetic-probe", type=int, default=2000, help="users in the embedded benchmark's probe file")
    p.add_argument("--max-len", type=int, default=256, help="user-side token budget (oldest events cut first)")
    p.add_argument("--answer-max-len", type=int, default=48, help="answer-side token budget")
    p.add_argument("--skip-bad", action="store_true", help="skip invalid JSONL lines (reported) instead of failing")
    p.add_argument("--cache", default="cache", help="folder for the synthetic data and small decoders built on demand")
    # model
    p.add_argument("--model", default="tiny", help="Hugging Face folder (config.json, *.safetensors, tokenizer.json), or 'tiny' to build a small decoder from --data")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="weights dtype on load")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (paper: 64)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha; scale = alpha / r (paper: 64)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA branch")
    p.add_argument("--lora-targets", default=LORA_TARGETS, help="comma-separated Linear names that get LoRA")
    p.add_argument("--pooling", default="token", choices=("token", "mean"), help="token: <USER> / EOS state (paper); mean: official code")
    p.add_argument("--projector", default="none", help="'none' or comma-separated dims after the hidden size, e.g. 512,128 (official code)")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing per decoder block")
    # the small decoder built by --model tiny
    p.add_argument("--tiny-hidden", type=int, default=128, help="hidden size of the small decoder")
    p.add_argument("--tiny-layers", type=int, default=4, help="decoder blocks")
    p.add_argument("--tiny-heads", type=int, default=4, help="attention heads")
    p.add_argument("--tiny-kv-heads", type=int, default=2, help="key/value heads (grouped-query attention)")
    p.add_argument("--tiny-vocab", type=int, default=1024, help="BPE vocabulary size trained on the data's text")
    p.add_argument("--tiny-steps", type=int, default=80, help="causal-LM optimizer steps")
    p.add_argument("--tiny-batch", type=int, default=32, help="sequences per causal-LM step")
    p.add_argument("--tiny-lr", type=float, default=3e-3, help="causal-LM peak learning rate")
    # mask strategy
    p.add_argument("--mask", default="ggsm", choices=MASKS, help="attention-mask strategy (ggsm.MaskSchedule)")
    p.add_argument("--mask-warmup", type=float, default=0.1, help="GG-SM warm-up T_warm as a fraction of --steps (paper's Fig. 1: ~0.03; official code: 0.1)")
    p.add_argument("--capture-layer", default="last-block", help="'last-block' (input of the last block, default), 'final' (the paper's literal final hidden state) or a block index")
    p.add_argument("--importance-ema", type=float, default=0.0, help="EMA decay of the GG-SM importance (official effective value 0.0)")
    p.add_argument("--importance-norm", default="none", choices=("none", "max", "mean", "zscore"), help="optional rescaling of gradient norms before the sigmoid (see ggsm.GradientImportance)")
    # optimisation
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (T_total of every mask schedule)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch: users per optimizer step over all ranks")
    p.add_argument("--micro-batch", type=int, default=32, help="users per rank per forward; batch-size = micro * accumulation * world size")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (paper: 2e-4 on Qwen2.5-0.5B)")
    p.add_argument("--lr-warmup", type=int, default=10, help="linear LR warm-up steps, then cosine decay to 0")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--clip", type=float, default=1.0, help="global grad-norm clip after accumulation (0 = off)")
    p.add_argument("--tau", type=float, default=0.05, help="InfoNCE temperature")
    p.add_argument("--margin", type=float, default=0.1, help="false-negative margin of Eq. 8")
    p.add_argument("--no-same-side", action="store_true", help="drop the user-user and answer-answer negatives of Eq. 7")
    p.add_argument("--seed", type=int, default=0, help="initialisation, data order, dropout, synthetic data")
    # run
    p.add_argument("--out", default="runs/default", help="run folder: args.json, metrics.jsonl, checkpoint/, probe.json")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--ckpt-every", type=int, default=50, help="checkpoint every N steps (and at the end)")
    p.add_argument("--log-every", type=int, default=10, help="log a metrics.jsonl line every N steps")
    p.add_argument("--no-probe", action="store_true", help="skip the linear probe at the end")
    p.add_argument("--halt-after", type=int, default=0, help="stop right after step N's checkpoint as if killed (tests resume)")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# distributed helpers

def setup_dist():
    """Rank, world and device from torchrun's environment; NCCL on CUDA, gloo on CPU."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, local_rank, world = 0, 0, 1
    if ddp:
        rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return ddp, rank, world, device


def gather_keep_grad(x, rank, world):
    """All-gather x (n, E) from every rank into (world * n, E); the local slot is x itself so its gradient
    flows (torch.distributed.all_gather returns tensors without autograd history: the open_clip idiom)."""
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts)


# -----------------------------------------------------------------------------
# data order: one permutation per epoch, every global batch split rank-major into micro-batches, so the
# gathered micro-batch is the same users in the same order for any world size (and resume needs only `step`)

def micro_indices(n_users, step, batch_size, micro, world, rank, m, seed):
    """Dataset indices of micro-step m of optimizer step `step` on `rank` (the tail of an epoch that does
    not fill a global batch is skipped, so every rank always holds the same number of users)."""
    per_epoch = n_users // batch_size
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n_users)
    start = k * batch_size + (m * world + rank) * micro
    return perm[start:start + micro].tolist()


def lr_at(step, args):
    """Linear warm-up, then cosine decay to 0 at --steps."""
    if step < args.lr_warmup:
        return args.lr * (step + 1) / args.lr_warmup
    frac = (step - args.lr_warmup) / max(1, args.steps - args.lr_warmup)
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))


# -----------------------------------------------------------------------------
# the two towers on one backbone, wrapped as one module so DDP sees a single forward per micro-step

class DualTower(nn.Module):
    def __init__(self, encoder, mask_module):
        super().__init__()
        self.encoder = encoder
        self.mask_module = mask_module  # hybrid_mlp's per-layer MLPs (trainable), else None

    def forward(self, user, answer, user_mask, answer_mask, capture_layer=None):
        out = self.encoder(user.input_ids, user.attention_mask, user.pool_index, mask=user_mask,
                           vectors=user.vectors, vector_pos=user.vector_pos, return_layer=capture_layer)
        u, h = out if capture_layer is not None else (out, None)
        if h is not None:
            h.retain_grad()  # GG-SM reads dL/dh_j of the user tower after backward (Eq. 5)
        a = self.encoder(answer.input_ids, answer.attention_mask, answer.pool_index, mask=answer_mask)
        return u, a, h


# -----------------------------------------------------------------------------
# building the encoder (shared with probe.py, which rebuilds it from the checkpoint's spec)

def make_spec(args, model_dir, report, n_layers):
    """Everything needed to rebuild the encoder, stored in the checkpoint (probe.build_encoder reads it)."""
    capture = {"last-block": n_layers - 1, "final": n_layers}.get(args.capture_layer)
    if capture is None:
        capture = int(args.capture_layer)
    warmup = int(round(args.mask_warmup * args.steps))
    projector = None if args.projector == "none" else [int(d) for d in args.projector.split(",")]
    return {
        "base_model": os.path.abspath(model_dir), "dtype": args.dtype,
        "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                 "targets": args.lora_targets.split(",")},
        "modalities": report.modalities, "vector_dims": report.vector_dims,
        "max_len": args.max_len, "answer_max_len": args.answer_max_len,
        "global_token": args.mask == "hybrid_gq",
        "pooling": args.pooling, "projector": projector,
        "mask": {"strategy": args.mask, "total_steps": args.steps, "warmup_steps": warmup,
                 "capture_layer": capture, "ema": args.importance_ema, "normalize": args.importance_norm},
    }


# -----------------------------------------------------------------------------
# checkpoints: safetensors + JSON, written by rank 0 into a temporary folder, then renamed into place

def optimizer_tensors(opt, named_params):
    """AdamW state as flat named tensors (no pickle)."""
    out = {}
    for name, p in named_params:
        st = opt.state.get(p)
        if st:
            for k, v in st.items():
                out[f"{name}::{k}"] = torch.as_tensor(v).detach().cpu().clone()
    return out


def load_optimizer_tensors(opt, named_params, tensors):
    for name, p in named_params:
        keys = [k for k in tensors if k.startswith(name + "::")]
        if keys:
            opt.state[p] = {k.split("::", 1)[1]: tensors[k].to(p.device) for k in keys}


def save_checkpoint(run_dir, tensors, optim, meta):
    final = os.path.join(run_dir, "checkpoint")
    tmp, old = final + ".tmp", final + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(tensors, os.path.join(tmp, "trainable.safetensors"))
    save_file(optim, os.path.join(tmp, "optimizer.safetensors"))
    probe.write_json(os.path.join(tmp, "state.json"), meta)
    # swap: the previous checkpoint stays whole under .old until the new one is in place
    if os.path.isdir(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(run_dir):
    for name in ("checkpoint", "checkpoint.old"):  # .old survives a crash between the two renames
        path = os.path.join(run_dir, name)
        if os.path.isfile(os.path.join(path, "state.json")):
            return path
    return None


# -----------------------------------------------------------------------------
# the causal-LM objective that builds the small default decoder

def build_tiny_decoder(args, records, report, out_dir, device, log):
    """Train a BPE tokenizer and a small Qwen2-layout decoder on the records' own text; save in HF layout."""
    t0 = time.time()
    torch.manual_seed(args.seed)
    tmp = out_dir + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    tok = data.train_tokenizer(data.record_texts(records), args.tiny_vocab)
    # the Template adds its tag / <VEC> / <USER> / <GLOBAL> tokens to the vocabulary before the decoder exists,
    # so the pretrained decoder has real rows for them
    template = data.Template(tok, report.modalities, report.vector_dims, max_len=args.max_len, global_token=True,
                             max_answer_len=args.answer_max_len)
    tok.save(os.path.join(tmp, "tokenizer.json"))
    cfg = model.ModelConfig(
        model_type="qwen2", vocab_size=tok.get_vocab_size(), hidden_size=args.tiny_hidden,
        intermediate_size=args.tiny_hidden * 3, num_hidden_layers=args.tiny_layers,
        num_attention_heads=args.tiny_heads, num_key_value_heads=args.tiny_kv_heads,
        head_dim=args.tiny_hidden // args.tiny_heads, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
        attention_bias=True, qk_norm=False, tie_word_embeddings=True, max_position_embeddings=4096,
        bos_token_id=None, eos_token_id=template.eos_id)
    dec = model.Decoder(cfg).to(device)
    # one LM sequence per user: its templated history, then the answer (history -> next period's behaviour)
    seqs = []
    for r in records:
        ids = template.encode_user(r)["input_ids"] + template.encode_answer(r)
        seqs.append(ids[: args.max_len + args.answer_max_len])
    opt = torch.optim.AdamW(dec.parameters(), lr=args.tiny_lr, weight_decay=0.01, betas=(0.9, 0.95))
    rng = np.random.default_rng(args.seed)
    first = last = None
    for step in range(args.tiny_steps):
        idx = rng.choice(len(seqs), size=min(args.tiny_batch, len(seqs)), replace=False)
        ids, am = data.pad([seqs[i] for i in idx], template.pad_id)
        ids, am = ids.to(device), am.to(device)
        hidden = dec(input_ids=ids, mask=ggsm.causal_mask(am, torch.float32))
        logits = dec.logits(hidden[:, :-1])                                   # (B, L-1, V)
        targets = ids[:, 1:].masked_fill(am[:, 1:] == 0, -100)               # no loss on padding
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)
        for g in opt.param_groups:  # cosine decay after a short warm-up
            g["lr"] = args.tiny_lr * min(1.0, (step + 1) / 10) * 0.5 * (1 + math.cos(math.pi * step / args.tiny_steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
        if step % 25 == 0 or step == args.tiny_steps - 1:
            log(f"causal-LM pretraining step {step}/{args.tiny_steps}: loss {last:.3f}")
    dec.save_pretrained(tmp)
    with open(os.path.join(tmp, "pretrain.json"), "w") as f:
        json.dump({"first_loss": first, "last_loss": last, "steps": args.tiny_steps,
                   "seconds": time.time() - t0}, f, indent=1)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def shutdown(ddp):
    """Leave together: a rank that tears gloo down while another still writes can abort the job."""
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


def replica_max_diff(tensors):
    """Largest difference of any trainable value between ranks (0.0 when the replicas agree, as they must)."""
    flat = torch.cat([t.detach().float().flatten() for t in tensors])
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return (hi - lo).abs().max().item()


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


# -----------------------------------------------------------------------------

def main(argv=None):
    args = get_args(argv)
    ddp, rank, world, device = setup_dist()
    master = rank == 0

    def log(msg):
        if master:
            print(msg, flush=True)

    run_dir = args.out
    if args.resume:  # the run's own arguments win, except where a resume needs to differ
        ckpt = find_checkpoint(run_dir)
        if ckpt is None:
            sys.exit(f"error: --resume: no checkpoint in {run_dir}")
        with open(os.path.join(run_dir, "args.json")) as f:
            saved = json.load(f)
        saved.update(resume=True, halt_after=args.halt_after, no_probe=args.no_probe, out=run_dir)
        args = argparse.Namespace(**saved)

    # ---- validate the arguments before any work
    if args.batch_size % (args.micro_batch * world):
        sys.exit(f"error: --batch-size {args.batch_size} is not a multiple of --micro-batch {args.micro_batch} x world size {world}")
    accum = args.batch_size // (args.micro_batch * world)
    if args.capture_layer not in ("last-block", "final") and not args.capture_layer.isdigit():
        sys.exit(f"error: --capture-layer {args.capture_layer}: expected 'last-block', 'final' or a block index")
    if args.model != "tiny":
        for name in ("config.json", "tokenizer.json"):
            if not os.path.isfile(os.path.join(args.model, name)):
                sys.exit(f"error: --model {args.model}: no {name} (expected a Hugging Face folder or 'tiny')")
    for flag, path in (("--data", args.data), ("--probe-data", args.probe_data)):
        if path is not None and not os.path.isfile(path):
            sys.exit(f"error: {flag} {path}: no such file")

    # ---- data: the embedded benchmark is written once by rank 0 into the cache
    train_path, probe_path = args.data, args.probe_data
    if train_path is None:
        syn_dir = os.path.join(args.cache, f"synthetic-{args.synthetic_train}-{args.synthetic_probe}-seed{args.seed}")
        if master and not os.path.isfile(os.path.join(syn_dir, "probe.jsonl")):
            log(f"writing the embedded synthetic benchmark to {syn_dir}")
            data.write_synthetic(syn_dir, args.synthetic_train, args.synthetic_probe, seed=args.seed)
        if ddp:
            dist.barrier()
        train_path = os.path.join(syn_dir, "train.jsonl")
        probe_path = probe_path or os.path.join(syn_dir, "probe.jsonl")
    try:
        records, report = data.load_records(train_path, skip_bad=args.skip_bad, require=("answer",))
    except ValueError as e:
        sys.exit(f"error: {e}")
    if report.n_bad:
        log(str(report))

    # ---- model: a real checkpoint folder, or the small decoder built (once) from the training data
    model_dir = args.model
    if model_dir == "tiny":
        # cached by everything that shapes it: the data file's bytes and the --tiny-* / length / seed flags
        recipe = [file_digest(train_path), args.max_len, args.answer_max_len, args.seed]
        recipe += [getattr(args, k) for k in sorted(vars(args)) if k.startswith("tiny_")]
        model_dir = os.path.join(args.cache, "tiny-" + hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:12])
        if master and not os.path.isfile(os.path.join(model_dir, "model.safetensors")):
            log(f"building the small decoder in {model_dir} (causal-LM objective on {train_path})")
            build_tiny_decoder(args, records, report, model_dir, device, log)
        if ddp:
            dist.barrier()

    cfg = model.ModelConfig.from_hf_config(os.path.join(model_dir, "config.json"))
    spec = make_spec(args, model_dir, report, cfg.num_hidden_layers)
    if args.resume:
        with open(os.path.join(ckpt, "state.json")) as f:
            state = json.load(f)
        spec = state["spec"]
    torch.manual_seed(args.seed)  # LoRA A, adapters, projector, new token rows: the same init on every rank
    encoder, template, schedule = probe.build_encoder(spec, device)
    encoder.decoder.gradient_checkpointing = args.grad_ckpt
    train_set = data.UserDataset(records, template)
    n_users = len(train_set)
    if n_users < args.batch_size:
        sys.exit(f"error: {train_path}: {n_users} users, fewer than one global batch of {args.batch_size}")

    # ---- LoRA froze the base inside build_encoder; only now wrap in DDP (DDP registers trainable params only)
    tower = DualTower(encoder, schedule.module).to(device).train()  # from_pretrained returns eval mode
    named = [(n, p) for n, p in tower.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    start = 0
    if args.resume:
        tower_state = load_file(os.path.join(ckpt, "trainable.safetensors"), device=str(device))
        probe.load_trainable(tower.encoder, schedule, tower_state, state["schedule"])
        load_optimizer_tensors(opt, named, load_file(os.path.join(ckpt, "optimizer.safetensors"), device=str(device)))
        start = state["step"]
        rng = state.get("rng", {}).get(str(rank))
        if rng is not None and len(state["rng"]) == world:
            torch.set_rng_state(torch.tensor(rng, dtype=torch.uint8))
        else:
            torch.manual_seed(args.seed + 1000 * rank + start)
        log(f"resumed from {ckpt} at step {start}")
    else:
        torch.manual_seed(args.seed + 1000 * rank)  # per-rank dropout noise; the data order is shared
    model_ddp = DDP(tower, device_ids=[device.index] if device.type == "cuda" else None) if ddp else tower
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    if master:
        os.makedirs(run_dir, exist_ok=True)
        probe.write_json(os.path.join(run_dir, "args.json"), vars(args))
        n_train = sum(p.numel() for p in params)
        log(f"torch {torch.__version__} | device {device} x{world} | model {model_dir} | {n_users} users | "
            f"mask {args.mask} | steps {args.steps} | batch {args.batch_size} = {args.micro_batch} x {accum} accum x {world} ranks | "
            f"trainable {n_train / 1e6:.2f}M")
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if master and os.path.exists(metrics_path):
        # a fresh run starts a new log; a resumed one drops what was logged after its checkpoint
        with open(metrics_path) as f:
            kept = [line for line in f if args.resume and json.loads(line)["step"] < start]
        with open(metrics_path, "w") as f:
            f.writelines(kept)

    def checkpoint_meta(step, tensors, sched):
        rng = torch.get_rng_state()
        rngs = [torch.empty_like(rng) for _ in range(world)] if ddp else [rng]
        if ddp:
            dist.all_gather(rngs, rng)
        return {"step": step, "spec": spec, "args": vars(args), "world_size": world, "schedule": sched,
                "replica_max_diff": replica_max_diff(list(tensors.values())) if ddp else 0.0,
                "rng": {str(r): t.tolist() for r, t in enumerate(rngs)},
                "data_position": {"epoch": step // (n_users // args.batch_size),
                                  "batch_in_epoch": step % (n_users // args.batch_size)}}

    def write_checkpoint(step):
        tensors, sched = probe.trainable_tensors(tower.encoder, schedule)
        meta = checkpoint_meta(step, tensors, sched)  # every rank joins the RNG gather and the replica check
        if master:
            save_checkpoint(run_dir, tensors, optimizer_tensors(opt, named), meta)

    t_last, tokens = time.time(), 0
    for step in range(start, args.steps):
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = 0.0
        # GG-SM / hybrid_mask warm-up: the user tower's dL/dh at this block feeds the next step's mask (Eq. 5)
        capture = schedule.capture_layer if schedule.wants_gradients(step) else None
        for m in range(accum):
            idx = micro_indices(n_users, step, args.batch_size, args.micro_batch, world, rank, m, args.seed)
            batch = data.collate([train_set[i] for i in idx]).to(device)
            user_mask = schedule.train_mask(step, batch.user.attention_mask, torch.float32)
            answer_mask = schedule.train_mask(step, batch.answer.attention_mask, torch.float32, tower="answer")
            # no gradient all-reduce on the non-final micro-steps of an accumulation
            sync = model_ddp.no_sync() if (ddp and m < accum - 1) else nullcontext()
            with sync:
                with autocast:
                    u, a, h = model_ddp(batch.user, batch.answer, user_mask, answer_mask, capture)
                # negatives from the global batch (Eq. 7); every rank computes the same global loss
                ug, ag = gather_keep_grad(u.float(), rank, world), gather_keep_grad(a.float(), rank, world)
                loss = ggsm.info_nce(ug, ag, args.tau, args.margin, same_side=not args.no_same_side)
                # x world: DDP averages gradients over ranks, each holding only its own rows' share of dL
                (loss * world / accum).backward()
            if h is not None and h.grad is not None:
                schedule.accumulate(h.grad.float() * accum / world, batch.user.attention_mask)  # back to dL/dh
            loss_sum += loss.item() / accum
            tokens += int(batch.user.attention_mask.sum() + batch.answer.attention_mask.sum())
        if not math.isfinite(loss_sum):
            log(f"error: non-finite loss {loss_sum} at step {step}; stopping. The last good checkpoint in {run_dir} is kept.")
            shutdown(ddp)
            sys.exit(2)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip if args.clip > 0 else float("inf")).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.end_step(step)  # GG-SM: all-reduce the importance, EMA, freeze at T_warm - 1
        done = step + 1
        if master and sys.stderr.isatty():  # a live progress bar on a terminal (the log lines go to stdout)
            bar = "#" * (30 * done // args.steps)
            print(f"\r[{bar:<30}] {done}/{args.steps} loss {loss_sum:.4f}\033[K", end="", file=sys.stderr, flush=True)
        if master and (step % args.log_every == 0 or done == args.steps):
            dt = time.time() - t_last
            rec = {"step": step, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm,
                   "future_weight": schedule.mean_future_weight(step), "phase": schedule.phase(step),
                   "tokens_per_s": tokens * world / max(dt, 1e-9)}
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            log(f"step {step:5d}/{args.steps} | loss {loss_sum:.4f} | lr {lr:.2e} | gnorm {grad_norm:.3f} | "
                f"w_future {rec['future_weight']:.4f} ({rec['phase']}) | {rec['tokens_per_s']:.0f} tok/s")
            t_last, tokens = time.time(), 0
        if done % args.ckpt_every == 0 or done == args.steps or done == args.halt_after:
            write_checkpoint(done)
        if done == args.halt_after:
            log(f"halting after step {done} (--halt-after)")
            shutdown(ddp)
            return None

    if args.steps == start:
        log(f"nothing to do: the checkpoint is already at step {start}")
    # ---- probe the trained encoder under the strategy's inference mask (rank 0)
    result = None
    if master and not args.no_probe and probe_path:
        result = probe.run(tower.encoder, template, schedule, probe_path, device,
                           name=args.mask, checkpoint=os.path.join(run_dir, "checkpoint"),
                           out=os.path.join(run_dir, "probe.json"), skip_bad=args.skip_bad)
    shutdown(ddp)
    return result


if __name__ == "__main__":
    main()

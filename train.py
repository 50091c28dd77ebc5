"""Contrastive training of a decoder-only user encoder under every attention-mask strategy of the paper.

    python train.py                                     # embedded default: synthetic users + small decoder, GG-SM, probe
    torchrun --standalone --nproc_per_node=N train.py --model DIR|tiny --data train.jsonl --probe-data probe.jsonl \
             --mask NAME --steps S --out RUN_DIR      # NAME: a key of ggsm.STRATEGIES
    python train.py --out RUN_DIR --resume              # continue a stopped run where it left off

train_step is one optimizer step of the paper's algorithm, read top-down. Around it: the setup (data, the base
model, the encoder), the loop (learning rate, logs, checkpoints) and the probe at the end. `--model tiny` (the
default) builds a small decoder first (tools/tiny_decoder.py); --data is tokenized once into an encoded cache
(tools/cache.py) that every later run and rank memory-maps (--data-cache off: read in memory, the same batches).

References: arXiv 2602.10622 (GG-SM); nanoGPT / nanochat train scripts (loop, DDP, argparse);
open_clip (gathering embeddings across ranks with the local gradient kept).
"""
import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint as ckpt
import data
import ggsm
import model
import probe

# a run warns that it collapses when a batch's user embeddings have an effective rank below COLLAPSE_RANK or a
# mean pairwise cosine above COLLAPSE_COSINE (measured: a collapsed run sits at cosine 0.99-1.00, effective rank
# 2.4-3.0; a learning one at cosine -0.03, effective rank 17-19 of 32)
COLLAPSE_RANK, COLLAPSE_COSINE = 2.0, 0.9
# --event-modalities auto: the event form when the text form would cut more than this share of the events. On
# MovieLens (70% cut) the event form trained higher; on the embedded benchmark (0% cut) the text form did
AUTO_CUT = 0.25

def mask_option(text):
    """'key=value' -> (key, value); value read as JSON where it parses (numbers, true/false), else as text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected key=value")
    try:
        return key.replace("-", "_"), json.loads(value)
    except ValueError:
        return key.replace("-", "_"), value

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("the paper's settings (paper: Qwen2.5-0.5B, LoRA r 64, lr 2e-4, batch 2,048, 70k steps; "
                             "these defaults fit a CPU)")
    # paper [backbone of the default run]: Qwen2.5-0.5B-Instruct (--model DIR); the default builds a small decoder
    g.add_argument("--model", default="tiny", help="Hugging Face folder (config.json, *.safetensors, tokenizer.json), or 'tiny' to build a small decoder from --data")
    g.add_argument("--data", default=None, help="training JSONL (with answers); default: the embedded synthetic benchmark")
    g.add_argument("--probe-data", default=None, help="labelled JSONL probed after training; default: the synthetic probe users when --data is not given")
    g.add_argument("--mask", default="ggsm", choices=list(ggsm.STRATEGIES), help="attention-mask strategy (ggsm.STRATEGIES)")
    g.add_argument("--mask-warmup", type=float, default=0.1, help="GG-SM warm-up T_warm as a fraction of --steps (paper's Fig. 1: ~0.03; official code: 0.1)")
    g.add_argument("--mask-option", type=mask_option, action="append", default=[], metavar="KEY=VALUE",
                   help="a keyword argument of the strategy class, repeatable (stored in the checkpoint); e.g. capture_layer=final, ema=0.9, segment=all")
    # paper [lr, steps, batch]: 2e-4, 70k, 2,048 on Qwen2.5-0.5B; these defaults fit a CPU budget
    g.add_argument("--steps", type=int, default=250, help="optimizer steps (T_total of every mask schedule)")
    g.add_argument("--batch-size", type=int, default=32, help="global batch: users per optimizer step over all ranks")
    g.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (paper: 2e-4 on Qwen2.5-0.5B)")
    # paper [τ]: not given; official code 0.02, Q-Anchor code 0.07; 0.05 is a choice between them, not tuned
    g.add_argument("--tau", type=float, default=0.05, help="InfoNCE temperature")
    g.add_argument("--margin", type=float, default=0.1, help="false-negative margin of Eq. 8")
    g.add_argument("--no-same-side", action="store_true", help="drop the user-user and answer-answer negatives of Eq. 7")
    g.add_argument("--lora-r", type=int, default=16, help="LoRA rank (paper: 64)")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha; scale = alpha / r (paper: 64)")
    g.add_argument("--max-len", type=int, default=256, help="user-side token budget (oldest events cut first)")
    g.add_argument("--pooling", default="token", choices=("token", "mean"), help="token: <USER> / EOS state (paper); mean: official code")
    g.add_argument("--event-modalities", default="auto", help="comma-separated modalities in the paper's event-level form: one position per event (frozen token embeddings pooled over the event's text, then the modality adapter) instead of subword tokens; '' for none; auto (default): every modality without vectors of its own when the text form would cut more than a quarter of the events, else none")
    g.add_argument("--seed", type=int, default=0, help="initialisation (small decoder, LoRA, adapters), data order, dropout")

    g = p.add_argument_group("model and optimisation details")
    g.add_argument("--preamble", default="", type=data.preamble_text, help="the template's opening sentence: 'paper' (App. A.1), any text, or '' for none (the default: see data.PREAMBLE)")
    g.add_argument("--answer-max-len", type=int, default=48, help="answer-side token budget")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="weights dtype on load")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA branch")
    g.add_argument("--lora-targets", default=",".join(model.LORA_TARGETS), help="comma-separated Linear names that get LoRA")
    g.add_argument("--projector", default="none", help="'none' or comma-separated dims after the hidden size, e.g. 512,128 (official code)")
    g.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=True,
                   help="standardise each tower's pooled state (BatchNorm, no affine; global-batch statistics in training, running ones at inference) before the L2 norm")
    g.add_argument("--new-lr-mult", type=float, default=5.0, help="learning-rate multiplier for what is trained from scratch (new token rows, modality adapters, projector, the strategy's module); LoRA gets --lr")
    g.add_argument("--lr-warmup", type=int, default=10, help="linear LR warm-up steps, then cosine decay to 0")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--clip", type=float, default=1.0, help="global grad-norm clip after accumulation (0 = off)")
    # aliases of --mask-option (None: the strategy's default, stored as before)
    g.add_argument("--capture-layer", default="last-block", help="= --mask-option capture_layer=...: 'last-block' (input of the last block), 'final' (the paper's literal final hidden state) or a block index")
    g.add_argument("--importance-ema", type=float, default=0.0, help="= --mask-option ema=...: EMA decay of the GG-SM importance (official effective value 0.0)")
    g.add_argument("--importance-norm", default="none", choices=ggsm.NORMALIZE, help="= --mask-option normalize=...: rescaling of gradient norms before the sigmoid")
    g.add_argument("--hybrid-segment", default="history", choices=ggsm.SEGMENTS, help="= --mask-option segment=...: hybrid_mask, hybrid_mlp relax causality inside the user-history segment only (paper) or everywhere ('all')")

    g = p.add_argument_group("the embedded synthetic benchmark (when --data is not given)")
    g.add_argument("--synthetic-train", type=int, default=3000, help="users in the training file")
    g.add_argument("--synthetic-probe", type=int, default=5000, help="users in the probe file (5,000: the standard error of the mean AUC stays under 0.005)")
    g.add_argument("--data-seed", type=int, default=0, help="the synthetic users (apart from --seed, so that seeds compare on the same data)")

    g = p.add_argument_group("the small decoder built by --model tiny (tools/tiny_decoder.py)")
    g.add_argument("--tiny-hidden", type=int, default=128, help="hidden size")
    g.add_argument("--tiny-layers", type=int, default=4, help="decoder blocks")
    g.add_argument("--tiny-heads", type=int, default=4, help="attention heads")
    g.add_argument("--tiny-kv-heads", type=int, default=2, help="key/value heads (grouped-query attention)")
    g.add_argument("--tiny-vocab", type=int, default=1024, help="BPE vocabulary size trained on the data's text")
    g.add_argument("--tiny-steps", type=int, default=80, help="causal-LM optimizer steps")
    g.add_argument("--tiny-batch", type=int, default=32, help="sequences per causal-LM step")
    g.add_argument("--tiny-lr", type=float, default=3e-3, help="causal-LM peak learning rate")

    g = p.add_argument_group("speed and memory")
    g.add_argument("--micro-batch", type=int, default=32, help="users per rank per forward; batch-size = micro * accumulation * world size")
    # official code [micro-batches]: every sequence padded to 512; here packed rows, or with --no-pack padded to the longest
    g.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                   help="run the users packed into shared rows (block-diagonal masks, RoPE restarting per user; pack.py): the same numbers, no padding")
    g.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing per decoder block")
    g.add_argument("--data-cache", default=None, metavar="DIR|off",
                   help="where --data and --probe-data are tokenized once and memory-mapped by every later run and rank "
                        "(tools/cache.py); default: an 'encoded' folder beside each file; 'off': read and encode them in memory")

    g = p.add_argument_group("run folder, logs and checkpoints")
    g.add_argument("--out", default="runs/default", help="run folder: args.json, metrics.jsonl, checkpoint/, probe.json")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    g.add_argument("--ckpt-every", type=int, default=50, help="checkpoint every N steps (and at the end)")
    g.add_argument("--log-every", type=int, default=10, help="log a metrics.jsonl line every N steps")
    g.add_argument("--no-probe", action="store_true", help="skip the linear probe at the end")
    g.add_argument("--no-oracle", action="store_true", help="probe the trained encoder only: no untrained Oracle row, no hand-made baseline rows")
    g.add_argument("--skip-bad", action="store_true", help="skip invalid JSONL lines (reported) instead of failing")
    g.add_argument("--cache", default="cache", help="folder for the synthetic data and small decoders built on demand")
    p.add_argument("--halt-after", type=int, default=0, help=argparse.SUPPRESS)  # tests: stop after step N's checkpoint, as if killed
    return p.parse_args(argv)

def mask_options(args):
    """The strategy's keyword arguments: the alias flags, then every --mask-option (a later one wins)."""
    opts = {"capture_layer": args.capture_layer, "ema": args.importance_ema, "normalize": args.importance_norm,
            "segment": args.hybrid_segment}
    opts.update(dict(args.mask_option))
    return opts

# -----------------------------------------------------------------------------
# distributed helpers and data order

def gather_keep_grad(x, rank, world):
    """All-gather x (n, E) from every rank into (world * n, E); the local slot is x itself so its gradient
    flows (torch.distributed.all_gather returns tensors without autograd history: the open_clip idiom)."""
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts)

# one permutation per epoch, every global batch split rank-major into micro-batches, so the gathered micro-batch is
# the same users in the same order for any world size (and resume needs only `step`)
def micro_indices(n_users, step, batch_size, micro, world, rank, m, seed):
    """Dataset indices of micro-step m of optimizer step `step` on `rank` (the tail of an epoch that does
    not fill a global batch is skipped, so every rank always holds the same number of users)."""
    per_epoch = n_users // batch_size
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n_users)
    start = k * batch_size + (m * world + rank) * micro
    return perm[start:start + micro].tolist()

def micro_batch(dataset, idx, device):
    """The users idx, shortest first, collated (padded to the longest; packing, if on, happens in the encoder)."""
    return data.collate([dataset[i] for i in sorted(idx, key=lambda i: dataset.lengths[i])]).to(device)

def make_optimizer(named, args):
    """AdamW with two groups: the LoRA factors at --lr, and what starts from scratch (new token rows, modality
    adapters, projector, the strategy's module) at --lr x --new-lr-mult; each group's "lr_mult" scales lr_at."""
    lora = [p for n, p in named if "lora_" in n]
    new = [p for n, p in named if "lora_" not in n]
    groups = [{"params": ps, "lr_mult": m} for ps, m in ((lora, 1.0), (new, args.new_lr_mult)) if ps]
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)

def lr_at(step, args):
    """Linear warm-up, then cosine decay to 0 at --steps."""
    if step < args.lr_warmup:
        return args.lr * (step + 1) / args.lr_warmup
    frac = (step - args.lr_warmup) / max(1, args.steps - args.lr_warmup)
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))

# -----------------------------------------------------------------------------
# one optimizer step

class DualTower(nn.Module):
    """The user tower and the answer tower on one shared backbone (LoRA weights tied), as one module so that DDP
    sees a single forward per micro-step; the strategy's trainable module (hybrid_mlp's MLPs) rides along."""

    def __init__(self, encoder, mask_module):
        super().__init__()
        self.encoder, self.mask_module = encoder, mask_module

    def forward(self, batch, user_mask, answer_mask, capture_layer=None):
        """-> pooled (projected) states of both towers (B, E) before Eq. 13, and h: the user tower's (B, L, D) state
        at capture_layer, whose .grad backward fills (None when not captured)."""
        user, answer = batch.user, batch.answer
        out = self.encoder(user.input_ids, user.attention_mask, user.pool_index, mask=user_mask, vectors=user.vectors,
                           vector_pos=user.vector_pos, return_layer=capture_layer, finish=False)
        u, h = out if capture_layer is not None else (out, None)
        a = self.encoder(answer.input_ids, answer.attention_mask, answer.pool_index, mask=answer_mask, finish=False)
        return u, a, h

def train_step(towers, strategy, optimizer, micro_batches, step, loss_fn, clip=1.0, rank=0, world=1,
               autocast=nullcontext()):
    """One optimizer step over this rank's micro-batches (data.Batch with answers). Per micro-batch: the strategy's
    masks for both towers, both towers, the pooled states gathered from every rank, Eq. 13, InfoNCE (Eq. 6-8),
    backward, and the user tower's dL/dh for the gradient importance (Eq. 5). Then clip, AdamW and the strategy's
    end of step. towers: a DualTower, or DDP around one.
    -> {"loss", "grad_norm", "tokens", "masks": [(user mask, attention mask)], "embeddings": [(user, answer)]}
    (masks and embeddings as used, for the logs); on a non-finite loss it returns before the optimizer step."""
    n = len(micro_batches)
    encoder = (towers.module if isinstance(towers, DDP) else towers).encoder
    capture = strategy.capture_layer if strategy.wants_gradients(step) else None  # GG-SM: during the warm-up only
    out = {"loss": 0.0, "grad_norm": float("nan"), "tokens": 0, "masks": [], "embeddings": []}
    for m, batch in enumerate(micro_batches):
        user_am, answer_am = batch.user.attention_mask, batch.answer.attention_mask
        # 1. the masks at this step: GG-SM's soft future weights (Eq. 4), the ramp, or a fixed mask
        user_mask = measured(strategy.train_mask(step, user_am, torch.float32, history=batch.user.history), user_am)
        answer_mask = strategy.train_mask(step, answer_am, torch.float32, tower="answer")
        # no gradient all-reduce on the non-final micro-steps of an accumulation
        sync = towers.no_sync() if (isinstance(towers, DDP) and m < n - 1) else nullcontext()
        with sync:
            # 2. both towers through the shared LoRA backbone (Eq. 11-12)
            with autocast:
                u, a, h = towers(batch, user_mask, answer_mask, capture)
            # 3. negatives from the global batch (Eq. 7): every rank computes the same global loss. 4. Eq. 13 after
            # the gather: the standardisation's batch statistics are the global batch's, the same on every rank
            user = encoder.finish(gather_keep_grad(u.float(), rank, world), "user")
            answer = encoder.finish(gather_keep_grad(a.float(), rank, world), "answer")
            loss = loss_fn(user, answer)  # 5. InfoNCE, Eq. 6-8
            # 6. backward; x world: DDP averages gradients over ranks, each holding only its own rows' share of dL
            (loss * world / n).backward()
        if h is not None and h.grad is not None:  # 7. Eq. 5: ||dL/dh_j|| per position j, back to the step's loss
            strategy.accumulate(h.grad.float() * n / world, user_am)
        out["loss"] += loss.item() / n
        out["tokens"] += int(user_am.sum() + answer_am.sum())
        out["masks"].append((user_mask, user_am))
        out["embeddings"].append((user.detach(), answer.detach()))
    if not math.isfinite(out["loss"]):
        return out
    # 8. clip, AdamW, then the strategy's end of step (GG-SM: all-reduce the importance, freeze it at T_warm - 1)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    out["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf")).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    strategy.end_step(step)
    return out

# -----------------------------------------------------------------------------
# setup: arguments, data, base model, the encoder

def open_data(args, events, load, loaded, train_path, model_dir, ddp, master, log):
    """-> (template -> the training users, LoadReport): the encoded cache (rank 0 builds it, every rank memory-maps
    it; one per input form) or, with --data-cache off, the records in memory. events: the modalities in event form."""
    if args.data_cache == "off":
        records, report = load()
        return partial(data.UserDataset, records), report
    loaded.clear()  # the decoder is built: the records are not needed any more
    from tools import cache
    folder, report = cache.ensure_for_training(args, train_path, model_dir, ddp, master, log, events)
    return partial(cache.EncodedDataset, folder), report

def make_spec(args, model_dir, report, events=()):
    return ckpt.RunSpec(
        base_model=os.path.abspath(model_dir), modalities=report.modalities, vector_dims=report.vector_dims,
        mask=args.mask, total_steps=args.steps, warmup_steps=int(round(args.mask_warmup * args.steps)),
        mask_options=mask_options(args), dtype=args.dtype,
        lora={"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout, "targets": args.lora_targets.split(",")},
        max_len=args.max_len, answer_max_len=args.answer_max_len, pooling=args.pooling, standardize=args.standardize,
        projector=None if args.projector == "none" else [int(d) for d in args.projector.split(",")],
        event_modalities=list(events), preamble=args.preamble)

def parse_run(argv=None):
    """The command line. With --resume: the run's own arguments (but for the few a resume may change) and its
    checkpoint's state.json (with "path", and "spec" as a checkpoint.RunSpec); else (args, None)."""
    args = get_args(argv)
    if not args.resume:
        return args, None
    path = ckpt.find_checkpoint(args.out)
    if path is None:
        sys.exit(f"error: --resume: no checkpoint in {args.out}")
    with open(os.path.join(args.out, "args.json")) as f:
        saved = {**vars(get_args([])), **json.load(f)}  # a flag newer than the run: its default
    saved.update(resume=True, halt_after=args.halt_after, no_probe=args.no_probe, no_oracle=args.no_oracle, out=args.out)
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    state["path"] = path
    try:
        state["spec"] = ckpt.RunSpec.from_dict(state["spec"], where=os.path.join(path, "state.json"))
    except ValueError as e:
        sys.exit(f"error: --resume: {e}")
    return argparse.Namespace(**saved), state

def check_args(args, world):
    """Fail on bad arguments before any work; -> micro-steps per optimizer step."""
    if args.batch_size % (args.micro_batch * world):
        sys.exit(f"error: --batch-size {args.batch_size} is not a multiple of --micro-batch {args.micro_batch} x world size {world}")
    capture = mask_options(args)["capture_layer"]
    if capture not in ("last-block", "final") and not str(capture).isdigit():
        sys.exit(f"error: --capture-layer {capture}: expected 'last-block', 'final' or a block index")
    if args.model != "tiny":
        for name in ("config.json", "tokenizer.json"):
            if not os.path.isfile(os.path.join(args.model, name)):
                sys.exit(f"error: --model {args.model}: no {name} (expected a Hugging Face folder or 'tiny')")
    for flag, path in (("--data", args.data), ("--probe-data", args.probe_data)):
        if path is not None and not os.path.isfile(path):
            sys.exit(f"error: {flag} {path}: no such file")
    return args.batch_size // (args.micro_batch * world)

def prepare_paths(args, ddp, master, log):
    """-> (train path, probe path). The embedded benchmark is written once by rank 0 into the cache."""
    train_path, probe_path = args.data, args.probe_data
    if train_path is None:
        syn_dir = os.path.join(args.cache, f"synthetic-{args.synthetic_train}-{args.synthetic_probe}-seed{args.data_seed}")
        if master and not os.path.isfile(os.path.join(syn_dir, "probe.jsonl")):
            from tools import synthetic  # a tool, not the method: the embedded benchmark's users
            log(f"writing the embedded synthetic benchmark to {syn_dir}")
            synthetic.write_synthetic(syn_dir, args.synthetic_train, args.synthetic_probe, seed=args.data_seed)
        if ddp:
            dist.barrier()
        train_path = os.path.join(syn_dir, "train.jsonl")
        probe_path = probe_path or os.path.join(syn_dir, "probe.jsonl")
    return train_path, probe_path

def load_train_records(args, train_path, log):
    """-> (training records, their LoadReport): the whole file in memory (--data-cache off, the small decoder's build)."""
    try:
        records, report = data.load_records(train_path, skip_bad=args.skip_bad, require=("answer",))
    except ValueError as e:
        sys.exit(f"error: {e}")
    if report.n_bad:
        log(str(report))
    return records, report

def prepare_model(args, load_records, train_path, ddp, master, device, log):
    """-> the base model folder: --model, or the small decoder built (once, by rank 0) from the training data.
    load_records() -> (records, report) is called only when the decoder has to be built."""
    if args.model != "tiny":
        return args.model
    from tools import tiny_decoder  # a tool, not the method: builds a stand-in for a pretrained LLM
    model_dir = tiny_decoder.folder(args, train_path)
    if master and not os.path.isfile(os.path.join(model_dir, "model.safetensors")):
        log(f"building the small decoder in {model_dir} (causal-LM objective on {train_path})")
        tiny_decoder.build(args, *load_records(), model_dir, device, log)
    if ddp:
        dist.barrier()
    return model_dir

def restore(state, towers, strategy, opt, named, rank, world, device):
    """Load a checkpoint's trainable tensors, strategy state, optimizer state and this rank's RNG; -> its step."""
    path = state["path"]
    ckpt.load_trainable(towers.encoder, strategy, load_file(os.path.join(path, "trainable.safetensors"), device=str(device)),
                        state["strategy"])
    ckpt.load_optimizer_tensors(opt, named, load_file(os.path.join(path, "optimizer.safetensors"), device=str(device)))
    rng = state["rng"].get(str(rank))
    if rng is not None and len(state["rng"]) == world:
        torch.set_rng_state(torch.tensor(rng, dtype=torch.uint8))
    else:  # another world size: a fresh, reproducible stream
        torch.manual_seed(state["args"]["seed"] + 1000 * rank + state["step"])
    return state["step"]

def write_checkpoint(args, step, spec, towers, strategy, opt, named, n_users, world, master):
    """Every rank joins (the RNG gather and the replica check are collectives); rank 0 writes."""
    tensors, plain = ckpt.trainable_tensors(towers.encoder, strategy)
    rng = torch.get_rng_state()
    rngs = [torch.empty_like(rng) for _ in range(world)] if world > 1 else [rng]
    if world > 1:
        dist.all_gather(rngs, rng)
    per_epoch = n_users // args.batch_size
    meta = {"step": step, "spec": spec.to_dict(), "args": vars(args), "world_size": world, "strategy": plain,
            "replica_max_diff": replica_max_diff(list(tensors.values())) if world > 1 else 0.0,
            "rng": {str(r): t.tolist() for r, t in enumerate(rngs)},
            "data_position": {"epoch": step // per_epoch, "batch_in_epoch": step % per_epoch}}
    if master:
        ckpt.save_checkpoint(args.out, tensors, ckpt.optimizer_tensors(opt, named), meta)

# -----------------------------------------------------------------------------
# logs

def is_log_step(args, step):
    return step % args.log_every == 0 or step + 1 == args.steps

def measured(mask, attention_mask):
    """The mask unchanged; a per-layer callable (hybrid_mlp) wrapped to keep, in .future_weights, the mean future
    weight of each mask it returns: evaluated inside the decoder, it cannot be measured afterwards."""
    if not callable(mask):
        return mask

    def wrapped(layer_idx, h):
        m = mask(layer_idx, h)
        wrapped.future_weights.append(ggsm.mean_future_weight(m, attention_mask))
        return m

    wrapped.future_weights = []
    return wrapped

def future_weight(masks):
    """The mean future weight of the user masks as used (Fig. 1's "Soft Mask Average Weight"): a tensor mask
    measured here, a per-layer callable as it was measured at each evaluation (measured)."""
    seen = [w for mask, am in masks
            for w in (mask.future_weights if callable(mask) else [ggsm.mean_future_weight(mask, am)])]
    return float(np.mean(seen)) if seen else float("nan")

def log_step(args, step, out, lr, strategy, meter, world, log):
    """The progress bar (on a terminal; off one, a line at each quarter of the run), and every --log-every steps a
    metrics.jsonl line with the collapse diagnostics and a log line."""
    done = step + 1
    meter["tokens"] += out["tokens"]
    bar = "#" * (30 * done // args.steps)  # on stderr: the log lines go to stdout
    probe.progress(done, args.steps, f"[{bar:<30}] {done}/{args.steps} loss {out['loss']:.4f}")
    if not is_log_step(args, step):
        return
    dt = time.time() - meter["t"]
    rec = {"step": step, "lr": lr, "phase": strategy.phase(step), "tokens_per_s": meter["tokens"] * world / max(dt, 1e-9),
           "loss": out["loss"], "grad_norm": out["grad_norm"], "future_weight": future_weight(out["masks"])}
    diag = [ggsm.batch_diagnostics(u, a, args.margin) for u, a in out["embeddings"]]  # an SVD each: log steps only
    rec.update({k: float(np.mean([d[k] for d in diag])) for k in diag[0]})
    with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    log(f"step {step:5d}/{args.steps} | loss {rec['loss']:.4f} | lr {lr:.2e} | gnorm {rec['grad_norm']:.3f} | "
        f"w_future {rec['future_weight']:.4f} ({rec['phase']}) | align {rec['alignment']:.2f} "
        f"cos_uu {rec['cos_uu']:.2f} erank {rec['effective_rank']:.1f} | {rec['tokens_per_s']:.0f} tok/s")
    if rec["effective_rank"] < COLLAPSE_RANK or rec["cos_uu"] > COLLAPSE_COSINE:
        print(f"warning: step {step}: the user embeddings are collapsing: effective rank {rec['effective_rank']:.2f} "
              f"(warns below {COLLAPSE_RANK}), mean user-user cosine {rec['cos_uu']:.3f} (warns above {COLLAPSE_COSINE}); "
              f"a collapsed batch gives loss ln N = {math.log(args.batch_size):.3f} (or ln(3N - 2) = "
              f"{math.log(3 * args.batch_size - 2):.3f} with same-side negatives); see metrics.jsonl", file=sys.stderr, flush=True)
    meter.update(t=time.time(), tokens=0)

def start_metrics(path, start):
    """A fresh run starts a new log; a resumed one keeps what was logged before its checkpoint's step."""
    if os.path.exists(path):
        kept = [rec for _, rec in data.read_jsonl(path) if rec["step"] < start]  # a damaged line is named by file:line
        with open(path, "w") as f:
            f.writelines(json.dumps(rec) + "\n" for rec in kept)  # as log_step wrote them

# -----------------------------------------------------------------------------
# distributed setup and teardown

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

# -----------------------------------------------------------------------------

def main(argv=None):
    args, resume = parse_run(argv)
    ddp, rank, world, device = setup_dist()
    master = rank == 0
    log = (lambda msg: print(msg, flush=True)) if master else (lambda msg: None)
    accum = check_args(args, world)
    train_path, probe_path = prepare_paths(args, ddp, master, log)
    loaded = {}  # the records, read at most once (the small decoder's build, the in-memory path)

    def load():
        if not loaded:
            loaded["r"] = load_train_records(args, train_path, log)
        return loaded["r"]

    model_dir = prepare_model(args, load, train_path, ddp, master, device, log)
    auto = args.event_modalities == "auto" and not resume  # a resumed run keeps the form its spec chose
    events = resume["spec"].event_modalities if resume else [] if auto else \
        [m for m in args.event_modalities.split(",") if m]
    dataset, report = open_data(args, events, load, loaded, train_path, model_dir, ddp, master, log)
    unknown = [m for m in events if m not in report.modalities]
    if unknown:
        sys.exit(f"error: --event-modalities {','.join(unknown)}: not among the data's modalities {report.modalities}")

    def encoder_and_users(spec):
        torch.manual_seed(args.seed)  # LoRA A, adapters, projector, new token rows: the same init on every rank
        encoder, template, strategy = ckpt.build_encoder(spec, device)
        return encoder, template, strategy, dataset(template)
    spec = resume["spec"] if resume else make_spec(args, model_dir, report, events)
    encoder, template, strategy, train_set = encoder_and_users(spec)
    n_users, n_events = len(train_set), sum(report.modality_counts.values())
    if n_users < args.batch_size:
        sys.exit(f"error: {train_path}: {n_users} users, fewer than one global batch of {args.batch_size}")
    if train_set.n_cut:  # a history longer than --max-len loses its oldest events: say so before any work
        log(f"--max-len {args.max_len} cuts {train_set.n_cut} of {n_events} events ({train_set.n_cut / n_events:.0%}; "
            f"{train_set.n_cut / n_users:.1f} per user)" + ("" if auto else "; --event-modalities auto keeps one "
                                                              "position per event when the text form cuts many"))
    text_only = [m for m in report.modalities if m not in report.vector_dims]  # vectors of their own: not event form
    if auto and train_set.n_cut > AUTO_CUT * n_events and text_only:
        events = text_only
        log(f"--event-modalities auto: the text form cuts more than {AUTO_CUT:.0%} of the events: the event form (one "
            f"position per event) for {','.join(events)}")
        dataset, report = open_data(args, events, load, loaded, train_path, model_dir, ddp, master, log)
        spec = make_spec(args, model_dir, report, events)
        encoder, template, strategy, train_set = encoder_and_users(spec)
        if train_set.n_cut:
            log(f"--max-len {args.max_len} still cuts {train_set.n_cut} of {n_events} events in the event form")
    encoder.decoder.gradient_checkpointing = args.grad_ckpt
    encoder.pack = args.pack
    # LoRA froze the base inside build_encoder; only now wrap in DDP (DDP registers trainable params only)
    towers = DualTower(encoder, strategy.module).to(device).train()  # from_pretrained returns eval mode
    named = [(n, p) for n, p in towers.named_parameters() if p.requires_grad]
    opt = make_optimizer(named, args)
    if resume:
        start = restore(resume, towers, strategy, opt, named, rank, world, device)
        log(f"resumed from {resume['path']} at step {start}")
    else:
        start = 0
        torch.manual_seed(args.seed + 1000 * rank)  # per-rank dropout noise; the data order is shared
    model_ddp = DDP(towers, device_ids=[device.index] if device.type == "cuda" else None) if ddp else towers
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    loss_fn = partial(ggsm.info_nce, tau=args.tau, margin=args.margin, same_side=not args.no_same_side)

    if master:
        os.makedirs(args.out, exist_ok=True)
        ckpt.write_json(os.path.join(args.out, "args.json"), vars(args))
        start_metrics(os.path.join(args.out, "metrics.jsonl"), start)
        n_train = sum(p.numel() for _, p in named)
        log(f"torch {torch.__version__} | device {device} x{world} | model {model_dir} | {n_users} users | "
            f"mask {args.mask} | steps {args.steps} | batch {args.batch_size} = {args.micro_batch} x {accum} accum x {world} ranks | "
            f"trainable {n_train / 1e6:.2f}M")
    meter = {"t": time.time(), "tokens": 0}
    for step in range(start, args.steps):
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        batches = [micro_batch(train_set, micro_indices(n_users, step, args.batch_size, args.micro_batch, world, rank, m,
                                                        args.seed), device) for m in range(accum)]
        out = train_step(model_ddp, strategy, opt, batches, step, loss_fn, args.clip, rank, world, autocast)
        if not math.isfinite(out["loss"]):
            log(f"error: non-finite loss {out['loss']} at step {step}; stopping. The last good checkpoint in {args.out} is kept.")
            shutdown(ddp)
            sys.exit(2)
        if master:
            log_step(args, step, out, lr, strategy, meter, world, log)
        done = step + 1
        if done % args.ckpt_every == 0 or done == args.steps or done == args.halt_after:
            write_checkpoint(args, done, spec, towers, strategy, opt, named, n_users, world, master)
        if done == args.halt_after:
            log(f"halting after step {done} (--halt-after)")
            shutdown(ddp)
            return None

    if args.steps == start:
        log(f"nothing to do: the checkpoint is already at step {start}")
    result = None  # the trained encoder under the strategy's inference mask, probed by rank 0
    if master and not args.no_probe and probe_path:
        model.merge_lora(towers.encoder)  # training is over (the checkpoint is written): embed without the LoRA branch
        root = args.data_cache or os.path.join(os.path.dirname(os.path.abspath(probe_path)), "encoded")
        result = probe.run(towers.encoder, template, strategy, probe_path, device, name=args.mask,
                           checkpoint=os.path.join(args.out, "checkpoint"), out=os.path.join(args.out, "probe.json"),
                           skip_bad=args.skip_bad, baseline_spec=None if args.no_oracle else ckpt.oracle_spec(spec),
                           cache_root=None if args.data_cache == "off" else root, baselines=not args.no_oracle)
    shutdown(ddp)
    return result

if __name__ == "__main__":
    main()

"""Contrastive training of a decoder-only user encoder under every attention-mask strategy of the paper.

    python train.py                                     # embedded default: synthetic users + small decoder, GG-SM, probe
    torchrun --standalone --nproc_per_node=N train.py --model DIR|tiny --data train.jsonl --probe-data probe.jsonl \
             --mask NAME --steps S --out RUN_DIR      # NAME: a key of ggsm.STRATEGIES
    python train.py --out RUN_DIR --resume              # continue a stopped run where it left off

One optimizer step (train_step):
    batch (global, split over ranks and micro-steps) -> strategy.train_mask(step) -> user tower and answer tower
    through one shared LoRA backbone -> embeddings gathered across ranks -> InfoNCE (Eq. 6-8) -> backward
    -> GG-SM importance from the user tower's dL/dh (all-reduced) -> clip -> AdamW; then logs and checkpoint.

The data: --data is validated and tokenized once into an encoded cache (cache.py; by default in an `encoded` folder
beside the file) that every later run and every rank memory-maps, reading only its own micro-batches; rank 0 builds
it while the others wait. --data-cache off reads and encodes the file in memory instead (the same batches).

`--model tiny` first trains a small decoder with a causal-LM objective on the users' histories and queries (a `tokenizers`
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
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP

import cache
import data
import ggsm
import model
import pack
import probe

# a run warns that it collapses when a batch's user embeddings have an effective rank below COLLAPSE_RANK or a
# mean pairwise cosine above COLLAPSE_COSINE (measured: a collapsed run sits at cosine 0.99-1.00, effective rank
# 2.4-3.0; a learning one at cosine -0.03, effective rank 17-19 of 32)
COLLAPSE_RANK, COLLAPSE_COSINE = 2.0, 0.9
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data
    p.add_argument("--data", default=None, help="training JSONL (with answers); default: the embedded synthetic benchmark")
    p.add_argument("--probe-data", default=None, help="labelled JSONL probed after training; default: the synthetic probe users when --data is not given")
    p.add_argument("--synthetic-train", type=int, default=3000, help="users in the embedded benchmark's training file")
    p.add_argument("--synthetic-probe", type=int, default=5000, help="users in the embedded benchmark's probe file (5,000: the standard error of the mean AUC stays under 0.005)")
    p.add_argument("--max-len", type=int, default=256, help="user-side token budget (oldest events cut first)")
    p.add_argument("--answer-max-len", type=int, default=48, help="answer-side token budget")
    p.add_argument("--skip-bad", action="store_true", help="skip invalid JSONL lines (reported) instead of failing")
    p.add_argument("--cache", default="cache", help="folder for the synthetic data and small decoders built on demand")
    p.add_argument("--data-cache", default=None, metavar="DIR|off",
                   help="where --data and --probe-data are tokenized once and memory-mapped by every later run and rank "
                        "(cache.py); default: an 'encoded' folder beside each file; 'off': read and encode them in memory")
    # model
    # paper [backbone of the default run]: Qwen2.5-0.5B-Instruct (--model DIR); the default builds a small decoder
    p.add_argument("--model", default="tiny", help="Hugging Face folder (config.json, *.safetensors, tokenizer.json), or 'tiny' to build a small decoder from --data")
    p.add_argument("--preamble", default="", type=data.preamble_text, help="the template's opening sentence: 'paper' (App. A.1), any text, or '' for none (the default: see data.PREAMBLE)")
    p.add_argument("--event-modalities", default="", help="comma-separated modalities in the paper's event-level form: one position per event (frozen token embeddings pooled over the event's text, then the modality adapter) instead of subword tokens; default none")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="weights dtype on load")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (paper: 64)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha; scale = alpha / r (paper: 64)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA branch")
    p.add_argument("--lora-targets", default=LORA_TARGETS, help="comma-separated Linear names that get LoRA")
    p.add_argument("--pooling", default="token", choices=("token", "mean"), help="token: <USER> / EOS state (paper); mean: official code")
    p.add_argument("--projector", default="none", help="'none' or comma-separated dims after the hidden size, e.g. 512,128 (official code)")
    p.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=True,
                   help="standardise each tower's pooled state (BatchNorm, no affine; global-batch statistics in training, running ones at inference) before the L2 norm")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing per decoder block")
    # official code [micro-batches]: every sequence padded to 512; here packed rows, or with --no-pack length-sorted chunks
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                   help="run the users of each chunk packed into shared rows (block-diagonal masks, RoPE restarting per user; pack.py): the same numbers, no padding; also the probe's embeddings")
    p.add_argument("--chunks", type=int, default=None, help="each micro-batch runs as this many length-sorted chunks, each padded (or packed) on its own (less padding, the same loss); default 1 with --pack, which leaves no padding to cut, 4 without")
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
    p.add_argument("--mask", default="ggsm", choices=list(ggsm.STRATEGIES), help="attention-mask strategy (ggsm.STRATEGIES)")
    p.add_argument("--mask-warmup", type=float, default=0.1, help="GG-SM warm-up T_warm as a fraction of --steps (paper's Fig. 1: ~0.03; official code: 0.1)")
    p.add_argument("--capture-layer", default="last-block", help="'last-block' (input of the last block, default), 'final' (the paper's literal final hidden state) or a block index")
    p.add_argument("--importance-ema", type=float, default=0.0, help="EMA decay of the GG-SM importance (official effective value 0.0)")
    p.add_argument("--importance-norm", default="none", choices=ggsm.NORMALIZE, help="optional rescaling of gradient norms before the sigmoid (see ggsm.GradientImportance)")
    p.add_argument("--hybrid-segment", default="history", choices=ggsm.SEGMENTS, help="hybrid_mask, hybrid_mlp: relax causality inside the user-history segment only (paper) or open every future key of both towers ('all')")
    # optimisation
    # paper [lr, steps, batch]: 2e-4, 70k, 2,048 on Qwen2.5-0.5B; these defaults fit a CPU budget
    p.add_argument("--steps", type=int, default=250, help="optimizer steps (T_total of every mask schedule)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch: users per optimizer step over all ranks")
    p.add_argument("--micro-batch", type=int, default=32, help="users per rank per forward; batch-size = micro * accumulation * world size")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (paper: 2e-4 on Qwen2.5-0.5B)")
    p.add_argument("--new-lr-mult", type=float, default=5.0, help="learning-rate multiplier for what is trained from scratch (new token rows, modality adapters, projector, the strategy's module); LoRA gets --lr")
    p.add_argument("--lr-warmup", type=int, default=10, help="linear LR warm-up steps, then cosine decay to 0")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--clip", type=float, default=1.0, help="global grad-norm clip after accumulation (0 = off)")
    # paper [τ]: not given; official code 0.02, Q-Anchor code 0.07; 0.05 is a choice between them, not tuned
    p.add_argument("--tau", type=float, default=0.05, help="InfoNCE temperature")
    p.add_argument("--margin", type=float, default=0.1, help="false-negative margin of Eq. 8")
    p.add_argument("--no-same-side", action="store_true", help="drop the user-user and answer-answer negatives of Eq. 7")
    p.add_argument("--seed", type=int, default=0, help="initialisation (small decoder, LoRA, adapters), data order, dropout")
    p.add_argument("--data-seed", type=int, default=0, help="the embedded synthetic benchmark's users (kept apart from --seed, so that seeds compare on the same data)")
    # run
    p.add_argument("--out", default="runs/default", help="run folder: args.json, metrics.jsonl, checkpoint/, probe.json")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--ckpt-every", type=int, default=50, help="checkpoint every N steps (and at the end)")
    p.add_argument("--log-every", type=int, default=10, help="log a metrics.jsonl line every N steps")
    p.add_argument("--no-probe", action="store_true", help="skip the linear probe at the end")
    p.add_argument("--no-oracle", action="store_true", help="probe the trained encoder only, not also the untrained Oracle row of the same base")
    p.add_argument("--halt-after", type=int, default=0, help="stop right after step N's checkpoint as if killed (tests resume)")
    args = p.parse_args(argv)
    if args.chunks is None:
        args.chunks = 1 if args.pack else 4
    return args


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


def length_chunks(idx, lengths, chunks):
    """The indices idx sorted by lengths[i] and cut into at most `chunks` non-empty parts: each part, padded to
    its own longest, wastes less than the whole padded to the longest of all."""
    idx = sorted(idx, key=lambda i: lengths[i])
    return [part.tolist() for part in np.array_split(np.asarray(idx, dtype=np.int64), chunks) if len(part)]


def micro_batch(dataset, idx, chunks, device):
    """The users idx as length_chunks, each collated (padded to its own longest)."""
    return [data.collate([dataset[i] for i in part]).to(device) for part in length_chunks(idx, dataset.lengths, chunks)]


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
# the two towers on one backbone, wrapped as one module so DDP sees a single forward per micro-step

class DualTower(nn.Module):
    def __init__(self, encoder, mask_module):
        super().__init__()
        self.encoder = encoder  # encoder.pack: run each side's users packed into shared rows (pack.py)
        self.mask_module = mask_module  # the strategy's trainable module (hybrid_mlp's MLPs), else None

    def forward(self, chunks, user_masks, answer_masks, capture_layer=None):
        """chunks: the parts of one micro-batch (data.Batch each, padded to its own longest), with their masks.
        -> pooled (projected) states of both towers, rows in chunk order, before encoder.finish; and per chunk
        (h, packing): the user tower's h at capture_layer (None when not captured), and the Packing it is packed
        by (False when the rows are padded)."""
        us, as_, hs = [], [], []
        for chunk, user_mask, answer_mask in zip(chunks, user_masks, answer_masks):
            user, answer = chunk.user, chunk.answer
            packing = pack.Packing(user.attention_mask, key_cost=self.encoder.key_cost) if self.encoder.pack else False
            out = self.encoder(user.input_ids, user.attention_mask, user.pool_index, mask=user_mask, vectors=user.vectors,
                               vector_pos=user.vector_pos, return_layer=capture_layer, finish=False, packing=packing)
            u, h = out if capture_layer is not None else (out, None)
            if h is not None:
                h.retain_grad()  # GG-SM reads dL/dh_j of the user tower after backward (Eq. 5)
            us.append(u)
            hs.append((h, packing))
            as_.append(self.encoder(answer.input_ids, answer.attention_mask, answer.pool_index, mask=answer_mask,
                                    finish=False))
        return torch.cat(us), torch.cat(as_), hs


def _measured(mask, attention_mask, seen):
    """The mask unchanged; its mean future weight appended to `seen` (for a per-layer callable, at each call)."""
    if not callable(mask):
        seen.append(ggsm.mean_future_weight(mask, attention_mask))
        return mask

    def measured(layer_idx, h):
        m = mask(layer_idx, h)
        seen.append(ggsm.mean_future_weight(m, attention_mask))
        return m

    return measured


def train_step(towers, strategy, optimizer, micro_batches, step, loss_fn, clip=1.0, rank=0, world=1,
               autocast=nullcontext(), diagnose=None):
    """
    One optimizer step over this rank's micro-batches (each a data.Batch with answers, or a list of them: the
    length-sorted chunks of one micro-batch, each padded to its own longest, so less padding and the same
    loss). For each: the strategy's masks for both towers, forward, loss_fn(user, answer) over the batch gathered
    from every rank (InfoNCE, Eq. 6-8), backward, and the user tower's dL/dh for the gradient importance (Eq. 5).
    Then clip, optimizer step and strategy.end_step (every rank: it may all-reduce).
    towers: a DualTower, or DDP around one. Returns {"loss", "grad_norm", "tokens", "future_weight"} (the mean
    future weight of the user masks as used), plus the mean over micro-steps of diagnose(user, answer) (a dict
    of floats on the gathered embeddings, e.g. ggsm.batch_diagnostics) when given; on a non-finite loss it
    returns before the optimizer step.
    """
    micro_batches = [mb if isinstance(mb, (list, tuple)) else [mb] for mb in micro_batches]
    n = len(micro_batches)
    capture = strategy.capture_layer if strategy.wants_gradients(step) else None
    encoder = (towers.module if isinstance(towers, DDP) else towers).encoder
    loss_sum, tokens, weights, diag = 0.0, 0, [], []
    for m, chunks in enumerate(micro_batches):
        user_masks = [_measured(strategy.train_mask(step, c.user.attention_mask, torch.float32, history=c.user.history),
                                c.user.attention_mask, weights) for c in chunks]
        answer_masks = [strategy.train_mask(step, c.answer.attention_mask, torch.float32, tower="answer") for c in chunks]
        # no gradient all-reduce on the non-final micro-steps of an accumulation
        sync = towers.no_sync() if (isinstance(towers, DDP) and m < n - 1) else nullcontext()
        with sync:
            with autocast:
                u, a, hs = towers(chunks, user_masks, answer_masks, capture)
            # negatives from the global batch (Eq. 7); every rank computes the same global loss. Standardisation
            # and L2 norm after the gather: batch statistics of the global batch, the same on every rank
            ug = encoder.finish(gather_keep_grad(u.float(), rank, world), "user")
            ag = encoder.finish(gather_keep_grad(a.float(), rank, world), "answer")
            loss = loss_fn(ug, ag)
            if diagnose is not None:
                diag.append(diagnose(ug, ag))
            # x world: DDP averages gradients over ranks, each holding only its own rows' share of dL
            (loss * world / n).backward()
        for (h, packing), c in zip(hs, chunks):
            if h is not None and h.grad is not None:
                g = packing.unpack(h.grad) if packing else h.grad  # (B, L, D): position j of each user
                strategy.accumulate(g.float() * n / world, c.user.attention_mask)  # back to dL/dh of the step's loss
        loss_sum += loss.item() / n
        tokens += sum(int(c.user.attention_mask.sum() + c.answer.attention_mask.sum()) for c in chunks)
    out = {"loss": loss_sum, "grad_norm": float("nan"), "tokens": tokens,
           "future_weight": float(np.mean(weights)) if weights else float("nan")}
    out.update({k: float(np.mean([d[k] for d in diag])) for k in (diag[0] if diag else ())})
    if not math.isfinite(loss_sum):
        return out
    params = [p for g in optimizer.param_groups for p in g["params"]]
    out["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf")).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    strategy.end_step(step)  # GG-SM: all-reduce the importance, EMA, freeze at T_warm - 1
    return out


# -----------------------------------------------------------------------------
# the run spec (probe.RunSpec: what rebuilds the encoder, stored in the checkpoint)

def make_spec(args, model_dir, report):
    return probe.RunSpec(
        base_model=os.path.abspath(model_dir), modalities=report.modalities, vector_dims=report.vector_dims,
        mask=args.mask, total_steps=args.steps, warmup_steps=int(round(args.mask_warmup * args.steps)),
        mask_options={"capture_layer": args.capture_layer, "ema": args.importance_ema, "normalize": args.importance_norm,
                      "segment": getattr(args, "hybrid_segment", "all")},  # a run saved before the option: the old behaviour
        dtype=args.dtype,
        lora={"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout, "targets": args.lora_targets.split(",")},
        max_len=args.max_len, answer_max_len=args.answer_max_len, pooling=args.pooling, standardize=args.standardize,
        projector=None if args.projector == "none" else [int(d) for d in args.projector.split(",")],
        event_modalities=[m for m in getattr(args, "event_modalities", "").split(",") if m],
        preamble=getattr(args, "preamble", ""))  # a run saved before the option had none


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
    """Train a BPE tokenizer and a small Qwen2-layout decoder on the records' user side (histories, queries; never
    the answers); save in HF layout."""
    t0 = time.time()
    torch.manual_seed(args.seed)
    tmp = out_dir + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    # the users' side only (histories, queries): the answers are the contrastive targets, so a decoder that had
    # learnt to predict them would not be the untrained Oracle the paper compares against
    preamble = getattr(args, "preamble", "")  # a run saved before the option had none
    tok = data.train_tokenizer(data.record_texts(records, answers=False, preamble=preamble), args.tiny_vocab)
    # the Template adds its tag / <VEC> / <USER> / <GLOBAL> tokens to the vocabulary before the decoder exists,
    # so the pretrained decoder has real rows for them
    template = data.Template(tok, report.modalities, report.vector_dims, max_len=args.max_len, global_token=True,
                             max_answer_len=args.answer_max_len, preamble=preamble)
    tok.save(os.path.join(tmp, "tokenizer.json"))
    cfg = model.ModelConfig(
        model_type="qwen2", vocab_size=tok.get_vocab_size(), hidden_size=args.tiny_hidden,
        intermediate_size=args.tiny_hidden * 3, num_hidden_layers=args.tiny_layers,
        num_attention_heads=args.tiny_heads, num_key_value_heads=args.tiny_kv_heads,
        head_dim=args.tiny_hidden // args.tiny_heads, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
        attention_bias=True, qk_norm=False, tie_word_embeddings=True, max_position_embeddings=4096,
        bos_token_id=None, eos_token_id=template.eos_id)
    dec = model.Decoder(cfg).to(device)
    seqs = [template.encode_user(r)["input_ids"] for r in records]  # one LM sequence per user: history + query + <USER>
    lengths = [len(s) for s in seqs]
    opt = torch.optim.AdamW(dec.parameters(), lr=args.tiny_lr, weight_decay=0.01, betas=(0.9, 0.95))
    rng = np.random.default_rng(args.seed)
    first = last = None
    for step in range(args.tiny_steps):
        idx = rng.choice(len(seqs), size=min(args.tiny_batch, len(seqs)), replace=False)
        n_targets = sum(lengths[i] - 1 for i in idx)
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        # chunks (one by default) packed or padded: the mean over all the batch's target tokens is the sum of the
        # chunks' sums / n_targets, so the gradient is the one of a single padded batch
        for part in length_chunks(idx, lengths, args.chunks):
            ids, am = data.pad([seqs[i] for i in part], template.pad_id)
            ids, am = ids.to(device), am.to(device)
            mask = ggsm.causal_mask(am, torch.float32)
            packed = args.pack and pack.Packing(am, key_cost=pack.key_cost(cfg))
            hidden = packed.decode(dec, mask, ids) if packed else dec(input_ids=ids, mask=mask)  # (b, L, D)
            real = am[:, 1:] == 1                                                # slot t predicts token t + 1
            logits = dec.logits(hidden[:, :-1][real])                            # (n targets, V): no padded slots
            part_loss = F.cross_entropy(logits.float(), ids[:, 1:][real], reduction="sum") / n_targets
            part_loss.backward()
            loss += part_loss.item()
        for g in opt.param_groups:  # cosine decay after a short warm-up
            g["lr"] = args.tiny_lr * min(1.0, (step + 1) / 10) * 0.5 * (1 + math.cos(math.pi * step / args.tiny_steps))
        torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
        opt.step()
        first = loss if first is None else first
        last = loss
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

def parse_run(argv=None):
    """The command line. With --resume: the run's own arguments (but for the few a resume may change) and its
    checkpoint's state.json (with "path", and "spec" as a probe.RunSpec); else (args, None)."""
    args = get_args(argv)
    if not args.resume:
        return args, None
    ckpt = find_checkpoint(args.out)
    if ckpt is None:
        sys.exit(f"error: --resume: no checkpoint in {args.out}")
    with open(os.path.join(args.out, "args.json")) as f:
        saved = {**vars(get_args([])), **json.load(f)}  # a flag newer than the run: its default
    saved.update(resume=True, halt_after=args.halt_after, no_probe=args.no_probe, no_oracle=args.no_oracle, out=args.out)
    with open(os.path.join(ckpt, "state.json")) as f:
        state = json.load(f)
    state["path"] = ckpt
    try:
        state["spec"] = probe.RunSpec.from_dict(state["spec"], where=os.path.join(ckpt, "state.json"))
    except ValueError as e:
        sys.exit(f"error: --resume: {e}")
    return argparse.Namespace(**saved), state


def check_args(args, world):
    """Fail on bad arguments before any work; -> micro-steps per optimizer step."""
    if args.batch_size % (args.micro_batch * world):
        sys.exit(f"error: --batch-size {args.batch_size} is not a multiple of --micro-batch {args.micro_batch} x world size {world}")
    if args.chunks < 1:
        sys.exit(f"error: --chunks {args.chunks}: must be >= 1")
    if args.capture_layer not in ("last-block", "final") and not args.capture_layer.isdigit():
        sys.exit(f"error: --capture-layer {args.capture_layer}: expected 'last-block', 'final' or a block index")
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
            log(f"writing the embedded synthetic benchmark to {syn_dir}")
            data.write_synthetic(syn_dir, args.synthetic_train, args.synthetic_probe, seed=args.data_seed)
        if ddp:
            dist.barrier()
        train_path = os.path.join(syn_dir, "train.jsonl")
        probe_path = probe_path or os.path.join(syn_dir, "probe.jsonl")
    return train_path, probe_path


def load_train_records(args, train_path, log):
    """-> (training records, their LoadReport): the whole file in memory (--data-cache off, and the small decoder's build)."""
    try:
        records, report = data.load_records(train_path, skip_bad=args.skip_bad, require=("answer",))
    except ValueError as e:
        sys.exit(f"error: {e}")
    if report.n_bad:
        log(str(report))
    return records, report


def check_event_modalities(args, report):
    unknown = [m for m in getattr(args, "event_modalities", "").split(",") if m and m not in report.modalities]
    if unknown:
        sys.exit(f"error: --event-modalities {','.join(unknown)}: not among the data's modalities {report.modalities}")


# -----------------------------------------------------------------------------
# the encoded cache (cache.py): rank 0 builds it, every rank memory-maps it and reads only its own users

def data_cache_root(args, path):
    return os.path.join(os.path.dirname(os.path.abspath(path)), "encoded") if args.data_cache is None else args.data_cache


def train_template(args, model_dir, report):
    """The template probe.build_encoder makes for a run of these arguments on a file with this report."""
    return data.Template(os.path.join(model_dir, "tokenizer.json"), report.modalities, report.vector_dims,
                         max_len=args.max_len, global_token=ggsm.STRATEGIES[args.mask].global_token,
                         max_answer_len=args.answer_max_len, preamble=getattr(args, "preamble", ""))


def ensure_train_cache(args, train_path, model_dir, ddp, master, log):
    """-> (the encoded cache folder of the training file, its LoadReport). Rank 0 builds it when missing; the
    others wait for its folder name (an error on rank 0 stops every rank with the same message)."""
    result = None
    if master:
        # what decides the encoding besides the file: the tokenizer's bytes and the template's options
        settings = {"tokenizer_sha256": cache.file_sha256(os.path.join(model_dir, "tokenizer.json")),
                    "max_len": args.max_len, "answer_max_len": args.answer_max_len,
                    "global_token": ggsm.STRATEGIES[args.mask].global_token, "modalities": "the file's",
                    "preamble": getattr(args, "preamble", "")}
        try:
            result = ("ok", cache.ensure(train_path, data_cache_root(args, train_path), settings,
                                         partial(train_template, args, model_dir), require=("answer",),
                                         skip_bad=args.skip_bad, with_answer=True, log=log))
        except ValueError as e:
            result = ("error", str(e))
    if ddp:
        box = [result]
        dist.broadcast_object_list(box, src=0)  # also the barrier: the folder is complete when its name arrives
        result = box[0]
    if result[0] == "error":
        sys.exit(f"error: {result[1]}")
    report = cache.read_report(result[1])
    if report.n_bad:
        log(str(report))
    return result[1], report


def prepare_model(args, load_records, train_path, ddp, master, device, log):
    """-> the base model folder: --model, or the small decoder built (once, by rank 0) from the training data.
    load_records() -> (records, report) is called only when the decoder has to be built."""
    if args.model != "tiny":
        return args.model
    # cached by everything that shapes it: the data file's bytes and the --tiny-* / length / seed flags
    recipe = [file_digest(train_path), args.max_len, args.answer_max_len, args.seed, "user-side"]
    if getattr(args, "preamble", ""):  # its text shapes the tokenizer and the LM sequences (none: the former key)
        recipe.append(args.preamble)
    recipe += [getattr(args, k) for k in sorted(vars(args)) if k.startswith("tiny_")]
    model_dir = os.path.join(args.cache, "tiny-" + hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:12])
    if master and not os.path.isfile(os.path.join(model_dir, "model.safetensors")):
        log(f"building the small decoder in {model_dir} (causal-LM objective on {train_path})")
        build_tiny_decoder(args, *load_records(), model_dir, device, log)
    if ddp:
        dist.barrier()
    return model_dir


def restore(state, towers, strategy, opt, named, rank, world, device):
    """Load a checkpoint's trainable tensors, strategy state, optimizer state and this rank's RNG; -> its step."""
    ckpt = state["path"]
    probe.load_trainable(towers.encoder, strategy, load_file(os.path.join(ckpt, "trainable.safetensors"), device=str(device)),
                         state["strategy"])
    load_optimizer_tensors(opt, named, load_file(os.path.join(ckpt, "optimizer.safetensors"), device=str(device)))
    rng = state["rng"].get(str(rank))
    if rng is not None and len(state["rng"]) == world:
        torch.set_rng_state(torch.tensor(rng, dtype=torch.uint8))
    else:  # another world size: a fresh, reproducible stream
        torch.manual_seed(state["args"]["seed"] + 1000 * rank + state["step"])
    return state["step"]


def write_checkpoint(args, step, spec, towers, strategy, opt, named, n_users, world, master):
    """Every rank joins (the RNG gather and the replica check are collectives); rank 0 writes."""
    tensors, plain = probe.trainable_tensors(towers.encoder, strategy)
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
        save_checkpoint(args.out, tensors, optimizer_tensors(opt, named), meta)


def start_metrics(path, start):
    """A fresh run starts a new log; a resumed one keeps what was logged before its checkpoint's step."""
    if os.path.exists(path):
        kept = [rec for _, rec in data.read_jsonl(path) if rec["step"] < start]  # a damaged line is named by file:line
        with open(path, "w") as f:
            f.writelines(json.dumps(rec) + "\n" for rec in kept)  # as log_step wrote them


def is_log_step(args, step):
    return step % args.log_every == 0 or step + 1 == args.steps


def log_step(args, step, out, lr, strategy, meter, world, log):
    """The progress bar (on a terminal; off one, a line at each quarter of the run), and every --log-every steps a metrics.jsonl line and a log line (out then
    holds the collapse diagnostics: train_step is given them on these steps only)."""
    done = step + 1
    meter["tokens"] += out["tokens"]
    bar = "#" * (30 * done // args.steps)  # on stderr: the log lines go to stdout
    probe.progress(done, args.steps, f"[{bar:<30}] {done}/{args.steps} loss {out['loss']:.4f}")
    if not is_log_step(args, step):
        return
    dt = time.time() - meter["t"]
    rec = {"step": step, "lr": lr, "phase": strategy.phase(step), "tokens_per_s": meter["tokens"] * world / max(dt, 1e-9)}
    rec.update((k, v) for k, v in out.items() if k != "tokens")
    with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    log(f"step {step:5d}/{args.steps} | loss {rec['loss']:.4f} | lr {lr:.2e} | gnorm {rec['grad_norm']:.3f} | "
        f"w_future {rec['future_weight']:.4f} ({rec['phase']}) | align {rec['alignment']:.2f} "
        f"cos_uu {rec['cos_uu']:.2f} erank {rec['effective_rank']:.1f} | {rec['tokens_per_s']:.0f} tok/s")
    if rec["effective_rank"] < COLLAPSE_RANK or rec["cos_uu"] > COLLAPSE_COSINE:
        print(f"warning: step {step}: the user embeddings are collapsing: effective rank {rec['effective_rank']:.2f} "
              f"(warns below {COLLAPSE_RANK}), mean user-user cosine {rec['cos_uu']:.3f} (warns above "
              f"{COLLAPSE_COSINE}); a collapsed batch gives loss "
              f"ln N = {math.log(args.batch_size):.3f} (or ln(3N - 2) = {math.log(3 * args.batch_size - 2):.3f} with "
              "same-side negatives); see metrics.jsonl", file=sys.stderr, flush=True)
    meter.update(t=time.time(), tokens=0)


def main(argv=None):
    args, resume = parse_run(argv)
    ddp, rank, world, device = setup_dist()
    master = rank == 0
    log = (lambda msg: print(msg, flush=True)) if master else (lambda msg: None)
    accum = check_args(args, world)
    train_path, probe_path = prepare_paths(args, ddp, master, log)
    cached = args.data_cache != "off"
    if cached and getattr(args, "event_modalities", ""):
        # the cache holds token ids; the event form turns texts into vectors of the base model's embeddings
        log("--event-modalities: the encoded cache holds the text form only; reading the data in memory")
        cached = False
    loaded = {}  # the records, read at most once: for the small decoder's build and/or the in-memory path

    def load():
        if not loaded:
            loaded["r"] = load_train_records(args, train_path, log)
        return loaded["r"]

    model_dir = prepare_model(args, load, train_path, ddp, master, device, log)
    if cached:
        loaded.clear()  # the decoder is built: the records are not needed any more
        folder, report = ensure_train_cache(args, train_path, model_dir, ddp, master, log)
    else:
        records, report = load()
    check_event_modalities(args, report)
    spec = resume["spec"] if resume else make_spec(args, model_dir, report)

    torch.manual_seed(args.seed)  # LoRA A, adapters, projector, new token rows: the same init on every rank
    encoder, template, strategy = probe.build_encoder(spec, device)
    encoder.decoder.gradient_checkpointing = args.grad_ckpt
    encoder.pack = args.pack
    train_set = cache.EncodedDataset(folder, template) if cached else data.UserDataset(records, template)
    n_users = len(train_set)
    if n_users < args.batch_size:
        sys.exit(f"error: {train_path}: {n_users} users, fewer than one global batch of {args.batch_size}")
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
        probe.write_json(os.path.join(args.out, "args.json"), vars(args))
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
                                                        args.seed), args.chunks, device) for m in range(accum)]
        diagnose = partial(ggsm.batch_diagnostics, margin=args.margin) if is_log_step(args, step) else None  # an SVD
        out = train_step(model_ddp, strategy, opt, batches, step, loss_fn, args.clip, rank, world, autocast, diagnose)
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
        result = probe.run(towers.encoder, template, strategy, probe_path, device, name=args.mask,
                           checkpoint=os.path.join(args.out, "checkpoint"), out=os.path.join(args.out, "probe.json"),
                           skip_bad=args.skip_bad, baseline_spec=None if args.no_oracle else probe.oracle_spec(spec),
                           cache_root=data_cache_root(args, probe_path) if cached else None)
    shutdown(ddp)
    return result


if __name__ == "__main__":
    main()

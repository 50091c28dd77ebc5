"""The small default decoder: a stand-in for a pretrained LLM, built from the training data in a minute on a CPU.

A byte-level BPE tokenizer and a small Qwen2-layout decoder are trained with a causal-LM objective on the users'
histories and queries, then saved as config.json + model.safetensors + tokenizer.json, so the contrastive stage
starts, like the paper's, from a causally pretrained decoder loaded through the same Decoder.from_pretrained path
as a real checkpoint. train.py --model tiny (the default) calls folder() and build().
"""
import hashlib
import json
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import data
import ggsm
import model
import pack
from checkpoint import file_sha256


def train_tokenizer(texts, vocab_size=2000, special_tokens=("<|endoftext|>", "<|pad|>")):
    """A byte-level BPE tokenizer (GPT-2/Qwen style: every byte representable, no unknown token)
    trained on an iterator of strings. The special tokens get the first ids."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok



def record_texts(records, answers=True, preamble=""):
    """Every event text, query and (unless answers=False) answer, spelled as the template spells them
    (' text;' with the leading space), and the template's preamble once per record, so BPE merges learned from
    this corpus are the ones the template uses."""
    for rec in records:
        if preamble:
            yield preamble
        for ev in rec["events"]:
            if ev.get("text") is not None:
                yield data.event_piece(ev["text"])
        yield " Instruction:" + (" " + rec["query"] if rec.get("query") else "")
        if answers and rec.get("answer"):
            yield rec["answer"]


def folder(args, train_path):
    """The decoder's folder under --cache, named by a hash of everything that shapes it: the data file's bytes and
    the --tiny-* / length / seed / preamble flags (another data file or flag builds another decoder)."""
    recipe = [file_sha256(train_path)[:12], args.max_len, args.answer_max_len, args.seed, "user-side"]
    if args.preamble:  # its text shapes the tokenizer and the LM sequences (none: the former key)
        recipe.append(args.preamble)
    recipe += [getattr(args, k) for k in sorted(vars(args)) if k.startswith("tiny_")]
    return os.path.join(args.cache, "tiny-" + hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:12])


def build(args, records, report, out_dir, device, log):
    """Train a BPE tokenizer and a small Qwen2-layout decoder on the records' user side (histories, queries; never
    the answers); save in HF layout."""
    t0 = time.time()
    torch.manual_seed(args.seed)
    tmp = out_dir + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    # the users' side only (histories, queries): the answers are the contrastive targets, so a decoder that had
    # learnt to predict them would not be the untrained Oracle the paper compares against
    preamble = args.preamble
    tok = train_tokenizer(record_texts(records, answers=False, preamble=preamble), args.tiny_vocab)
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
        ids, am = data.pad([seqs[i] for i in sorted(idx, key=lambda i: lengths[i])], template.pad_id)  # (b, L)
        ids, am = ids.to(device), am.to(device)
        mask = ggsm.causal_mask(am, torch.float32)
        packed = args.pack and pack.Packing(am, key_cost=pack.key_cost(cfg))
        hidden = packed.decode(dec, mask, ids) if packed else dec(input_ids=ids, mask=mask)  # (b, L, D)
        real = am[:, 1:] == 1                                                # slot t predicts token t + 1
        logits = dec.logits(hidden[:, :-1][real])                            # (n targets, V): no padded slots
        loss = F.cross_entropy(logits.float(), ids[:, 1:][real], reduction="sum") / n_targets
        loss.backward()
        loss = loss.item()
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

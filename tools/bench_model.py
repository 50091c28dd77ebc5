"""
Speed and memory of our encoder against transformers + peft (a benchmark, not a test): each section is a
subcommand that prints a markdown table; --out writes JSON.

    python -m tools.bench_model all --out bench.json             # train, embed, ggsm, padding, embedded, paperlike
    python -m tools.bench_model SECTION [--quick] [--gpu-size] [--reps N] [--threads T] [--out FILE]
        SECTION: parity | train | embed | ggsm | softmask | scaling | padding | embedded | paperlike | levers | compile

Ours is model.py + LoRA; theirs is transformers + peft, the stack of the official GG-SM code
(github.com/JhCircle/Deepfind-GGSM). One random Qwen2-architecture checkpoint is written with transformers'
save_pretrained(safe_serialization=True) (CPU default: hidden 512, 8 layers, 8 heads, 2 KV heads, intermediate 1408,
vocab 32000; --gpu-size: the Qwen2.5-0.5B shape, hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864,
vocab 151936; --quick: a tiny one, what tests/test_bench.py runs) and loaded
  (a) "ours":   model.Decoder.from_pretrained + model.add_lora on the seven projections;
  (b) "theirs": transformers.AutoModelForCausalLM.from_pretrained(attn_implementation="sdpa"), its base
                `.model` for hidden states, + peft.get_peft_model(LoraConfig(same r, alpha, dropout 0,
                same seven target modules)), with our lora_A / lora_B copied in (B random and small, so
                the adapters change the function) -- the two compute the same function.
Both get the same 4D additive float mask from ggsm.py (HF 5.x masking_utils returns a 4D mask as is),
pool the same token (<USER> / the last real token) and run fp32 on CPU, bf16 autocast on CUDA.
The contrastive step of both sides is written here (contrastive_loss, make_train_step); the ggsm and padding
sections run train.py's own step (train.DualTower, train.train_step, train.micro_batch) on our side.

  parity   (with every run; alone by name) (a) and (b) give the same InfoNCE loss and the same gradient on one LoRA
           tensor for one batch, otherwise the timings would not be of the same work.
  train    one full contrastive step (user tower + answer tower forward and backward through one LoRA
           backbone, InfoNCE of ggsm.info_nce, grad clip, AdamW) on the same right-padded batch, GG-SM's
           warm-up mask at step 0 (soft future weight 0.5): non-pad tokens/s and peak memory.
  embed    inference (no grad) under the bidirectional mask: users/s and peak memory.
  ggsm     ours only: train.train_step in GG-SM's warm-up (capture of h_k at strategy.capture_layer, its gradient
           read after backward, strategy.accumulate, strategy.end_step, mask rebuilt from the importance) against
           the same step under the bidirectional strategy. Target: <= 2% overhead.
  softmask ours only, under bf16 autocast (CPU's when there is no GPU): the train step with GG-SM's soft mask
           kept in fp32 (Decoder.forward does so because bf16 cannot hold the log-weights; attention then runs
           in fp32) against the same mask rounded to bf16 first (bf16 attention, the weights erased): the cost
           of keeping the weights.
  scaling  the train step at L = 128, 256, 512, 1024 (quick: 16, 32, 64) with B*L fixed (same tokens per
           step), so the growth is the attention's share.
  padding  "what a user of the official code pays": one epoch of the embedded synthetic benchmark
           (tools.synthetic.write_synthetic) through our UserEncoder, packing off, and a GG-SM schedule, with
           dynamic padding (train.micro_batch: each micro-batch one padded batch, its users shortest first, padded
           to its longest; --chunks and its length-sorted chunks are gone) against the official recipe's padding
           of every sequence, user and answer, to 512. Both with OUR model, so only the padding differs; padded
           keys are masked in both, so the two epochs compute the same losses (reported as a check).
  embedded the workload a user runs: B users per step drawn from the embedded synthetic benchmark's users as train.py
           encodes them (a 1,024-token BPE, max_len 256, answers 48; median about 130 tokens), a new batch each
           repetition, the same users on both sides: ours packed (pack.py), theirs padded to each batch's longest
           (dynamic padding, their common practice). Train step (tokens/s, peak memory) and embedding (users/s).
  paperlike the same on long-tailed histories: lognormal lengths around a median of 200, clipped to [16, 1024]
           (the paper's history budget), answers 16-64 tokens.
  levers   (by name only, not in all) ours, the embedded workload's train step with every lever on and with one
           off at a time: packing (off: one micro-batch padded to its longest user, what train.py --no-pack runs;
           no longer length-sorted chunks), SDPA's enable_gqa, LoRA scaled at rank r and added by addmm.
  compile  (by name only, not in all) ours, the packed train step of the embedded workload with each decoder block
           under torch.compile (inductor, dynamic shapes) against eager: compile time and steady-state ratio.
  limit    (with every run) this machine's dense matmul throughput: the best of six torch.mm of 2048 x 2048 (CPU,
           fp32) or 8192 x 8192 (CUDA, bf16). The workload rows divide each side's model FLOP/s by it: model FLOPs
           count the matmuls of the real tokens only (model_flops: the projections, LoRA, attention over each
           user's own n x n block; the backward to the activations and the LoRA factors; tested against torch's
           FlopCounterMode), so padding a side computes is waste the fraction does not reward.
Timing: repetitions are interleaved (ours, theirs, ours, theirs...) after a warm-up, medians reported (the workload
sections: totals over their batches).
Memory: on CUDA torch.cuda.max_memory_allocated over one step minus what was allocated before it; on CPU
each side runs alone in a fresh process (multiprocessing forkserver) that loads the model, resets the peak
resident set (/proc/self/clear_refs), runs two steps and reads VmHWM: "step peak" is that peak minus the
resident set after loading (the memory a step adds on top of the weights). The load average is reported:
other work on the machine slows both sides alike but widens the spread.

all --out F also writes "summary": train_equal_padding_ratio (train), train_embedded_ratio, train_paperlike_ratio,
memory_ratio (the embedded train step's peak), embed_ratio (embedding the embedded workload), ggsm_overhead (a
fraction), limit_fraction_ours / limit_fraction_theirs (the embedded train step); ratios are ours / theirs.
Targets (measured, not asserted): on the workloads train >= 1.3x transformers+peft tokens/s and <= 0.8x peak
memory, embedding >= 1.3x; at equal padding >= 1.0x; GG-SM overhead <= 2%.

transformers and peft are dev requirements (requirements-dev.txt), imported only by the benchmarks and tests.
"""
import argparse
import contextlib
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
import warnings
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

import data
import ggsm
import model
import pack
import train
from checkpoint import write_json
from tools import synthetic, tiny_decoder

LORA_TARGETS = model.LORA_TARGETS  # the seven projections (train.py's default --lora-targets), on both sides
SIZES = {  # Qwen2 shapes; tied embeddings as in Qwen2.5-0.5B
    "cpu": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=1408, vocab_size=32000),
    "gpu": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                intermediate_size=4864, vocab_size=151936),
    "quick": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=1000),
}
# per-section workloads: (full, quick). B users per step; L the padded user length; answers up to A tokens.
WORK = {
    "train": (dict(B=8, L=256, A=32), dict(B=4, L=32, A=8)),
    "embed": (dict(B=16, L=256), dict(B=4, L=32)),
    "ggsm": (dict(B=8, L=256, A=32), dict(B=4, L=32, A=8)),
    "scaling": (dict(lengths=(128, 256, 512, 1024), tokens=2048, A=32), dict(lengths=(16, 32, 64), tokens=128, A=8)),
    "padding": (dict(users=64, B=16, pad_to=512), dict(users=32, B=8, pad_to=128)),
    # the workloads a user runs: B users per step drawn from a length distribution, a new batch each repetition
    # embedded: the embedded synthetic benchmark's users as train.py encodes them (max_len 256, answers 48)
    "embedded": (dict(B=8, users=400, max_len=256, answer_max_len=48), dict(B=4, users=48, max_len=64, answer_max_len=16)),
    # paperlike: long-tailed histories up to the paper's 1,024 tokens: lognormal around a median, clipped
    "paperlike": (dict(B=8, median=200, sigma=0.9, min=16, max=1024, A=(16, 64)),
                  dict(B=4, median=24, sigma=0.9, min=4, max=128, A=(4, 16))),
}
TAU, MARGIN = 0.05, 0.1  # train.py's defaults
LORA_B_STD = 0.02  # B random and small: the adapters change the function, so LoRA gradients are not trivial


def write_checkpoint(path, size, seed=0):
    """A random Qwen2 checkpoint written by transformers itself (config.json + model.safetensors)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(**SIZES[size], rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096,
                      tie_word_embeddings=True, use_sliding_window=False)
    Qwen2ForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


class Contender:
    """One side of the comparison: `module` holds the parameters, `hidden(ids, mask)` is (B, L, D) after the
    final norm; with return_layer=k it also returns the tensor entering block k (ours only, for GG-SM)."""

    def __init__(self, name, module, hidden):
        self.name, self.module, self.hidden = name, module, hidden


def load_ours(ckpt, r, alpha, device, seed=0):
    dec = model.Decoder.from_pretrained(ckpt, dtype=torch.float32, device=device)
    torch.manual_seed(seed)  # lora_A (Kaiming) and lora_B (below) are the same on every load
    model.add_lora(dec, LORA_TARGETS, r=r, alpha=alpha, dropout=0.0)
    with torch.no_grad():
        for m in dec.modules():
            if isinstance(m, model.LoRALinear):
                m.lora_B.normal_(0.0, LORA_B_STD)
    dec.train()

    def hidden(ids, mask, return_layer=None, am=None):
        """am given: the users packed into shared rows (pack.py), the hidden states returned unpacked."""
        if am is None:
            return dec(input_ids=ids, mask=mask, return_layer=return_layer)
        return pack.Packing(am, key_cost=pack.key_cost(dec.config)).decode(dec, mask, ids)

    return Contender("ours", dec, hidden)


def load_theirs(ckpt, r, alpha, device, lora_from=None):
    """transformers + peft; lora_from: our Decoder whose lora_A / lora_B are copied in (strict by name)."""
    import transformers
    from peft import LoraConfig, get_peft_model
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices from peft's calls into transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="sdpa", dtype=torch.float32)
    hf = hf.to(device)
    pm = get_peft_model(hf, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS)))
    if lora_from is not None:
        ours = {k: v for k, v in lora_from.named_parameters() if "lora_" in k}  # model.layers.0.self_attn.q_proj.lora_A
        theirs = {k: v for k, v in pm.named_parameters() if "lora_" in k}  # base_model.model.<same>.lora_A.default.weight
        mapped = {"base_model.model." + k + ".default.weight": k for k in ours}
        if set(mapped) != set(theirs):
            raise RuntimeError(f"load_theirs: LoRA names differ, e.g. {sorted(set(mapped) ^ set(theirs))[:3]}")
        with torch.no_grad():
            for k, p in theirs.items():
                p.copy_(ours[mapped[k]])
    pm.train()
    base = pm.base_model.model.model  # Qwen2Model: hidden states after the final norm, no lm_head

    def hidden(ids, mask, return_layer=None, am=None):
        if am is not None:
            raise ValueError("load_theirs: packed rows are not available on the transformers side")
        if return_layer is not None:
            raise ValueError("load_theirs: return_layer is not available on the transformers side")
        # use_cache=False: training needs no KV cache (the default would build one every forward)
        return base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state

    return Contender("theirs", pm, hidden)


def load_contender(who, ckpt, r, alpha, device, seed=0):
    if who == "ours":
        return load_ours(ckpt, r, alpha, device, seed)
    ours = load_ours(ckpt, r, alpha, "cpu", seed).module  # the same LoRA values as the ours side
    return load_theirs(ckpt, r, alpha, device, lora_from=ours)


def random_batch(B, L, A, vocab, seed, device):
    """Right-padded random token ids: user lengths in [L/2, L] (one row exactly L), answers in [A/4, A].
    Pools at the last real token (the <USER> / EOS slot). Pad id 0 (masked anyway)."""
    g = torch.Generator().manual_seed(seed)

    def side(L, lo):
        n = torch.randint(lo, L + 1, (B,), generator=g)
        n[0] = L
        am = (torch.arange(L)[None, :] < n[:, None]).long()  # (B, L)
        ids = torch.randint(0, vocab, (B, L), generator=g) * am
        return {"ids": ids.to(device), "am": am.to(device), "pool": (n - 1).to(device)}

    batch = {"user": side(L, max(1, L // 2))}
    if A:
        batch["answer"] = side(A, max(1, A // 4))
    return batch


def n_tokens(batch):
    return int(sum(s["am"].sum() for s in batch.values()))


def soft_mask(am, dtype):
    """GG-SM's warm-up mask at step 0: every future key at weight sigma(0) = 0.5 (Eq. 4), pads blocked."""
    return ggsm.soft_future_mask(am, torch.full((am.shape[1],), 0.5, device=am.device), dtype)


def pool(hidden, idx):
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx].float()  # (B, D) fp32, as UserEncoder


def contrastive_loss(c, batch, mask_dtype, autocast, packed=False):
    """Both towers through the one LoRA backbone, then InfoNCE (Eq. 6-8), as train.py's step. packed: ours with
    each side's users packed into shared rows."""
    u_side, a_side = batch["user"], batch["answer"]
    with autocast:
        hu = c.hidden(u_side["ids"], soft_mask(u_side["am"], mask_dtype), am=u_side["am"] if packed else None)
        ha = c.hidden(a_side["ids"], soft_mask(a_side["am"], mask_dtype), am=a_side["am"] if packed else None)
    return ggsm.info_nce(pool(hu, u_side["pool"]), pool(ha, a_side["pool"]), TAU, MARGIN)


def make_train_step(c, batch, mask_dtype, autocast, packed=False):
    """-> step(b=batch): one contrastive step (forward, backward, clip, AdamW) on b."""
    params = [p for p in c.module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step(b=batch):
        loss = contrastive_loss(c, b, mask_dtype, autocast, packed)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def make_embed_step(c, batch, mask_dtype, autocast, packed=False):
    """-> step(b=batch): the L2-normalised pooled states of b's users, no gradients, bidirectional mask."""
    def step(b=batch):
        side = b["user"]
        with torch.no_grad(), autocast:
            h = c.hidden(side["ids"], ggsm.bidirectional_mask(side["am"], mask_dtype), am=side["am"] if packed else None)
        return F.normalize(pool(h, side["pool"]), dim=-1)

    return step


def make_ggsm_steps(c, batch, autocast, n_layers):
    """(plain bidirectional step, GG-SM warm-up step), ours only: train.train_step under each strategy, each with
    its own optimizer. The GG-SM strategy never leaves warm-up here, so every timed step captures and accumulates."""
    encoder = model.UserEncoder(c.module, [], {}).train()
    towers = train.DualTower(encoder, None)
    user, answer = (data.Side(batch[k]["ids"], batch[k]["am"], batch[k]["pool"], {}, {}) for k in ("user", "answer"))
    b = data.Batch(user, answer, [], [], torch.zeros(0, dtype=torch.long))
    params = [p for p in encoder.parameters() if p.requires_grad]
    loss_fn = partial(ggsm.info_nce, tau=TAU, margin=MARGIN)

    def make(name):
        big = 10 ** 9
        strategy = ggsm.STRATEGIES[name](total_steps=big, warmup_steps=big - 1, n_layers=n_layers)
        opt = torch.optim.AdamW(params, lr=1e-5)
        counter = [0]

        def step():
            out = train.train_step(towers, strategy, opt, [b], counter[0], loss_fn, autocast=autocast)
            counter[0] += 1
            return out["loss"]

        return step

    return make("bidirectional"), make("ggsm")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns, reps, device, warmup=1):
    """{name: fn} -> {name: [seconds]}: warm-up calls, then reps rounds of one call each, in turn."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def status_mb(key):
    """A field of /proc/self/status in MiB (VmRSS, VmHWM, RssAnon, RssFile)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    raise KeyError(key)


def _memory_child(job):
    """In a fresh process (a fork of the forkserver): load one side, reset the peak RSS, run two steps, read the peak."""
    torch.manual_seed(0)
    torch.set_num_threads(job["threads"])
    device = torch.device("cpu")
    c = load_contender(job["who"], job["ckpt"], job["r"], job["alpha"], device)
    w = job["work"]
    # a workload's batches as its section drew them; else one random padded batch
    batches = job["batches"] or [random_batch(w["B"], w["L"], w.get("A", 0), job["vocab"], job["seed"], device)]
    make = make_train_step if job["kind"] == "train" else make_embed_step
    step = make(c, batches[0], torch.float32, contextlib.nullcontext(), job["packed"])
    rss0 = status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS, so the peak below is the steps' own
    for b in batches[:1] + batches:  # the first step also creates AdamW's state
        step(b)
    peak = status_mb("VmHWM")
    return {"rss_loaded_mb": rss0, "peak_rss_mb": peak, "step_peak_mb": peak - rss0}


def peak_memory(who, kind, ctx, work, c=None, step=None, batches=None, packed=False):
    """MiB a step adds at its peak (over `batches` when given, each a step): CUDA in process, CPU in a fresh
    process (see the module docstring)."""
    if ctx["device"].type == "cuda":
        sync(ctx["device"])
        torch.cuda.reset_peak_memory_stats(ctx["device"])
        base = torch.cuda.memory_allocated(ctx["device"])
        for b in batches or [None]:
            step() if b is None else step(b)
        sync(ctx["device"])
        return {"step_peak_mb": (torch.cuda.max_memory_allocated(ctx["device"]) - base) / 2 ** 20}
    if not os.path.exists("/proc/self/clear_refs"):
        return {"step_peak_mb": float("nan"), "note": "no /proc/self/clear_refs: peak RSS not measured"}
    job = dict(who=who, kind=kind, ckpt=ctx["ckpt"], r=ctx["r"], alpha=ctx["alpha"], work=work,
               vocab=ctx["vocab"], seed=ctx["seed"], threads=torch.get_num_threads(), packed=packed,
               batches=[{k: {f: t.cpu() for f, t in side.items()} for k, side in b.items()} for b in batches or []])
    # forkserver: each measurement is a fresh fork of a server that has imported torch / transformers / peft
    # but never held a model, so the child's allocator starts clean and the imports are paid once
    mp = multiprocessing.get_context("forkserver")
    mp.set_forkserver_preload(["tools.bench_model", "transformers", "peft"])
    # by module name, also when this file runs as __main__, so that the forkserver can unpickle the child function
    from tools import bench_model
    with mp.Pool(1) as pool_:
        return pool_.apply(bench_model._memory_child, (job,))


def median(xs):
    return statistics.median(xs)


# ---- sections. Each returns (json dict, table rows); a row is (section, metric, ours, theirs, ratio, target)


def section_parity(ctx):
    """Same loss and same LoRA gradient from (a) and (b) on one batch: the comparison is of the same work."""
    ours, theirs = ctx["ours"], ctx["theirs"]
    w = ctx["work"]["train"]
    batch = random_batch(w["B"], w["L"], w["A"], ctx["vocab"], ctx["seed"] + 1, ctx["device"])
    losses, grads = {}, {}
    name = "model.layers.0.self_attn.q_proj.lora_A"
    for c, key in ((ours, name), (theirs, "base_model.model." + name + ".default.weight")):
        c.module.zero_grad(set_to_none=True)
        loss = contrastive_loss(c, batch, ctx["mask_dtype"], ctx["autocast"])
        loss.backward()
        losses[c.name] = loss.item()
        grads[c.name] = dict(c.module.named_parameters())[key].grad.detach().float().cpu().clone()
        c.module.zero_grad(set_to_none=True)
    diff = abs(losses["ours"] - losses["theirs"])
    gdiff = (grads["ours"] - grads["theirs"]).abs().max().item()
    out = {"loss_ours": losses["ours"], "loss_theirs": losses["theirs"], "loss_abs_diff": diff,
           "grad_tensor": name, "grad_max_abs_diff": gdiff, "grad_max_abs": grads["theirs"].abs().max().item()}
    rows = [("parity", "InfoNCE loss, same batch", f"{losses['ours']:.6f}", f"{losses['theirs']:.6f}",
             f"diff {diff:.1e}", "diff <= 1e-4 (fp32)"),
            ("parity", f"grad of {name}, max abs", f"{out['grad_max_abs']:.2e}", "",
             f"diff {gdiff:.1e}", "")]
    return out, rows


def section_train(ctx):
    w = ctx["work"]["train"]
    batch = random_batch(w["B"], w["L"], w["A"], ctx["vocab"], ctx["seed"], ctx["device"])
    steps = {c.name: make_train_step(c, batch, ctx["mask_dtype"], ctx["autocast"]) for c in (ctx["ours"], ctx["theirs"])}
    times = time_interleaved(steps, ctx["reps"], ctx["device"])
    tok = n_tokens(batch)
    mem = {name: peak_memory(name, "train", ctx, w, step=steps[name]) for name in steps}
    tps = {name: tok / median(t) for name, t in times.items()}
    out = {"B": w["B"], "L": w["L"], "answer_max": w["A"], "nonpad_tokens": tok, "mask": "soft future 0.5 (GG-SM step 0)",
           "times_s": times, "median_s": {k: median(v) for k, v in times.items()}, "tokens_per_s": tps,
           "throughput_ratio": tps["ours"] / tps["theirs"], "memory": mem,
           "memory_ratio": mem["ours"]["step_peak_mb"] / mem["theirs"]["step_peak_mb"]}
    rows = [("train", f"step, B={w['B']} L={w['L']}: non-pad tokens/s", f"{tps['ours']:.0f}", f"{tps['theirs']:.0f}",
             f"{out['throughput_ratio']:.2f}x", ">= 1.0x"),
            ("train", "step peak memory, MiB above the loaded model", f"{mem['ours']['step_peak_mb']:.0f}",
             f"{mem['theirs']['step_peak_mb']:.0f}", f"{out['memory_ratio']:.2f}x", "<= 1.0x")]
    if "peak_rss_mb" in mem["ours"]:  # CPU: the whole process too (same forkserver baseline for both sides)
        rows.append(("train", "process peak RSS, MiB (imports + model + step)", f"{mem['ours']['peak_rss_mb']:.0f}",
                     f"{mem['theirs']['peak_rss_mb']:.0f}",
                     f"{mem['ours']['peak_rss_mb'] / mem['theirs']['peak_rss_mb']:.2f}x", ""))
    return out, rows


def section_embed(ctx):
    w = ctx["work"]["embed"]
    batch = random_batch(w["B"], w["L"], 0, ctx["vocab"], ctx["seed"], ctx["device"])
    steps = {c.name: make_embed_step(c, batch, ctx["mask_dtype"], ctx["autocast"]) for c in (ctx["ours"], ctx["theirs"])}
    times = time_interleaved(steps, ctx["reps"], ctx["device"])
    ups = {name: w["B"] / median(t) for name, t in times.items()}
    mem = {name: peak_memory(name, "embed", ctx, w, step=steps[name]) for name in steps}
    out = {"B": w["B"], "L": w["L"], "mask": "bidirectional", "times_s": times,
           "median_s": {k: median(v) for k, v in times.items()}, "users_per_s": ups,
           "throughput_ratio": ups["ours"] / ups["theirs"], "memory": mem,
           "memory_ratio": mem["ours"]["step_peak_mb"] / mem["theirs"]["step_peak_mb"]}
    rows = [("embed", f"inference, B={w['B']} L={w['L']}: users/s", f"{ups['ours']:.1f}", f"{ups['theirs']:.1f}",
             f"{out['throughput_ratio']:.2f}x", ">= 1.0x"),
            ("embed", "inference peak memory, MiB above the loaded model", f"{mem['ours']['step_peak_mb']:.0f}",
             f"{mem['theirs']['step_peak_mb']:.0f}", f"{out['memory_ratio']:.2f}x", "")]
    return out, rows


def section_ggsm(ctx):
    w = ctx["work"]["ggsm"]
    batch = random_batch(w["B"], w["L"], w["A"], ctx["vocab"], ctx["seed"], ctx["device"])
    bi, gg = make_ggsm_steps(ctx["ours"], batch, ctx["autocast"], ctx["n_layers"])
    times = time_interleaved({"bidirectional": bi, "ggsm": gg}, ctx["reps"], ctx["device"])
    med = {k: median(v) for k, v in times.items()}
    # paired per round: both steps of a round ran back to back, so their ratio sees the same machine load
    paired = [g / b - 1 for g, b in zip(times["ggsm"], times["bidirectional"])]
    out = {"B": w["B"], "L": w["L"], "times_s": times, "median_s": med, "overhead": med["ggsm"] / med["bidirectional"] - 1,
           "overhead_paired_median": median(paired)}
    rows = [("ggsm", f"step time, B={w['B']} L={w['L']}: GG-SM warm-up vs bidirectional (ours only)",
             f"{med['ggsm'] * 1e3:.0f} ms", f"{med['bidirectional'] * 1e3:.0f} ms",
             f"{out['overhead'] * 100:+.1f}% (paired {out['overhead_paired_median'] * 100:+.1f}%)", "<= +2%")]
    return out, rows


def section_softmask(ctx):
    """Ours only, under bf16 autocast (CUDA's on a GPU, CPU's otherwise): the contrastive step with GG-SM's soft
    mask in fp32, which Decoder.forward keeps in fp32 because bf16 cannot hold its log-weights, so attention runs
    in fp32; against the same mask rounded to bf16 first, attention in bf16 (what every step cost before, when
    the rounding erased the weights). The difference is what keeping the soft weights costs."""
    w = ctx["work"]["ggsm"]
    batch = random_batch(w["B"], w["L"], w["A"], ctx["vocab"], ctx["seed"], ctx["device"])
    bf16 = ctx["autocast"] if ctx["device"].type == "cuda" else torch.autocast("cpu", dtype=torch.bfloat16)
    steps = {"fp32 mask": make_train_step(ctx["ours"], batch, torch.float32, bf16),
             "bf16 mask": make_train_step(ctx["ours"], batch, torch.bfloat16, bf16)}
    times = time_interleaved(steps, ctx["reps"], ctx["device"])
    med = {k: median(v) for k, v in times.items()}
    paired = [a / b - 1 for a, b in zip(times["fp32 mask"], times["bf16 mask"])]  # same round, same machine load
    out = {"B": w["B"], "L": w["L"], "autocast": f"{ctx['device'].type} bf16", "times_s": times, "median_s": med,
           "overhead": med["fp32 mask"] / med["bf16 mask"] - 1, "overhead_paired_median": median(paired)}
    rows = [("softmask", f"step time under {out['autocast']} autocast, B={w['B']} L={w['L']}: soft mask kept in fp32 "
                         "(fp32 attention) vs rounded to bf16 (ours only)",
             f"{med['fp32 mask'] * 1e3:.0f} ms", f"{med['bf16 mask'] * 1e3:.0f} ms",
             f"{out['overhead'] * 100:+.1f}% (paired {out['overhead_paired_median'] * 100:+.1f}%)", "")]
    return out, rows


def section_scaling(ctx):
    w = ctx["work"]["scaling"]
    points, rows = [], []
    for L in w["lengths"]:
        B = max(2, w["tokens"] // L)
        batch = random_batch(B, L, w["A"], ctx["vocab"], ctx["seed"], ctx["device"])
        steps = {c.name: make_train_step(c, batch, ctx["mask_dtype"], ctx["autocast"]) for c in (ctx["ours"], ctx["theirs"])}
        times = time_interleaved(steps, min(ctx["reps"], 3), ctx["device"])  # four lengths: fewer reps each
        tok = n_tokens(batch)
        mem = {name: peak_memory(name, "train", ctx, dict(B=B, L=L, A=w["A"]), step=steps[name]) for name in steps}
        tps = {name: tok / median(t) for name, t in times.items()}
        p = {"L": L, "B": B, "nonpad_tokens": tok, "times_s": times, "tokens_per_s": tps,
             "throughput_ratio": tps["ours"] / tps["theirs"], "memory": mem,
             "memory_ratio": mem["ours"]["step_peak_mb"] / mem["theirs"]["step_peak_mb"]}
        points.append(p)
        rows.append(("scaling", f"train step L={L} B={B}: tokens/s | step peak MiB",
                     f"{tps['ours']:.0f} / {mem['ours']['step_peak_mb']:.0f}",
                     f"{tps['theirs']:.0f} / {mem['theirs']['step_peak_mb']:.0f}",
                     f"{p['throughput_ratio']:.2f}x / {p['memory_ratio']:.2f}x", ">= 1.0x / <= 1.0x"))
    return {"tokens_per_step_target": w["tokens"], "points": points}, rows


# -----------------------------------------------------------------------------
# the limit of this machine, and the workloads a user runs

def peak_matmul_flops(device, dtype, reps=5):
    """This machine's dense matmul throughput, FLOP/s: the best of `reps` large square torch.mm (2 n^3 FLOPs
    each) in the dtype the steps compute in, on the threads the steps use."""
    n = 2048 if device.type == "cpu" else 8192
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    best = 0.0
    for _ in range(reps + 1):  # the first call warms up
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def model_flops(cfg, r, user_lengths, answer_lengths=(), train=True):
    """Matmul FLOPs of the real tokens (2 per multiply-add), counted the same for both sides whatever they pad:
    per layer and token, the seven projections (x W^T) and their LoRA branches (x A^T B^T, rank r); per layer and
    user of n tokens, attention's Q K^T and P V over its n x n block (every key: the soft mask at step 0 opens the
    future). train: plus the backward to the activations (the frozen projections: one more x W^T-sized product
    for the input gradient; LoRA: two, for the input and for A and B; attention: two). Not counted: norms, RoPE,
    softmax, the embedding lookup, the loss, the optimizer (all O(tokens x hidden) or smaller)."""
    D, I, nh, nkv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, layers = D // nh, cfg["num_hidden_layers"]
    shapes = [(D, nh * hd), (D, nkv * hd), (D, nkv * hd), (nh * hd, D), (D, I), (D, I), (I, D)]  # (in, out)
    proj = sum(i * o for i, o in shapes)              # multiply-adds per token per layer
    lora = sum(r * (i + o) for i, o in shapes)
    total = 0
    for n in list(user_lengths) + list(answer_lengths):
        attn = 2 * n * n * nh * hd                     # Q K^T and P V, multiply-adds
        fwd = n * proj + n * lora + attn
        bwd = n * proj + 2 * n * lora + 2 * attn if train else 0
        total += 2 * layers * (fwd + bwd)
    return total


def synthetic_dataset(ctx, name, users, vocab, **template_options):
    """(data.UserDataset, its template): `users` users of the embedded synthetic benchmark with answers, encoded by
    a BPE of `vocab` tokens trained on them (at most the model's vocabulary, so every id is a row)."""
    train_path, _ = synthetic.write_synthetic(os.path.join(ctx["tmp"], name), users, 0, seed=ctx["seed"])
    records, report = data.load_records(train_path, require=("answer",))
    tok = tiny_decoder.train_tokenizer(tiny_decoder.record_texts(records), min(vocab, ctx["vocab"]))
    template = data.Template(tok, report.modalities, report.vector_dims, **template_options)
    return data.UserDataset(records, template), template


def embedded_lengths(ctx, w):
    """(user lengths, answer lengths) of w["users"] users of the embedded synthetic benchmark, encoded as train.py
    does by default (a 1,024-token BPE trained on them, as --model tiny; max_len, answer_max_len; no preamble)."""
    ds, _ = synthetic_dataset(ctx, "embedded", w["users"], 1024, max_len=w["max_len"], max_answer_len=w["answer_max_len"])
    return np.array(ds.lengths), np.array([len(ds[i]["answer_ids"]) for i in range(len(ds))])


def length_batch(user_lengths, answer_lengths, vocab, seed, device):
    """random_batch's layout for given lengths: right-padded random ids, pooled at each side's last token."""
    g = torch.Generator().manual_seed(seed)

    def side(n):
        n = torch.as_tensor(n, dtype=torch.long)
        am = (torch.arange(int(n.max()))[None, :] < n[:, None]).long()  # (B, longest)
        ids = torch.randint(0, vocab, am.shape, generator=g) * am
        return {"ids": ids.to(device), "am": am.to(device), "pool": (n - 1).to(device)}

    return {"user": side(user_lengths), "answer": side(answer_lengths)}


def workload_batches(name, ctx, w, n_batches):
    """n_batches batches of w["B"] users each, drawn from the workload's length distribution."""
    rng = np.random.default_rng(ctx["seed"])
    B = w["B"]
    if name == "embedded":
        users, answers = embedded_lengths(ctx, w)
        picks = [rng.choice(len(users), B, replace=False) for _ in range(n_batches)]
        lengths = [(users[p], answers[p]) for p in picks]
    else:  # paperlike: lognormal around the median, clipped to [min, max]; one history at max in every batch
        lengths = []
        for _ in range(n_batches):
            u = np.clip(np.round(rng.lognormal(np.log(w["median"]), w["sigma"], B)), w["min"], w["max"]).astype(int)
            lengths.append((u, rng.integers(w["A"][0], w["A"][1] + 1, B)))
    return [length_batch(u, a, ctx["vocab"], ctx["seed"] + k, ctx["device"]) for k, (u, a) in enumerate(lengths)]


def section_workload(name, ctx):
    """The same users per step on both sides, a new batch each repetition: ours packed (pack.py), theirs with
    dynamic padding (each batch padded to its longest user, their common practice). Train step and embedding."""
    w = ctx["work"][name]
    batches = workload_batches(name, ctx, w, ctx["reps"] + 1)  # batch 0: the warm-up
    packed = {"ours": True, "theirs": False}
    # the limit again, the best measurement of the run kept: a busy moment of a shared machine only lowers it
    ctx["peak_flops"] = max(ctx["peak_flops"], peak_matmul_flops(ctx["device"], ctx["mask_dtype"]))
    out, rows = {"B": w["B"], "work": {k: v for k, v in w.items()}, "batches": len(batches) - 1}, []
    users = np.concatenate([b["user"]["am"].sum(1).cpu().numpy() for b in batches[1:]])
    out["user_length"] = {"median": float(np.median(users)), "mean": float(users.mean()), "max": int(users.max())}
    tokens = sum(n_tokens(b) for b in batches[1:])
    slots = {"theirs": sum(s["am"].numel() for b in batches[1:] for s in b.values()),
             "ours": sum(pack.Packing(s["am"], key_cost=pack.key_cost(ctx["ours"].module.config)).slots()
                         for b in batches[1:] for s in b.values())}
    for kind in ("train", "embed"):
        make = make_train_step if kind == "train" else make_embed_step
        steps = {c.name: make(c, batches[0], ctx["mask_dtype"], ctx["autocast"], packed[c.name])
                 for c in (ctx["ours"], ctx["theirs"])}
        times = time_interleaved_batches(steps, batches, ctx["device"])
        total = {k: sum(v) for k, v in times.items()}
        u_len = [n for b in batches[1:] for n in b["user"]["am"].sum(1).tolist()]
        a_len = [n for b in batches[1:] for n in b["answer"]["am"].sum(1).tolist()] if kind == "train" else []
        flops = model_flops(ctx["model_cfg"], ctx["r"], u_len, a_len, train=kind == "train")
        r = {"times_s": times, "total_s": total, "model_flops": flops, "peak_flops": ctx["peak_flops"],
             "limit_fraction": {k: flops / t / ctx["peak_flops"] for k, t in total.items()}}
        if kind == "train":
            r["tokens_per_s"] = {k: tokens / t for k, t in total.items()}
            r["throughput_ratio"] = r["tokens_per_s"]["ours"] / r["tokens_per_s"]["theirs"]
            # over the first two timed batches (each side in a fresh process that loads the model: minutes for all)
            r["memory"] = {k: peak_memory(k, "train", ctx, w, step=steps[k], batches=batches[1:3], packed=packed[k])
                           for k in steps}
            r["memory_ratio"] = r["memory"]["ours"]["step_peak_mb"] / r["memory"]["theirs"]["step_peak_mb"]
            rows += [(name, f"train, {len(batches) - 1} steps of B={w['B']} (user length median {out['user_length']['median']:.0f}, "
                            f"max {out['user_length']['max']}): tokens/s, limit fraction",
                      f"{r['tokens_per_s']['ours']:.0f}, {r['limit_fraction']['ours']:.0%}",
                      f"{r['tokens_per_s']['theirs']:.0f}, {r['limit_fraction']['theirs']:.0%}",
                      f"{r['throughput_ratio']:.2f}x", ">= 1.3x"),
                     (name, "train step peak memory, MiB above the loaded model", f"{r['memory']['ours']['step_peak_mb']:.0f}",
                      f"{r['memory']['theirs']['step_peak_mb']:.0f}", f"{r['memory_ratio']:.2f}x", "<= 0.8x")]
        else:
            n_users = len(u_len)
            r["users_per_s"] = {k: n_users / t for k, t in total.items()}
            r["throughput_ratio"] = r["users_per_s"]["ours"] / r["users_per_s"]["theirs"]
            rows.append((name, "embedding, the same users: users/s, limit fraction",
                         f"{r['users_per_s']['ours']:.1f}, {r['limit_fraction']['ours']:.0%}",
                         f"{r['users_per_s']['theirs']:.1f}, {r['limit_fraction']['theirs']:.0%}",
                         f"{r['throughput_ratio']:.2f}x", ">= 1.3x"))
        out[kind] = r
    out["tokens"], out["token_slots"] = tokens, slots
    rows.append((name, "token slots computed, both towers (real share)", f"{slots['ours']} ({tokens / slots['ours']:.0%})",
                 f"{slots['theirs']} ({tokens / slots['theirs']:.0%})", "", ""))
    return out, rows


def section_compile(ctx):
    """Ours only: the packed train step on the embedded workload with every decoder block under torch.compile
    (inductor, dynamic shapes: the packed length changes every batch) against the same blocks eager. Reports the
    compile time (the first compiled steps minus an eager one) and the steady-state ratio."""
    w = ctx["work"]["embedded"]
    batches = workload_batches("embedded", ctx, w, ctx["reps"] + 1)
    dec = ctx["ours"].module
    eager = list(dec.model.layers)
    compiled = [torch.compile(b, dynamic=True) for b in eager]
    step = make_train_step(ctx["ours"], batches[0], ctx["mask_dtype"], ctx["autocast"], packed=True)

    def use(blocks):
        for i, b in enumerate(blocks):
            dec.model.layers[i] = b

    def timed(b):
        sync(ctx["device"])
        t0 = time.perf_counter()
        step(b)
        sync(ctx["device"])
        return time.perf_counter() - t0

    try:
        use(eager)
        t_eager = timed(batches[0])
        use(compiled)
        t_first = timed(batches[0]) + timed(batches[1])  # a second shape: dynamic recompiles once more
        times = {"eager": [], "compiled": []}
        for b in batches[1:]:
            for name, blocks in (("eager", eager), ("compiled", compiled)):
                use(blocks)
                times[name].append(timed(b))
    finally:
        use(eager)
    total = {k: sum(v) for k, v in times.items()}
    out = {"times_s": times, "compile_s": t_first - 2 * t_eager, "speedup": total["eager"] / total["compiled"]}
    rows = [("compile", f"packed train step, embedded workload B={w['B']}: torch.compile of the blocks vs eager "
                        "(ours only): seconds per step",
             f"{total['compiled'] / len(times['compiled']):.2f} s", f"{total['eager'] / len(times['eager']):.2f} s",
             f"{out['speedup']:.2f}x; compile {out['compile_s']:.0f} s", "keep behind a flag if > 1.1x")]
    return out, rows


def _lora_at_width(self, x):
    """model.LoRALinear.forward as it was: the branch computed at width out, scaled there, then added."""
    y = F.linear(x, self.weight, self.bias)
    z = self.lora_dropout(x).to(self.lora_A.dtype) @ self.lora_A.t() @ self.lora_B.t()  # (..., out)
    return y + (z * self.scaling).to(y.dtype)


def section_levers(ctx):
    """Ours only, the train step on the embedded workload with everything on, and with one lever off at a time:
    packing (one micro-batch padded to its longest user instead: what packing off means now that train.py's length-
    sorted chunks are gone), SDPA's enable_gqa (K and V heads copied by
    repeat_interleave instead), LoRA's rank-r scaling with addmm (the branch scaled at width out and added
    separately instead). Interleaved per batch; each variant's total time against everything on."""
    w = ctx["work"]["embedded"]
    batches = workload_batches("embedded", ctx, w, ctx["reps"] + 1)
    c = ctx["ours"]
    lora_forward, gqa = model.LoRALinear.forward, model.SDPA_GQA
    variants = {"all on": dict(packed=True), "no packing": dict(packed=False), "KV heads copied": dict(packed=True, gqa=False),
                "LoRA scaled at width out": dict(packed=True, lora=_lora_at_width)}

    def make(v):
        step = make_train_step(c, batches[0], ctx["mask_dtype"], ctx["autocast"], v["packed"])

        def run(b):
            model.LoRALinear.forward, model.SDPA_GQA = v.get("lora", lora_forward), v.get("gqa", gqa)
            try:
                return step(b)
            finally:
                model.LoRALinear.forward, model.SDPA_GQA = lora_forward, gqa
        return run

    times = time_interleaved_batches({name: make(v) for name, v in variants.items()}, batches, ctx["device"])
    total = {k: sum(v) for k, v in times.items()}
    out = {"times_s": times, "total_s": total, "cost": {k: t / total["all on"] - 1 for k, t in total.items()}}
    rows = [("levers", f"train step, embedded workload B={w['B']}, ours: {name} (seconds per step; time against all on)",
             f"{total[name] / len(times[name]):.2f} s", "", f"{out['cost'][name] * 100:+.1f}%", "")
            for name in variants]
    return out, rows


def section_embedded(ctx):
    return section_workload("embedded", ctx)


def section_paperlike(ctx):
    return section_workload("paperlike", ctx)


def time_interleaved_batches(steps, batches, device):
    """{name: step(batch)} -> {name: [seconds]}: every step on batches[0] to warm up, then on each later batch in
    turn (ours, theirs, ours, ...), so both sides time the same users under the same machine load."""
    for fn in steps.values():
        fn(batches[0])
    times = {name: [] for name in steps}
    for b in batches[1:]:
        for name, fn in steps.items():
            sync(device)
            t0 = time.perf_counter()
            fn(b)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def pad_side(side, L, pad_id):
    """The official recipe's padding: every sequence right-padded to L (positions, pooling, vectors unchanged)."""
    extra = L - side.input_ids.shape[1]
    if extra < 0:
        raise ValueError(f"pad_side: a sequence of {side.input_ids.shape[1]} tokens is longer than the pad length {L}")
    return data.Side(F.pad(side.input_ids, (0, extra), value=pad_id), F.pad(side.attention_mask, (0, extra), value=0),
                     side.pool_index, side.vectors, side.vector_pos, side.history)


def section_padding(ctx):
    """One epoch of the synthetic benchmark, ours both times, packing off: dynamic padding (train.micro_batch: one
    micro-batch, its users shortest first, padded to its longest, as train.py --no-pack runs it) vs every sequence
    padded to 512."""
    w = ctx["work"]["padding"]
    # the official recipe truncates to 512 and pads to 512; truncation at pad_to keeps both runs on the same tokens
    dataset, template = synthetic_dataset(ctx, "synthetic", w["users"], 2000, max_len=w["pad_to"])
    dec = ctx["ours"].module
    encoder = model.UserEncoder(dec, template.special_token_ids, template.vector_dims).to(ctx["device"]).train()
    encoder.pack = False  # padded rows both times: packing would remove the very padding this section prices
    init = {k: v.clone() for k, v in encoder.trainable_state_dict().items()}
    order = np.random.default_rng(ctx["seed"]).permutation(len(dataset))
    batches = [train.micro_batch(dataset, order[s:s + w["B"]].tolist(), "cpu")
               for s in range(0, len(order) - w["B"] + 1, w["B"])]
    n_steps = len(batches)

    towers = train.DualTower(encoder, None)
    loss_fn = partial(ggsm.info_nce, tau=TAU, margin=MARGIN)

    def epoch(pad_to):
        encoder.load_trainable_state_dict(init)  # the same start for both epochs
        opt = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=1e-4)
        strategy = ggsm.STRATEGIES["ggsm"](total_steps=n_steps, warmup_steps=max(1, n_steps // 10), n_layers=ctx["n_layers"])
        losses, tokens, slots = [], 0, 0
        sync(ctx["device"])
        t0 = time.perf_counter()
        for t, b in enumerate(batches):
            b = b.to(ctx["device"])
            if pad_to:
                b = data.Batch(pad_side(b.user, pad_to, template.pad_id), pad_side(b.answer, pad_to, template.pad_id),
                               b.user_ids, b.labels, b.index)
            slots += b.user.input_ids.numel() + b.answer.input_ids.numel()
            out = train.train_step(towers, strategy, opt, [b], t, loss_fn, autocast=ctx["autocast"])
            tokens += out["tokens"]
            losses.append(out["loss"])
        sync(ctx["device"])
        return {"seconds": time.perf_counter() - t0, "nonpad_tokens": tokens, "token_slots": slots, "losses": losses}

    dyn = epoch(None)
    pad = epoch(w["pad_to"])
    encoder.load_trainable_state_dict(init)  # leave the shared LoRA weights as they were
    loss_diff = max(abs(x - y) for x, y in zip(dyn["losses"], pad["losses"]))
    out = {"users": n_steps * w["B"], "B": w["B"], "steps": n_steps, "pad_to": w["pad_to"],
           "user_length_median": float(np.median(dataset.lengths)), "user_length_max": int(max(dataset.lengths)),
           "dynamic": dyn, "padded": pad, "speedup": pad["seconds"] / dyn["seconds"], "max_loss_diff": loss_diff,
           "label": f"what a user of the official code pays: every sequence padded to {w['pad_to']} (our model both times)"}
    rows = [("padding", f"one epoch, {out['users']} synthetic users, B={w['B']}: seconds (ours dynamic | ours padded to "
                        f"{w['pad_to']}, what a user of the official code pays)",
             f"{dyn['seconds']:.1f} s", f"{pad['seconds']:.1f} s", f"{out['speedup']:.2f}x faster",
             f"same losses: max diff {loss_diff:.1e}"),
            ("padding", "token slots computed (non-pad share)", f"{dyn['token_slots']} ({dyn['nonpad_tokens'] / dyn['token_slots']:.0%})",
             f"{pad['token_slots']} ({pad['nonpad_tokens'] / pad['token_slots']:.0%})", "", "")]
    return out, rows


SECTIONS = {"train": section_train, "embed": section_embed, "ggsm": section_ggsm, "softmask": section_softmask,
            "scaling": section_scaling, "padding": section_padding, "embedded": section_embedded,
            "paperlike": section_paperlike, "compile": section_compile, "levers": section_levers}
# all: what the summary needs, within 15 minutes on a 2-core CPU; the others take minutes each: asked for by name
ALL = ["train", "embed", "ggsm", "padding", "embedded", "paperlike"]


def summary(result):
    """The machine-readable figures of an `all` run (ratios ours / theirs; throughput up is better)."""
    emb, pap = result["embedded"], result["paperlike"]
    return {"train_equal_padding_ratio": result["train"]["throughput_ratio"],
            "train_embedded_ratio": emb["train"]["throughput_ratio"],
            "train_paperlike_ratio": pap["train"]["throughput_ratio"],
            "memory_ratio": emb["train"]["memory_ratio"],  # the train step on the embedded workload
            "embed_ratio": emb["embed"]["throughput_ratio"],  # embedding the embedded workload's users
            "ggsm_overhead": result["ggsm"]["overhead"],
            "limit_fraction_ours": emb["train"]["limit_fraction"]["ours"],
            "limit_fraction_theirs": emb["train"]["limit_fraction"]["theirs"]}


def bench_models(args):
    """parity | train | embed | ... | all: build the checkpoint, load both sides, run, tabulate."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = "quick" if args.quick else ("gpu" if args.gpu_size else "cpu")
    reps = args.reps or (2 if args.quick else 5)
    # CUDA: bf16 autocast, masks built in bf16 (an fp32 finfo.min would become -inf under autocast's cast)
    mask_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    # quick: one thread (tiny matrices gain nothing from more, and on a busy machine a second OpenMP thread
    # that is descheduled stalls every op at its barrier)
    threads = args.threads or (1 if args.quick else None)
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _bench_models(args, device, size, reps, mask_dtype, autocast)
    finally:
        torch.set_num_threads(threads_before)  # a caller in the same process (a test) gets its setting back


def _bench_models(args, device, size, reps, mask_dtype, autocast):
    import peft
    import transformers
    load = os.getloadavg()
    names = ALL if args.section == "all" else [] if args.section == "parity" else [args.section]
    work = {k: v[1 if args.quick else 0] for k, v in WORK.items()}
    result = {"sections": names, "size": size, "model": SIZES[size], "lora": {"r": args.r, "alpha": args.alpha},
              "device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
              "peft": peft.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "cpu": platform.processor() or platform.machine(), "reps": reps, "work": work,
              "load_average_before": list(load)}
    rows = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(os.path.join(tmp, "ckpt"), size, args.seed)
        ours = load_ours(ckpt, args.r, args.alpha, device, args.seed)
        theirs = load_theirs(ckpt, args.r, args.alpha, device, lora_from=ours.module)
        ctx = dict(ours=ours, theirs=theirs, device=device, mask_dtype=mask_dtype, autocast=autocast, work=work,
                   reps=reps, ckpt=ckpt, r=args.r, alpha=args.alpha, vocab=SIZES[size]["vocab_size"],
                   n_layers=SIZES[size]["num_hidden_layers"], seed=args.seed, tmp=tmp, model_cfg=SIZES[size])
        result["parity"], r = section_parity(ctx)
        rows += r
        # the limit: dense matmul FLOP/s in the dtype the steps compute in (bf16 under CUDA autocast)
        ctx["peak_flops"] = peak_matmul_flops(device, mask_dtype)
        for name in names:
            t0 = time.perf_counter()
            result[name], r = SECTIONS[name](ctx)
            result[name]["section_seconds"] = time.perf_counter() - t0
            rows += r
            print(f"[{name} done in {time.perf_counter() - t0:.0f} s]", flush=True)
    result["load_average_after"] = list(os.getloadavg())
    result["total_seconds"] = time.perf_counter() - t_start
    result["peak_matmul_flops"] = ctx["peak_flops"]  # the best of the run's measurements
    rows.insert(2, ("limit", "dense matmul throughput of this machine (torch.mm; the best measurement of the run), "
                             "GFLOP/s", f"{ctx['peak_flops'] / 1e9:.1f}", "", "", ""))
    if args.section == "all":
        result["summary"] = summary(result)
    result["table"] = [dict(zip(("section", "metric", "ours", "theirs", "ratio", "target"), r)) for r in rows]
    m = SIZES[size]
    print(f"\nours (model.py + LoRA r={args.r}) vs theirs (transformers {transformers.__version__} sdpa + peft "
          f"{peft.__version__}); Qwen2 hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, {m['num_attention_heads']}/"
          f"{m['num_key_value_heads']} heads, vocab {m['vocab_size']}; {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {reps} interleaved reps, medians; load average {load[0]:.2f} before, "
          f"{result['load_average_after'][0]:.2f} after; {result['total_seconds']:.0f} s\n")
    print("| section | metric | ours | theirs | ratio (ours / theirs) | target |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    return result



def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sections = parser.add_subparsers(dest="section", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quick", action="store_true", help="tiny model and workloads (seconds; what the test runs)")
    common.add_argument("--gpu-size", action="store_true", help="Qwen2.5-0.5B-sized model (for a GPU)")
    common.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    common.add_argument("--reps", type=int, default=None, help="timed repetitions per side (default 5; quick 2)")
    common.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, all cores; quick: 1)")
    common.add_argument("--r", type=int, default=16, help="LoRA rank (train.py's default)")
    common.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--out", default=None, help="write the results as JSON here")
    helps = {"parity": "only the check that both sides compute the same loss and LoRA gradient (part of every run)",
             "train": "contrastive training step: tokens/s and peak memory",
             "embed": "inference under the bidirectional mask: users/s",
             "ggsm": "GG-SM warm-up step overhead against a bidirectional step (ours only)",
             "softmask": "under bf16 autocast: the soft mask kept in fp32 (fp32 attention) vs rounded to bf16 (ours only)",
             "scaling": "training step at growing sequence length",
             "padding": "one synthetic epoch: dynamic padding vs pad-everything-to-512 (official recipe)",
             "embedded": "the embedded benchmark's users: ours packed vs theirs dynamically padded (train, embed)",
             "paperlike": "long-tailed histories up to 1,024 tokens: ours packed vs theirs dynamically padded",
             "compile": "torch.compile of our decoder blocks against eager on the embedded workload (not in all)",
             "levers": "ours, embedded workload: each speed lever (packing, enable_gqa, LoRA addmm) off in turn (not in all)",
             "all": "train, embed, ggsm, padding, embedded, paperlike: one table and the summary"}
    for name, h in helps.items():
        sections.add_parser(name, parents=[common], help=h)
    args = parser.parse_args(argv)
    result = bench_models(args)
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()

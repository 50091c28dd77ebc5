"""
The data path's benchmarks (not tests): the encoded cache as the number of users grows, and the event-level form
against the text form. Each prints a markdown table; --out writes JSON.

    python -m tools.bench_data data [--users 10000,100000] [--ranks 2] [--steps 20] [--old-upto 10000]
                                    [--replicate N] [--out bench_data.json]
    python -m tools.bench_data events --model DIR --data train.jsonl [--max-len 256 --batch 32 --reps 5]

data: the encoded cache (tools/cache.py) as the number of users grows. For each N, N synthetic users are written
once (tools.synthetic.write_synthetic, or with --replicate copies of a smaller file; not timed) and a byte-level BPE
of 1,024 tokens (as train.py --model tiny trains, tools.tiny_decoder.train_tokenizer) encodes them with train.py's
defaults (max_len 256, answers 48). Measured, each in a fresh spawned process: the cache build
(tools.cache.ensure_for_training: file hash, validation line by line, tokenization, writing) with its peak RSS;
then --ranks gloo ranks run train.py's data path: rank 0 checks the cache (hashing the file), the others wait for
its folder, every rank memory-maps it and materialises its own micro-batches (train.micro_indices +
train.micro_batch: one collated micro-batch each, shortest first) for --steps optimizer steps of 64 users.
"start-up" is the time from process start (after imports) to the first step's micro-batches; peak RSS is VmHWM (it
counts the pages of the memory map a rank touched), also given above the rank's resident set after imports;
"growth per 10x users" is the difference of peak RSS per decade of users. Up to --old-upto users the in-memory path
(data.load_records + data.UserDataset, as --data-cache off) is timed too.

events: ours only, on a data set and base model: the text form (event text as subword tokens) against the
event-level form (one position per event: the frozen base embeddings pooled over the event's tokens, then the
modality adapter; data.Template event_modalities): user sequence lengths over the whole file and the median time of
train.train_step (GG-SM warm-up, LoRA r 16, batch 32 as one micro-batch, shortest first, packed by the encoder;
before --chunks was removed, 4 length-sorted chunks) on the same users, the two forms interleaved.
"""
import argparse
import math
import multiprocessing
import os
import shutil
import time
from functools import partial

import numpy as np
import torch

import checkpoint as ckpt
import data
import ggsm
import model
import train
from tools import cache, synthetic, tiny_decoder
from tools.bench_model import MARGIN, TAU, median, status_mb, time_interleaved

# -----------------------------------------------------------------------------
# data: the encoded cache (tools/cache.py) at growing numbers of users

def _data_args(cache_dir):
    """train.py's arguments as far as the data path reads them (its defaults: max_len 256, answer 48, GG-SM)."""
    return train.get_args(["--data-cache", cache_dir, "--batch-size", "64", "--micro-batch", "32"])


def _template(args, model_dir, report):
    """The data.Template a run of train.py with these arguments encodes with (the one checkpoint.build_encoder makes
    and tools.cache.ensure_for_training builds the cache with), without loading the model: model_dir holds only
    tokenizer.json here."""
    return data.Template(os.path.join(model_dir, "tokenizer.json"), report.modalities, report.vector_dims,
                         max_len=args.max_len, global_token=ggsm.STRATEGIES[args.mask].global_token,
                         max_answer_len=args.answer_max_len, preamble=args.preamble)


def _data_build_child(job, queue):
    """A fresh process: build (or find) the cache through tools.cache.ensure_for_training as rank 0 of one; time,
    peak RSS."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    args = _data_args(job["cache_dir"])
    folder, report = cache.ensure_for_training(args, job["path"], job["model_dir"], False, True, lambda m: None)
    queue.put({"seconds": time.perf_counter() - t0, "peak_rss_mb": status_mb("VmHWM"), "folder": folder})


def _data_old_child(job):
    """A fresh process: the in-memory path (data.load_records + data.UserDataset), as --data-cache off."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    records, report = data.load_records(job["path"], require=("answer",))
    t1 = time.perf_counter()
    args = _data_args(job["cache_dir"])
    data.UserDataset(records, _template(args, job["model_dir"], report))
    t2 = time.perf_counter()
    return {"load_s": t1 - t0, "encode_s": t2 - t1, "seconds": t2 - t0, "peak_rss_mb": status_mb("VmHWM")}


def _data_rank(rank, job, queue):
    """One gloo rank of a 2-rank job reading the cache as train.py does: rank 0 checks the cache (file hash), the
    others wait for its folder; each opens the memory maps and materialises its own micro-batches for `steps`."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(job["ranks"]), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(job["port"]))
    torch.set_num_threads(1)
    rss0 = status_mb("VmRSS")  # the interpreter with torch, numpy, tokenizers imported
    t0 = time.perf_counter()
    ddp, rank, world, device = train.setup_dist()
    args = _data_args(job["cache_dir"])
    folder, report = cache.ensure_for_training(args, job["path"], job["model_dir"], ddp, rank == 0, lambda m: None)
    ds = cache.EncodedDataset(folder, _template(args, job["model_dir"], report))
    accum = args.batch_size // (args.micro_batch * world)
    first, anon = None, status_mb("RssAnon")
    for step in range(job["steps"]):
        for m in range(accum):
            idx = train.micro_indices(len(ds), step, args.batch_size, args.micro_batch, world, rank, m, args.seed)
            train.micro_batch(ds, idx, device)
        if first is None:
            first = time.perf_counter() - t0
        anon = max(anon, status_mb("RssAnon"))  # private memory, sampled after every step
    total = time.perf_counter() - t0
    # VmHWM also counts the pages of the memory map this rank touched (RssFile): page cache, shared by the ranks
    # and reclaimable; a random micro-batch maps whole pages (and the kernel maps neighbouring cached pages too)
    queue.put({"rank": rank, "startup_s": first, "steps_s": total - first, "rss_start_mb": rss0,
               "peak_rss_mb": status_mb("VmHWM"), "peak_above_start_mb": status_mb("VmHWM") - rss0,
               "private_mb": anon, "mapped_cache_mb": status_mb("RssFile")})
    train.shutdown(ddp)


def replicate_users(src, copies, path):
    """A file of `copies` copies of the synthetic users in src, the user ids of copy r prefixed with 'r{r}-' (the
    synthetic writer takes about 15 minutes per million users on a 2-core machine; this takes seconds). Texts,
    queries and answers repeat, so the tables of distinct strings do not grow past src's. Written atomically."""
    with open(src, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    key = b'{"user_id":"'
    assert all(line.startswith(key) for line in lines), f"{src}: every line must start with {key!r}"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as out:
        for r in range(copies):
            prefix = key + f"r{r}-".encode()
            out.writelines(prefix + line[len(key):] for line in lines)
    os.replace(path + ".tmp", path)
    return path


def bench_data(args):
    """For each number of users: write the synthetic users once, build the cache (fresh process), then a 2-rank gloo
    job reads it as train.py does; optionally the in-memory path for comparison."""
    work = args.workdir
    os.makedirs(work, exist_ok=True)
    sizes = [int(x) for x in args.users.split(",")]
    model_dir = os.path.join(work, "tokenizer")  # a folder with tokenizer.json, as a model folder has
    if not os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        seed_dir = os.path.join(work, "users-2000")
        path, _ = synthetic.write_synthetic(seed_dir, 2000, 0, seed=args.seed)
        records, _ = data.load_records(path, require=("answer",))
        tok = tiny_decoder.train_tokenizer(tiny_decoder.record_texts(records, answers=False), 1024)  # as --model tiny
        os.makedirs(model_dir, exist_ok=True)
        tok.save(os.path.join(model_dir, "tokenizer.json"))
    mp = multiprocessing.get_context("spawn")
    rows = []
    for n in sizes:
        users = os.path.join(work, f"users-{n}")
        path = os.path.join(users, "train.jsonl")
        if not os.path.isfile(path) and args.replicate and n > args.replicate and n % args.replicate == 0:
            base = os.path.join(work, f"users-{args.replicate}", "train.jsonl")
            if not os.path.isfile(base):
                print(f"writing {args.replicate} synthetic users to {os.path.dirname(base)} (not timed)", flush=True)
                synthetic.write_synthetic(os.path.dirname(base), args.replicate, 0, seed=args.seed)
            print(f"writing {n} users to {users}: {n // args.replicate} copies of {base}, user ids renamed (not timed)",
                  flush=True)
            replicate_users(base, n // args.replicate, path)
        if not os.path.isfile(path):
            print(f"writing {n} synthetic users to {users} (not timed)", flush=True)
            synthetic.write_synthetic(users, n, 0, seed=args.seed)
        cache_dir = os.path.join(work, "encoded")
        job = {"path": path, "model_dir": model_dir, "cache_dir": cache_dir, "steps": args.steps, "ranks": args.ranks}
        row = {"users": n, "file_mb": os.path.getsize(path) / 2 ** 20}
        if n <= args.old_upto:
            with mp.Pool(1) as p:
                row["in_memory"] = p.apply(_data_old_child, (job,))
        # a fresh build each time: this size's caches live in their own folder, removed first
        key_dir = os.path.join(cache_dir, f"users-{n}")
        job["cache_dir"] = key_dir
        shutil.rmtree(key_dir, ignore_errors=True)
        queue = mp.Queue()  # the build in a process of its own
        proc = mp.Process(target=_data_build_child, args=(job, queue))
        proc.start()
        row["build"] = queue.get(timeout=3600)
        proc.join()
        row["cache_mb"] = sum(os.path.getsize(os.path.join(row["build"]["folder"], f))
                              for f in os.listdir(row["build"]["folder"])) / 2 ** 20
        queue = mp.Queue()
        job["port"] = 29500 + (os.getpid() + n) % 1000
        procs = [mp.Process(target=_data_rank, args=(r, job, queue)) for r in range(args.ranks)]
        for proc in procs:
            proc.start()
        ranks = sorted((queue.get(timeout=1800) for _ in procs), key=lambda r: r["rank"])
        for proc in procs:
            proc.join()
        row["ranks"] = ranks
        rows.append(row)
        print(f"{n} users: build {row['build']['seconds']:.1f} s, start-up {max(r['startup_s'] for r in ranks):.2f} s, "
              f"peak RSS per rank {max(r['peak_rss_mb'] for r in ranks):.0f} MiB", flush=True)
    for a, b in zip(rows, rows[1:]):
        decades = math.log10(b["users"] / a["users"])
        for key, name in (("peak_rss_mb", "rss_growth_per_10x_mb"), ("private_mb", "private_growth_per_10x_mb")):
            b[name] = (max(r[key] for r in b["ranks"]) - max(r[key] for r in a["ranks"])) / decades
    print(f"\nload average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (other work slows every number)")
    print("| users | file | in-memory path (load + encode), peak RSS | cache build, peak RSS | cache size | "
          f"start-up from the cache | peak RSS per rank ({args.ranks} gloo ranks) | of it private | of it file-backed "
          "(libraries, cache pages) | growth per 10x users: peak / private |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        old = r.get("in_memory")
        old_s = f"{old['seconds']:.1f} s ({old['load_s']:.1f} + {old['encode_s']:.1f}), {old['peak_rss_mb']:.0f} MiB" \
            if old else "not run"
        top = lambda key: max(x[key] for x in r["ranks"])  # noqa: E731
        grow = f"{r['rss_growth_per_10x_mb']:+.0f} / {r['private_growth_per_10x_mb']:+.0f} MiB" \
            if "rss_growth_per_10x_mb" in r else "—"
        print(f"| {r['users']:,} | {r['file_mb']:.0f} MB | {old_s} | {r['build']['seconds']:.1f} s, "
              f"{r['build']['peak_rss_mb']:.0f} MiB | {r['cache_mb']:.0f} MB | {top('startup_s'):.2f} s | "
              f"{top('peak_rss_mb'):.0f} MiB | {top('private_mb'):.0f} MiB | {top('mapped_cache_mb'):.0f} MiB | {grow} |")
    return {"rows": rows, "load_average": os.getloadavg(), "cpus": os.cpu_count(), "steps": args.steps}


def bench_events(args):
    """Text form against the event-level form on a data set: user sequence lengths (every user of the file) and the
    time of train.train_step (GG-SM warm-up, LoRA, both towers, train.py's defaults otherwise) on the same batches
    (each one train.micro_batch: shortest first, packed by the encoder), interleaved, medians. The event form puts
    every text modality of the data in event form."""
    records, report = data.load_records(args.data, require=("answer",))
    text_modalities = sorted({e["modality"] for r in records for e in r["events"] if e.get("text") is not None})
    lora = {"r": 16, "alpha": 16.0, "dropout": 0.0, "targets": list(model.LORA_TARGETS)}
    forms = {"text": [], "event": text_modalities}
    load = os.getloadavg()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(records))
    steps, out = {}, {"data": args.data, "model": args.model, "batch": args.batch, "event_modalities": text_modalities,
                      "threads": torch.get_num_threads(), "load_average_before": list(load)}
    for name, ev in forms.items():
        spec = ckpt.RunSpec(os.path.abspath(args.model), report.modalities, report.vector_dims, mask="ggsm",
                            total_steps=10 ** 6, warmup_steps=10 ** 6 - 1, lora=lora, max_len=args.max_len,
                            answer_max_len=48, standardize=True, event_modalities=ev, preamble=args.preamble)
        torch.manual_seed(args.seed)
        encoder, template, strategy = ckpt.build_encoder(spec)
        t0 = time.perf_counter()
        ds = data.UserDataset(records, template)
        encode_s = time.perf_counter() - t0
        lengths = np.asarray(ds.lengths)
        towers = train.DualTower(encoder.train(), None)
        opt = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=1e-4)
        batches = [train.micro_batch(ds, order[i * args.batch:(i + 1) * args.batch].tolist(), "cpu")
                   for i in range(args.reps + 1)]
        loss_fn = partial(ggsm.info_nce, tau=TAU, margin=MARGIN)
        counter = [0]

        def step(batches=batches, towers=towers, strategy=strategy, opt=opt, counter=counter):
            b = batches[counter[0] % len(batches)]
            train.train_step(towers, strategy, opt, [b], 0, loss_fn)
            counter[0] += 1

        steps[name] = step
        out[name] = {"mean_length": float(lengths.mean()), "median_length": float(np.median(lengths)),
                     "max_length": int(lengths.max()), "n_cut_events": int(ds.n_cut), "encode_data_s": encode_s}
    times = time_interleaved(steps, args.reps, torch.device("cpu"))
    for name in forms:
        med = median(times[name])
        out[name].update(times_s=times[name], median_step_s=med, users_per_s=args.batch / med)
    out["load_average_after"] = list(os.getloadavg())
    print(f"{args.data}: {len(records)} users; event form for {', '.join(text_modalities)}; batch {args.batch}, "
          f"{args.reps} interleaved steps each, medians; {torch.get_num_threads()} threads; load average "
          f"{load[0]:.2f} before, {out['load_average_after'][0]:.2f} after\n")
    print("| form | mean user length | median | max | events cut | train step | users/s |")
    print("|---|---|---|---|---|---|---|")
    for name in forms:
        r = out[name]
        print(f"| {name} | {r['mean_length']:.1f} | {r['median_length']:.0f} | {r['max_length']} | {r['n_cut_events']} | "
              f"{r['median_step_s'] * 1e3:.0f} ms | {r['users_per_s']:.1f} |")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sections = parser.add_subparsers(dest="section", required=True)
    # --- data: the encoded cache at growing numbers of users
    sd = sections.add_parser("data", help="encoded cache: build time, start-up and peak RSS per rank as users grow")
    sd.add_argument("--users", default="10000,100000", help="comma-separated numbers of synthetic users (1000000 when asked)")
    sd.add_argument("--ranks", type=int, default=2, help="gloo ranks reading the cache")
    sd.add_argument("--steps", type=int, default=20, help="optimizer steps of micro-batches each rank materialises")
    sd.add_argument("--old-upto", type=int, default=10000, help="also time the in-memory path up to this many users")
    sd.add_argument("--workdir", default="cache/bench-data", help="synthetic users, tokenizer and caches (reused)")
    sd.add_argument("--replicate", type=int, default=0, metavar="N",
                    help="write a missing file of a multiple of N users as copies of the N-user file, user ids renamed "
                         "(faster than the synthetic writer; the distinct texts do not grow); 0: always the writer")
    sd.add_argument("--seed", type=int, default=0)
    sd.add_argument("--out", default=None, help="write the results as JSON here")
    # --- events: text form vs the event-level form on a data set and base model (ours only)
    se = sections.add_parser("events", help="text form vs event-level form: user lengths and train-step time")
    se.add_argument("--model", required=True, help="Hugging Face folder (e.g. the default run's cache/tiny-*)")
    se.add_argument("--data", required=True, help="training JSONL with answers (e.g. cache/synthetic-*/train.jsonl)")
    se.add_argument("--max-len", type=int, default=256, help="user-side token budget (train.py's default)")
    se.add_argument("--batch", type=int, default=32, help="users per step (train.py's default)")
    se.add_argument("--preamble", default="", type=data.preamble_text, help="the template's opening sentence: 'paper', any text, or '' (none)")
    se.add_argument("--reps", type=int, default=5, help="timed steps per form (after one warm-up)")
    se.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    se.add_argument("--seed", type=int, default=0)
    se.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    result = {"data": bench_data, "events": bench_events}[args.section](args)
    if args.out:
        ckpt.write_json(args.out, result)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()

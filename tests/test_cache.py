"""Tests for tools/cache.py, the encoded cache. The reference is the in-memory path it replaces: data.UserDataset
(data.Template.encode_user one user at a time) for the examples, and train.py / probe.run with --data-cache off
for the losses, weights, resume and probe AUCs.

    python -m pytest -q tests/test_cache.py
"""
import copy
import json
import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import data
import train
from test_data import CORPUS, GOOD, write_lines
from test_train import common, losses, max_diff, run, workdir  # noqa: F401 (workdir: a fixture)
from tools import cache, synthetic, tiny_decoder


@pytest.fixture(scope="module")
def tok():
    return tiny_decoder.train_tokenizer((data.event_piece(t) for t in CORPUS), vocab_size=300)


def assert_same_examples(old, new):
    """Every field of every example equal (vectors: same float32 values), in the same order."""
    assert len(old) == len(new)
    for i in range(len(old)):
        a, b = old[i], new[i]
        assert a.keys() == b.keys(), f"user {i}: fields {sorted(a.keys() ^ b.keys())}"
        for k in a:
            if k == "vectors":
                assert a[k].keys() == b[k].keys(), f"user {i}: vector modalities {a[k].keys()} vs {b[k].keys()}"
                for m in a[k]:
                    assert b[k][m].dtype == np.float32 and np.array_equal(a[k][m], b[k][m]), f"user {i}: vectors[{m}]"
            else:
                assert a[k] == b[k], f"user {i}: {k}: UserDataset {a[k]!r} vs cache {b[k]!r}"
    assert list(old.lengths) == list(new.lengths) and old.n_cut == new.n_cut


def build_both(path, root, template, require=("answer",), with_answer=True, skip_bad=False):
    records, _ = data.load_records(path, require=require, skip_bad=skip_bad)
    old = data.UserDataset(records, template, with_answer=with_answer)
    folder = cache.ensure(path, str(root), {"case": "test"}, lambda report: template, require=require,
                          skip_bad=skip_bad, with_answer=with_answer, log=lambda m: None)
    return old, cache.EncodedDataset(folder, template), folder


# every corner of the template: untimed events (newer than timed ones, file order), equal times, ISO times,
# vector-only and text+vector events, a modality outside the paper's order, no query, no user_id, non-ASCII text
EDGE = [
    {"user_id": "ü1", "events": [{"modality": "search", "time": 5, "text": "what next"},
                                 {"modality": "bill", "time": 5, "text": "grocery 30"},
                                 {"modality": "bill", "time": 2, "text": "cinema 45", "vector": [1, 2, 3]},
                                 {"modality": "tabular", "vector": [0.1, -2.5, 1e-8]},
                                 {"modality": "bill", "text": "metro 4 — ünïcode"},
                                 {"modality": "zzz", "time": "2024-01-02T00:00:00", "text": "weather today"}],
     "query": "what next", "answer": "cinema tickets", "labels": {"movie": 1, "food": 0}},
    {"events": [{"modality": "bill", "time": 1.5, "text": "grocery 30"}], "answer": "metro rides",
     "labels": {"food": 1}},
    {"user_id": 7, "events": [{"modality": "tabular", "vector": [3, 2, 1]}], "query": "", "answer": "x " * 60,
     "labels": {}},
] + [{"user_id": f"r{k}", "events": [{"modality": ("bill", "search", "zzz")[j % 3], "time": (j * 7919) % 13,
                                      "text": CORPUS[(k + j) % 8]} for j in range(3 + k % 9)]
      + [{"modality": "tabular", "vector": [k, -k, 0.5]}] * (k % 2),
      "query": "what next" if k % 3 else None, "answer": CORPUS[k % 8], "labels": {"movie": k % 2}}
     for k in range(40)]


@pytest.mark.parametrize("kw", [dict(max_len=512), dict(max_len=20), dict(max_len=16, global_token=True),
                                dict(max_len=30),
                                dict(max_len=40, max_answer_len=4), dict(max_len=512, preamble=data.PREAMBLE),
                                dict(max_len=24, global_token=True, preamble="user data:")])
def test_examples_equal_user_dataset(tok, tmp_path, kw):
    """Hand-made corner cases, long and heavily truncated, with <GLOBAL>, a preamble, cut answers."""
    path = write_lines(tmp_path, EDGE)
    tpl = data.Template(copy.deepcopy(tok), ["bill", "search", "tabular", "zzz"], {"tabular": 3, "bill": 3},
                        **{"preamble": "", **kw})
    old, new, _ = build_both(path, tmp_path / "enc", tpl, require=(), with_answer=True)
    assert_same_examples(old, new)
    assert old.n_cut > 0 or kw["max_len"] == 512
    assert new[0]["history"][0] == len(tpl.preamble_ids) + int(tpl.global_token)
    assert new[0]["labels"] == {"movie": 1, "food": 0} and new[2]["user_id"] == "7" and new[1]["user_id"].endswith(":2")


def test_synthetic_users_and_chunks(tmp_path):
    """The embedded benchmark's users, encoded in chunks of 7 users (a chunk boundary inside every batch)."""
    train_path, _ = synthetic.write_synthetic(str(tmp_path / "syn"), 60, 10, seed=1)
    records, report = data.load_records(train_path, require=("answer",))
    tk = tiny_decoder.train_tokenizer(tiny_decoder.record_texts(records), vocab_size=400)
    tpl = data.Template(tk, report.modalities, report.vector_dims, max_len=100, max_answer_len=24)
    key = {"format": cache.FORMAT, "test": "chunks"}
    folder = cache.build(train_path, str(tmp_path / "c"), key, lambda r: tpl, require=("answer",), chunk=7)
    assert_same_examples(data.UserDataset(records, tpl), cache.EncodedDataset(folder, tpl))
    # the same collated tensors for a length-sorted micro-batch
    old, new = data.UserDataset(records, tpl), cache.EncodedDataset(folder, tpl)
    idx = list(range(3, 40, 3))
    a, b = train.micro_batch(old, idx, "cpu"), train.micro_batch(new, idx, "cpu")
    for x, y in ((a.user.input_ids, b.user.input_ids), (a.answer.input_ids, b.answer.input_ids),
                 (a.user.pool_index, b.user.pool_index), (a.index, b.index),
                 (a.user.vectors["tabular"], b.user.vectors["tabular"]),
                 (a.user.vector_pos["tabular"], b.user.vector_pos["tabular"])):
        assert torch.equal(x, y)


@pytest.mark.parametrize("rec, tpl_kw, message, line", [
    (dict(GOOD, events=[{"modality": "app", "text": "x"}]), {}, "events[0].modality 'app' is not among", 4),
    (dict(GOOD, events=[{"modality": "bill", "text": "hi <USER> there"}]), {}, "contains the reserved token '<USER>'", 4),
    (dict(GOOD, query="<VEC>"), {}, "contains the reserved token '<VEC>'", 4),
    (dict(GOOD, events=[{"modality": "bill", "vector": [1.0]}]), {}, "modality 'bill' has no vector_dims entry", 4),
    (GOOD, {"dims": {"tabular": 4}}, "events[1].vector: length 3, but modality 'tabular' has 4", 1),
    (dict(GOOD, query="what will this user do next month, and the month after that?"), {"max_len": 20},
     "more than max_len=20", 4),
    (GOOD, {"max_len": 20, "preamble": data.PREAMBLE}, "tokens with <USER> and the preamble, more than max_len=20", 1),
])
def test_encoding_errors_name_file_and_line(tok, tmp_path, rec, tpl_kw, message, line):
    """What the template refuses, the cache refuses too (the old path raises as well), naming file:line and user."""
    path = write_lines(tmp_path, [GOOD, "", GOOD, rec])  # the bad record on line 4 (line 2 is blank)
    tpl_kw = dict(tpl_kw)
    tpl = data.Template(copy.deepcopy(tok), ["bill", "search", "tabular"], tpl_kw.pop("dims", {"tabular": 3}),
                        **{"preamble": "", **tpl_kw})
    records, _ = data.load_records(path)
    with pytest.raises(ValueError):
        data.UserDataset(records, tpl)
    with pytest.raises(ValueError) as e:
        cache.ensure(path, str(tmp_path / "enc"), {}, lambda r: tpl, log=lambda m: None)
    assert f"{path}:{line}: user u1" in str(e.value) and message in str(e.value), str(e.value)
    assert not os.path.exists(tmp_path / "enc") or not os.listdir(tmp_path / "enc")  # nothing half-written


def test_validation_errors_and_skip_bad_as_load_records(tok, tmp_path, capsys):
    path = write_lines(tmp_path, [GOOD, '{"events": [', GOOD])
    tpl = data.Template(copy.deepcopy(tok), ["bill", "tabular"], {"tabular": 3}, preamble="")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: invalid JSON")):
        cache.ensure(path, str(tmp_path / "enc"), {}, lambda r: tpl, log=lambda m: None)
    old, new, folder = build_both(path, tmp_path / "enc", tpl, require=(), skip_bad=True)
    assert_same_examples(old, new)
    report = cache.read_report(folder)
    assert (report.n_ok, report.n_bad) == (2, 1) and f"{path}:2: invalid JSON" in report.reasons[0]
    assert report.modalities == ["bill", "tabular"] and report.vector_dims == {"tabular": 3}


def test_key_rebuild_and_mismatch(tok, tmp_path):
    """A changed file or setting gives another folder; a folder whose key, template or arrays do not match fails
    naming the folder and what differs."""
    path = write_lines(tmp_path, [GOOD, GOOD])
    tpl = data.Template(copy.deepcopy(tok), ["bill", "tabular"], {"tabular": 3}, max_len=64, preamble="")
    root, quiet = str(tmp_path / "enc"), (lambda m: None)
    f1 = cache.ensure(path, root, {"max_len": 64}, lambda r: tpl, log=quiet)
    assert cache.ensure(path, root, {"max_len": 64}, lambda r: tpl, log=quiet) == f1  # reused
    assert cache.ensure(path, root, {"max_len": 65}, lambda r: tpl, log=quiet) != f1  # a setting changed
    write_lines(tmp_path, [GOOD, dict(GOOD, user_id="u2")])
    f3 = cache.ensure(path, root, {"max_len": 64}, lambda r: tpl, log=quiet)
    assert f3 != f1 and cache.EncodedDataset(f3, tpl)[1]["user_id"] == "u2"  # the file changed
    assert not [n for n in os.listdir(root) if ".tmp" in n]
    # the template it is opened with must be the one it was built with
    other = data.Template(copy.deepcopy(tok), ["bill", "tabular"], {"tabular": 3}, max_len=32, preamble="")
    with pytest.raises(ValueError, match=re.escape(f"{f3}: the cache was encoded with another template: max_len differ")):
        cache.EncodedDataset(f3, other)
    # a folder whose meta.json names another key
    with open(os.path.join(f3, "meta.json")) as f:
        meta = json.load(f)
    meta["key"]["file_sha256"] = "0" * 64
    with open(os.path.join(f3, "meta.json"), "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match=re.escape(f"{f3}: the cache does not match its key: file_sha256 differ")):
        cache.ensure(path, root, {"max_len": 64}, lambda r: tpl, log=quiet)
    # a damaged array
    np.save(os.path.join(f1, "user_off.npy"), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=re.escape(f"{f1}: user_off.npy: 2 rows, expected 3")):
        cache.EncodedDataset(f1, tpl)


def test_reader_holds_no_users_in_memory(tok, tmp_path):
    """Everything per user stays in the memory maps but `lengths`; ds[i] reads user i only."""
    path = write_lines(tmp_path, [dict(GOOD, user_id=f"u{k}") for k in range(50)])
    tpl = data.Template(copy.deepcopy(tok), ["bill", "tabular"], {"tabular": 3}, preamble="")
    ds = cache.EncodedDataset(cache.ensure(path, str(tmp_path / "e"), {}, lambda r: tpl, log=lambda m: None), tpl)
    for name in ("user_ids", "user_off", "answer_ids", "labels", "uid_bytes", "lines"):
        assert isinstance(getattr(ds, name), np.memmap), name
    assert all(isinstance(x, np.memmap) for v in ds.vecs.values() for x in v)
    assert ds[49]["user_id"] == "u49" and int(ds.lines[49]) == 50


# -----------------------------------------------------------------------------
# train.py and the probe: the cache path gives the numbers of the in-memory path


SHORT = ["--preamble", "User data:"]  # an opening sentence that fits --max-len 96 with the small BPE


def test_training_and_probe_same_as_in_memory(workdir):
    """--data-cache off (records in memory) against the cache (built by this run, beside the file): the same
    losses at every step, the same final weights and the same probe AUCs, for the trained row and the Oracle;
    hybrid_gq: a template with <GLOBAL> and a preamble for training, the preamble alone for the Oracle (two probe
    caches)."""
    a, b = str(workdir["root"] / "in-memory"), str(workdir["root"] / "cached")
    args = ["--mask", "hybrid_gq", "--steps", "4", "--mask-warmup", "0.5", "--batch-size", "8", "--micro-batch", "4",
            "--probe-data", workdir["probe"]] + SHORT
    with_probe = lambda out, *extra: [x for x in common(workdir, out, *args, *extra) if x != "--no-probe"]  # noqa: E731
    run(with_probe(a, "--data-cache", "off"))
    assert not os.path.exists(workdir["root"] / "data" / "encoded")
    run(with_probe(b))
    encoded = sorted(os.listdir(workdir["root"] / "data" / "encoded"))
    assert [n.split("-")[0] for n in encoded] == ["probe", "probe", "train"], encoded
    assert losses(a) == losses(b)
    wa, wb = (load_file(os.path.join(r, "checkpoint", "trainable.safetensors")) for r in (a, b))
    assert max_diff(wa, wb) == 0.0
    pa, pb = (json.load(open(os.path.join(r, "probe.json"))) for r in (a, b))
    for row_a, row_b in ((pa, pb), (pa["oracle"], pb["oracle"])):
        assert row_a["mean_auc"] == row_b["mean_auc"] and row_a["mean_auc_se"] == row_b["mean_auc_se"]
        assert {t: r["auc"] for t, r in row_a["tasks"].items()} == {t: r["auc"] for t, r in row_b["tasks"].items()}
    # probe.py alone, on the checkpoint and as the Oracle of the base: the cache (a fresh folder) = in memory
    import probe
    for source in (["--checkpoint", os.path.join(a, "checkpoint")], ["--model", workdir["model"], "--max-len", "96"] + SHORT):
        outs = []
        for dc in ("off", str(workdir["root"] / "probe-cache")):
            out = str(workdir["root"] / f"probe-{len(outs)}")
            outs.append(probe.main(source + ["--data", workdir["probe"], "--data-cache", dc, "--export", out + ".st"]))
            outs[-1]["emb"] = probe.load_embeddings(out + ".st")
        assert outs[0]["mean_auc"] == outs[1]["mean_auc"] and outs[0]["tasks"] == outs[1]["tasks"]
        assert np.array_equal(outs[0]["emb"][0], outs[1]["emb"][0]) and outs[0]["emb"][1] == outs[1]["emb"][1]
    assert len(os.listdir(workdir["root"] / "probe-cache")) == 2  # one folder per template


def test_probe_embeddings_same_as_in_memory(workdir, tmp_path):
    import checkpoint as ckpt
    import probe
    spec = ckpt.RunSpec(workdir["model"], ["bill", "minipro", "spm", "app", "search", "tabular"], {"tabular": 8},
                        max_len=96, preamble="User data:")
    torch.manual_seed(0)
    enc, tpl, strat = ckpt.build_encoder(spec)
    records, _ = data.load_records(workdir["probe"], require=("labels",))
    old = probe.embed_records(enc, tpl, strat, records, "cpu", batch_size=16)
    ds, recs = probe.labelled_users(workdir["probe"], tpl, cache_root=str(tmp_path))
    assert np.array_equal(old, probe.embed_dataset(enc, ds, strat, "cpu", batch_size=16))
    assert ds.records() == recs == [{"user_id": r["user_id"], "labels": r["labels"]} for r in records]


def test_two_ranks_from_the_cache_equal_one_rank_in_memory(workdir):
    """torchrun, 2 gloo ranks: rank 0 builds the cache while rank 1 waits, both read their own micro-batches;
    the losses and weights are the 1-process in-memory run's. Then resumed from step 2 on 2 ranks: the data
    position is restored (same losses and weights as never stopped). hybrid_mask relaxes causality inside each
    user's history segment only: the segment read from the cache is the template's."""
    cache_dir = str(workdir["root"] / "ddp-cache")
    one, two = str(workdir["root"] / "one-mem"), str(workdir["root"] / "two-cache")
    # --no-pack: 8 users packed in one process and 4 per rank pack into different rows, whose round-off (1e-6 per
    # step, tests/test_pack.py) grows past 1e-5 in 4 steps; padded, the 8 users of one process and the 4 of a rank
    # pad to different widths too (1.07e-5 measured after 4 steps), hence 2e-5; what is tested here is the data path
    args = ["--mask", "hybrid_mask", "--steps", "4", "--mask-warmup", "0.5", "--batch-size", "8", "--no-standardize",
            "--ckpt-every", "2", "--no-pack"] + SHORT
    run(common(workdir, one, *args, "--micro-batch", "8", "--data-cache", "off"))
    run(common(workdir, two, *args, "--micro-batch", "4", "--data-cache", cache_dir, "--halt-after", "2"), nproc=2)
    assert len(os.listdir(cache_dir)) == 1
    run(["--out", two, "--resume", "--no-probe"], nproc=2)
    assert losses(one) == pytest.approx(losses(two), abs=1e-5)
    w1, w2 = (load_file(os.path.join(r, "checkpoint", "trainable.safetensors")) for r in (one, two))
    assert max_diff(w1, w2) < 2e-5


def test_a_template_change_not_mirrored_fails_the_build(tok, tmp_path, monkeypatch):
    """cache.build restates data.Template; if the template changes (an opening sentence, a new example field) and
    tools/cache.py does not follow, the build re-encodes its first and last users with data.Template and stops."""
    path = write_lines(tmp_path, [dict(GOOD, user_id=f"u{k}") for k in range(30)])
    tpl = data.Template(copy.deepcopy(tok), ["bill", "tabular"], {"tabular": 3}, preamble="")
    encode_user = data.Template.encode_user

    def with_opening(self, record):  # what a template with an opening sentence would give
        out = encode_user(self, record)
        return dict(out, input_ids=[self.eos_id] + out["input_ids"], user_index=out["user_index"] + 1,
                    vector_pos={m: [c + 1 for c in cols] for m, cols in out["vector_pos"].items()})
    monkeypatch.setattr(data.Template, "encode_user", with_opening)
    with pytest.raises(ValueError, match=r"users.jsonl:1: user u0: cache.py encodes input_ids as .* mirror the template"):
        cache.ensure(path, str(tmp_path / "a"), {}, lambda r: tpl, log=lambda m: None)
    monkeypatch.setattr(data.Template, "encode_user", encode_user)
    init = data.UserDataset.__init__

    def with_field(self, *a, **kw):
        init(self, *a, **kw)
        for ex in self.examples:
            ex["history_end"] = 0
    monkeypatch.setattr(data.UserDataset, "__init__", with_field)
    with pytest.raises(ValueError, match=r"fields \['history_end'\] that cache.py does not write"):
        cache.ensure(path, str(tmp_path / "b"), {}, lambda r: tpl, log=lambda m: None)
    assert os.listdir(tmp_path / "a") == os.listdir(tmp_path / "b") == []  # not even the temporary folders


def test_bench_data_runs(tmp_path):
    """tools/bench_data.py data end to end on small files: the in-memory path, the build and 2 gloo ranks reading the
    cache."""
    from tools import bench_data
    out = bench_data.main(["data", "--users", "200,400", "--steps", "2", "--old-upto", "200", "--workdir", str(tmp_path)])
    a, b = out["rows"]
    assert (a["users"], b["users"]) == (200, 400) and "in_memory" in a and "in_memory" not in b
    assert [r["rank"] for r in b["ranks"]] == [0, 1] and all(r["startup_s"] > 0 for r in b["ranks"])
    assert b["build"]["folder"].startswith(str(tmp_path)) and "rss_growth_per_10x_mb" in b


def test_validation_pass_equals_load_records(tok, tmp_path, capsys):
    """The cache's validation pass (cache.collect, one pass in file order) gives the users, lines, report and errors
    of data.load_records: bad lines under --skip-bad, a vector wider than the file's first width (skipped or named),
    the first error of the file when a later line also has one."""
    lines = [dict(GOOD, user_id=f"u{k}") for k in range(30)]
    lines[4] = '{"events": ['
    lines[22] = "[1]"
    lines[17] = dict(GOOD, user_id="wide", events=[{"modality": "tabular", "vector": [1, 2, 3, 4]}])
    path = write_lines(tmp_path, [""] + lines)  # a blank first line: numbering must still follow the file
    tpl = data.Template(copy.deepcopy(tok), ["bill", "tabular"], {"tabular": 3}, preamble="")
    records, report = data.load_records(path, skip_bad=True)
    folder = cache.build(path, str(tmp_path / "p"), {"format": cache.FORMAT}, lambda r: tpl, skip_bad=True)
    ds = cache.EncodedDataset(folder, tpl)
    assert_same_examples(data.UserDataset(records, tpl), ds)
    assert list(ds.lines) == [int(r["user_id"][1:]) + 2 for r in records]
    rep = cache.read_report(folder)
    assert (rep.n_ok, rep.n_bad, rep.reasons, rep.vector_dims, rep.modality_counts) == \
        (report.n_ok, report.n_bad, report.reasons, report.vector_dims, report.modality_counts)
    # without --skip-bad: the first bad line of the file, as data.load_records names it
    with pytest.raises(ValueError) as one:
        data.load_records(path)
    with pytest.raises(ValueError) as cached:
        cache.collect(path)
    assert str(cached.value) == str(one.value) and f"{path}:6:" in str(one.value)
    # line 19's 4-wide vector sets the file's width when no line before it has one; line 20's 3-wide one is the error
    lines[4], lines[22] = GOOD, GOOD
    lines[:17] = [dict(GOOD, events=[{"modality": "bill", "text": "x"}])] * 17  # no vector before line 19 now
    write_lines(tmp_path, [""] + lines)
    with pytest.raises(ValueError, match=re.escape(f"{path}:20: events[1].vector: length 3, but modality 'tabular' has 4")):
        cache.collect(path)


# records the batch checks must refuse, each with the error data.validate_record gives (or data.parse_line)
BAD_LINES = [
    '{"events": [', "[1]", '"text"', b"\xff", b'{"user_id": "\xc3", "events": []}',
    dict(GOOD, user_id=True), dict(GOOD, user_id=1.5), {"user_id": "x"}, dict(GOOD, events={}), dict(GOOD, events=[]),
    dict(GOOD, events=[1]), dict(GOOD, events=[{"modality": "", "text": "x"}]),
    dict(GOOD, events=[{"modality": 5, "text": "x"}]), dict(GOOD, events=[{"text": "x"}]),
    dict(GOOD, events=[{"modality": "bill", "time": True, "text": "x"}]),
    '{"events": [{"modality": "bill", "time": NaN, "text": "x"}], "answer": "a"}',
    '{"events": [{"modality": "bill", "time": Infinity, "text": "x"}], "answer": "a"}',
    dict(GOOD, events=[{"modality": "bill", "time": "soon", "text": "x"}]),
    dict(GOOD, events=[{"modality": "bill", "time": 10 ** 400, "text": "x"}]),
    dict(GOOD, events=[{"modality": "bill", "text": 5}]), dict(GOOD, events=[{"modality": "bill", "text": ["x"]}]),
    dict(GOOD, events=[{"modality": "bill"}]), dict(GOOD, events=[{"modality": "bill", "text": None, "vector": None}]),
    dict(GOOD, events=[{"modality": "tabular", "vector": []}]), dict(GOOD, events=[{"modality": "tabular", "vector": 3}]),
    dict(GOOD, events=[{"modality": "tabular", "vector": [1, "2", 3]}]),
    dict(GOOD, events=[{"modality": "tabular", "vector": [1, True, 3]}]),
    dict(GOOD, events=[{"modality": "tabular", "vector": [1, 10 ** 400, 3]}]),
    '{"events": [{"modality": "tabular", "vector": [1, NaN, 3]}], "answer": "a"}',
    '{"events": [{"modality": "tabular", "vector": [1, -Infinity, 3]}], "answer": "a"}',
    dict(GOOD, events=[{"modality": "tabular", "vector": [1, 2]}]),
    dict(GOOD, events=[{"modality": "bill", "text": "x"}, {"modality": "bill", "vector": [1]},
                       {"modality": "bill", "vector": [1, 2]}]),
    dict(GOOD, query=5), dict(GOOD, answer=""), dict(GOOD, answer="  "), dict(GOOD, answer=3),
    {k: v for k, v in GOOD.items() if k != "answer"}, dict(GOOD, labels=[1]), dict(GOOD, labels={"movie": 2}),
    dict(GOOD, labels={"movie": True}), dict(GOOD, labels={"movie": "1"}),
]


def test_bad_line_deep_in_a_file(tmp_path):
    """A bad record deep in a file (line 2,345 of 2,600) is reported by the cache's pass with the file:line and the
    message of data.load_records, for every kind of error; with --skip-bad that line alone is dropped."""
    good = [dict(GOOD, user_id=f"u{k}", events=[{"modality": ("bill", "search")[k % 2], "time": k * 60 + j,
                                                  "text": f"{CORPUS[(k + j) % 8]} {k % 97}"} for j in range(1 + k % 5)]
                 + [{"modality": "tabular", "vector": [k, 0.5, -1.25]}] * (k % 3 > 0), query=None if k % 4 else "q")
            for k in range(2600)]
    for bad in BAD_LINES:
        lines = list(good)
        lines[2344] = bad
        path = str(tmp_path / "users.jsonl")
        with open(path, "wb") as f:
            f.write(b"\n".join(l if isinstance(l, bytes) else l.encode() if isinstance(l, str) else json.dumps(l).encode()
                                for l in lines))
        with pytest.raises(ValueError) as one:
            data.load_records(path, require=("answer",))
        with pytest.raises(ValueError) as cached:
            cache.collect(path, require=("answer",))
        assert str(cached.value) == str(one.value) and str(one.value).startswith(f"{path}:2345: "), (bad, one.value)
        _, report, _ = cache.collect(path, require=("answer",), skip_bad=True)
        assert report.n_bad == 1 and report.n_ok == 2599 and report.reasons == [str(one.value)]


def test_bench_replicated_users(tmp_path):
    """tools/bench_data.py data --replicate: copies of a synthetic file, every user id unique, the records otherwise the
    same."""
    from tools import bench_data
    src, _ = synthetic.write_synthetic(str(tmp_path / "syn"), 30, 0, seed=2)
    path = bench_data.replicate_users(src, 3, str(tmp_path / "big" / "train.jsonl"))
    base, _ = data.load_records(src)
    big, report = data.load_records(path)
    assert len(big) == 90 and len({r["user_id"] for r in big}) == 90 and big[65]["user_id"] == "r2-" + base[5]["user_id"]
    assert all({k: v for k, v in r.items() if k != "user_id"} == {k: v for k, v in base[i % 30].items() if k != "user_id"}
               for i, r in enumerate(big))


def test_a_file_without_vectors(tok, tmp_path):
    """Text events only (as MovieLens converts): the cache builds and equals the in-memory encoding (its vector-width
    check once indexed the empty table of vector lengths)."""
    path = write_lines(tmp_path, [{"user_id": f"u{k}", "events": [{"modality": "bill", "time": t, "text": f"gym {k + t}"}
                                                                  for t in range(k % 4 + 1)], "answer": "gym"}
                                  for k in range(12)])
    tpl = data.Template(copy.deepcopy(tok), ["bill"], {}, max_len=30, preamble="")
    records, _ = data.load_records(path)
    folder = cache.build(path, str(tmp_path / "p"), {"format": cache.FORMAT}, lambda r: tpl)
    assert_same_examples(data.UserDataset(records, tpl), cache.EncodedDataset(folder, tpl))


def ids_encoder(ids):
    """A stand-in event encoder that tells ids apart (the real one, model.frozen_token_mean, is tested in test_train)."""
    return np.array([len(ids), sum(ids), ids[0]], np.float32)


@pytest.mark.parametrize("kw", [dict(max_len=512), dict(max_len=16), dict(max_len=19, global_token=True),
                                dict(max_len=24, preamble="user data:")])
def test_event_form_examples_equal_user_dataset(tok, tmp_path, kw):
    """The event form (one <VEC> per event of bill and zzz, its vector from the event's ids), read from the cache:
    the same examples as data.Template, with text events, event-form texts, the file's own vectors (a bill event
    with both: its text's <VEC> first) and cuts in one user. The cache stores the texts' ids, not their vectors: the
    reader's template encodes them, so another encoder on the same folder gives its own vectors."""
    path = write_lines(tmp_path, EDGE)
    mk = lambda enc: data.Template(copy.deepcopy(tok), ["bill", "search", "tabular", "zzz"],  # noqa: E731
                                   {"tabular": 3, "bill": 3}, event_modalities=["bill", "zzz"], event_encoder=enc,
                                   event_dim=3, **{"preamble": "", **kw})
    tpl = mk(ids_encoder)
    old, new, folder = build_both(path, tmp_path / "enc", tpl, require=(), with_answer=True)
    assert_same_examples(old, new)
    first = new[0]
    assert len(first["vectors"]["bill"]) == len(first["vector_pos"]["bill"])
    if kw["max_len"] == 512:  # every bill event: 3 texts + the vector of the one that has both, in time order
        assert old.n_cut == 0 and [float(v[0]) for v in first["vectors"]["bill"]][:2] != [1.0, 2.0]
        assert sum(1 for v in first["vectors"]["bill"] if list(v) == [1.0, 2.0, 3.0]) == 1
        assert len(first["vectors"]["bill"]) == 4 and len(first["vectors"]["zzz"]) == 1
    else:
        assert old.n_cut > 0
    src = np.load(os.path.join(folder, f"vec{cache.read_meta(folder)['vector_modalities'].index('bill')}_src.npy"))
    assert (src < 0).any() and ((src >= 0).any() or kw["max_len"] < 512)  # event texts and file vectors in one modality
    other = cache.EncodedDataset(folder, mk(lambda ids: -ids_encoder(ids)))  # the same fingerprint, another encoder
    if "zzz" in first["vectors"]:  # its one event is in event form
        assert np.array_equal(other[0]["vectors"]["zzz"], -first["vectors"]["zzz"])

"""Tests for data.py: validation errors name file:line and field, the App. A.1 template, truncation,
collation, the bucketing sampler; and for the tools that make data for it: tools/tiny_decoder.py's tokenizer and
corpus, tools/synthetic.py's benchmark (determinism, sane labels, and a scikit-learn bag-of-words baseline that
learns the tasks without solving them).

    python -m pytest -q tests/test_data.py
"""
import copy
import json

import numpy as np
import pytest
import torch

import data
from tools import synthetic, tiny_decoder

# -----------------------------------------------------------------------------
# helpers

GOOD = {"user_id": "u1", "events": [{"modality": "bill", "time": 1, "text": "grocery 30"},
                                    {"modality": "tabular", "vector": [0.1, 0.2, 0.3]}],
        "query": "q", "answer": "cinema tickets", "labels": {"movie": 1}}


def write_lines(tmp_path, lines, name="users.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return str(p)


def with_event(ev, **top):
    rec = json.loads(json.dumps(GOOD))
    rec["events"].append(ev)
    rec.update(top)
    return rec


CORPUS = ["grocery 30", "cinema 45", "weather today", "home>movies>tickets", "metro 4", "what next",
          "next month: cinema tickets; food delivery", "Instruction: what will this user do"] * 20


@pytest.fixture(scope="module")
def tok():
    return tiny_decoder.train_tokenizer((data.event_piece(t) for t in CORPUS), vocab_size=300)


def template(tok, modalities=("bill", "search", "tabular"), **kw):
    return data.Template(copy.deepcopy(tok), list(modalities), {"tabular": 3}, **kw)


# -----------------------------------------------------------------------------
# validation: every error names file:line and the field

BAD = [
    ('{"events": [', "invalid JSON"),
    ("[1, 2]", "record: expected a JSON object"),
    ({"user_id": "u2"}, "events: missing"),
    ({"events": "grocery"}, "events: expected a list"),
    ({"events": []}, "events: empty history"),
    ({"events": [3]}, "events[0]: expected an object"),
    ({"events": [{"time": 1, "text": "x"}]}, "events[0].modality"),
    (with_event({"modality": "bill", "time": 2}), "events[2]: has neither 'text' nor 'vector'"),
    (with_event({"modality": "bill", "text": 5}), "events[2].text: expected a string"),
    (with_event({"modality": "tabular", "vector": [1, "a", 3]}), "events[2].vector[1]: expected a number"),
    (with_event({"modality": "tabular", "vector": []}), "events[2].vector: expected a non-empty list"),
    (with_event({"modality": "tabular", "vector": [1, 2, 3, 4]}),
     "events[2].vector: length 4, but modality 'tabular' has 3"),
    ('{"events": [{"modality": "tabular", "vector": [NaN, 1, 2]}]}', "events[0].vector[0]: not a finite number"),
    ('{"events": [{"modality": "tabular", "vector": [1e999, 1, 2]}]}', "events[0].vector[0]: not a finite number"),
    ('{"events": [{"modality": "bill", "time": Infinity, "text": "x"}]}', "events[0].time: not a finite number"),
    (with_event({"modality": "bill", "time": "yesterday", "text": "x"}), "events[2].time: 'yesterday'"),
    (with_event({"modality": "bill", "time": [1], "text": "x"}), "events[2].time: expected a number"),
    (with_event({"modality": "bill", "text": "x"}, labels={"movie": 2}), "labels.movie: expected 0 or 1"),
    (with_event({"modality": "bill", "text": "x"}, labels={"movie": "1"}), "labels.movie: expected 0 or 1"),
    (with_event({"modality": "bill", "text": "x"}, labels={"movie": True}), "labels.movie: expected 0 or 1"),
    (with_event({"modality": "bill", "text": "x"}, labels=[1]), "labels: expected an object"),
    (with_event({"modality": "bill", "text": "x"}, query=3), "query: expected a string"),
    (with_event({"modality": "bill", "text": "x"}, answer=""), "answer: expected a non-empty string"),
    (with_event({"modality": "bill", "text": "x"}, user_id=[1]), "user_id: expected a string"),
]


@pytest.mark.parametrize("line,field", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_line_names_file_line_and_field(tmp_path, line, field):
    # line 1 is good (it fixes tabular's vector length at 3), line 2 blank, line 3 bad
    path = write_lines(tmp_path, [GOOD, "", line])
    with pytest.raises(ValueError) as e:
        data.load_records(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: "), msg
    assert field in msg, msg


def test_vector_length_checked_inside_one_record(tmp_path):
    rec = {"events": [{"modality": "tabular", "vector": [1, 2]}, {"modality": "tabular", "vector": [1, 2, 3]}]}
    with pytest.raises(ValueError, match=r"users.jsonl:1: events\[1\].vector: length 3, but modality 'tabular' has 2"):
        data.load_records(write_lines(tmp_path, [rec]))


@pytest.mark.parametrize("require,field", [(("answer",), "answer: missing"), (("labels",), "labels: missing")])
def test_required_fields(tmp_path, require, field):
    rec = {"user_id": "u", "events": [{"modality": "bill", "text": "x"}]}
    path = write_lines(tmp_path, [rec])
    with pytest.raises(ValueError, match=f"users.jsonl:1: {field}"):
        data.load_records(path, require=require)
    records, _ = data.load_records(path)  # not required: fine
    assert records[0]["user_id"] == "u"


def test_skip_bad_counts_and_reasons(tmp_path, capsys):
    lines = [GOOD, "not json"] + [{"events": []}] * 6 + [GOOD]
    path = write_lines(tmp_path, lines)
    records, report = data.load_records(path, skip_bad=True)
    assert len(records) == 2 and report.n_ok == 2 and report.n_bad == 7
    assert len(report.reasons) == data.MAX_REASONS
    assert report.reasons[0].startswith(f"{path}:2: invalid JSON")
    assert report.reasons[1].startswith(f"{path}:3: events: empty history")
    s = str(report)
    assert "2 records read, 7 bad lines skipped" in s and "and 2 more" in s
    assert "7 bad lines skipped" in capsys.readouterr().err  # never silent


def test_skipped_record_does_not_fix_vector_length(tmp_path):
    # line 1 is bad for another reason after a 4-long tabular vector: its length must not count
    bad = {"events": [{"modality": "tabular", "vector": [1, 2, 3, 4]}], "labels": {"x": 5}}
    _, report = data.load_records(write_lines(tmp_path, [bad, GOOD]), skip_bad=True)
    assert report.n_ok == 1 and report.vector_dims == {"tabular": 3}


def test_report_and_normalisation(tmp_path):
    rec = {"user_id": 7, "events": [{"modality": "search", "time": "2024-01-02T00:00:00", "text": "a"},
                                    {"modality": "zzz", "text": "b"}, {"modality": "bill", "text": "c"}],
           "labels": {"movie": 1, "food": 0}}
    records, report = data.load_records(write_lines(tmp_path, [rec, {"events": [{"modality": "bill", "text": "d"}]}]))
    assert records[0]["user_id"] == "7" and records[1]["user_id"] == "users.jsonl:2"
    assert records[0]["events"][0]["time"] == 1704153600.0  # ISO dates read as UTC
    assert report.modalities == ["bill", "search", "zzz"]
    assert report.modality_counts == {"search": 1, "zzz": 1, "bill": 2}


def test_iter_records_streams(tmp_path):
    # the first record comes out before a later bad line is read
    it = data.iter_records(write_lines(tmp_path, [GOOD, "oops"]))
    assert next(it)["user_id"] == "u1"
    with pytest.raises(ValueError, match="users.jsonl:2: invalid JSON"):
        next(it)


def test_bytes_that_are_not_utf8_name_file_and_line(tmp_path, capsys):
    """A byte that is not UTF-8 is reported at its line (the file is decoded line by line), --skip-bad skips
    that line only; a byte-order mark at the start of the file is accepted."""
    good = json.dumps(GOOD).encode()
    bad = json.dumps(dict(GOOD, user_id="u2")).encode().replace(b"grocery", b"groc\xffery")
    path = tmp_path / "users.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n\n" + bad + b"\n" + good.replace(b"u1", b"u3") + b"\n")
    with pytest.raises(ValueError) as e:
        data.load_records(str(path))
    assert str(e.value).startswith(f"{path}:3: not UTF-8 text: byte 0xff at byte "), str(e.value)
    offset = bad.index(b"\xff") + 1
    assert f"byte 0xff at byte {offset} of the line" in str(e.value)
    records, report = data.load_records(str(path), skip_bad=True)
    assert [r["user_id"] for r in records] == ["u1", "u3"] and report.n_bad == 1
    assert report.reasons[0].startswith(f"{path}:3: not UTF-8 text")
    assert "1 bad lines skipped" in capsys.readouterr().err
    with pytest.raises(ValueError, match=f"{path}:3: not UTF-8 text"):  # the plain JSONL reader too
        list(data.read_jsonl(str(path)))
    assert [n for n, _ in data.read_jsonl(write_lines(tmp_path, [GOOD, "", GOOD], "ok.jsonl"))] == [1, 3]
    with pytest.raises(ValueError, match=r"ok2.jsonl:2: invalid JSON"):
        list(data.read_jsonl(write_lines(tmp_path, [GOOD, "{"], "ok2.jsonl")))


def test_records_checked_against_an_encoders_modalities_and_vector_dims(tmp_path):
    path = write_lines(tmp_path, [GOOD, with_event({"modality": "app", "text": "x"})])
    with pytest.raises(ValueError, match=r"users.jsonl:2: events\[2\].modality: 'app' is not one of the encoder's "
                                         r"modalities \['bill', 'tabular'\]"):
        data.load_records(path, modalities=["bill", "tabular"])
    with pytest.raises(ValueError, match=r"users.jsonl:1: events\[1\].vector: length 3, but modality 'tabular' has 4"):
        data.load_records(path, vector_dims={"tabular": 4})


# -----------------------------------------------------------------------------
# template

REC = {"user_id": "u", "query": "what next", "events": [
    {"modality": "search", "time": 30, "text": "weather today"},
    {"modality": "bill", "time": 20, "text": "cinema 45"},
    {"modality": "tabular", "vector": [1.0, 2.0, 3.0]},
    {"modality": "bill", "time": 10, "text": "grocery 30"},
    {"modality": "bill", "time": 40, "text": "metro 4"}]}


def test_round_trip_tags_order_and_user_index(tok, tmp_path):
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    t = data.Template(path, ["tabular", "search", "bill", "app"], {"tabular": 3})  # from tokenizer.json
    enc = t.encode_user(REC)
    ids = enc["input_ids"]
    # blocks in paper order, only modalities present (no <app>), events oldest first inside a block
    want = ("<bill> grocery 30; cinema 45; metro 4;</bill><search> weather today;</search>"
            "<tabular><VEC></tabular> Instruction: what next<USER>")  # no opening sentence by default
    assert t.tokenizer.decode(ids, skip_special_tokens=False) == want
    assert enc["user_index"] == len(ids) - 1 and ids[-1] == t.user_id == t.tokenizer.token_to_id("<USER>")
    assert enc["n_cut"] == 0
    # the user-history segment: the blocks, from <bill> to </tabular>; the instruction, query and <USER> follow it
    start, end = enc["history"]
    assert t.tokenizer.decode(ids[start:end], skip_special_tokens=False) == want.split(" Instruction:")[0]
    assert t.tokenizer.decode(ids[end:], skip_special_tokens=False) == " Instruction: what next<USER>"
    assert t.special_tokens == ["<bill>", "</bill>", "<app>", "</app>", "<search>", "</search>",
                                "<tabular>", "</tabular>", "<VEC>", "<USER>"]
    base = tok.get_vocab_size()
    assert t.special_token_ids == list(range(base, base + 10))  # new ids after the base vocabulary
    assert t.eos_token == "<|endoftext|>" and t.pad_token == "<|pad|>"
    ans = t.encode_answer({"answer": "next month: cinema tickets; food delivery"})
    assert ans[-1] == t.eos_id
    assert t.tokenizer.decode(ans, skip_special_tokens=False) == "next month: cinema tickets; food delivery<|endoftext|>"


def test_tokenizer_padding_and_truncation_settings_ignored(tok):
    t0 = template(tok, preamble=data.PREAMBLE)  # the sentence too must not be padded or truncated
    odd = copy.deepcopy(tok)
    odd.enable_padding(length=40)
    odd.enable_truncation(max_length=2)
    t1 = data.Template(odd, ["bill", "search", "tabular"], {"tabular": 3}, preamble=data.PREAMBLE)
    assert t1.encode_user(REC) == t0.encode_user(REC)


def test_other_modalities_sorted_after_paper_order(tok):
    t = template(tok, ["zeta", "tabular", "alpha", "bill"])
    assert t.modalities == ["bill", "tabular", "alpha", "zeta"]
    rec = {"events": [{"modality": "zeta", "text": "metro 4"}, {"modality": "alpha", "text": "cinema 45"},
                      {"modality": "bill", "text": "grocery 30"}]}
    s = t.tokenizer.decode(t.encode_user(rec)["input_ids"], skip_special_tokens=False)
    assert s == "<bill> grocery 30;</bill><alpha> cinema 45;</alpha><zeta> metro 4;</zeta> Instruction:<USER>"


def test_preamble(tok):
    """App. A.1's opening sentence, when asked: first (after <GLOBAL>), never cut, outside the history segment;
    none by default."""
    rec = {"query": "what next", "events": [{"modality": "bill", "time": i, "text": "metro 4"} for i in range(6)]}
    plain = template(tok).encode_user(rec)
    pre_ids = template(tok).tokenizer.encode(data.PREAMBLE, add_special_tokens=False).ids
    t = template(tok, global_token=True, preamble=data.PREAMBLE, max_len=10_000)
    enc = t.encode_user(rec)
    assert enc["input_ids"] == [t.global_id] + pre_ids + plain["input_ids"]
    assert enc["history"] == (1 + len(pre_ids), 1 + len(pre_ids) + plain["history"][1])
    short = template(tok, preamble=data.PREAMBLE, max_len=len(plain["input_ids"]) + len(pre_ids) - 4)
    cut = short.encode_user(rec)  # the budget shrinks by the sentence: old events go, the sentence stays
    assert cut["input_ids"][:len(pre_ids)] == pre_ids and cut["n_cut"] > 0
    with pytest.raises(ValueError, match="and the preamble, more than max_len"):
        template(tok, preamble=data.PREAMBLE, max_len=len(pre_ids)).encode_user(rec)
    assert template(tok, preamble="").encode_user(rec) == plain
    texts = list(tiny_decoder.record_texts([rec], preamble=data.PREAMBLE))
    assert texts[0] == data.PREAMBLE and data.PREAMBLE not in tiny_decoder.record_texts([rec])
    assert data.preamble_text("paper") == data.PREAMBLE and data.preamble_text("Users:") == "Users:"


def test_global_token(tok):
    t = template(tok, global_token=True)
    enc = t.encode_user({"events": [{"modality": "bill", "text": "metro 4"}]})
    assert enc["input_ids"][0] == t.global_id == t.tokenizer.token_to_id("<GLOBAL>")
    start, end = enc["history"]
    assert (start, enc["input_ids"][start], enc["input_ids"][end - 1]) == (1, t.open_id["bill"], t.close_id["bill"])
    assert t.global_id in t.special_token_ids and "<GLOBAL>" in t.special_tokens


def test_vector_placeholders(tok):
    t = template(tok, ["bill", "tabular"])
    rec = {"events": [{"modality": "tabular", "time": 5, "vector": [5.0, 5, 5]},
                      {"modality": "bill", "time": 1, "text": "grocery 30", "vector": None},
                      {"modality": "tabular", "time": 2, "vector": [2.0, 2, 2]}]}
    enc = t.encode_user(rec)
    cols = enc["vector_pos"]["tabular"]
    assert [enc["input_ids"][c] for c in cols] == [t.vec_id, t.vec_id]
    assert enc["input_ids"].count(t.vec_id) == 2
    assert enc["vectors"]["tabular"] == [[2.0, 2, 2], [5.0, 5, 5]]  # time order, matching positions
    with pytest.raises(ValueError, match=r"events\[0\].vector: length 2, but modality 'tabular' has 3"):
        t.encode_user({"events": [{"modality": "tabular", "vector": [1.0, 2.0]}]})
    with pytest.raises(ValueError, match="'search' is not among"):
        t.encode_user({"events": [{"modality": "search", "text": "x"}]})
    with pytest.raises(ValueError, match="reserved token '<USER>'"):
        t.encode_user({"events": [{"modality": "bill", "text": "hi <USER>"}]})


def test_truncation_keeps_latest_events(tok):
    # 12 events alternating bill/search with shuffled file order; newest must survive
    texts = ["grocery 30", "cinema 45", "weather today", "metro 4"]
    events = [{"modality": ("bill", "search")[i % 2], "time": i, "text": texts[i % 4]} for i in range(12)]
    events = [events[i] for i in np.random.default_rng(0).permutation(12)]
    rec = {"query": "what next", "events": events}
    full = template(tok).encode_user(rec)
    for max_len in (len(full["input_ids"]) - 1, 25, 18):
        t = template(tok, max_len=max_len)
        enc = t.encode_user(rec)
        ids, n_cut = enc["input_ids"], enc["n_cut"]
        assert len(ids) <= max_len and n_cut > 0
        # reference: the kept events are exactly the (12 - n_cut) newest, rendered in block/time order
        kept = range(n_cut, 12)
        ref = template(tok, max_len=10_000).encode_user(
            {"query": "what next", "events": [e for e in events if e["time"] in kept]})
        assert ids == ref["input_ids"]
        # and one more event would not have fitted
        more = template(tok, max_len=10_000).encode_user(
            {"query": "what next", "events": [e for e in events if e["time"] >= n_cut - 1]})
        assert len(more["input_ids"]) > max_len
        assert t.tokenizer.decode(ids[-6:], skip_special_tokens=False).endswith("what next<USER>")
    with pytest.raises(ValueError, match="query: .* more than max_len=3"):
        template(tok, max_len=3).encode_user(rec)


def test_event_form_one_position_per_event(tok):
    """Event-level form for bill: each bill event is one <VEC> position whose vector is event_encoder(the ids the text
    form would have written); search stays subwords; the other positions and the cut are unchanged otherwise."""
    def encoder(ids):  # a known function of the ids, so the vector can be checked against them
        return np.array([len(ids), sum(ids), ids[0]], dtype=np.float32)

    text_t = template(tok)
    ev_t = template(tok, event_modalities=["bill"], event_encoder=encoder, event_dim=3)
    assert ev_t.vector_dims == {"tabular": 3, "bill": 3} and text_t.vector_dims == {"tabular": 3}
    enc = ev_t.encode_user(REC)
    ids = enc["input_ids"]
    s = ev_t.tokenizer.decode(ids, skip_special_tokens=False)
    assert s == ("<bill><VEC><VEC><VEC></bill><search> weather today;</search><tabular><VEC></tabular>"
                 " Instruction: what next<USER>")
    bills = ["grocery 30", "cinema 45", "metro 4"]  # oldest first
    want = [encoder(text_t.tokenizer.encode(data.event_piece(b), add_special_tokens=False).ids) for b in bills]
    assert [ids[c] for c in enc["vector_pos"]["bill"]] == [ev_t.vec_id] * 3 and enc["vector_pos"]["bill"] == [1, 2, 3]
    assert np.array_equal(np.stack(enc["vectors"]["bill"]), np.stack(want))
    assert enc["vectors"]["tabular"] == [[1.0, 2.0, 3.0]]
    n_text = len(text_t.encode_user(REC)["input_ids"])
    bill_tokens = sum(len(text_t.tokenizer.encode(data.event_piece(b), add_special_tokens=False).ids) for b in bills)
    assert len(ids) == n_text - bill_tokens + 3  # one position per bill event
    # a batch carries the event vectors like any vector (the model runs the bill adapter on them)
    ds = data.UserDataset([dict(REC, answer="a")], ev_t)
    b = data.collate([ds[0]])
    assert b.user.vectors["bill"].shape == (3, 3) and b.user.vector_pos["bill"].tolist() == [[0, 1], [0, 2], [0, 3]]
    with pytest.raises(ValueError, match="reads 4-wide vectors"):
        template(tok, event_modalities=["tabular"], event_encoder=encoder, event_dim=4)
    with pytest.raises(ValueError, match="not among the modalities"):
        template(tok, event_modalities=["app"], event_encoder=encoder, event_dim=3)
    with pytest.raises(ValueError, match="need an event_encoder"):
        template(tok, event_modalities=["bill"])


def test_eos_and_pad_choice(tmp_path):
    no_eos = tiny_decoder.train_tokenizer(["grocery 30"] * 5, vocab_size=270, special_tokens=["<unk>"])
    with pytest.raises(ValueError, match="no end-of-sequence token"):
        data.Template(no_eos, ["bill"])
    only_eos = tiny_decoder.train_tokenizer(["grocery 30"] * 5, vocab_size=270, special_tokens=["</s>"])
    t = data.Template(only_eos, ["bill"])
    assert t.eos_token == "</s>" and t.pad_id == t.eos_id  # pad falls back to eos
    # tokenizer_config.json beside tokenizer.json names them (HF layout, dict or string form)
    two = tiny_decoder.train_tokenizer(["grocery 30"] * 5, vocab_size=270, special_tokens=["<|endoftext|>", "<|im_end|>"])
    two.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<|im_end|>"}, "pad_token": "<|endoftext|>"}))
    t = data.Template(str(tmp_path), ["bill"])
    assert t.eos_token == "<|im_end|>" and t.pad_token == "<|endoftext|>"


# -----------------------------------------------------------------------------
# batching

def test_collate_padding_pool_index_vectors(tok):
    t = template(tok)
    recs = [REC, {"user_id": "b", "events": [{"modality": "bill", "text": "metro 4"}], "answer": "a"},
            {"user_id": "c", "events": [{"modality": "tabular", "vector": [7.0, 8, 9]},
                                        {"modality": "tabular", "vector": [1.0, 1, 1]}], "answer": "next month"}]
    recs[0] = dict(REC, answer="cinema tickets; food delivery")
    ds = data.UserDataset(recs, t)
    b = data.collate([ds[i] for i in range(3)])
    L = max(ds.lengths)
    assert b.user.input_ids.shape == (3, L) and b.user.attention_mask.dtype == torch.long
    for r in range(3):
        n = ds.lengths[r]
        assert b.user.attention_mask[r].tolist() == [1] * n + [0] * (L - n)
        assert b.user.input_ids[r, :n].tolist() == ds[r]["input_ids"]
        assert (b.user.input_ids[r, n:] == t.pad_id).all()
        assert b.user.input_ids[r, b.user.pool_index[r]] == t.user_id
        a = b.answer
        assert a.input_ids[r, a.pool_index[r]] == t.eos_id and a.attention_mask[r, a.pool_index[r] + 1:].sum() == 0
    pos, vec = b.user.vector_pos["tabular"], b.user.vectors["tabular"]
    assert pos.dtype == torch.long and pos.shape == (3, 2) and vec.dtype == torch.float32 and vec.shape == (3, 3)
    assert (b.user.input_ids[pos[:, 0], pos[:, 1]] == t.vec_id).all()
    assert vec.tolist() == [[1, 2, 3], [7, 8, 9], [1, 1, 1]] and pos[:, 0].tolist() == [0, 2, 2]
    assert b.user_ids == ["u", "b", "c"] and b.index.tolist() == [0, 1, 2]
    assert b.user.history.tolist() == [list(ds[r]["history"]) for r in range(3)] and b.answer.history is None
    assert b.user.history[:, 1].tolist() == [ds.lengths[r] - len(t.tokenizer.encode(" Instruction:").ids) - 1
                                             - (r == 0) * len(t.tokenizer.encode(" what next").ids) for r in range(3)]
    # a batch without vectors still carries an empty (0, F) tensor per vector modality
    b1 = data.collate([ds[1]])
    assert b1.user.vectors["tabular"].shape == (0, 3) and b1.user.vector_pos["tabular"].shape == (0, 2)
    assert b1.to("cpu").user.input_ids.shape == (1, ds.lengths[1])


def test_dataloader_with_distributed_sampler(tok):
    t = template(tok, ["bill"])
    recs = [{"user_id": f"u{i}", "events": [{"modality": "bill", "text": "metro 4"}] * (i + 1), "answer": "a",
             "labels": {"movie": i % 2}} for i in range(10)]
    ds = data.UserDataset(recs, t)
    seen = []
    for rank in (0, 1):
        s = torch.utils.data.distributed.DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        for b in torch.utils.data.DataLoader(ds, batch_size=3, sampler=s, collate_fn=data.collate):
            seen += b.index.tolist()
            assert [lab["movie"] for lab in b.labels] == [i % 2 for i in b.index.tolist()]
    assert sorted(seen) == list(range(10))


# -----------------------------------------------------------------------------
# synthetic benchmark

@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    return synthetic.write_synthetic(str(out), n_train=300, n_probe=1500, seed=0)


def test_synthetic_deterministic(synth, tmp_path):
    again = synthetic.write_synthetic(str(tmp_path / "a"), n_train=300, n_probe=1500, seed=0)
    other = synthetic.write_synthetic(str(tmp_path / "b"), n_train=300, n_probe=1500, seed=1)
    for p, q, r in zip(synth, again, other):
        assert open(p, "rb").read() == open(q, "rb").read()
        assert open(p, "rb").read() != open(r, "rb").read()


def test_synthetic_records_and_lengths(synth):
    train, rep_t = data.load_records(synth[0], require=("answer",))
    probe, rep_p = data.load_records(synth[1], require=("answer", "labels"))
    assert len(train) == 300 and len(probe) == 1500 and "labels" not in train[0]
    assert rep_p.modalities == list(data.MODALITY_ORDER) and rep_p.vector_dims == {"tabular": 8}
    assert not {r["user_id"] for r in train} & {r["user_id"] for r in probe}
    assert all(set(r["labels"]) == set(data.TASKS) for r in probe)
    assert all(r["answer"].startswith("next month: ") for r in train)
    tok = tiny_decoder.train_tokenizer(tiny_decoder.record_texts(train), vocab_size=2000)
    t = data.Template(tok, rep_t.modalities, rep_t.vector_dims, max_len=512)
    ds = data.UserDataset(probe[:300], t)
    assert ds.n_cut == 0 and 100 <= np.mean(ds.lengths) <= 250, np.mean(ds.lengths)


def test_synthetic_tasks_learnable_not_trivial(synth):
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    probe, _ = data.load_records(synth[1], require=("labels",))
    docs = [" ".join(e["text"] for e in r["events"] if "text" in e) for r in probe]
    X = CountVectorizer().fit_transform(docs)
    n = 1000
    aucs = {}
    for task in data.TASKS:
        y = np.array([r["labels"][task] for r in probe])
        assert 0.15 < y.mean() < 0.85, (task, y.mean())
        clf = LogisticRegression(C=0.3, max_iter=2000).fit(X[:n], y[:n])
        aucs[task] = roc_auc_score(y[n:], clf.decision_function(X[n:]))
    assert max(aucs.values()) < 0.95, aucs  # no task is solved by counting words
    assert sum(a > 0.55 for a in aucs.values()) >= 7, aucs  # yet the text carries the signal


# -----------------------------------------------------------------------------
# hand-made features (probe.py's baseline rows)

BAG_TEXTS = ["Cinema near me", "cinema tickets, 2 for 1!", "Café au lait", "metro line 4 map", "bus_schedule 12:30",
             "new movies this week", "CINEMA", "home>movies>tickets", "lunch deals near me", "5 stars",
             "Toy Story (1995) | Animation, Children's, Comedy | 5 stars", "", "naïve 東京 tower"]


def test_bag_of_events_equals_sklearn_tfidf_per_modality():
    """One modality: the bag is scikit-learn's TfidfVectorizer(sublinear_tf, smooth idf, l2) with the same words kept
    (those of the n_words highest document frequencies, at least min_users users); a word in two modalities is two
    columns."""
    text = pytest.importorskip("sklearn.feature_extraction.text")
    rng = np.random.default_rng(0)
    recs = [{"user_id": f"u{i}", "events": [{"modality": "search", "text": BAG_TEXTS[j]}
                                            for j in rng.integers(len(BAG_TEXTS), size=rng.integers(1, 7))]}
            for i in range(40)]
    for min_users in (1, 3):
        X = data.bag_of_events(recs, n_words=1000, min_users=min_users)
        vec = text.TfidfVectorizer(token_pattern=r"[^\W_]+", sublinear_tf=True, min_df=min_users)
        S = vec.fit_transform([" ".join(e["text"] for e in r["events"]) for r in recs]).toarray()
        assert X.shape == S.shape
        # our columns: by document frequency, then name; scikit-learn's: by name
        df = {w: int((S[:, j] > 0).sum()) for w, j in vec.vocabulary_.items()}
        order = [vec.vocabulary_[w] for w in sorted(df, key=lambda w: (-df[w], "search", w))]
        np.testing.assert_allclose(X, S[:, order], rtol=0, atol=1e-12)
    capped = data.bag_of_events(recs, n_words=5, min_users=1)
    np.testing.assert_array_equal((capped > 0).sum(0), np.sort((X > 0).sum(0))[::-1][:5])
    two = [{"user_id": "a", "events": [{"modality": "bill", "text": "metro 4"}, {"modality": "bill", "text": "metro"}]},
           {"user_id": "b", "events": [{"modality": "search", "text": "Metro map"}]}]
    B = data.bag_of_events(two, min_users=1)
    assert B.shape == (2, 4) and (B > 0).sum(1).tolist() == [2, 2]  # bill:metro, bill:4 | search:metro, search:map
    assert np.count_nonzero(B[0] * B[1]) == 0  # "metro" of a bill is not "metro" of a search


def test_tabular_vectors_mean_per_modality():
    recs = [{"user_id": "a", "events": [{"modality": "tabular", "vector": [1.0, 2.0, 3.0]},
                                        {"modality": "bill", "text": "gym 80"},
                                        {"modality": "tabular", "vector": [3.0, 4.0, 5.0]},
                                        {"modality": "ctx", "vector": [1.0, -1.0], "text": "gym"}]},
            {"user_id": "b", "events": [{"modality": "bill", "text": "metro 4"}]},
            {"user_id": "c", "events": [{"modality": "ctx", "vector": [0.5, 0.5]}]}]
    # ctx (2 wide) before tabular (3 wide); zeros where a user has none of a modality
    np.testing.assert_array_equal(data.tabular_vectors(recs), [[1, -1, 2, 3, 4], [0, 0, 0, 0, 0], [.5, .5, 0, 0, 0]])
    assert data.tabular_vectors(recs[1:2]) is None

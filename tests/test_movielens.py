"""tools/movielens.py on a tiny hand-made MovieLens in both layouts (RecBole atomic files in a fake wheel, and GroupLens
u.* files): identical output, the 80% cut with ties by item id, the 60-event cap, the answer's ranking, labels
computed by hand, the [0.10, 0.90] filter, the project's own validation, and errors that name file and line.
The real wheel is converted only where it exists (never in CI).

    python -m pytest -q tests/test_movielens.py
"""
import json
import os
import subprocess
import sys
import zipfile

import pytest

import data
from tools import movielens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REAL_WHEEL = "/work/realdata/dl/recbole-1.2.1-py3-none-any.whl"
T0 = 880000000
# id -> (title, year, genres). Catalogue: Comedy 2 movies, the others 1 (the answer's tie-break). Item 4 is
# MovieLens's item 267: no title or year ('unknown' in u.item, 'unkonwn' in RecBole's file).
ITEMS = {1: ("Alpha", "1990", ["Action", "Comedy"]), 2: ("Bêta", "1991", ["Drama"]),
         3: ("Gamma", "1992", ["Children's", "Comedy"]), 4: ("unknown", "", ["unknown"])}
USERS = {1: (24, "F", "student"), 2: (45, "M", "programmer"), 3: (30, "M", "educator"), 4: (50, "F", "writer")}
# (user, item, stars, seconds after T0)
R1 = [(1, 1, 4, 0), (1, 2, 3, 1), (1, 3, 5, 2), (1, 1, 2, 3), (1, 2, 4, 4), (1, 3, 3, 5), (1, 1, 5, 6),
      (1, 3, 1, 7), (1, 1, 4, 7),  # same second: item 1 sorts first, so it ends the history; item 3 opens the future
      (1, 2, 5, 8)]
R2 = [(2, 4, 3, 100)] + [(2, 2 + k % 2, 3, 100 + k) for k in range(1, 8)] + [(2, 1, 5, 108), (2, 1, 4, 109)]
R3 = [(3, k % 3 + 1, k % 5 + 1, 200 + k) for k in range(80)]  # 80 ratings: 64 history (60 kept), 16 held out
R4 = [(4, 1, 3, 300), (4, 2, 3, 301)]  # 2 ratings: no future, skipped
RATINGS = R3[::-1] + R1 + R4 + R2  # the files are not in time order


def write_recbole(folder):
    os.makedirs(folder, exist_ok=True)
    tables = {"ml-100k.inter": (movielens.RECBOLE["ml-100k.inter"][2],
                                [f"{u}\t{i}\t{s}\t{T0 + t}" for u, i, s, t in RATINGS]),
              "ml-100k.item": (movielens.RECBOLE["ml-100k.item"][2],
                               [f"{i}\t{title}\t{year}\t{' '.join(g)}" if year else f"{i}\tunkonwn\tunkonwn\tunknown"
                                for i, (title, year, g) in ITEMS.items()]),
              "ml-100k.user": (movielens.RECBOLE["ml-100k.user"][2],
                               [f"{u}\t{a}\t{g}\t{o}\t55455" for u, (a, g, o) in USERS.items()])}
    for name, (header, lines) in tables.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(header + "\n" + "\n".join(lines) + "\n")


def write_grouplens(folder):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "u.data"), "w") as f:
        f.writelines(f"{u}\t{i}\t{s}\t{T0 + t}\n" for u, i, s, t in RATINGS)
    with open(os.path.join(folder, "u.item"), "w", encoding="latin-1") as f:  # as GroupLens ships it
        for i, (title, year, genres) in ITEMS.items():
            flags = "|".join("1" if g in genres else "0" for g in movielens.GENRES)
            if year:
                f.write(f"{i}|{title} ({year})|01-Jan-{year}||http://us.imdb.com/M/title-exact?{i}|{flags}\n")
            else:
                f.write(f"{i}|{title}||||{flags}\n")
    with open(os.path.join(folder, "u.user"), "w") as f:
        f.writelines(f"{u}|{a}|{g}|{o}|55455\n" for u, (a, g, o) in USERS.items())


def write_wheel(path, folder):
    with zipfile.ZipFile(path, "w") as z:
        for name in movielens.RECBOLE:
            z.write(os.path.join(folder, name), movielens.IN_WHEEL + name)
        z.writestr("recbole/__init__.py", "")


def convert(tmp_path, name, *source, window=None):
    out = str(tmp_path / name)
    summary = movielens.main([*source, "--out", out] + ([] if window is None else ["--future-window", str(window)]))
    return out, summary


def read(out, name):
    with open(os.path.join(out, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("ml")
    write_recbole(str(root / "recbole"))
    write_grouplens(str(root / "grouplens"))
    write_wheel(str(root / "fake.whl"), str(root / "recbole"))
    return root


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    out, summary = convert(tmp_path_factory.mktemp("out"), "wheel", "--wheel", str(sources / "fake.whl"))
    return out, summary, {r["user_id"]: r for r in read(out, "probe.jsonl")}


def test_all_layouts_give_identical_files(sources, converted, tmp_path):
    wheel_out = converted[0]
    for name, folder in (("grouplens", "grouplens"), ("atomic", "recbole")):
        out, _ = convert(tmp_path, name, "--dir", str(sources / folder))
        for f in ("train.jsonl", "probe.jsonl"):
            with open(os.path.join(out, f), "rb") as a, open(os.path.join(wheel_out, f), "rb") as b:
                assert a.read() == b.read(), f"{name}: {f} differs from the wheel's"
    assert sorted(os.listdir(wheel_out)) == ["probe.jsonl", "train.jsonl"]  # no temporary file left


def test_cut_with_ties_by_item_id(converted):
    u1 = converted[2]["u1"]
    assert [e["time"] - T0 for e in u1["events"]] == [0, 1, 2, 3, 4, 5, 6, 7]  # 80% of 10
    assert u1["events"][-1]["text"] == "Alpha (1990) | Action, Comedy | 4 stars"  # item 1 before item 3 at t=7
    assert u1["events"][1]["text"] == "Bêta (1991) | Drama | 3 stars"
    assert all(e["modality"] == "rating" for e in u1["events"])
    assert u1["query"] == "Which genres will this user rate next?"
    assert converted[2]["u2"]["events"][0]["text"] == "unknown | unknown | 3 stars"  # RecBole's 'unkonwn' mended


def test_sixty_event_cap(converted):
    ev = converted[2]["u3"]["events"]
    assert len(ev) == 60 and [e["time"] - T0 for e in ev] == list(range(204, 264))  # history 0..63, last 60
    assert ev[0]["text"] == "Bêta (1991) | Drama | 5 stars"  # k=4: item 2, 5 stars
    assert ev[1]["text"] == "Gamma (1992) | Children's, Comedy | 1 star"  # k=5: item 3, 1 star (singular)


def test_answer_ranking_and_tie_break(converted, sources, tmp_path):
    recs = converted[2]
    # u1's future: item 3 (Children's, Comedy), item 2 (Drama): all once; Comedy has 2 movies, the rest by name
    assert recs["u1"]["answer"] == "Comedy; Children's; Drama"
    assert recs["u2"]["answer"] == "Comedy; Action"  # item 1 twice: a tie broken by catalogue size; only 2 genres
    # u3, window 5 (k=64..68: items 2,3,1,2,3): Comedy 3, Children's 2, Drama 2 (name), Action 1
    assert recs["u3"]["answer"] == "Comedy; Children's; Drama"
    out, _ = convert(tmp_path, "all", "--wheel", str(sources / "fake.whl"), window=0)
    # all 16 held out: Comedy 10, Drama 6, Action 5 = Children's 5 (name)
    assert {r["user_id"]: r["answer"] for r in read(out, "probe.jsonl")}["u3"] == "Comedy; Drama; Action"


def test_training_records_end_before_the_probe_future(converted, sources, tmp_path):
    """train.jsonl: a user's record is cut one window (5) before the probe's cut and answers with that window, so
    no rating a probe label comes from reaches training; --train-windows 2 adds a record a window earlier still
    (where the history allows)."""
    train = {r["user_id"]: r for r in read(converted[0], "train.jsonl")}
    u3 = train["u3"]  # probe cut at 64: training history 0..58, answer from k = 59..63 (items 3, 1, 2, 3, 1)
    assert [e["time"] - T0 - 200 for e in u3["events"]] == list(range(59))  # u3 rates at T0 + 200 + k
    assert u3["answer"] == "Comedy; Action; Children's" and "labels" not in u3  # Action = Children's: by name
    probe_u3 = converted[2]["u3"]
    assert max(e["time"] for e in u3["events"]) < min(e["time"] for e in probe_u3["events"][-5:])
    assert [e["time"] - T0 for e in train["u1"]["events"]] == [0, 1, 2]  # u1: probe cut at 8, training at 3
    out = str(tmp_path / "two")
    movielens.main(["--wheel", str(sources / "fake.whl"), "--out", out, "--train-windows", "2"])
    two = {r["user_id"]: r for r in read(out, "train.jsonl")}
    assert sorted(two) == ["u1", "u2", "u3", "u3-2"]  # u1 and u2 have no room for a second window
    assert [e["time"] - T0 - 200 for e in two["u3-2"]["events"]] == list(range(54)) and two["u3"] == u3
    out = str(tmp_path / "ten")
    movielens.main(["--wheel", str(sources / "fake.whl"), "--out", out, "--train-window", "10"])
    ten = {r["user_id"]: r for r in read(out, "train.jsonl")}["u3"]  # cut at 54, answer from k = 54..63
    assert [e["time"] - T0 - 200 for e in ten["events"]] == list(range(54))
    assert ten["answer"] == "Comedy; Action; Children's"  # Comedy 7, Action 4, Children's 3 = Drama 3 (name)


def test_titles_answer(converted, sources, tmp_path):
    """--answer titles: the future's movies in time order (u1: item 3 then item 2), the same events and labels."""
    out = str(tmp_path / "titles")
    movielens.main(["--wheel", str(sources / "fake.whl"), "--out", out, "--answer", "titles"])
    recs = {r["user_id"]: r for r in read(out, "probe.jsonl")}
    assert recs["u1"]["answer"] == "Gamma (1992) | Children's, Comedy; Bêta (1991) | Drama"
    assert recs["u1"]["query"] == "Which movies will this user rate next?"
    for u, r in recs.items():
        assert {k: v for k, v in r.items() if k not in ("answer", "query")} == \
            {k: v for k, v in converted[2][u].items() if k not in ("answer", "query")}


def test_labels_by_hand_and_rate_filter(converted):
    _, summary, recs = converted
    assert summary["users"] == 3 and set(recs) == {"u1", "u2", "u3"}  # u4 (2 ratings) skipped
    names = ["female", "age_under_25", "age_under_30", "age_45_plus", "occupation_student", "occupation_educator",
             "occupation_tech", "future_mean_rating_ge_4", "future_mean_above_history_mean", "future_any_rating_le_2",
             "future_action", "future_childrens", "future_drama"]
    # u1: future stars 1, 5 (mean 3 < history 30/8); u2: 5, 4 over 3.0; u3: 5,1,2,3,4 (mean 3 > 190/64)
    want = {"u1": [1, 1, 1, 0, 1, 0, 0, 0, 0, 1, 0, 1, 1],
            "u2": [0, 0, 0, 1, 0, 0, 1, 1, 1, 0, 1, 0, 0],
            "u3": [0, 0, 0, 0, 0, 1, 0, 0, 1, 1, 1, 1, 1]}
    for uid, values in want.items():
        assert recs[uid]["labels"] == dict(zip(names, values)), uid
    assert list(summary["kept"]) == names
    # every user has a 5-star and a Comedy movie in the future (rate 1.0); no one sees the other genres (0.0)
    zero = {"future_" + g for g in ("unknown", "adventure", "animation", "crime", "documentary", "fantasy",
                                    "film_noir", "horror", "musical", "mystery", "romance", "sci_fi", "thriller",
                                    "war", "western")}
    assert summary["dropped"] == {"future_any_5_star": 1.0, "future_comedy": 1.0, **{k: 0.0 for k in zero}}


def test_records_pass_project_validation(converted):
    out = converted[0]
    train, _ = data.load_records(os.path.join(out, "train.jsonl"), require=("answer",))
    probe, _ = data.load_records(os.path.join(out, "probe.jsonl"), require=("labels",))
    assert [r["user_id"] for r in train] == [r["user_id"] for r in probe] == ["u1", "u2", "u3"]
    assert all("labels" not in r for r in train)  # labels never reach training


def test_errors_name_file_and_line(sources, tmp_path):
    bad = tmp_path / "bad"
    write_grouplens(str(bad))
    lines = (bad / "u.data").read_text().splitlines()
    (bad / "u.data").write_text("\n".join(lines[:2] + ["1\t2\t3"] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match=r"u\.data:3: expected 4 fields"):
        convert(tmp_path, "o1", "--dir", str(bad))
    (bad / "u.data").write_text("\n".join(lines[:4] + ["1\t9\t3\t880000000"] + lines[4:]) + "\n")
    with pytest.raises(ValueError, match=r"u\.data:5: item 9 is not in u\.item"):
        convert(tmp_path, "o2", "--dir", str(bad))
    (bad / "u.user").unlink()
    with pytest.raises(FileNotFoundError, match=r"u\.user"):
        convert(tmp_path, "o3", "--dir", str(bad))

    atomic = tmp_path / "atomic"
    write_recbole(str(atomic))
    inter = (atomic / "ml-100k.inter").read_text().splitlines()
    (atomic / "ml-100k.inter").write_text("\n".join(inter[:6] + ["1\t2\tfour\t880000000"] + inter[6:]) + "\n")
    write_wheel(str(tmp_path / "bad.whl"), str(atomic))
    with pytest.raises(ValueError, match=r"bad\.whl:recbole/dataset_example/ml-100k/ml-100k\.inter:7: rating"):
        convert(tmp_path, "o4", "--wheel", str(tmp_path / "bad.whl"))
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3", "o4"))  # nothing written


def test_command_line(sources, tmp_path):
    run = [sys.executable, "-m", "tools.movielens", "--dir", str(sources / "grouplens"), "--out", str(tmp_path / "o")]
    done = subprocess.run(run, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "users: 3" in done.stdout and "future_comedy" in done.stdout
    bad = tmp_path / "empty"
    bad.mkdir()
    done = subprocess.run(run[:3] + ["--dir", str(bad), "--out", str(tmp_path / "o")], capture_output=True, text=True,
                          cwd=ROOT)
    assert done.returncode == 1 and "holds neither" in done.stderr


def test_real_wheel(tmp_path):
    if not os.path.isfile(REAL_WHEEL):
        pytest.skip(f"{REAL_WHEEL} not present (pip download recbole==1.2.1 --no-deps)")
    out, summary = convert(tmp_path, "real", "--wheel", REAL_WHEEL)
    assert summary["users"] == 943
    assert set(summary["kept"]) == {
        "female", "age_under_25", "age_under_30", "age_45_plus", "occupation_student", "occupation_educator",
        "occupation_tech", "future_mean_rating_ge_4", "future_mean_above_history_mean", "future_any_rating_le_2",
        "future_any_5_star", "future_action", "future_adventure", "future_animation", "future_childrens",
        "future_comedy", "future_crime", "future_drama", "future_horror", "future_musical", "future_mystery",
        "future_romance", "future_sci_fi", "future_thriller", "future_war"}
    assert set(summary["dropped"]) == {"future_documentary", "future_fantasy", "future_film_noir", "future_unknown",
                                       "future_western"}
    train, _ = data.load_records(os.path.join(out, "train.jsonl"), require=("answer",))
    probe, _ = data.load_records(os.path.join(out, "probe.jsonl"), require=("labels",))
    assert len(train) == len(probe) == 943 and max(len(r["events"]) for r in train) == 60


def test_histogram_features_by_hand():
    recs = [{"events": [{"text": "A (1990) | Drama, War | 4 stars"}, {"text": "B (1991) | Drama | 1 star"},
                        {"text": "C (1992) | Comedy | 5 stars"}]}]
    X, genres = movielens.histogram_features(recs)
    assert genres == ["Comedy", "Drama", "War"]
    assert X[0] == pytest.approx([1 / 3, 2 / 3, 1 / 3, 1 / 3, 0, 0, 1 / 3, 1 / 3, 3])
    X, genres = movielens.histogram_features(recs, last=2)  # the last two events only
    assert genres == ["Comedy", "Drama"] and X[0] == pytest.approx([0.5, 0.5, 0.5, 0, 0, 0, 0.5, 2])


def test_title_vectors_match_transformers(sources, tmp_path):
    """--title-vectors: each movie read by a frozen decoder, the mean of its last hidden states over the title's
    tokens, checked against transformers on a tiny random checkpoint (batched with right padding, so titles of
    different lengths share a batch); events keep only their stars as text."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tools import tiny_decoder
    items = {i: (f"{t} ({y})" if y else t, g) for i, (t, y, g) in ITEMS.items()}
    texts = [" %s | %s" % (t, ", ".join(g)) for t, g in items.values()]
    tok = tiny_decoder.train_tokenizer(texts * 20, vocab_size=120)
    cfg = transformers.Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    folder = str(tmp_path / "m")
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    vectors = movielens.title_vectors(items, folder, batch=3)
    hf = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    for i, text in zip(items, texts):
        ids = torch.tensor([tok.encode(text, add_special_tokens=False).ids])
        with torch.no_grad():
            want = hf(input_ids=ids).last_hidden_state[0].mean(0)
        assert torch.allclose(torch.tensor(vectors[i]), want, atol=1e-5), items[i]
    assert movielens.rating_events(items, [(T0, 1, 4), (T0 + 1, 3, 1)], vectors) == [
        {"modality": "rating", "time": T0, "text": "4 stars", "vector": vectors[1]},
        {"modality": "rating", "time": T0 + 1, "text": "1 star", "vector": vectors[3]}]
    assert movielens.rating_events(items, [(T0, 1, 4)])[0]["text"] == "Alpha (1990) | Action, Comedy | 4 stars"

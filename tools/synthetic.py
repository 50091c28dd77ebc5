"""The embedded synthetic user benchmark: six modalities over 90 days and the paper's nine tasks.

Each user has latent interests over seven topics; their events (bills, mini-programs, page paths, app actions,
searches and a tabular vector) are drawn from those interests over 90 days, and the labels and the answer
describe the next 30 days, so a probe can only score well by reading the history. Deterministic per seed.

    python -m tools.synthetic --out cache/synthetic --n-train 3000 --n-probe 5000 --seed 0
"""
import datetime
import json
import math
import os

import numpy as np

from data import TASKS, load_records

T0 = 1704067200  # 2024-01-01 00:00 UTC; history days 0..89, prediction window days 90..119
HISTORY_DAYS, WINDOW_DAYS = 90, 30
TOPICS = ("movie", "music", "food", "transit", "fitness", "achievement", "daily")
# phrases per topic and modality; a bill line is '<merchant> <amount>'
PHRASES = {
    "movie": {"bill": ["cinema", "movie ticket"], "minipro": ["MovieTix", "CinemaPass"],
              "spm": ["home>movies>tickets", "home>movies>showtimes"], "app": ["open movie app", "rate film"],
              "search": ["new movies this week", "cinema near me"]},
    "music": {"bill": ["livehouse", "music store"], "minipro": ["LiveMusic", "TicketHub"],
              "spm": ["home>shows>concerts", "home>music>playlists"], "app": ["stream music", "follow artist"],
              "search": ["concert tickets", "band tour dates"]},
    "food": {"bill": ["restaurant", "food delivery"], "minipro": ["FoodGo", "TakeoutNow"],
             "spm": ["home>food>delivery", "home>food>coupons"], "app": ["order takeout", "review restaurant"],
             "search": ["hotpot near me", "lunch deals"]},
    "transit": {"bill": ["metro", "bus fare"], "minipro": ["MetroPass", "BikeShare"],
                "spm": ["home>transit>metro", "home>transit>bus"], "app": ["scan metro code", "top up transit card"],
                "search": ["metro line map", "bus schedule"]},
    "fitness": {"bill": ["gym", "sports store"], "minipro": ["GymClub", "RunTracker"],
                "spm": ["home>sports>gym", "home>health>steps"], "app": ["log workout", "join step challenge"],
                "search": ["yoga class", "running shoes"]},
    "achievement": {"bill": ["points mall"], "minipro": ["BadgeWall", "PointsMall"],
                    "spm": ["home>rewards>badges", "home>rewards>points"], "app": ["claim badge", "check points"],
                    "search": ["points rewards", "level up rewards"]},
    "daily": {"bill": ["grocery", "utilities", "phone bill", "convenience store", "mall", "electronics"],
              "minipro": ["WeatherNow", "NewsDaily", "PayUtilities"], "spm": ["home>bills>pay", "home>wallet>balance"],
              "app": ["check balance", "pay bill", "open news"], "search": ["weather today", "electricity bill"]},
}
# which modality an event of a topic lands in (bill, minipro, spm, app, search)
SEQ_MODALITIES = ("bill", "minipro", "spm", "app", "search")
MODALITY_P = np.array([0.3, 0.2, 0.2, 0.2, 0.1])
BILL_AMOUNT = {"cinema": 45, "movie ticket": 40, "livehouse": 180, "music store": 60, "restaurant": 90,
               "food delivery": 35, "metro": 4, "bus fare": 2, "gym": 80, "sports store": 150, "points mall": 20,
               "grocery": 60, "utilities": 120, "phone bill": 50, "convenience store": 15, "mall": 300,
               "electronics": 900}
ANSWER_PHRASE = {"movie": "cinema tickets", "music": "concert tickets", "food": "food delivery",
                 "transit": "metro rides", "fitness": "gym visits", "achievement": "reward badges",
                 "daily": "daily payments"}
# one is drawn per user; the answer does not depend on which (all ask about next month's behaviour): not the
# paper's D_qa, whose answers are written for their query
QUERIES = ("What will this user do next month?", "Which services will this user use next?",
           "Summarize this user's upcoming behavior.", "Which offers will this user open next month?")
LABEL_NOISE = 0.05
DATES = [datetime.datetime.fromtimestamp(T0 + d * 86400, datetime.timezone.utc).strftime("%b %d")
         for d in range(HISTORY_DAYS)]  # 'Jan 05' prefix of each day's events (2 tokens)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _synthetic_user(rng, uid):
    """One user: latent traits -> 90 days of events -> a 30-day prediction window -> labels, answer."""
    age = rng.choice(4, p=[0.25, 0.35, 0.25, 0.15])  # 18-24, 25-34, 35-49, 50+
    income = rng.normal() + 0.3 * (age in (1, 2))
    activity = np.exp(rng.normal(0.0, 0.45))
    churn = rng.random() < 0.3
    commuter = rng.random() < 0.5
    leisure = rng.normal()  # shared factor: movie and music fans overlap
    logit = {
        "movie": -1.0 + 0.7 * leisure + 0.4 * (age <= 1) + 0.8 * rng.normal(),
        "music": -1.6 + 0.7 * leisure + 0.7 * (age == 0) + 0.8 * rng.normal(),
        "food": -0.6 + 0.3 * (age <= 1) + 0.2 * income + rng.normal(),
        "transit": -1.4 + 1.8 * commuter + 0.8 * rng.normal(),
        "fitness": -1.2 + 0.5 * (age == 1) + 0.3 * income + rng.normal(),
        "achievement": -1.3 + 0.6 * (age == 0) + rng.normal(),
    }
    p = {k: _sigmoid(v) for k, v in logit.items()}
    # daily intensity multiplier over the history: churners fade, the others drift a little;
    # both average about 0.9 so the event count alone says little about churn
    x = np.arange(HISTORY_DAYS + WINDOW_DAYS) / HISTORY_DAYS
    trend = (1.5 - 1.2 * x) if churn else (0.9 + rng.normal(0, 0.15) * (x - 0.5))
    trend = np.clip(trend, 0.05, None)
    weekday = np.arange(HISTORY_DAYS + WINDOW_DAYS) % 7  # 2024-01-01 is a Monday: 5, 6 = weekend
    weekend = weekday >= 5
    base = {k: 0.09 * p[k] for k in p}
    base["daily"] = 0.08
    # expected events per day for each topic: activity x trend x weekly rhythm x interest
    leisure_w = np.where(weekend, 1.5, 1.0)
    transit_w = np.where(weekend, 0.4, 1.2)  # commuting is a weekday thing
    rhythm = {k: leisure_w if k in ("movie", "music", "food") else transit_w if k == "transit" else 1.0
              for k in TOPICS}
    R = np.stack([activity * trend * rhythm[k] * base[k] for k in TOPICS])  # (K, history + window days)
    H = HISTORY_DAYS
    # all history events in one set of draws: topic counts, then day by inverse CDF, modality,
    # phrase, minute of the day, amount noise
    n_topic = rng.poisson(R[:, :H].sum(1))  # (K,)
    topic = np.repeat(np.arange(len(TOPICS)), n_topic)  # (n,)
    n = len(topic)
    cdf = np.cumsum(R[:, :H], 1)
    cdf /= cdf[:, -1:]  # (K, H)
    days = np.minimum((cdf[topic] < rng.random(n)[:, None]).sum(1), H - 1)  # (n,)
    mods = np.minimum(np.searchsorted(np.cumsum(MODALITY_P), rng.random(n)), 4)
    picks, minutes = rng.integers(1 << 30, size=n), rng.integers(7 * 60, 23 * 60, size=n)
    noise, u = rng.normal(0, 0.4, size=n), rng.random(n)
    big = _sigmoid(income - 1)
    events = []
    for k, d, mi, pk, mn, z, ui in zip(topic.tolist(), days.tolist(), mods.tolist(), picks.tolist(),
                                       minutes.tolist(), noise.tolist(), u.tolist()):
        m = SEQ_MODALITIES[mi]
        choices = PHRASES[TOPICS[k]][m]
        phrase = choices[pk % len(choices)]
        if m == "bill":
            if phrase in ("mall", "electronics") and ui > big:
                phrase = "grocery"  # big-ticket merchants mostly for high incomes
            phrase = f"{phrase} {BILL_AMOUNT[phrase] * math.exp(0.35 * income + z):.0f}"
        events.append({"modality": m, "time": T0 + d * 86400 + mn * 60, "text": f"{DATES[d]} {phrase}"})
    if len(events) > 40:  # bound the sequence length: keep a random subset (time order restored below)
        events = [events[i] for i in sorted(rng.choice(len(events), 40, replace=False))]
    if not events:  # an empty history is invalid: every user did at least one daily thing
        d = int(rng.integers(H))
        events.append({"modality": "bill", "time": T0 + d * 86400 + 12 * 3600,
                       "text": f"{DATES[d]} grocery {60 * math.exp(0.35 * income):.0f}"})
    events.sort(key=lambda e: e["time"])
    # tabular profile: 8 noisy features, no time (static); income is seen far better here than in text
    tab = [age / 3 + rng.normal(0, 0.3), income + rng.normal(0, 0.4), math.log(activity) + rng.normal(0, 0.3),
           rng.uniform(0, 5), float(rng.poisson(1.5)), 0.7 * income + rng.normal(0, 0.7),
           0.5 * logit["achievement"] + rng.normal(0, 1), rng.normal()]
    events.append({"modality": "tabular", "vector": [round(float(v), 4) for v in tab]})

    # prediction window (days 90..119): counts per topic drawn from the same rates, then labels
    # (App. B: a label is whether the user triggers the task's target event in the window).
    # concert: rare music events, boosted by income; login: the activity level at the *end* of the
    # history; mau_loss: the churn trend (late vs early activity) and a low activity level;
    # transit/food/movie/physical: a window event of that topic; power: spending, driven by income
    # (clear in the tabular vector, faint in bill amounts); achievement: the latent interest itself,
    # seen through reward events and one noisy tabular feature. Then 5% of labels are flipped.
    win = {k: R[i, H:].sum() for i, k in enumerate(TOPICS)}
    counts = {k: rng.poisson(win[k]) for k in TOPICS}
    end_act = activity * trend[H:].mean()
    spend = income + rng.normal(0, 0.5)
    y = {
        "concert": rng.random() < 1 - math.exp(-1.0 * win["music"] * (1 + 0.3 * (income > 0))),
        "login": rng.random() < 1 - math.exp(-2.0 * end_act),
        "mau_loss": rng.random() < _sigmoid(-2.0 + 4.0 * churn - 0.8 * math.log(activity)),
        "transit": counts["transit"] > 0,
        "power": spend > 0.6,
        "food": counts["food"] > 0,
        "movie": counts["movie"] > 0,
        "achievement": rng.random() < _sigmoid(2.0 * logit["achievement"] + 1.2),
        "physical": counts["fitness"] > 0,
    }
    labels = {t: int(y[t]) ^ int(rng.random() < LABEL_NOISE) for t in TASKS}
    top = sorted((k for k in TOPICS if counts[k] > 0), key=lambda k: (-counts[k], TOPICS.index(k)))[:3]
    answer = "next month: " + ("; ".join(ANSWER_PHRASE[k] for k in top) if top else "inactive")
    answer += "; spending " + ("high" if spend > 0.6 else "low" if spend < -0.6 else "medium")
    query = QUERIES[rng.integers(len(QUERIES))]
    return {"user_id": uid, "events": events, "query": query, "answer": answer, "labels": labels}


def write_synthetic(out_dir, n_train=4000, n_probe=2000, seed=0):
    """Writes train.jsonl (events, query, answer) and probe.jsonl (plus labels). Deterministic per
    seed (one numpy Generator, fixed key order). Returns (train_path, probe_path)."""
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for name, n, prefix, keep_labels in (("train.jsonl", n_train, "t", False), ("probe.jsonl", n_probe, "p", True)):
        path = os.path.join(out_dir, name)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for i in range(n):
                rec = _synthetic_user(rng, f"{prefix}{i:06d}")
                if not keep_labels:
                    del rec["labels"]
                f.write(json.dumps(rec, separators=(",", ":")) + "\n")
        os.replace(tmp, path)  # no half-written file under the final name
        paths.append(path)
    return tuple(paths)


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description="write the synthetic user benchmark (train.jsonl, probe.jsonl)")
    ap.add_argument("--out", default="cache/synthetic")
    ap.add_argument("--n-train", type=int, default=3000)
    ap.add_argument("--n-probe", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    train_path, probe_path = write_synthetic(args.out, args.n_train, args.n_probe, args.seed)
    probe, report = load_records(probe_path, require=("labels",))
    print(report)
    for t in TASKS:
        print(f"{t:12s} positive rate {np.mean([r['labels'][t] for r in probe]):.3f}")


if __name__ == "__main__":
    main()

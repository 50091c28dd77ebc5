"""The encoded cache: a JSONL file of user records, validated and tokenized once into plain arrays on disk that
every later run, every rank of a torchrun job and the probe memory-map instead of re-reading the file.

    import cache
    folder = cache.ensure("train.jsonl", "cache/encoded", settings, make_template, require=("answer",))
    ds = cache.EncodedDataset(folder, template)      # ds[i] is data.UserDataset(records, template)[i], read from disk

Why: data.UserDataset keeps every record as Python dicts and encodes them one user at a time (about 100 s and
2-3 GB per 100,000 users, repeated by every rank and every run). Here one pass validates the file line by line
(data.parse_line + data.validate_record: the checks and file:line errors of data.iter_records), keeps the events as flat arrays, tokenizes each distinct event text,
query and answer once with the tokenizer's batch API, then applies the template (preamble, block order, the
oldest-first truncation to max_len, tags, <VEC> placeholders, <USER>, answer + EOS) with vectorised numpy over a
chunk of users at a time. This restates data.Template.encode_user; every build re-encodes a few users with
data.Template and stops if they differ (check_against_template). A reader touches only the rows of the users it
asks for, so a rank's private memory does not grow with the number of users (the pages of the memory map it reads
are page cache, shared by the ranks). Modalities in event form (Template.event_modalities) keep one <VEC> per event
and the ids of its text; the reader's template turns them into the event's vector (its event_encoder), so the cache
never depends on the weights.

The folder's name carries a hash of its key: the file's SHA-256, the validation options and the caller's
encoding settings (tokenizer, template options). meta.json holds the key in full and the template's fingerprint;
opening a folder whose key or fingerprint differs from the caller's is an error naming the folder and the field.
The folder is written under a temporary name and renamed into place, so a reader never sees half a cache.

Layout of a cache folder (.npy files read with np.load(mmap_mode="r"); no pickle anywhere):
    meta.json       key, fingerprint, n_users, the LoadReport of the validation pass, tasks, vector modalities
    user_ids.npy    (T_u,) int32     every user's token ids, concatenated; <USER> is each user's last token
    user_off.npy    (N + 1,) int64   user i's tokens are user_ids[user_off[i]:user_off[i + 1]]
    answer_ids.npy  (T_a,) int32     every answer's token ids (EOS last, where the pooled state is read), concatenated
    answer_off.npy  (N + 1,) int64   (answer files only when the cache was built with answers)
    vec{k}.npy      (R_k, F_k) float32  the file's vectors of modality meta["vector_modalities"][k], users in order
    vec{k}_src.npy  (N_k,) int64     each <VEC> of that modality: j >= 0 its vector vec{k}[j]; j < 0 an event in event
                                     form, its text -j - 1 (text_ids[text_off[-j - 1]:text_off[-j]])
    vec{k}_col.npy  (N_k,) int32     each <VEC> placeholder's column in its user's tokens
    vec{k}_off.npy  (N + 1,) int64   user i's rows of vec{k}_src and vec{k}_col
    text_ids.npy    (T_t,) int32     the ids of every distinct event text (event form only), concatenated
    text_off.npy    (T + 1,) int64
    labels.npy      (N, T) int8      0/1, -1 where the user has no label; columns meta["tasks"]
    uid_bytes.npy   (B,) uint8       user ids, UTF-8, concatenated
    uid_off.npy     (N + 1,) int64
    lines.npy       (N,) int64       each user's line in the JSONL file
    n_cut.npy       (N,) int32       events dropped by truncation
    history.npy     (N, 2) int32     each user's history segment [start, end): the modality blocks, tags included
"""
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
from array import array

import numpy as np
import torch

import data
from checkpoint import file_sha256

FORMAT = 3             # bump when the layout or the encoding changes: old folders are then not reused
CHUNK_USERS = 20_000   # users encoded at once: bounds the numpy temporaries (about 1 KB per event)
N_CHECK = 8            # the first and last N_CHECK users of every build are re-encoded by data.Template and compared


def template_fingerprint(template):
    """Everything about a data.Template that changes the token ids it produces (the tokenizer in full, with the
    special tokens the template added)."""
    return {"tokenizer_sha256": hashlib.sha256(template.tokenizer.to_str().encode()).hexdigest(),
            "modalities": list(template.modalities), "vector_dims": dict(template.vector_dims),
            "max_len": template.max_len, "max_answer_len": template.max_answer_len,
            "global_token": bool(template.global_token), "eos_id": template.eos_id, "pad_id": template.pad_id,
            "special_token_ids": list(template.special_token_ids), "preamble_ids": list(template.preamble_ids),
            "event_modalities": list(template.event_modalities)}


def _diff(want, have):
    """The names of the fields of two dicts that differ (JSON round trip first: tuples and lists compare equal)."""
    want, have = json.loads(json.dumps(want)), json.loads(json.dumps(have))
    return sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))


# -----------------------------------------------------------------------------
# finding or building a cache

def ensure(path, root, settings, make_template, require=(), skip_bad=False, with_answer=True, log=print):
    """-> the cache folder of `path` under `root`, built first when missing.
    settings: JSON-able, everything that decides make_template's result besides the file (e.g. the tokenizer
    file's hash and the template options). make_template(report) -> the data.Template to encode with; it gets the
    LoadReport of the validation pass (modalities and vector widths of the file)."""
    key = {"format": FORMAT, "file_sha256": file_sha256(path), "require": sorted(require), "skip_bad": bool(skip_bad),
           "with_answer": bool(with_answer), "settings": settings}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(path))[0]
    folder = os.path.join(root, f"{stem}-{digest}")
    meta_path = os.path.join(folder, "meta.json")
    if os.path.isfile(meta_path):
        meta = read_meta(folder)
        bad = _diff(key, meta["key"])
        if bad:
            raise ValueError(f"{folder}: the cache does not match its key: {', '.join(bad)} differ "
                             "(delete the folder to rebuild it)")
        return folder
    log(f"encoding {path} into {folder} (once; later runs memory-map it)")
    build(path, folder, key, make_template, require, skip_bad, with_answer)
    return folder


def read_meta(folder):
    path = os.path.join(folder, "meta.json")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder}: not a readable encoded cache ({e})") from None
    if meta.get("key", {}).get("format") != FORMAT:
        raise ValueError(f"{folder}: cache format {meta.get('key', {}).get('format')}, this code reads {FORMAT} "
                         "(delete the folder to rebuild it)")
    return meta


def read_report(folder):
    """The LoadReport of the validation pass that built the cache (modalities, vector widths, bad lines)."""
    r = read_meta(folder)["report"]
    return data.LoadReport(path=r["path"], n_ok=r["n_ok"], n_bad=r["n_bad"], reasons=r["reasons"],
                           vector_dims=r["vector_dims"], modality_counts=r["modality_counts"])


class _Collected:
    """The validation pass's output: flat per-event and per-user arrays (array.array: 8 bytes or less per value,
    not a Python object each), texts, queries and answers replaced by codes into tables of distinct strings."""

    def __init__(self):
        self.texts, self.queries, self.answers, self.mods, self.tasks = {}, {}, {}, {}, {}  # string -> code
        self.ev_mod, self.ev_text, self.ev_vec = array("i"), array("i"), array("q")  # per event; -1: none
        self.ev_time = array("d")                       # per event; NaN: no time
        self.vec_val, self.vec_len = array("d"), array("i")  # vector k: vec_val[vec_start[k]:][:vec_len[k]]
        self.n_ev, self.query, self.answer, self.line = array("q"), array("i"), array("i"), array("q")
        self.lab_user, self.lab_task, self.lab_val = array("q"), array("i"), array("b")
        self.uids = []

    def add(self, lineno, rec):
        u = len(self.uids)
        self.uids.append(rec["user_id"])
        self.line.append(lineno)
        events = rec["events"]
        self.n_ev.append(len(events))
        # list comprehensions per field, not one loop with many appends: about a third less time per event
        mods, texts = self.mods, self.texts
        self.ev_mod.extend([mods.setdefault(ev["modality"], len(mods)) for ev in events])
        self.ev_time.extend([math.nan if t is None else t for t in [ev.get("time") for ev in events]])
        self.ev_text.extend([-1 if x is None else texts.setdefault(x, len(texts)) for x in [ev.get("text") for ev in events]])
        for v in [ev.get("vector") for ev in events]:
            if v is None:
                self.ev_vec.append(-1)
            else:
                self.ev_vec.append(len(self.vec_len))
                self.vec_len.append(len(v))
                self.vec_val.extend(v)
        self.query.append(self.queries.setdefault(rec.get("query"), len(self.queries)))
        a = rec.get("answer")
        self.answer.append(-1 if a is None else self.answers.setdefault(a, len(self.answers)))
        for k, y in (rec.get("labels") or {}).items():
            self.lab_user.append(u)
            self.lab_task.append(self.tasks.setdefault(k, len(self.tasks)))
            self.lab_val.append(y)


def _scan(job):
    """Validate and collect one part of a JSONL file: the lines that start in bytes [start, stop), the first of them
    line number first_line. Each line goes through data.parse_line and data.validate_record, with the file:line
    errors and the --skip-bad accounting of data.iter_records. -> dict(c, report, head, tail) or dict(error)."""
    path, start, stop, line, skip_bad, require = (job[k] for k in ("path", "start", "stop", "first_line", "skip_bad",
                                                                    "require"))
    report = data.LoadReport(path=str(path))
    c, head, tail = _Collected(), [], []  # head, tail: (user number, record) of the first and last N_CHECK users
    base = os.path.basename(str(path))
    with open(path, "rb") as f:
        f.seek(start)
        pos = start
        while pos < stop:
            raw = f.readline()
            if not raw:
                break
            pos += len(raw)
            try:
                rec = data.parse_line(raw, line)
                if rec is not None:
                    data.validate_record(rec, report.vector_dims, require)
            except ValueError as e:
                msg = f"{path}:{line}: {e}"
                if not skip_bad:
                    return {"error": msg}
                report.n_bad += 1
                if len(report.reasons) < data.MAX_REASONS:
                    report.reasons.append(msg)
                rec = None
            if rec is not None:
                rec["user_id"] = str(rec["user_id"]) if rec.get("user_id") is not None else f"{base}:{line}"
                report.n_ok += 1
                (head if len(head) < N_CHECK else tail).append((len(c.uids), rec))
                del tail[:-N_CHECK]
                c.add(line, rec)
            line += 1
    return {"c": c, "report": report, "head": head, "tail": tail}


def _merge(parts):
    """The parts' collections as one (numpy arrays, string tables as lists in code order), the report as one pass
    over the whole file would give it, and the check sample with global user numbers. Codes are remapped: each
    part numbered its distinct strings itself."""
    m = _Collected()
    tables = {}
    for name in ("texts", "queries", "answers", "mods", "tasks"):
        merged = {}
        tables[name] = [np.array([merged.setdefault(s, len(merged)) for s in getattr(p["c"], name)] or [0], np.int64)
                        for p in parts]
        setattr(m, name, list(merged))

    def remap(field, table, dtype):  # -1 stays -1 (no text, no answer)
        out = []
        for p, t in zip(parts, tables[table]):
            x = np.frombuffer(getattr(p["c"], field), dtype=dtype).astype(np.int64)
            out.append(np.where(x >= 0, t[np.maximum(x, 0)], -1))
        return np.concatenate(out)
    m.ev_mod, m.ev_text = remap("ev_mod", "mods", np.int32), remap("ev_text", "texts", np.int32)
    m.query, m.answer = remap("query", "queries", np.int32), remap("answer", "answers", np.int32)
    m.lab_task = remap("lab_task", "tasks", np.int32)
    users = np.cumsum([0] + [len(p["c"].uids) for p in parts])
    vecs = np.cumsum([0] + [len(p["c"].vec_len) for p in parts])
    m.ev_vec = np.concatenate([np.where(x >= 0, x + vecs[k], -1) for k, x in
                               enumerate(np.frombuffer(p["c"].ev_vec, dtype=np.int64) for p in parts)])
    m.lab_user = np.concatenate([np.frombuffer(p["c"].lab_user, dtype=np.int64) + users[k] for k, p in enumerate(parts)])
    for field, dtype in (("ev_time", np.float64), ("vec_val", np.float64), ("vec_len", np.int32), ("n_ev", np.int64),
                         ("line", np.int64), ("lab_val", np.int8)):
        setattr(m, field, np.concatenate([np.frombuffer(getattr(p["c"], field), dtype=dtype) for p in parts]))
    m.uids = [u for p in parts for u in p["c"].uids]
    report = data.LoadReport(path=parts[0]["report"].path)
    for p in parts:
        r = p["report"]
        report.n_ok, report.n_bad = report.n_ok + r.n_ok, report.n_bad + r.n_bad
        report.reasons = (report.reasons + r.reasons)[:data.MAX_REASONS]
        for mod, dim in r.vector_dims.items():
            report.vector_dims.setdefault(mod, dim)
    counts = np.bincount(m.ev_mod, minlength=len(m.mods))
    report.modality_counts = {mod: int(k) for mod, k in zip(m.mods, counts)}
    sample = [(u + users[k], rec) for k, p in enumerate(parts) for u, rec in p["head"] + p["tail"]]
    sample = sorted({u: (u, rec) for u, rec in sample}.values(), key=lambda x: x[0])
    return m, report, sample[:N_CHECK] + sample[-N_CHECK:] if len(sample) > 2 * N_CHECK else sample


def collect(path, skip_bad=False, require=()):
    """The validation pass, line by line in file order: -> (collection as numpy arrays, LoadReport, check sample)."""
    r = _scan({"path": path, "start": 0, "stop": os.path.getsize(path), "first_line": 1, "skip_bad": skip_bad,
               "require": tuple(require)})
    if "error" in r:
        raise ValueError(r["error"])
    m, report, sample = _merge([r])
    if report.n_bad:
        print(f"warning: {report}", file=sys.stderr)  # as data.iter_records says it at the end of its pass
    return m, report, sample


def _tokenize(template, strings, who, add=(), keep=None):
    """Distinct strings -> (flat ids int32, offsets (n + 1,) int64), each string encoded alone (encode_batch runs in
    Rust, in parallel), `add` appended after keeping the first `keep` ids. A string that tokenizes to a special
    token of the template (a literal '<USER>' would fake the anchor) raises ValueError naming who(index)."""
    encs = template.tokenizer.encode_batch(list(strings), add_special_tokens=False) if strings else []
    ids = [e.ids for e in encs]
    for j, x in enumerate(ids):
        bad = template._special_set.intersection(x)
        if bad:
            raise ValueError(f"{who(j)} contains the reserved token {template.tokenizer.id_to_token(min(bad))!r}")
    if keep is not None or add:
        ids = [x[:keep] + list(add) for x in ids]
    lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lens.sum()))
    return flat, np.concatenate([[0], np.cumsum(lens)])


class _Npy:
    """An .npy file whose length is known only at the end: rows go to a raw file as they come, and close()
    writes the header and copies them behind it (one sequential copy, never all rows in memory)."""

    def __init__(self, path, dtype, row_shape=()):
        self.path, self.dtype, self.row_shape, self.n = path, np.dtype(dtype), tuple(row_shape), 0
        self.raw = open(path + ".raw", "wb")

    def write(self, rows):
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        assert rows.shape[1:] == self.row_shape, (self.path, rows.shape, self.row_shape)
        rows.tofile(self.raw)
        self.n += len(rows)

    def close(self):
        self.raw.close()
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (self.n,) + self.row_shape}
        with open(self.path, "wb") as out, open(self.path + ".raw", "rb") as raw:
            np.lib.format.write_array_header_1_0(out, header)
            shutil.copyfileobj(raw, out, 1 << 22)
        os.remove(self.path + ".raw")


def _offsets(counts):
    """(n,) counts -> (n + 1,) int64 offsets."""
    return np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))])


def _ranges(starts, lens):
    """Indices of the concatenated ranges [starts[j], starts[j] + lens[j]) (vectorised: no loop over ranges)."""
    lens = np.asarray(lens, dtype=np.int64)
    out_start = np.cumsum(lens) - lens
    return np.repeat(np.asarray(starts, dtype=np.int64) - out_start, lens) + np.arange(int(lens.sum()))


def build(path, folder, key, make_template, require=(), skip_bad=False, with_answer=True, chunk=CHUNK_USERS):
    """Validate `path` line by line, encode it, write the cache folder atomically (see the module docstring)."""
    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _encode_into(tmp, path, key, make_template, require, skip_bad, with_answer, chunk)
    except BaseException:  # an error or an interrupt leaves nothing behind, not even the temporary folder
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # the folder appears whole under its final name or not at all; a concurrent builder of the same key may win
    try:
        os.rename(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(os.path.join(folder, "meta.json")):
            raise
    return folder


def _encode_into(tmp, path, key, make_template, require, skip_bad, with_answer, chunk):
    c, report, sample = collect(path, skip_bad, require)
    n = len(c.uids)
    if n == 0:
        raise ValueError(f"{path}: no usable records" + (f"\n{report}" if report.n_bad else ""))
    template = make_template(report)
    where = lambda u: f"{path}:{c.line[u]}: user {c.uids[u]}"  # noqa: E731

    # per event (file order) and per user, as numpy views of the collected arrays
    ev_mod, ev_text, ev_vec, ev_time, n_ev = c.ev_mod, c.ev_text, c.ev_vec, c.ev_time, c.n_ev
    ev_off = _offsets(n_ev)                                         # (n + 1,)
    ev_user = np.repeat(np.arange(n), n_ev)                         # (E,)
    vec_len, vec_val = c.vec_len, c.vec_val
    vec_start = _offsets(vec_len)[:-1]

    # the file's modality codes -> the template's block order; -1: a modality the template has no tags for
    M = len(template.modalities)
    names = list(c.mods)
    tmpl_index = {m: k for k, m in enumerate(template.modalities)}
    mod_map = np.array([tmpl_index.get(m, -1) for m in names], dtype=np.int64)
    ev_m = mod_map[ev_mod]                                          # (E,)
    if (ev_m < 0).any():
        e = int(np.argmax(ev_m < 0))
        u = int(ev_user[e])
        raise ValueError(f"{where(u)}: events[{e - ev_off[u]}].modality {names[ev_mod[e]]!r} is not among the "
                         f"template's {template.modalities}")
    # vectors: the template must have an adapter width for the modality, and the same width
    dims = np.array([template.vector_dims.get(m, -1) for m in template.modalities], dtype=np.int64)
    has_vec = ev_vec >= 0
    width = vec_len[np.maximum(ev_vec, 0)] if len(vec_len) else np.zeros(len(ev_vec), np.int64)  # no vector in the file
    wrong = has_vec & (dims[ev_m] != np.where(has_vec, width, 0))
    if wrong.any():
        e = int(np.argmax(wrong))
        u, m = int(ev_user[e]), template.modalities[ev_m[e]]
        i = e - ev_off[u]
        if dims[ev_m[e]] < 0:
            raise ValueError(f"{where(u)}: events[{i}].vector: modality {m!r} has no vector_dims entry")
        raise ValueError(f"{where(u)}: events[{i}].vector: length {vec_len[ev_vec[e]]}, but modality {m!r} has "
                         f"{dims[ev_m[e]]}")

    # tokenize each distinct string once; errors name the first user (file order) that uses the string
    def first_user(codes, j):
        return int(np.argmax(np.asarray(codes) == j))
    texts = list(c.texts)
    t_flat, t_off = _tokenize(template, [data.event_piece(t) for t in texts],
                              lambda j: f"{where(int(ev_user[np.argmax(ev_text == j)]))}: text {texts[j]!r}")
    queries = list(c.queries)
    q_flat, q_off = _tokenize(template, [" Instruction:" + (" " + q if q else "") for q in queries],
                              lambda j: f"{where(first_user(c.query, j))}: query {queries[j]!r}", add=[template.user_id])
    answers = list(c.answers)
    if with_answer:
        missing = c.answer < 0
        if missing.any():
            raise ValueError(f"{where(int(np.argmax(missing)))}: answer: missing (needed to train)")
        a_flat, a_off = _tokenize(template, answers, lambda j: f"{where(first_user(c.answer, j))}: answer {answers[j]!r}",
                                  add=[template.eos_id], keep=template.max_answer_len - 1)
    t_len, q_len = np.diff(t_off), np.diff(q_off)
    # event form (data.Template event_modalities): the event's text becomes one <VEC>, its vector read from its ids
    as_event = np.isin(ev_m, [tmpl_index[m] for m in template.event_modalities]) & (ev_text >= 0)  # (E,)
    # one source array for the gather that assembles the sequences: text ids, suffix ids, the head of every
    # sequence (<GLOBAL> for hybrid_gq, then the preamble; never cut), then the single tokens
    head_ids = ([template.global_id] if template.global_token else []) + list(template.preamble_ids)
    S0 = len(t_flat) + len(q_flat)
    single = head_ids + [template.vec_id] + [template.open_id[m] for m in template.modalities] \
        + [template.close_id[m] for m in template.modalities]
    src = np.concatenate([t_flat, q_flat, np.array(single, dtype=np.int32)])
    H = len(head_ids)
    VEC, OPEN, CLOSE = S0 + H, S0 + H + 1, S0 + H + 1 + M

    query = c.query
    fixed = q_len[query] + H                                        # (n,) head + suffix: never cut
    if (fixed > template.max_len).any():
        u = int(np.argmax(fixed > template.max_len))
        raise ValueError(f"{where(u)}: query: {fixed[u]} tokens with <USER> and the preamble, more than "
                         f"max_len={template.max_len}")

    vec_mods = [m for m in template.modalities if m in template.vector_dims]
    os.makedirs(tmp)
    out_user = _Npy(os.path.join(tmp, "user_ids.npy"), np.int32)
    out_answer = _Npy(os.path.join(tmp, "answer_ids.npy"), np.int32) if with_answer else None
    out_vec = [(_Npy(os.path.join(tmp, f"vec{k}.npy"), np.float32, (template.vector_dims[m],)),
                _Npy(os.path.join(tmp, f"vec{k}_col.npy"), np.int32), _Npy(os.path.join(tmp, f"vec{k}_src.npy"), np.int64))
               for k, m in enumerate(vec_mods)]
    user_len, answer_len, n_cut = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int32)
    history = np.zeros((n, 2), np.int32)
    vec_count = np.zeros((len(vec_mods), n), np.int64)

    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        ea, eb = int(ev_off[a]), int(ev_off[b])
        E, nu = eb - ea, b - a
        u = ev_user[ea:eb] - a                                      # (E,) chunk-local user, ascending
        i = np.arange(E) - np.repeat(ev_off[a:b] - ea, n_ev[a:b])   # (E,) index within the user's events
        m = ev_m[ea:eb]
        tc, vr, xv = ev_text[ea:eb], ev_vec[ea:eb], as_event[ea:eb]
        t = ev_time[ea:eb]
        untimed = np.isnan(t)
        tkey = np.where(untimed, 0.0, t)
        cost = np.where(tc >= 0, np.where(xv, 1, t_len[np.maximum(tc, 0)]), 0) + (vr >= 0)  # tokens of its piece(s)
        # recency key (data.Template): timed events by time, then untimed ones (newer) by file order.
        # nf: newest first within each user; pos: rank of the key, oldest first (the order inside a block)
        nf = np.lexsort((-i, -tkey, -untimed.astype(np.int64), u))
        pos = np.empty(E, np.int64)
        pos[np.lexsort((i, tkey, untimed, u))] = np.arange(E)
        m_nf = m[nf]
        # rank of each event among its user's events of the same modality, newest first
        g = np.lexsort((np.arange(E), m_nf, u))
        gid = u[g] * M + m_nf[g]
        new = np.r_[True, gid[1:] != gid[:-1]]
        rank = np.empty(E, np.int64)
        rank[g] = np.arange(E) - np.maximum.accumulate(np.where(new, np.arange(E), 0))
        add = cost[nf] + 2 * (rank == 0)                            # the newest event of a block pays its 2 tags
        cs = np.cumsum(add)
        cum = cs - np.repeat(np.r_[0, cs][ev_off[a:b] - ea], n_ev[a:b])  # tokens used up to this event, per user
        # every event costs >= 1 token, so `cum` grows strictly: keeping those that fit is exactly the template's
        # "stop at the first event that does not fit"
        kept_nf = fixed[a:b][u] + cum <= template.max_len
        kept = np.empty(E, bool)
        kept[nf] = kept_nf
        n_cut[a:b] = n_ev[a:b] - np.bincount(u[kept], minlength=nu)
        blk = nf[kept_nf & (rank == 0)]                             # one event per kept block: its user, modality
        # pieces of the sequences: (user, section, modality, position, sub) orders them; start/length in src
        te, ve = np.flatnonzero(kept & (tc >= 0) & ~xv), np.flatnonzero(kept & (vr >= 0))
        xe = np.flatnonzero(kept & xv)                              # event-form texts: one <VEC> each
        users = np.arange(nu)
        gl = users if H else users[:0]                              # one head piece per user
        # within an event: its text (ids, or one <VEC> in event form) first, then the <VEC> of its own vector
        p_u = np.concatenate([gl, u[blk], u[te], u[xe], u[ve], u[blk], users])
        p_sec = np.concatenate([np.zeros(len(gl)), np.ones(len(blk) + len(te) + len(xe) + len(ve) + len(blk)),
                                np.full(nu, 2)])
        p_m = np.concatenate([np.zeros(len(gl), np.int64), m[blk], m[te], m[xe], m[ve], m[blk], np.zeros(nu, np.int64)])
        p_pos = np.concatenate([np.zeros(len(gl), np.int64), np.full(len(blk), -1), pos[te], pos[xe], pos[ve],
                                np.full(len(blk), E), np.zeros(nu, np.int64)])
        p_sub = np.concatenate([np.zeros(len(gl) + len(blk) + len(te) + len(xe)), np.ones(len(ve)),
                                np.zeros(len(blk) + nu)])
        p_start = np.concatenate([np.full(len(gl), S0), OPEN + m[blk], t_off[tc[te]], np.full(len(xe) + len(ve), VEC),
                                  CLOSE + m[blk], len(t_flat) + q_off[query[a:b]]])
        p_len = np.concatenate([np.full(len(gl), H), np.ones(len(blk), np.int64), t_len[tc[te]],
                                np.ones(len(xe) + len(ve), np.int64), np.ones(len(blk), np.int64), q_len[query[a:b]]])
        # the source of a <VEC>: the file's vector r (r >= 0), or an event-form text c (-c - 1); -len(texts) - 1 none
        none = -len(texts) - 1
        p_src = np.concatenate([np.full(len(gl) + len(blk) + len(te), none), -tc[xe] - 1, vr[ve],
                                np.full(len(blk) + nu, none)])
        order = np.lexsort((p_sub, p_pos, p_m, p_sec, p_u))
        p_u, p_m, p_start, p_len, p_src = p_u[order], p_m[order], p_start[order], p_len[order], p_src[order]
        tokens = src[_ranges(p_start, p_len)]                      # (sum of lengths,) the chunk's sequences
        lens = np.bincount(p_u, weights=p_len, minlength=nu).astype(np.int64)
        # u is ascending, so u[nf] == u: the newest-first arrays share the file order's per-user ranges
        expected = fixed[a:b] + np.bincount(u, weights=np.where(kept_nf, add, 0), minlength=nu).astype(np.int64)
        assert (lens == expected).all(), "cache: assembled lengths disagree with the truncation's count"
        out_user.write(tokens)
        user_len[a:b] = lens
        history[a:b, 0], history[a:b, 1] = H, lens - q_len[query[a:b]]  # [start, end): the blocks, tags included
        # <VEC> columns: a piece's output offset minus its user's first offset
        p_out = np.cumsum(p_len) - p_len
        u_out = np.cumsum(lens) - lens
        for k, mname in enumerate(vec_mods):
            sel = (p_src != none) & (p_m == tmpl_index[mname])
            came, F = p_src[sel], template.vector_dims[mname]
            file_vec = came >= 0
            rows = vec_val[_ranges(vec_start[came[file_vec]], np.full(int(file_vec.sum()), F))].reshape(-1, F)  # (R, F)
            out_vec[k][0].write(rows.astype(np.float32))
            # the file's vectors are numbered as written, over all chunks
            out_vec[k][2].write(np.where(file_vec, out_vec[k][0].n - len(rows) + np.cumsum(file_vec) - 1, came))
            out_vec[k][1].write(p_out[sel] - u_out[p_u[sel]])
            vec_count[k, a:b] = np.bincount(p_u[sel], minlength=nu)
        if with_answer:
            ac = c.answer[a:b]
            out_answer.write(a_flat[_ranges(a_off[ac], np.diff(a_off)[ac])])
            answer_len[a:b] = np.diff(a_off)[ac]

    for f in [out_user] + ([out_answer] if out_answer else []) + [x for pair in out_vec for x in pair]:
        f.close()
    save = lambda name, x: np.save(os.path.join(tmp, name), x)  # noqa: E731
    save("user_off.npy", _offsets(user_len))
    if template.event_modalities:
        save("text_ids.npy", t_flat)
        save("text_off.npy", t_off)
    if with_answer:
        save("answer_off.npy", _offsets(answer_len))
    for k in range(len(vec_mods)):
        save(f"vec{k}_off.npy", _offsets(vec_count[k]))
    labels = np.full((n, len(c.tasks)), -1, np.int8)
    labels[c.lab_user, c.lab_task] = c.lab_val
    save("labels.npy", labels)
    uid_bytes = [s.encode("utf-8") for s in c.uids]
    save("uid_bytes.npy", np.frombuffer(b"".join(uid_bytes), dtype=np.uint8))
    save("uid_off.npy", _offsets([len(x) for x in uid_bytes]))
    save("lines.npy", c.line)
    save("n_cut.npy", n_cut)
    save("history.npy", history)
    meta = {"key": key, "fingerprint": template_fingerprint(template), "n_users": n, "with_answer": bool(with_answer),
            "tasks": list(c.tasks), "vector_modalities": vec_mods, "path": os.path.abspath(path),
            "report": {"path": report.path, "n_ok": report.n_ok, "n_bad": report.n_bad, "reasons": report.reasons,
                       "vector_dims": report.vector_dims, "modality_counts": report.modality_counts}}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    check_against_template(tmp, template, sample, path)


def check_against_template(folder, template, sample, path):
    """The vectorised encoding above restates data.Template.encode_user / encode_answer; a change to the template
    that is not mirrored here must fail loudly, not train on other batches. sample: [(user number, record)],
    re-encoded one user at a time by data.UserDataset and compared field by field with the cache."""
    ds = EncodedDataset(folder, template)
    ref = data.UserDataset([rec for _, rec in sample], template, with_answer=ds.with_answer)
    for j, (u, rec) in enumerate(sample):
        want, have = ref[j], ds[u]
        want["index"] = u  # UserDataset numbers its own sample from 0
        missing = sorted(set(want) - set(have))
        if missing:
            raise ValueError(f"{path}:{int(ds.lines[u])}: data.UserDataset's examples have fields {missing} that "
                             "cache.py does not write: mirror the template change in cache.build (and bump FORMAT)")
        for k in want:
            same = (want[k].keys() == have[k].keys() and all(np.array_equal(want[k][m], have[k][m]) for m in want[k])
                    ) if k == "vectors" else want[k] == have[k]
            if not same:
                raise ValueError(f"{path}:{int(ds.lines[u])}: user {rec['user_id']}: cache.py encodes {k} as "
                                 f"{have[k]!r}, data.Template as {want[k]!r}: mirror the template change in "
                                 "cache.build (and bump FORMAT)")


# -----------------------------------------------------------------------------
# reading a cache: the examples of data.UserDataset, a user at a time, from the memory maps

class EncodedDataset(torch.utils.data.Dataset):
    """The users of a cache folder as data.UserDataset examples (the same dicts, so data.collate and train.py's
    micro-batches are unchanged). Only `lengths` (8 bytes a user) is read whole; ds[i] reads user i's rows.
    template: the data.Template the caller encodes with; its fingerprint must be the one the cache was built with."""

    def __init__(self, folder, template):
        meta = read_meta(folder)
        have = template_fingerprint(template)
        bad = _diff(meta["fingerprint"], have)
        if bad:
            raise ValueError(f"{folder}: the cache was encoded with another template: {', '.join(bad)} differ "
                             f"(cache: {[meta['fingerprint'].get(k) for k in bad if k != 'tokenizer_sha256']}, "
                             f"now: {[have.get(k) for k in bad if k != 'tokenizer_sha256']})")
        self.folder, self.template, self.n = folder, template, meta["n_users"]
        self.tasks, self.with_answer = meta["tasks"], meta["with_answer"]

        def load(name, rows=None):
            p = os.path.join(folder, name)
            try:
                x = np.load(p, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise ValueError(f"{folder}: {name}: unreadable ({e}); delete the folder to rebuild it") from None
            if rows is not None and len(x) != rows:
                raise ValueError(f"{folder}: {name}: {len(x)} rows, expected {rows} (meta.json: {self.n} users)")
            return x

        self.user_off = load("user_off.npy", self.n + 1)
        self.user_ids = load("user_ids.npy", int(self.user_off[-1]))
        if self.with_answer:
            self.answer_off = load("answer_off.npy", self.n + 1)
            self.answer_ids = load("answer_ids.npy", int(self.answer_off[-1]))
        self.vecs = {}  # modality -> (the file's vectors (R_k, F), sources (N_k,), columns (N_k,), offsets (N + 1,))
        for k, m in enumerate(meta["vector_modalities"]):
            off = load(f"vec{k}_off.npy", self.n + 1)
            self.vecs[m] = (load(f"vec{k}.npy"), load(f"vec{k}_src.npy", int(off[-1])), load(f"vec{k}_col.npy", int(off[-1])),
                            off)
        if template.event_modalities:
            self.text_off = load("text_off.npy")
            self.text_ids = load("text_ids.npy", int(self.text_off[-1]))
        self.labels = load("labels.npy", self.n)
        self.uid_off = load("uid_off.npy", self.n + 1)
        self.uid_bytes = load("uid_bytes.npy", int(self.uid_off[-1]))
        self.lines = load("lines.npy", self.n)
        self.history = load("history.npy", self.n)
        self.lengths = np.diff(self.user_off)              # (N,) int64: train.micro_batch sorts by it
        self.n_cut = int(load("n_cut.npy", self.n).sum())

    def __len__(self):
        return self.n

    def event_vector(self, c):
        """Event text c (event form) -> its (F,) vector: the template's event_encoder over the text's ids."""
        return self.template.event_encoder(self.text_ids[self.text_off[c]:self.text_off[c + 1]].tolist())

    def user_id(self, i):
        return bytes(self.uid_bytes[self.uid_off[i]:self.uid_off[i + 1]]).decode("utf-8")

    def labels_of(self, i):
        row = self.labels[i]
        return {t: int(y) for t, y in zip(self.tasks, row) if y >= 0}

    def records(self):
        """[{"user_id", "labels"}] for every user: what probe.report_probe reads of the records."""
        return [{"user_id": self.user_id(i), "labels": self.labels_of(i)} for i in range(self.n)]

    def __getitem__(self, i):
        i = int(i)
        ids = self.user_ids[self.user_off[i]:self.user_off[i + 1]].tolist()
        vector_pos, vectors = {}, {}
        for m, (val, src, col, off) in self.vecs.items():
            lo, hi = off[i], off[i + 1]
            if hi > lo:  # as data.Template: a modality appears only when the user has vectors of it
                vector_pos[m] = col[lo:hi].tolist()
                vectors[m] = np.stack([val[j] if j >= 0 else self.event_vector(-j - 1) for j in src[lo:hi].tolist()]
                                      ).astype(np.float32)  # (n, F), a copy out of the map
        answer = self.answer_ids[self.answer_off[i]:self.answer_off[i + 1]].tolist() if self.with_answer else None
        return dict(index=i, user_id=self.user_id(i), input_ids=ids, user_index=len(ids) - 1,
                    history=(int(self.history[i, 0]), int(self.history[i, 1])), vector_pos=vector_pos,
                    vectors=vectors, answer_ids=answer, labels=self.labels_of(i), pad_id=self.template.pad_id,
                    vector_dims=self.template.vector_dims)


# -----------------------------------------------------------------------------
# the training file's cache, as train.py uses it

def ids_checksum(width):
    """A stand-in event encoder for the build's self-check (check_against_template): the cache stores an event's
    ids, not its vector, so any function of the ids that tells them apart checks the assembly; the real one
    (model.frozen_token_mean) needs the weights, which the cache must not depend on. -> ids -> (width,) float32."""
    def encode(ids):
        x = np.asarray(ids, dtype=np.float64)
        v = np.zeros(width, np.float32)
        v[:3] = [len(x), x.sum(), (x * np.arange(1, len(x) + 1)).sum()][:width]
        return v
    return encode


def ensure_for_training(args, train_path, model_dir, ddp, master, log, event_modalities=()):
    """-> (the encoded cache folder of train.py's training file, its LoadReport). Rank 0 builds it when missing; the
    others wait for its folder name (an error on rank 0 stops every rank with the same message)."""
    import torch.distributed as dist
    import ggsm
    global_token = ggsm.STRATEGIES[args.mask].global_token
    events = {}
    if event_modalities:
        with open(os.path.join(model_dir, "config.json")) as f:
            width = json.load(f)["hidden_size"]
        events = dict(event_modalities=list(event_modalities), event_encoder=ids_checksum(width), event_dim=width)

    def make_template(report):  # the template checkpoint.build_encoder makes for this run on a file with this report
        return data.Template(os.path.join(model_dir, "tokenizer.json"), report.modalities, report.vector_dims,
                             max_len=args.max_len, global_token=global_token, max_answer_len=args.answer_max_len,
                             preamble=args.preamble, **events)

    result = None
    if master:
        # what decides the encoding besides the file: the tokenizer's bytes and the template's options
        settings = {"tokenizer_sha256": file_sha256(os.path.join(model_dir, "tokenizer.json")),
                    "max_len": args.max_len, "answer_max_len": args.answer_max_len, "global_token": global_token,
                    "modalities": "the file's", "preamble": args.preamble, "event_modalities": list(event_modalities)}
        root = os.path.join(os.path.dirname(os.path.abspath(train_path)), "encoded") if args.data_cache is None \
            else args.data_cache
        try:
            result = ("ok", ensure(train_path, root, settings, make_template, require=("answer",),
                                   skip_bad=args.skip_bad, with_answer=True, log=log))
        except ValueError as e:
            result = ("error", str(e))
    if ddp:
        box = [result]
        dist.broadcast_object_list(box, src=0)  # also the barrier: the folder is complete when its name arrives
        result = box[0]
    if result[0] == "error":
        sys.exit(f"error: {result[1]}")
    report = read_report(result[1])
    if report.n_bad:
        log(str(report))
    return result[1], report

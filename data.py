"""User records, the paper's input template, and batching (nothing here is model code).

- the JSONL record (one JSON object per line; docs/data.md) and its validation (`iter_records`, `load_records`):
  every bad line is an error naming `file:line` and the field, or, with `skip_bad=True`, is skipped and counted
  in a `LoadReport` that is printed (never dropped silently);
- the input template of App. A.1 / Eq. 10 of arXiv 2602.10622, tokenized with `tokenizers`:
      {PREAMBLE} <bill> … </bill> <minipro> … </minipro> <spm> … </spm> <app> … </app> <search> … </search>
      <tabular> … </tabular> Instruction: {query} <USER>
  an event that carries a `vector` becomes one `<VEC>` placeholder whose position and vector travel with the
  batch (model.py splices the adapter output in);
- `UserDataset`, `collate` (dynamic right padding); hand-made features of the records (probe.py's baseline rows).
"""

import datetime
import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer

MODALITY_ORDER = ("bill", "minipro", "spm", "app", "search", "tabular")  # paper order (App. A.1)
TASKS = ("concert", "login", "mau_loss", "transit", "power", "food", "movie", "achievement", "physical")

VEC_TOKEN, USER_TOKEN, GLOBAL_TOKEN = "<VEC>", "<USER>", "<GLOBAL>"
# paper [template opening sentence]: App. A.1 opens the template with this sentence, naming each source's data with a
# symbol (B_i, M_i, S_i, A_i, R_i, T_i); the blocks themselves follow here, so the symbols are left out. Off by
# default: at a 256-token budget its 38 tokens (the small decoder's BPE) cut 2,732 events of the embedded benchmark
# instead of 103 and cost a fifth of each step. Template(preamble=PREAMBLE) / train.py --preamble paper opens with it.
PREAMBLE = ("The following presents heterogeneous user data collected from multiple sources, including PayBill "
            "transactions, Mini Program interaction logs, Super Position Model paths, App interaction records, "
            "homepage search queries, and structured tabular features:")

def preamble_text(value):
    """A --preamble value: 'paper' is PREAMBLE, anything else the sentence itself ('' for none)."""
    return PREAMBLE if value == "paper" else value

# Tried in order when the tokenizer (or a tokenizer_config.json beside it) does not name them.
EOS_CANDIDATES = ("<|endoftext|>", "<|im_end|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>")
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>")
MAX_REASONS = 5  # how many skip reasons a LoadReport keeps

def order_modalities(names):
    """The fixed block order: MODALITY_ORDER first (those present), then any other names sorted."""
    names = set(names)
    return [m for m in MODALITY_ORDER if m in names] + sorted(names - set(MODALITY_ORDER))

# -----------------------------------------------------------------------------
# Records and validation

@dataclass
class LoadReport:
    """What a pass over a JSONL file saw. `vector_dims` and `modalities` come from the same single
    pass, so building a Template never needs a second read of the file."""
    path: str = ""
    n_ok: int = 0
    n_bad: int = 0
    reasons: list = field(default_factory=list)  # the first MAX_REASONS error messages
    vector_dims: dict = field(default_factory=dict)  # modality -> vector length (first one seen)
    modality_counts: dict = field(default_factory=dict)  # modality -> number of events

    @property
    def modalities(self):
        return order_modalities(self.modality_counts)

    def __str__(self):
        s = f"{self.path}: {self.n_ok} records read, {self.n_bad} bad lines skipped"
        for r in self.reasons:
            s += f"\n  {r}"
        if self.n_bad > len(self.reasons):
            s += f"\n  ... and {self.n_bad - len(self.reasons)} more"
        return s

def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)

def _is_finite(x):
    """math.isfinite, False (not OverflowError) for an int too large for a float."""
    try:
        return math.isfinite(x)
    except OverflowError:
        return False

def _parse_time(t, where):
    """`time` is a number (e.g. unix seconds) or an ISO-8601 string; returns a float."""
    if _is_number(t):
        if not _is_finite(t):
            raise ValueError(f"{where}: not a finite number ({t})")
        return float(t)
    if isinstance(t, str):
        try:
            d = datetime.datetime.fromisoformat(t)
        except ValueError:
            raise ValueError(f"{where}: {t!r} is neither a number nor an ISO-8601 date") from None
        if d.tzinfo is None:  # naive dates are read as UTC so the order does not depend on the machine
            d = d.replace(tzinfo=datetime.timezone.utc)
        return d.timestamp()
    raise ValueError(f"{where}: expected a number or an ISO-8601 string, got {type(t).__name__}")

def validate_record(rec, vector_dims, require=(), modalities=None):
    """Checks one parsed record in place and normalises it (time -> float, labels -> int).
    `vector_dims` (modality -> length) is updated with the first length seen per modality.
    modalities: the only modality names accepted (those of a trained encoder), or None for any.
    Raises ValueError('field: problem'); the caller prefixes file:line."""
    if not isinstance(rec, dict):
        raise ValueError(f"record: expected a JSON object, got {type(rec).__name__}")
    uid = rec.get("user_id")
    if uid is not None and (not isinstance(uid, (str, int)) or isinstance(uid, bool)):
        raise ValueError(f"user_id: expected a string, got {type(uid).__name__}")
    if "events" not in rec:
        raise ValueError("events: missing")
    events = rec["events"]
    if not isinstance(events, list):
        raise ValueError(f"events: expected a list, got {type(events).__name__}")
    if len(events) == 0:
        raise ValueError("events: empty history (no events)")
    new_dims = {}  # only committed to vector_dims once the whole record is good
    for i, ev in enumerate(events):
        w = f"events[{i}]"
        if not isinstance(ev, dict):
            raise ValueError(f"{w}: expected an object, got {type(ev).__name__}")
        m = ev.get("modality")
        if not isinstance(m, str) or not m.strip():
            raise ValueError(f"{w}.modality: expected a non-empty string, got {m!r}")
        if modalities is not None and m not in modalities:
            raise ValueError(f"{w}.modality: {m!r} is not one of the encoder's modalities {list(modalities)}")
        if "time" in ev and ev["time"] is not None:
            ev["time"] = _parse_time(ev["time"], f"{w}.time")
        has_text, has_vec = ev.get("text") is not None, ev.get("vector") is not None
        if not has_text and not has_vec:
            raise ValueError(f"{w}: has neither 'text' nor 'vector'")
        if has_text and not isinstance(ev["text"], str):
            raise ValueError(f"{w}.text: expected a string, got {type(ev['text']).__name__}")
        if has_vec:
            v = ev["vector"]
            if not isinstance(v, list) or len(v) == 0:
                raise ValueError(f"{w}.vector: expected a non-empty list of numbers")
            for j, x in enumerate(v):
                if not _is_number(x):
                    raise ValueError(f"{w}.vector[{j}]: expected a number, got {type(x).__name__}")
                if not _is_finite(x):
                    raise ValueError(f"{w}.vector[{j}]: not a finite number ({x})")
            want = vector_dims.get(m, new_dims.get(m))
            if want is None:
                new_dims[m] = len(v)
            elif len(v) != want:
                raise ValueError(f"{w}.vector: length {len(v)}, but modality {m!r} has {want}")
    q = rec.get("query")
    if q is not None and not isinstance(q, str):
        raise ValueError(f"query: expected a string, got {type(q).__name__}")
    a = rec.get("answer")
    if a is not None and (not isinstance(a, str) or not a.strip()):
        raise ValueError(f"answer: expected a non-empty string, got {a!r}")
    if "answer" in require and a is None:
        raise ValueError("answer: missing (needed to train)")
    labels = rec.get("labels")
    if labels is not None:
        if not isinstance(labels, dict):
            raise ValueError(f"labels: expected an object, got {type(labels).__name__}")
        for k, y in labels.items():
            if isinstance(y, bool) or y not in (0, 1):
                raise ValueError(f"labels.{k}: expected 0 or 1, got {y!r}")
            labels[k] = int(y)
    if "labels" in require and not labels:
        raise ValueError("labels: missing (needed to probe)")
    vector_dims.update(new_dims)
    return rec

def decode_line(raw, lineno):
    """One line of a JSONL file (bytes) -> str. The file is decoded line by line, not as a whole, so a byte that
    is not UTF-8 is reported at its line (and --skip-bad can skip just that line). A UTF-8 byte-order mark at
    the start of the file is dropped. Raises ValueError('not UTF-8 ...'); the caller prefixes file:line."""
    if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text: byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line "
                         f"({e.reason})") from None

def read_jsonl(path):
    """Yields (line number, parsed JSON value) for every non-blank line of a JSONL file. Any line that is not
    UTF-8 or not JSON raises ValueError('file:line: ...'). For files this project writes itself (metrics.jsonl);
    user records go through iter_records, which also validates them."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                value = parse_line(raw, lineno)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
            if value is not None:
                yield lineno, value

def parse_line(raw, lineno):
    """One JSONL line (bytes) -> its JSON value, or None for a blank line; ValueError when not UTF-8 or not JSON."""
    line = decode_line(raw, lineno)
    if not line.strip():
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None

def iter_records(path, skip_bad=False, report=None, require=(), modalities=None):
    """Streams validated records from a JSONL file, one line at a time. Blank lines are ignored.
    A bad line (not UTF-8, not JSON, or an invalid record) raises ValueError('file:line: field: problem'), or
    with skip_bad=True is counted in `report` (a LoadReport, created if None) whose summary goes to stderr
    at the end. Vector lengths are checked against report.vector_dims, so a report created with an encoder's
    vector_dims checks them against the encoder's; modalities: the only modality names accepted (None: any).
    Records without a user_id get '<file>:<line>'."""
    report = LoadReport(path=str(path)) if report is None else report
    report.path = str(path)
    name = str(path)
    with open(path, "rb") as f:  # bytes: decoded line by line (decode_line)
        for lineno, raw in enumerate(f, start=1):
            try:
                rec = parse_line(raw, lineno)
                if rec is None:
                    continue
                validate_record(rec, report.vector_dims, require, modalities)
            except ValueError as e:
                msg = f"{name}:{lineno}: {e}"
                if not skip_bad:
                    raise ValueError(msg) from None
                report.n_bad += 1
                if len(report.reasons) < MAX_REASONS:
                    report.reasons.append(msg)
                continue
            rec["user_id"] = str(rec["user_id"]) if rec.get("user_id") is not None else f"{os.path.basename(name)}:{lineno}"
            for ev in rec["events"]:
                report.modality_counts[ev["modality"]] = report.modality_counts.get(ev["modality"], 0) + 1
            report.n_ok += 1
            yield rec
    if report.n_bad:
        print(f"warning: {report}", file=sys.stderr)

def load_records(path, skip_bad=False, require=(), vector_dims=None, modalities=None):
    """All records of a file (one streaming pass) and the LoadReport. require: ('answer',) to
    train, ('labels',) to probe. vector_dims, modalities: those of a trained encoder, to check the
    records against it (a mismatch names file:line); None: the file sets them."""
    report = LoadReport(path=str(path), vector_dims=dict(vector_dims or {}))
    records = list(iter_records(path, skip_bad=skip_bad, report=report, require=tuple(require),
                                modalities=modalities))
    if not records:
        raise ValueError(f"{path}: no usable records" + (f"\n{report}" if report.n_bad else ""))
    return records, report

# -----------------------------------------------------------------------------
# Tokenizer

def _config_token(config, key):
    """tokenizer_config.json names tokens as a string or as {"content": ...}."""
    t = config.get(key)
    return t.get("content") if isinstance(t, dict) else t

# -----------------------------------------------------------------------------
# Template (App. A.1, Eq. 10: x_i = u_i ⊕ [q_i] ⊕ <USER>)

def event_piece(text):
    """How one event's text enters the sequence: ' {text};' (';' ends an event)."""
    return " " + text + ";"

class Template:
    """Turns a record into token ids.

    Choices (the paper fixes the tag order, not these details):
    - The sequence opens with `preamble` (e.g. PREAMBLE, the paper's opening sentence; default "": none), after
      <GLOBAL> when there is one; it is never cut.
    - Blocks follow order_modalities(modalities); a block is written only for a modality the record
      has (no empty '<app></app>' pairs), so every tag costs a token only when it carries events.
    - Inside a block, events are ordered oldest first by `time`, so the most recent events sit
      nearest the query. Events without `time` count as newer than every timed event and keep their
      file order among themselves (a file without times is read as already chronological; static
      features such as a tabular profile are the last to be cut).
    - An event is ' {text};' (text tokenized on its own) and/or one <VEC> placeholder for its vector.
    - event_modalities (default none): the paper's event-level form for those modalities. An event's text
      does not enter the sequence as subwords; event_encoder(ids of ' {text};') -> a (event_dim,) vector
      goes through the modality's adapter at one <VEC> position, so the LLM sees one position per event.
      The modality's vector width is event_dim (vectors a record brings for it must have that width and
      share the adapter).
    - The suffix is ' Instruction: {query}' then <USER>; with no query it is ' Instruction:' alone. With global_token=True, <GLOBAL> is the first token (hybrid_gq).
    - Too long: the oldest events are dropped first, across modalities (a block whose events are all
      dropped loses its tags too). The query and <USER> are never cut; n_cut counts the dropped events.
    - Tags, <VEC>, <USER>, <GLOBAL> are added as special tokens when the tokenizer lacks them (new
      ids, possibly >= the checkpoint's vocab; UserEncoder trains their rows). The tokenizer object
      is modified in place; save `template.tokenizer` to keep the ids.
    """

    def __init__(self, tokenizer, modalities, vector_dims=None, max_len=512, global_token=False,
                 max_answer_len=128, eos_token=None, pad_token=None,
                 event_modalities=(), event_encoder=None, event_dim=None, preamble=""):
        config = {}
        if isinstance(tokenizer, (str, os.PathLike)):
            p = str(tokenizer)
            if os.path.isdir(p):
                p = os.path.join(p, "tokenizer.json")
            if not os.path.isfile(p):
                raise FileNotFoundError(f"tokenizer: {p} not found")
            cfg = os.path.join(os.path.dirname(p), "tokenizer_config.json")
            if os.path.isfile(cfg):
                with open(cfg, encoding="utf-8") as f:
                    config = json.load(f)
            tokenizer = Tokenizer.from_file(p)
        # padding/truncation stored in a tokenizer.json would pad or cut each event piece; the
        # template does its own truncation (by events) and collate its own padding
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tokenizer = tokenizer
        self.modalities = order_modalities(modalities)
        if not self.modalities:
            raise ValueError("Template: no modalities")
        self.vector_dims = dict(vector_dims or {})
        # paper [event inputs]: each event is encoded by a modality encoder, then the modality's adapter, one
        # position per event; default here: subword tokens (event_modalities empty)
        self.event_modalities = list(event_modalities)
        self.event_encoder = event_encoder
        if self.event_modalities:
            unknown = [m for m in self.event_modalities if m not in self.modalities]
            if unknown:
                raise ValueError(f"Template: event_modalities {unknown} are not among the modalities {self.modalities}")
            if event_encoder is None or not event_dim:
                raise ValueError("Template: event_modalities need an event_encoder (ids -> vector) and its event_dim")
            for m in self.event_modalities:
                if self.vector_dims.get(m, event_dim) != event_dim:
                    raise ValueError(f"Template: modality {m!r} in event form reads {event_dim}-wide vectors, but its "
                                     f"records carry {self.vector_dims[m]}-wide ones")
                self.vector_dims[m] = event_dim
        self.max_len, self.global_token, self.max_answer_len = max_len, global_token, max_answer_len

        self.special_tokens = [t for m in self.modalities for t in (f"<{m}>", f"</{m}>")] + [VEC_TOKEN, USER_TOKEN]
        if global_token:
            self.special_tokens.append(GLOBAL_TOKEN)
        missing = [t for t in self.special_tokens if tokenizer.token_to_id(t) is None]
        if missing:
            tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        self.special_token_ids = [tokenizer.token_to_id(t) for t in self.special_tokens]
        self._special_set = set(self.special_token_ids)
        self.open_id = {m: tokenizer.token_to_id(f"<{m}>") for m in self.modalities}
        self.close_id = {m: tokenizer.token_to_id(f"</{m}>") for m in self.modalities}
        self.vec_id, self.user_id = tokenizer.token_to_id(VEC_TOKEN), tokenizer.token_to_id(USER_TOKEN)
        self.global_id = tokenizer.token_to_id(GLOBAL_TOKEN) if global_token else None

        eos = eos_token or _config_token(config, "eos_token")
        eos = eos if eos and tokenizer.token_to_id(eos) is not None else next(
            (t for t in EOS_CANDIDATES if tokenizer.token_to_id(t) is not None), None)
        if eos is None:
            raise ValueError(f"tokenizer: no end-of-sequence token found (tried {', '.join(EOS_CANDIDATES)}); "
                             "pass eos_token=")
        pad = pad_token or _config_token(config, "pad_token")
        pad = pad if pad and tokenizer.token_to_id(pad) is not None else next(
            (t for t in PAD_CANDIDATES if tokenizer.token_to_id(t) is not None), eos)
        self.eos_token, self.pad_token = eos, pad
        self.eos_id, self.pad_id = tokenizer.token_to_id(eos), tokenizer.token_to_id(pad)
        self.preamble = preamble
        self.preamble_ids = self._encode_texts([preamble], "preamble")[0] if preamble else []

    def _encode_texts(self, texts, who):
        encs = self.tokenizer.encode_batch(texts, add_special_tokens=False) if texts else []
        out = []
        for t, e in zip(texts, encs):
            bad = self._special_set.intersection(e.ids)
            if bad:  # a literal '<USER>' inside a text would fake the anchor token
                raise ValueError(f"{who}: text {t.strip()!r} contains the reserved token "
                                 f"{self.tokenizer.id_to_token(min(bad))!r}")
            out.append(e.ids)
        return out

    def encode_user(self, record):
        """-> dict(input_ids, user_index, history (start, end), vector_pos {m: [col, ...]}, vectors {m: [[...], ...]},
        n_cut). history: the user-history segment, from the first modality tag to the last closing tag, as the
        half-open [start, end) (start = end when every event was cut); the hybrids relax causality there only."""
        who = f"user {record.get('user_id')}"
        events = record["events"]
        # recency key: timed events by time, then untimed events (newer) in file order
        keys = [(0, ev["time"], i) if ev.get("time") is not None else (1, 0.0, i) for i, ev in enumerate(events)]
        texts, text_of = [], {}
        for i, ev in enumerate(events):
            m = ev["modality"]
            if m not in self.open_id:
                raise ValueError(f"{who}: events[{i}].modality {m!r} is not among the template's {self.modalities}")
            if ev.get("vector") is not None:
                want = self.vector_dims.get(m)
                if want is None:
                    raise ValueError(f"{who}: events[{i}].vector: modality {m!r} has no vector_dims entry")
                if len(ev["vector"]) != want:
                    raise ValueError(f"{who}: events[{i}].vector: length {len(ev['vector'])}, but modality {m!r} has {want}")
            if ev.get("text") is not None:
                text_of[i] = len(texts)
                texts.append(event_piece(ev["text"]))
        ids_of = self._encode_texts(texts, who)
        as_event = {i for i in text_of if events[i]["modality"] in self.event_modalities}  # one position each
        cost = [1 if i in as_event else len(ids_of[text_of[i]]) if i in text_of else 0 for i in range(len(events))]
        cost = [c + (ev.get("vector") is not None) for c, ev in zip(cost, events)]

        q = record.get("query")
        suffix = self._encode_texts([" Instruction:" + (" " + q if q else "")], who)[0] + [self.user_id]
        fixed = len(suffix) + int(bool(self.global_token)) + len(self.preamble_ids)
        if fixed > self.max_len:
            raise ValueError(f"{who}: query: {fixed} tokens with <USER> and the preamble, more than max_len={self.max_len}")

        # newest first, within the budget (tags counted per kept block)
        order = sorted(range(len(events)), key=lambda i: keys[i], reverse=True)
        kept, blocks, total = [], set(), fixed
        for i in order:
            m = events[i]["modality"]
            add = cost[i] + (2 if m not in blocks else 0)
            if total + add > self.max_len:
                break  # keep the most recent events only: nothing older than a cut event survives
            kept.append(i)
            blocks.add(m)
            total += add
        n_cut = len(events) - len(kept)

        ids = ([self.global_id] if self.global_token else []) + self.preamble_ids
        start = len(ids)  # the history segment opens with the first modality tag
        vector_pos, vectors = {}, {}
        for m in self.modalities:
            mine = sorted((i for i in kept if events[i]["modality"] == m), key=lambda i: keys[i])
            if not mine:
                continue
            ids.append(self.open_id[m])
            for i in mine:
                if i in as_event:  # the event's text as one vector: frozen encoder here, the adapter in the model
                    vector_pos.setdefault(m, []).append(len(ids))
                    vectors.setdefault(m, []).append(self.event_encoder(ids_of[text_of[i]]))
                    ids.append(self.vec_id)
                elif i in text_of:
                    ids.extend(ids_of[text_of[i]])
                if events[i].get("vector") is not None:
                    vector_pos.setdefault(m, []).append(len(ids))
                    vectors.setdefault(m, []).append(events[i]["vector"])
                    ids.append(self.vec_id)
            ids.append(self.close_id[m])
        history = (start, len(ids))  # [start, end): the blocks; the instruction, query and <USER> follow
        ids.extend(suffix)
        assert len(ids) == total, (len(ids), total)
        return dict(input_ids=ids, user_index=len(ids) - 1, history=history, vector_pos=vector_pos, vectors=vectors,
                    n_cut=n_cut)

    def encode_answer(self, record):
        """Answer text + EOS (pooled at EOS, App. A.3); long answers keep their beginning."""
        a = record.get("answer")
        if a is None:
            raise ValueError(f"user {record.get('user_id')}: answer: missing (needed to train)")
        ids = self._encode_texts([a], f"user {record.get('user_id')}: answer")[0]
        return ids[: self.max_answer_len - 1] + [self.eos_id]

# -----------------------------------------------------------------------------
# Dataset and batches

class UserDataset(torch.utils.data.Dataset):
    """Encodes every record once (records are small; a DataLoader then only pads). `lengths` holds
    the user-side lengths (probe.embed_records batches by them); `n_cut` the events dropped by truncation."""

    def __init__(self, records, template, with_answer=True):
        self.template = template
        self.examples, self.lengths = [], []
        self.n_cut = 0
        for idx, rec in enumerate(records):
            u = template.encode_user(rec)
            ex = dict(index=idx, user_id=rec["user_id"], input_ids=u["input_ids"], user_index=u["user_index"],
                      history=u["history"], vector_pos=u["vector_pos"],
                      vectors={m: np.asarray(v, dtype=np.float32) for m, v in u["vectors"].items()},
                      answer_ids=template.encode_answer(rec) if with_answer else None,
                      labels=rec.get("labels") or {}, pad_id=template.pad_id, vector_dims=template.vector_dims)
            self.n_cut += u["n_cut"]
            self.examples.append(ex)
            self.lengths.append(len(u["input_ids"]))

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]

@dataclass
class Side:
    """One tower's inputs. vectors[m]: (N_m, F_m) float32; vector_pos[m]: (N_m, 2) long (row, col)."""
    input_ids: torch.Tensor       # (B, L) long, right padded
    attention_mask: torch.Tensor  # (B, L) long, 1 = token
    pool_index: torch.Tensor      # (B,) long: <USER> (user side) or EOS (answer side)
    vectors: dict
    vector_pos: dict
    history: torch.Tensor | None = None  # (B, 2) long [start, end) of the user-history segment; None: answer side

    def to(self, device):
        return Side(self.input_ids.to(device), self.attention_mask.to(device), self.pool_index.to(device),
                    {m: v.to(device) for m, v in self.vectors.items()},
                    {m: p.to(device) for m, p in self.vector_pos.items()},
                    None if self.history is None else self.history.to(device))

@dataclass
class Batch:
    user: Side
    answer: Side | None
    user_ids: list
    labels: list
    index: torch.Tensor  # (B,) long, dataset indices

    def to(self, device):
        return Batch(self.user.to(device), self.answer.to(device) if self.answer is not None else None,
                     self.user_ids, self.labels, self.index.to(device))

def pad(seqs, pad_id):
    """Right-pad token lists: -> ids (B, L) long, attention_mask (B, L) long, L = the longest."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), L), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        att[r, : len(s)] = 1
    return ids, att

def collate(examples):
    """Pads to the longest sequence in the batch (right padding). Every modality of the template's
    vector_dims gets a tensor, empty (0, F) when the batch has none, so each adapter always runs
    (DDP then sees the same parameters used on every rank)."""
    pad_id, dims = examples[0]["pad_id"], examples[0]["vector_dims"]
    ids, att = pad([e["input_ids"] for e in examples], pad_id)
    vectors, vector_pos = {}, {}
    for m, F in dims.items():
        pos = [(r, c) for r, e in enumerate(examples) for c in e["vector_pos"].get(m, [])]
        vecs = [e["vectors"][m] for e in examples if m in e["vectors"]]
        vectors[m] = torch.from_numpy(np.concatenate(vecs)) if vecs else torch.zeros((0, F), dtype=torch.float32)
        vector_pos[m] = torch.tensor(pos, dtype=torch.long).reshape(-1, 2)  # (N_m, 2)
    user = Side(ids, att, torch.tensor([e["user_index"] for e in examples], dtype=torch.long), vectors, vector_pos,
                torch.tensor([e["history"] for e in examples], dtype=torch.long).reshape(-1, 2))  # (B, 2)
    has = [e["answer_ids"] is not None for e in examples]
    if any(has) and not all(has):
        raise ValueError("collate: some examples have an answer and some do not")
    answer = None
    if all(has):
        a_ids, a_att = pad([e["answer_ids"] for e in examples], pad_id)
        answer = Side(a_ids, a_att, a_att.sum(1) - 1, {}, {})  # EOS is the last real token
    return Batch(user, answer, [e["user_id"] for e in examples], [e["labels"] for e in examples],
                 torch.tensor([e["index"] for e in examples], dtype=torch.long))

# -----------------------------------------------------------------------------
# hand-made features of the same records (probe.py's baseline rows)

BAG_WORDS, BAG_MIN_USERS = 128, 5  # more words cost probe time and lose AUC (docs/results.md)


def bag_of_events(records, n_words=BAG_WORDS, min_users=BAG_MIN_USERS):
    """(N, F) TF-IDF bag of each user's event words, a word counted per modality ("metro" in a bill and in a
    search are two columns): tf = 1 + ln(count), idf = ln((1 + N) / (1 + df)) + 1, rows L2-normalised, as
    scikit-learn's TfidfVectorizer(sublinear_tf=True); the n_words words held by the most users (at least
    min_users; ties by name). Unsupervised, like the embedding: no label is read."""
    docs = [Counter((ev["modality"], w) for ev in r["events"] if ev.get("text") is not None
                    for w in re.findall(r"[^\W_]+", ev["text"].lower())) for r in records]
    df = Counter(t for d in docs for t in d)
    terms = sorted((t for t, c in df.items() if c >= min_users), key=lambda t: (-df[t], t))[:n_words]
    col = {t: j for j, t in enumerate(terms)}
    X = np.zeros((len(docs), len(terms)))
    for i, d in enumerate(docs):
        for t, n in d.items():
            if t in col:
                X[i, col[t]] = 1.0 + math.log(n)
    X *= np.array([math.log((1 + len(docs)) / (1 + df[t])) + 1.0 for t in terms])
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-300)  # an all-zero row stays zero


def tabular_vectors(records):
    """(N, F) each user's mean vector per vector modality (sorted by name), zeros where none; None when no
    record carries a vector."""
    mods = sorted({ev["modality"] for r in records for ev in r["events"] if ev.get("vector") is not None})
    blocks = []
    for m in mods:
        vs = [[ev["vector"] for ev in r["events"] if ev["modality"] == m and ev.get("vector") is not None]
              for r in records]
        width = len(next(v for v in vs if v)[0])
        blocks.append(np.array([np.mean(v, axis=0) if v else np.zeros(width) for v in vs]))
    return np.hstack(blocks) if blocks else None

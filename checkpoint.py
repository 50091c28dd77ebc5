"""What a run is and where it lives on disk: the run spec, the encoder it rebuilds, and checkpoints.

A checkpoint folder (RUN_DIR/checkpoint) holds only safetensors and JSON, never pickle:
    trainable.safetensors   everything training changed: LoRA factors, new token rows, adapters, projector,
                            standardisation statistics ("encoder.*"), the strategy's tensors ("strategy.*")
    optimizer.safetensors   AdamW state, one tensor per parameter and slot ("NAME::exp_avg")
    state.json              step, the RunSpec, the run's arguments, the strategy's plain state, every rank's RNG
It is written into a temporary folder and renamed into place; the previous one survives as checkpoint.old until the
new one is whole, so a crash at any moment leaves one complete checkpoint. train.py writes it, probe.py and a
resumed run read it.
"""
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import data
import ggsm
import model

def file_sha256(path):
    """Hex SHA-256 of a file's bytes (names the data a cache or a small decoder was built from)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()

@dataclass
class RunSpec:
    """What rebuilds an encoder. train.py writes it into checkpoint/state.json (to_dict); probe.py and a
    resumed run read it back (from_dict), which names any missing or unexpected field."""
    base_model: str                  # Hugging Face folder (absolute path)
    modalities: list                 # the template's block order
    vector_dims: dict                # modality -> feature width of its `vector` events
    mask: str = "causal"             # a key of ggsm.STRATEGIES
    total_steps: int = 1             # the strategy's T_total and T_warm (optimizer steps)
    warmup_steps: int = 0
    mask_options: dict = field(default_factory=dict)  # further keyword arguments of the strategy class
    dtype: str = "float32"           # the base weights' dtype on load
    lora: dict = None                # {"r", "alpha", "dropout", "targets"}; None: the base stays frozen
    max_len: int = 256               # user-side token budget
    answer_max_len: int = 48         # answer-side token budget
    pooling: str = "token"           # model.UserEncoder pooling
    projector: list = None           # dims after the hidden size, or None
    standardize: bool = False        # model.UserEncoder per-tower standardisation
    event_modalities: list = field(default_factory=list)  # modalities in the event-level form (data.Template)
    preamble: str = ""               # the template's opening sentence (e.g. data.PREAMBLE, App. A.1); "" for none

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d, where="spec"):
        names = [f.name for f in fields(cls)]
        d = {"event_modalities": [], "preamble": "", **d}  # saved before these fields: text form, no preamble
        missing, unexpected = [k for k in names if k not in d], sorted(k for k in d if k not in names)
        if missing or unexpected:
            raise ValueError(f"{where}: missing fields {missing}, unexpected fields {unexpected}")
        if d["mask"] not in ggsm.STRATEGIES:
            raise ValueError(f"{where}: unknown mask strategy {d['mask']!r}, expected one of {list(ggsm.STRATEGIES)}")
        return cls(**d)

def build_encoder(spec, device="cpu"):
    """Decoder (+ LoRA) + UserEncoder + Template + strategy from a RunSpec."""
    decoder = model.Decoder.from_pretrained(spec.base_model, dtype=getattr(torch, spec.dtype), device=device)
    cfg = decoder.config
    strategy_cls = ggsm.STRATEGIES[spec.mask]
    events = {}
    if spec.event_modalities:  # one position per event: the frozen base embeddings pooled, then the adapter
        events = dict(event_modalities=spec.event_modalities, event_encoder=model.frozen_token_mean(decoder),
                      event_dim=cfg.hidden_size)
    template = data.Template(os.path.join(spec.base_model, "tokenizer.json"), spec.modalities, spec.vector_dims,
                             max_len=spec.max_len, global_token=strategy_cls.global_token,
                             max_answer_len=spec.answer_max_len, preamble=spec.preamble, **events)
    if spec.lora:
        lora = spec.lora
        model.add_lora(decoder, targets=tuple(lora["targets"]), r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"])
    else:
        decoder.requires_grad_(False)
    projector = [cfg.hidden_size] + list(spec.projector) if spec.projector else None
    encoder = model.UserEncoder(decoder, template.special_token_ids, template.vector_dims,  # + event-form widths
                                pooling=spec.pooling, projector_dims=projector, standardize=spec.standardize).to(device)
    strategy = strategy_cls(total_steps=spec.total_steps, warmup_steps=spec.warmup_steps, n_layers=cfg.num_hidden_layers,
                            hidden_size=cfg.hidden_size, n_heads=cfg.num_attention_heads,
                            **{"segment": "all", **spec.mask_options})  # saved before the option: every future key
    if strategy.module is not None:
        strategy.module.to(device)
    return encoder, template, strategy

def trainable_tensors(encoder, strategy):
    """Everything a run learned, once each, as (named tensors for safetensors, JSON-able strategy state)."""
    tensors = {"encoder." + k: v.detach().contiguous() for k, v in encoder.trainable_state_dict().items()}
    plain = {}
    for k, v in strategy.state_dict().items():
        if torch.is_tensor(v):
            tensors["strategy." + k] = v.detach().contiguous()
        else:
            plain[k] = v
    return tensors, plain

def load_trainable(encoder, strategy, tensors, plain):
    """Inverse of trainable_tensors. Both loaders are strict: a missing, unexpected or mis-shaped tensor names itself."""
    pick = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    unknown = sorted(k for k in tensors if not k.startswith(("encoder.", "strategy.")))
    if unknown:
        raise ValueError(f"checkpoint tensors do not match the model: unexpected {unknown[:5]}")
    encoder.load_trainable_state_dict(pick("encoder."))
    strategy.load_state_dict({**plain, **pick("strategy.")})

def load_checkpoint(checkpoint_dir, device="cpu"):
    """-> encoder, template, strategy, state (state.json; its "spec" as a RunSpec)."""
    if not os.path.isfile(os.path.join(checkpoint_dir, "state.json")):
        raise FileNotFoundError(f"{checkpoint_dir}: no state.json (expected RUN_DIR/checkpoint)")
    with open(os.path.join(checkpoint_dir, "state.json")) as f:
        state = json.load(f)
    state["spec"] = RunSpec.from_dict(state["spec"], where=os.path.join(checkpoint_dir, "state.json"))
    encoder, template, strategy = build_encoder(state["spec"], device)
    load_trainable(encoder, strategy, load_file(os.path.join(checkpoint_dir, "trainable.safetensors"), device=str(device)),
                   state["strategy"])
    return encoder, template, strategy, state

def oracle_spec(spec):
    """The paper's Oracle row for a run: its base model, untrained, under the causal mask (no LoRA; new token
    rows at their initial values, adapters freshly initialised), in the run's input form (template, lengths,
    event-form modalities) and pooling, so that the difference to the trained row is paired."""
    return RunSpec(spec.base_model, spec.modalities, spec.vector_dims, dtype=spec.dtype, max_len=spec.max_len,
                   answer_max_len=spec.answer_max_len, pooling=spec.pooling, preamble=spec.preamble,
                   event_modalities=list(spec.event_modalities))

def optimizer_tensors(opt, named_params):
    """AdamW state as flat named tensors (no pickle)."""
    out = {}
    for name, p in named_params:
        st = opt.state.get(p)
        if st:
            for k, v in st.items():
                out[f"{name}::{k}"] = torch.as_tensor(v).detach().cpu().clone()
    return out

def load_optimizer_tensors(opt, named_params, tensors):
    for name, p in named_params:
        keys = [k for k in tensors if k.startswith(name + "::")]
        if keys:
            opt.state[p] = {k.split("::", 1)[1]: tensors[k].to(p.device) for k in keys}

def save_checkpoint(run_dir, tensors, optim, meta):
    final = os.path.join(run_dir, "checkpoint")
    tmp, old = final + ".tmp", final + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(tensors, os.path.join(tmp, "trainable.safetensors"))
    save_file(optim, os.path.join(tmp, "optimizer.safetensors"))
    write_json(os.path.join(tmp, "state.json"), meta)
    # swap: the previous checkpoint stays whole under .old until the new one is in place
    if os.path.isdir(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)

def find_checkpoint(run_dir):
    for name in ("checkpoint", "checkpoint.old"):  # .old survives a crash between the two renames
        path = os.path.join(run_dir, name)
        if os.path.isfile(os.path.join(path, "state.json")):
            return path
    return None

def write_json(path, obj):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)

def save_embeddings(path, embeddings, user_ids, metadata=None):
    """Write embeddings (N, E) to a .safetensors file, the user ids (JSON list) in its metadata,
    plus any extra string metadata (mask, checkpoint). Written to a temporary file, then renamed."""
    from safetensors.numpy import save_file
    E = np.ascontiguousarray(embeddings)
    if E.ndim != 2 or len(E) != len(user_ids):
        raise ValueError(f"save_embeddings: embeddings {E.shape} and {len(user_ids)} user_ids do not match")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta["user_ids"] = json.dumps([str(u) for u in user_ids])
    tmp = f"{path}.tmp"
    save_file({"embeddings": E}, tmp, metadata=meta)
    os.replace(tmp, path)

def load_embeddings(path):
    """-> (embeddings (N, E) np.ndarray, user_ids list[str], metadata dict without user_ids)."""
    from safetensors import safe_open
    with safe_open(path, framework="numpy") as f:
        meta = dict(f.metadata() or {})
        if "embeddings" not in f.keys() or "user_ids" not in meta:
            raise ValueError(f"load_embeddings: {path} has no 'embeddings' tensor or no 'user_ids' metadata")
        E = f.get_tensor("embeddings")
    user_ids = json.loads(meta.pop("user_ids"))
    if len(user_ids) != len(E):
        raise ValueError(f"load_embeddings: {path}: {len(E)} embeddings but {len(user_ids)} user ids")
    return E, user_ids, meta

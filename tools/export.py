"""
A trained user encoder (a train.py checkpoint) in the layouts other tools read.

  --export-peft OUT    a standard PEFT LoRA adapter folder: adapter_config.json + adapter_model.safetensors
                       (peft's key names, the base model's path, r, alpha, target modules; the template's token
                       rows as peft's `trainable_token_indices`), for
                       peft.PeftModel.from_pretrained(transformers.AutoModel.from_pretrained(base), OUT)
  --export-merged OUT  a Hugging Face model folder: config.json + model.safetensors (LoRA merged into the base
                       weights, the token rows written into the embedding) + tokenizer.json (with the
                       template's special tokens), which model.Decoder.from_pretrained and
                       transformers.AutoModel.from_pretrained both load

What transformers has no place for is written beside them, in both folders: user_encoder.safetensors (modality
adapters, projector, standardisation statistics, a mask table where the strategy needs one) and
user_encoder.json, which says in a few lines how to go from the decoder's last hidden states to the user
embedding (input template, attention mask, vector placeholders, pooling, projector, standardisation, L2).
tests/test_export.py checks both folders against transformers + peft to 1e-4.

Writing these layouts needs torch and safetensors only: peft and transformers are never imported here.

Command lines:
    python probe.py --checkpoint RUN_DIR/checkpoint --export-peft OUT
    python probe.py --checkpoint RUN_DIR/checkpoint --export-merged OUT
"""

import dataclasses
import json
import os
import shutil

import torch
import torch.nn as nn
from safetensors.torch import save_file

import data
import ggsm
import model
import checkpoint as ckpt

# The HF module the exports are written for: AutoModel on a *ForCausalLM checkpoint gives the bare decoder
# (Qwen2Model, LlamaModel, ...), whose parameter names are ours without the leading "model.".
PEFT_PREFIX = "base_model.model."

# -----------------------------------------------------------------------------
# the attention mask at inference, as a rule a reader can rebuild

NAMED_MASKS = {  # name -> (builder, what it means); every rule also blocks padded keys
    "causal": (ggsm.causal_mask, "query i attends to key j iff j <= i"),
    "bidirectional": (ggsm.bidirectional_mask, "query i attends to every key j"),
    "global_query": (ggsm.global_query_mask, "query i attends to key j iff j <= i or i == 0 (<GLOBAL> is token 0)"),
}


def mask_rule(strategy, max_len):
    """-> (name, table or None): the strategy's user-side inference mask as one of NAMED_MASKS, or else as a
    table `bias` (max_len, max_len) whose top-left (L, L) corner, with padded keys blocked, is the mask of a
    batch padded to L ("table"); for a hybrid restricted to the user-history segment, the table applies to
    future keys only where query and key both lie in the row's segment, the rest is causal
    ("table_in_history"). The rule is checked against the strategy on a right-padded batch of several
    lengths; a mask it cannot express (a per-layer mask computed from hidden states, such as hybrid_mlp's,
    or one mask per head) is an error: transformers takes one (B, 1, L, L) mask for every layer."""
    name = type(strategy).__name__
    in_history = getattr(strategy, "segment", "all") == "history"
    full = torch.ones(1, max_len, dtype=torch.long)
    whole = torch.tensor([[0, max_len]])  # the table: as if every position were history
    m = strategy.inference_mask(full, torch.float32, tower="user", history=whole)
    if callable(m):
        raise ValueError(f"{name}: the inference mask is computed in every layer from that layer's hidden states; "
                         "transformers takes one fixed (B, 1, L, L) mask, so this encoder cannot be exported")
    if m.shape[1] != 1:
        raise ValueError(f"{name}: the inference mask differs between heads ({tuple(m.shape)}); transformers "
                         "takes one (B, 1, L, L) mask")
    kind, table = ("table_in_history" if in_history else "table"), m[0, 0].clone()
    for key, (build, _) in NAMED_MASKS.items():
        if torch.equal(m, build(full, torch.float32)):
            kind, table = key, None
            break
    # the rule must hold on padded batches too: rows of lengths max_len, a third and 1 in one batch, each with
    # a history segment that leaves positions out at both ends where it can
    lengths = torch.tensor([max_len, max(1, max_len // 3), 1])
    am = (torch.arange(max_len)[None, :] < lengths[:, None]).long()
    history = torch.stack([(lengths > 2).long(), (lengths - 1).clamp(min=1)], 1)  # (3, 2) [start, end)
    want = strategy.inference_mask(am, torch.float32, tower="user", history=history)
    got = apply_mask_rule(kind, table, am, history=history)
    if callable(want) or want.shape != got.shape or not torch.allclose(want, got, rtol=0, atol=1e-6):
        raise ValueError(f"{name}: the inference mask of a padded batch is not the unpadded one with padded keys "
                         "blocked; it cannot be written as one table")
    return kind, table


def apply_mask_rule(kind, table, attention_mask, dtype=torch.float32, history=None):
    """The (B, 1, L, L) additive mask of a right-padded batch from mask_rule's output (as user_encoder.json says);
    history: (B, 2) [start, end) of each row's user-history segment (data.Side.history), for "table_in_history"."""
    if kind in NAMED_MASKS:
        return NAMED_MASKS[kind][0](attention_mask, dtype)
    L = attention_mask.shape[1]
    blocked = torch.finfo(dtype).min
    bias = table[:L, :L].to(dtype)[None, None]                          # (1, 1, L, L)
    if kind == "table_in_history":
        seg = ggsm.history_segment(history, L)                          # (B, L) bool
        i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
        opened = (j <= i) | (seg[:, :, None] & seg[:, None, :])         # (B, L, L)
        bias = torch.where(opened[:, None], bias, blocked)              # (B, 1, L, L)
    return torch.where(attention_mask[:, None, None, :].bool(), bias, blocked).clamp(min=blocked)  # (B, 1, L, L)


# -----------------------------------------------------------------------------
# what transformers has no place for: user_encoder.json + user_encoder.safetensors


def head_tensors(encoder, mask_table):
    """Modality adapters, projector and standardisation statistics under the encoder's own names (the BatchNorm
    step counter left out: it does nothing at inference), and the mask table if there is one."""
    out = {k: v.detach().float().contiguous().cpu() for k, v in encoder.trainable_state_dict().items()
           if k.startswith(("adapters.", "projector.", "standardize.")) and not k.endswith("num_batches_tracked")}
    if mask_table is not None:
        out["mask.bias"] = mask_table.float().contiguous()
    return out


def describe(encoder, template, spec, kind, loading):
    """user_encoder.json: how to turn the decoder's last hidden states into the user embedding."""
    D = encoder.decoder.config.hidden_size
    blocked = "blocked (torch.finfo(dtype).min) where key j is padding"
    if kind in NAMED_MASKS:
        mask = f"{kind}: {NAMED_MASKS[kind][1]}; {blocked}"
    else:
        mask = f"table: bias[i, j] = mask.bias[i, j] (user_encoder.safetensors) for a batch padded to L <= " \
               f"{spec.max_len}, taking mask.bias[:L, :L]; {blocked}"
        if kind == "table_in_history":
            mask += ("; and blocked where j > i unless query i and key j both lie in the row's user-history "
                     "segment: from the first block's opening tag to the last block's closing tag, inclusive")
    vectors = {}
    for m, f in template.vector_dims.items():  # the file's vector modalities and those in event form
        hidden = encoder.adapters[m].fc1.out_features
        vectors[m] = {"in_features": f, "placeholder": data.VEC_TOKEN,
                      "event_form": None if m not in template.event_modalities else
                      "one placeholder per event instead of its text's tokens: the ids of ' {text};' (tokenizer.json, "
                      "no special tokens) -> the mean of the base model's input-embedding rows at those ids (frozen) "
                      "is the event's vector; an event that also carries a vector gets a second placeholder after it",
                      "adapter": f"LayerNorm({f}, eps={encoder.adapters[m].norm.eps}) -> Linear({f}, {hidden}) -> GELU "
                                 f"(erf) -> Linear({hidden}, {D}), tensors adapters.{m}.*",
                      "use": "inputs_embeds = input embeddings of the ids; the k-th placeholder of the row in this "
                             "modality's block is replaced by adapter(k-th vector of that block); then "
                             "model(inputs_embeds=..., attention_mask=...)"}
    return {
        "format": "GG-SM user encoder (arXiv 2602.10622), exported by export.py",
        "load": loading,
        "strategy": spec.mask,
        "input": {
            "template": "the token ids of data.Template (this project) with tokenizer.json of this folder: "
                        "blocks <m> events </m> in the modality order below, then ' Instruction: {query}' and <USER>; "
                        "batches right-padded",
            "modalities": template.modalities, "max_len": spec.max_len, "global_token": template.global_token,
            "special_tokens": dict(zip(template.special_tokens, template.special_token_ids)),
        },
        "attention_mask": {"rule": mask, "shape": "(B, 1, L, L), additive (0 = attend), in the model's dtype, passed "
                                                  "as attention_mask", "kind": kind},
        "vectors": vectors,
        "pooling": ("token: the last hidden state (after the final norm) at <USER>, the row's last real token"
                    if spec.pooling == "token" else "mean: of the last hidden states over the real tokens"),
        "projector": None if encoder.projector is None else
        " -> ".join(f"Linear({l.in_features}, {l.out_features}) [projector.{i}.*]" if isinstance(l, nn.Linear)
                    else "GELU (erf)" for i, l in enumerate(encoder.projector)),
        "standardize": None if encoder.standardize is None else
        f"e = (e - standardize.user.running_mean) / sqrt(standardize.user.running_var + {encoder.standardize['user'].eps})",
        "normalize": "e / ||e||_2",
    }


def write_folder(out, files):
    """Write every file of `files` (name -> callable(path)) into out.tmp, then swap it in for `out` (the previous
    folder survives as out.old until the new one is in place): a crash leaves no half-written export."""
    out = os.path.normpath(out)
    # never replace a folder this function did not write (a typo could name the base model's folder)
    if os.path.exists(out) and not (os.path.isdir(out) and (not os.listdir(out) or
                                                            os.path.isfile(os.path.join(out, "user_encoder.json")))):
        raise ValueError(f"{out} exists and is not an earlier export (no user_encoder.json); choose a new folder")
    tmp, old = out + ".tmp", out + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, write in files.items():
        write(os.path.join(tmp, name))
    if os.path.isdir(out):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def json_writer(obj):
    def write(path):
        with open(path, "w") as f:
            json.dump(obj, f, indent=2)
    return write


def copy_writer(src):
    return lambda path: shutil.copyfile(src, path)


def base_extras(spec):
    """Tokenizer and generation settings of the base folder, copied unchanged where present."""
    names = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
    return {n: copy_writer(os.path.join(spec.base_model, n)) for n in names
            if os.path.isfile(os.path.join(spec.base_model, n))}


# -----------------------------------------------------------------------------
# the two exports


def export_peft(checkpoint_dir, out):
    """A PEFT LoRA adapter folder for transformers.AutoModel.from_pretrained(spec.base_model); returns its
    user_encoder.json dict. The template's token rows become peft's trainable_token_indices (peft stores the
    rows themselves, not differences). Ids beyond the base vocabulary need the base's embedding resized first
    (user_encoder.json: "resize_token_embeddings")."""
    encoder, template, strategy, state = ckpt.load_checkpoint(checkpoint_dir, "cpu")
    spec = state["spec"]
    if not spec.lora:
        raise ValueError(f"{checkpoint_dir}: this run trained no LoRA (spec.lora is empty); use --export-merged")
    kind, table = mask_rule(strategy, spec.max_len)
    V = encoder.decoder.config.vocab_size
    ids = [int(i) for i in encoder.special_ids.tolist()]
    tensors = {}
    for k, v in model.lora_state_dict(encoder.decoder).items():  # model.layers.0.self_attn.q_proj.lora_A
        tensors[PEFT_PREFIX + k.removeprefix("model.") + ".weight"] = v.detach().float().contiguous().cpu()
    if ids:  # peft's layout: the rows that replace those of the listed ids, in the listed order
        tensors[PEFT_PREFIX + "embed_tokens.token_adapter.trainable_tokens_delta"] = \
            encoder.special_embeds.detach().to(encoder.decoder.model.embed_tokens.weight.dtype).contiguous().cpu()
    lora = spec.lora
    config = {  # the fields of peft.LoraConfig that say what the tensors are; peft fills the rest with its defaults
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": spec.base_model,
        "r": lora["r"], "lora_alpha": lora["alpha"], "lora_dropout": lora["dropout"],
        "target_modules": sorted(lora["targets"]), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
        "trainable_token_indices": {"embed_tokens": ids} if ids else None,
    }
    resize = max(ids) + 1 if ids and max(ids) >= V else None
    loading = {"how": "peft.PeftModel.from_pretrained(transformers.AutoModel.from_pretrained(base_model), this "
                      "folder)" + ("" if resize is None else ", after base.resize_token_embeddings(resize_token_embeddings)"),
               "base_model": spec.base_model, "resize_token_embeddings": resize}
    desc = describe(encoder, template, spec, kind, loading)
    files = {"adapter_config.json": json_writer(config),
             "adapter_model.safetensors": lambda p: save_file(tensors, p, metadata={"format": "pt"}),
             "tokenizer.json": lambda p: template.tokenizer.save(p),
             "user_encoder.safetensors": lambda p: save_file(head_tensors(encoder, table), p, metadata={"format": "pt"}),
             "user_encoder.json": json_writer(desc)}
    write_folder(out, files)
    return desc


def export_merged(checkpoint_dir, out):
    """A Hugging Face folder: LoRA merged into the base weights, the template's token rows written into the
    embedding (grown to the largest id + 1 where they lie beyond it; an untied lm_head gets zero rows there),
    tokenizer.json with the template's tokens. Returns its user_encoder.json dict."""
    encoder, template, strategy, state = ckpt.load_checkpoint(checkpoint_dir, "cpu")
    spec = state["spec"]
    kind, table = mask_rule(strategy, spec.max_len)
    dec = encoder.decoder
    model.merge_lora(dec)  # W + (alpha / r) B A
    cfg = dec.config
    W = dec.model.embed_tokens.weight.detach()
    ids = encoder.special_ids.cpu()
    V = max([cfg.vocab_size] + [int(i) + 1 for i in ids])
    with torch.no_grad():
        emb = torch.cat([W, W.new_zeros(V - cfg.vocab_size, W.shape[1])])  # (V, D)
        emb[ids] = encoder.special_embeds.detach().to(W.dtype)
        dec.config = dataclasses.replace(cfg, vocab_size=V)
        dec.model.embed_tokens = nn.Embedding.from_pretrained(emb, freeze=True)
        if cfg.tie_word_embeddings:
            dec.tie_weights()
        else:
            head = dec.lm_head.weight.detach()
            dec.lm_head = nn.Linear(W.shape[1], V, bias=False, dtype=head.dtype)
            dec.lm_head.weight.copy_(torch.cat([head, head.new_zeros(V - cfg.vocab_size, head.shape[1])]))
    loading = {"how": "model.Decoder.from_pretrained(this folder) or transformers.AutoModel.from_pretrained(this "
                      "folder); the template's token rows are in the embedding", "base_model": spec.base_model,
               "resize_token_embeddings": None}
    desc = describe(encoder, template, spec, kind, loading)
    files = {"config.json": lambda p: dec.save_pretrained(os.path.dirname(p)),  # config.json + model.safetensors
             **base_extras(spec),
             "tokenizer.json": lambda p: template.tokenizer.save(p),
             "user_encoder.safetensors": lambda p: save_file(head_tensors(encoder, table), p, metadata={"format": "pt"}),
             "user_encoder.json": json_writer(desc)}
    write_folder(out, files)
    return desc

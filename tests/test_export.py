"""Using a trained encoder outside this project: probe.encode (the numbers of probe.py --export) and tools/export.py's
two folders, checked against the reference stacks: a PEFT adapter loaded by peft.PeftModel.from_pretrained on
transformers.AutoModel gives our hidden states and, through user_encoder.json's recipe (rebuilt here by hand),
our embeddings; a merged folder loads in transformers and in model.Decoder with the same outputs (1e-4).

Two trained checkpoints (3 steps at a high learning rate, so LoRA B, the token rows, the adapters and the
standardisation statistics all differ from their initial values):
  - "tiny": the small decoder train.py builds (tools/tiny_decoder.py; tied embeddings; the template's tokens have rows in it),
    GG-SM (inference: bidirectional), <USER> pooling, standardisation;
  - "grown": a random Qwen2 written by transformers with an untied head and a tokenizer without the template's
    tokens (their ids lie beyond the vocabulary), hybrid_mask (inference: the frozen soft mask, a table),
    mean pooling and a projector.

    python -m pytest -q tests/test_export.py
"""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer

import checkpoint
import data
import ggsm
import model
import probe
import train
from tools import export, synthetic, tiny_decoder

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOL = 1e-4
COMMON = ["--no-probe", "--steps", "3", "--batch-size", "8", "--micro-batch", "8", "--max-len", "96",
          "--answer-max-len", "24", "--lr", "5e-2", "--lora-r", "4", "--lora-alpha", "8", "--log-every", "1",
          "--event-modalities", ""]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    train_path, probe_path = synthetic.write_synthetic(str(root / "data"), 24, 40, seed=5)
    records, report = data.load_records(train_path, require=("answer",))
    # "tiny": train.py's own small decoder
    tiny_args = train.get_args(["--data", train_path, "--tiny-hidden", "32", "--tiny-layers", "2", "--tiny-heads", "4",
                                "--tiny-kv-heads", "2", "--tiny-vocab", "400", "--tiny-steps", "2", "--max-len", "96"])
    tiny = tiny_decoder.build(tiny_args, records, report, str(root / "tiny"), torch.device("cpu"), lambda m: None)
    # "grown": transformers writes the checkpoint; its tokenizer lacks the template's tokens
    tok = tiny_decoder.train_tokenizer(tiny_decoder.record_texts(records), vocab_size=300)
    grown = str(root / "grown")
    cfg = transformers.Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   tie_word_embeddings=False, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(grown, safe_serialization=True)
    tok.save(os.path.join(grown, "tokenizer.json"))
    out = {}
    for name, base, extra in (("tiny", tiny, ["--mask", "ggsm"]),
                              ("grown", grown, ["--mask", "hybrid_mask", "--mask-warmup", "0.34", "--pooling", "mean",
                                                "--projector", "16", "--event-modalities", "bill,search"])):
        run_dir = str(root / f"run-{name}")
        train.main(["--model", base, "--data", train_path, "--out", run_dir] + COMMON + extra)
        out[name] = os.path.join(run_dir, "checkpoint")
    train.main(["--model", tiny, "--data", train_path, "--out", str(root / "run-mlp"), "--mask", "hybrid_mlp"] + COMMON)
    out["mlp"] = str(root / "run-mlp" / "checkpoint")
    out["probe"], out["root"] = probe_path, root
    return out


def raw_records(path, n=None):
    """The file's records as a user would hold them, without answers, labels or ids."""
    with open(path) as f:
        recs = [json.loads(line) for line in f][:n]
    return [{k: v for k, v in r.items() if k not in ("answer", "labels", "user_id")} for r in recs]


# -----------------------------------------------------------------------------
# probe.encode


@pytest.mark.parametrize("which", ["tiny", "grown"])
def test_encode_gives_the_numbers_of_probe_export(runs, which, tmp_path):
    ckpt = runs[which]
    emb_path = str(tmp_path / "emb.safetensors")
    probe.main(["--checkpoint", ckpt, "--data", runs["probe"], "--export", emb_path, "--device", "cpu"])
    exported, ids, _ = probe.load_embeddings(emb_path)
    E = probe.encode(ckpt, runs["probe"], device="cpu")
    assert E.dtype == np.float32 and E.shape == exported.shape
    assert np.array_equal(E, exported), f"encode vs probe.py --export: max |diff| {np.abs(E - exported).max():.2e}"
    # records in memory without answer, labels or user_id, and another batch size: the same users, the same rows
    recs = raw_records(runs["probe"])
    before = json.dumps(recs)
    E2 = probe.encode(ckpt, recs, batch_size=5, device="cpu")
    assert json.dumps(recs) == before, "encode must not change the caller's records"
    assert np.abs(E2 - exported).max() <= 1e-5
    assert np.allclose(np.linalg.norm(E2, axis=1), 1.0, atol=1e-5)
    assert np.abs(E2[0] - E2[1]).max() > 1e-3  # different users, different vectors


def test_encode_errors_name_the_place(runs, tmp_path):
    ckpt = runs["tiny"]
    recs = raw_records(runs["probe"], 3)
    with pytest.raises(ValueError, match=r"records\[1\]: events\[0\]\.modality: 'chat' is not one of the encoder's"):
        probe.encode(ckpt, [recs[0], {"events": [{"modality": "chat", "text": "hi"}]}], device="cpu")
    bad_vec = json.loads(json.dumps(recs[2]))
    next(e for e in bad_vec["events"] if "vector" in e)["vector"] = [1.0, 2.0]
    with pytest.raises(ValueError, match=r"records\[0\]: events\[\d+\]\.vector: length 2, but modality 'tabular' has 8"):
        probe.encode(ckpt, [bad_vec], device="cpu")
    path = tmp_path / "users.jsonl"
    lines = [json.dumps(r).encode() for r in recs]
    path.write_bytes(lines[0] + b"\n" + lines[1][:20] + b"\xff" + lines[1][20:] + b"\n" + lines[2] + b"\n")
    with pytest.raises(ValueError, match=f"{path}:2: not UTF-8 text: byte 0xff"):
        probe.encode(ckpt, str(path), device="cpu")
    E = probe.encode(ckpt, str(path), device="cpu", skip_bad=True)
    np.testing.assert_allclose(E, probe.encode(ckpt, [recs[0], recs[2]], device="cpu"), rtol=0, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="no state.json"):
        probe.encode(str(tmp_path), recs)


# -----------------------------------------------------------------------------
# the recipe of user_encoder.json, written here from its words (not with export.py's helpers)


def mask_from_description(desc, head, am, history=None):
    """(B, 1, L, L) additive mask from user_encoder.json's rule; history: (B, 2) [start, end) of each row's
    user-history segment (for "table_in_history")."""
    kind, L = desc["attention_mask"]["kind"], am.shape[1]
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    real_key = am[:, None, None, :].bool()
    if kind in ("table", "table_in_history"):
        bias = head["mask.bias"][:L, :L][None, None].expand(len(am), 1, L, L)
        if kind == "table_in_history":  # a naive loop over the rows' segments
            bias = bias.clone()
            for b, (start, end) in enumerate(history.tolist()):
                for q in range(L):
                    for k in range(q + 1, L):
                        if not (start <= q < end and start <= k < end):
                            bias[b, 0, q, k] = torch.finfo(torch.float32).min
        return torch.where(real_key, bias, torch.finfo(torch.float32).min)
    allowed = {"causal": j <= i, "bidirectional": torch.ones(L, L, dtype=torch.bool),
               "global_query": (j <= i) | (i == 0)}[kind]
    return torch.where(allowed[None, None] & real_key, 0.0, torch.finfo(torch.float32).min)


def splice_vectors(desc, head, x, side):
    """Replace each <VEC> placeholder's input embedding by the modality adapter's output."""
    x = x.clone()
    for m, spec in desc["vectors"].items():
        assert f"LayerNorm({spec['in_features']}, eps=1e-06)" in spec["adapter"] and "GELU (erf)" in spec["adapter"]
        a = {k.split(".", 2)[2]: v for k, v in head.items() if k.startswith(f"adapters.{m}.")}
        v = F.layer_norm(side.vectors[m], (spec["in_features"],), a["norm.weight"], a["norm.bias"], eps=1e-6)
        v = F.linear(F.gelu(F.linear(v, a["fc1.weight"], a["fc1.bias"])), a["fc2.weight"], a["fc2.bias"])
        pos = side.vector_pos[m]
        x[pos[:, 0], pos[:, 1]] = v.to(x.dtype)
    return x


def embedding_from_description(desc, head, hidden, side):
    """Pooling, projector, standardisation, L2, as user_encoder.json says."""
    if desc["pooling"].startswith("token"):
        e = hidden[torch.arange(len(hidden)), side.attention_mask.sum(1) - 1]  # <USER>: the last real token
    else:
        w = side.attention_mask[..., None].float()
        e = (hidden * w).sum(1) / w.sum(1)
    if desc["projector"]:
        n = sum(1 for k in head if k.startswith("projector.") and k.endswith(".weight"))
        for k in range(n):
            e = F.linear(e, head[f"projector.{2 * k}.weight"], head[f"projector.{2 * k}.bias"])
            e = F.gelu(e) if k < n - 1 else e
    if desc["standardize"]:
        assert "+ 1e-05)" in desc["standardize"]
        e = (e - head["standardize.user.running_mean"]) / torch.sqrt(head["standardize.user.running_var"] + 1e-5)
    return F.normalize(e, dim=-1)


def our_side(ckpt, records):
    """Our encoder's final hidden states and embeddings, and the batch, for the first records of the file."""
    encoder, template, strategy, _ = checkpoint.load_checkpoint(ckpt)
    encoder.eval()
    ds = data.UserDataset(records, template, with_answer=False)
    side = data.collate([ds[i] for i in range(len(ds))]).user
    mask = strategy.inference_mask(side.attention_mask, torch.float32, history=side.history)
    with torch.no_grad():
        hidden = encoder.decoder(inputs_embeds=encoder.embed(side.input_ids, side.vectors, side.vector_pos), mask=mask)
        emb = encoder(side.input_ids, side.attention_mask, side.pool_index, mask=mask, vectors=side.vectors,
                      vector_pos=side.vector_pos)
    return hidden, emb, side, template, mask


def on_tokens(a, b, am):
    keep = am.bool()
    return (a[keep] - b[keep]).abs().max().item()


# -----------------------------------------------------------------------------
# the PEFT adapter folder


@pytest.mark.parametrize("which", ["tiny", "grown"])
def test_peft_adapter_gives_our_hidden_states(runs, which, tmp_path):
    ckpt, out = runs[which], str(tmp_path / "adapter")
    probe.main(["--checkpoint", ckpt, "--export-peft", out])
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no temporary folder left behind
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "user_encoder.json",
            "user_encoder.safetensors"} == set(os.listdir(out))
    with open(os.path.join(out, "adapter_config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(out, "user_encoder.json")) as f:
        desc = json.load(f)
    with open(os.path.join(ckpt, "state.json")) as f:
        state = json.load(f)
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    # grown runs bill and search in the event form: described, with the width of the hidden state
    assert {m for m, v in desc["vectors"].items() if v["event_form"]} == ({"bill", "search"} if which == "grown" else set())
    assert cfg["base_model_name_or_path"] == state["spec"]["base_model"]
    assert set(cfg["target_modules"]) == set(state["spec"]["lora"]["targets"])
    records = [r for r in data.load_records(runs["probe"])[0][:6]]
    ours_h, ours_e, side, template, _ = our_side(ckpt, records)
    # the folder's tokenizer gives the template's token ids
    tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    assert {t: tok.token_to_id(t) for t in desc["input"]["special_tokens"]} == desc["input"]["special_tokens"]
    assert list(desc["input"]["special_tokens"].values()) == template.special_token_ids

    base = transformers.AutoModel.from_pretrained(cfg["base_model_name_or_path"], dtype=torch.float32)
    V = base.config.vocab_size
    grows = max(template.special_token_ids) >= V
    assert grows == (which == "grown") and desc["load"]["resize_token_embeddings"] == (max(template.special_token_ids) + 1 if grows else None)
    if grows:
        base.resize_token_embeddings(desc["load"]["resize_token_embeddings"])
    pm = peft.PeftModel.from_pretrained(base, out).eval()
    head = load_file(os.path.join(out, "user_encoder.safetensors"))
    am = side.attention_mask
    mask = mask_from_description(desc, head, am, side.history)
    with torch.no_grad():
        x = splice_vectors(desc, head, pm.get_input_embeddings()(side.input_ids), side)
        theirs = pm(inputs_embeds=x, attention_mask=mask).last_hidden_state
        with pm.disable_adapter():  # the adapter must matter, or this test could not fail
            plain = pm(inputs_embeds=x, attention_mask=mask).last_hidden_state
    d = on_tokens(ours_h, theirs, am)
    assert d <= TOL, f"{which}: hidden states, ours vs transformers + peft: max |diff| {d:.2e}"
    assert on_tokens(ours_h, plain, am) > 1e-2, "LoRA changed nothing"
    emb = embedding_from_description(desc, head, theirs, side)
    d = (emb - ours_e).abs().max().item()
    assert d <= TOL, f"{which}: embeddings from user_encoder.json's recipe vs ours: max |diff| {d:.2e}"
    np.testing.assert_allclose(emb.numpy(), probe.encode(ckpt, records, device="cpu"), rtol=0, atol=TOL)


def test_mask_rules_of_every_strategy():
    """Every strategy's inference mask is a named rule or a table that reproduces it on padded batches, except
    hybrid_mlp's per-layer mask, which is refused with the reason."""
    am = torch.tensor([[1] * 12, [1] * 7 + [0] * 5, [1] + [0] * 11])
    for name, cls in ggsm.STRATEGIES.items():
        s = cls(total_steps=4, warmup_steps=2, n_layers=2, hidden_size=8, n_heads=2)
        if s.wants_gradients(0):  # non-uniform importance, frozen at the end of warm-up
            for step in range(2):
                s.accumulate(torch.randn(2, 20, 8, generator=torch.Generator().manual_seed(step)),
                             torch.ones(2, 20, dtype=torch.long))
                s.end_step(step)
        if name == "hybrid_mlp":
            with pytest.raises(ValueError, match="computed in every layer"):
                export.mask_rule(s, 12)
            continue
        kind, table = export.mask_rule(s, 12)
        expect = {"causal": "causal", "hybrid_gq": "global_query", "hybrid_mask": "table_in_history"}.get(name, "bidirectional")
        assert kind == expect, (name, kind)
        head = {} if table is None else {"mask.bias": table}
        history = torch.tensor([[2, 10], [1, 5], [0, 1]])
        got = mask_from_description({"attention_mask": {"kind": kind}}, head, am, history)
        want = s.inference_mask(am, torch.float32, history=history)
        assert torch.allclose(got, want, rtol=0, atol=1e-6), name


# -----------------------------------------------------------------------------
# the merged folder


@pytest.mark.parametrize("which", ["tiny", "grown"])
def test_merged_folder_loads_alike_in_transformers_and_here(runs, which, tmp_path):
    ckpt, out = runs[which], str(tmp_path / "merged")
    probe.main(["--checkpoint", ckpt, "--export-merged", out])
    assert {"config.json", "model.safetensors", "tokenizer.json", "user_encoder.json",
            "user_encoder.safetensors"} <= set(os.listdir(out))
    ours = model.Decoder.from_pretrained(out)
    hf = transformers.AutoModel.from_pretrained(out, dtype=torch.float32).eval()
    records = data.load_records(runs["probe"])[0][:6]
    enc_h, enc_e, side, template, _ = our_side(ckpt, records)
    with open(os.path.join(ckpt, "state.json")) as f:
        base_model = json.load(f)["spec"]["base_model"]
    V, V_base = ours.config.vocab_size, model.ModelConfig.from_hf_config(base_model).vocab_size
    assert V == max([V_base] + [i + 1 for i in template.special_token_ids])  # grown only where the ids need it
    assert (V > V_base) == (which == "grown")
    if which == "grown":  # an untied head: the new ids' output rows are zero, the others the base's
        assert not ours.config.tie_word_embeddings and ours.lm_head.weight[V_base:].abs().max() == 0
        base_head = load_file(os.path.join(base_model, "model.safetensors"))["lm_head.weight"]
        assert torch.equal(ours.lm_head.weight[:V_base], base_head)
    # the folder's own tokenizer and template give the same ids without adding a token
    t2 = data.Template(out, template.modalities, template.vector_dims, max_len=template.max_len,
                       global_token=template.global_token)
    assert t2.special_token_ids == template.special_token_ids
    assert t2.tokenizer.get_vocab_size() == template.tokenizer.get_vocab_size()
    # transformers and model.Decoder on the folder: random ids over the whole vocabulary, padded, three masks
    g = torch.Generator().manual_seed(0)
    am = torch.tensor([[1] * 10, [1] * 6 + [0] * 4])
    ids = torch.randint(0, V, (2, 10), generator=g) * am
    ids[0, :3] = torch.tensor(template.special_token_ids[:3])
    with torch.no_grad():
        for mask in (ggsm.causal_mask(am), ggsm.bidirectional_mask(am), ggsm.global_query_mask(am)):
            a = ours(input_ids=ids, mask=mask)
            b = hf(input_ids=ids, attention_mask=mask).last_hidden_state
            d = on_tokens(a, b, am)
            assert d <= TOL, f"{which}: merged folder, model.Decoder vs transformers: max |diff| {d:.2e}"
    # and the merged decoder is the trained encoder's (LoRA merged, token rows in the embedding)
    head = load_file(os.path.join(out, "user_encoder.safetensors"))
    with open(os.path.join(out, "user_encoder.json")) as f:
        desc = json.load(f)
    with torch.no_grad():
        x = splice_vectors(desc, head, hf.get_input_embeddings()(side.input_ids), side)
        merged_h = hf(inputs_embeds=x, attention_mask=mask_from_description(desc, head, side.attention_mask,
                                                                          side.history)).last_hidden_state
    d = on_tokens(merged_h, enc_h, side.attention_mask)
    assert d <= TOL, f"{which}: merged folder vs the trained encoder: max |diff| {d:.2e}"
    d = (embedding_from_description(desc, head, merged_h, side) - enc_e).abs().max().item()
    assert d <= TOL, f"{which}: embeddings from the merged folder vs ours: max |diff| {d:.2e}"


def test_export_errors(runs, tmp_path):
    with pytest.raises(SystemExit, match="need --checkpoint"):
        probe.main(["--model", str(runs["root"] / "tiny"), "--export-peft", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="no state.json"):
        probe.main(["--checkpoint", str(tmp_path), "--export-merged", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="--data is required"):
        probe.main(["--checkpoint", runs["tiny"]])
    # a folder that is not an earlier export is never replaced (here: the base model's own folder)
    base = str(runs["root"] / "tiny")
    before = sorted(os.listdir(base))
    with pytest.raises(SystemExit, match="exists and is not an earlier export"):
        probe.main(["--checkpoint", runs["tiny"], "--export-merged", base])
    assert sorted(os.listdir(base)) == before
    # an earlier export is replaced whole
    out = str(tmp_path / "adapter")
    probe.main(["--checkpoint", runs["tiny"], "--export-peft", out])
    open(os.path.join(out, "stale.txt"), "w").close()
    probe.main(["--checkpoint", runs["tiny"], "--export-peft", out])
    assert "stale.txt" not in os.listdir(out) and sorted(os.listdir(tmp_path)) == ["adapter"]
    with pytest.raises(SystemExit, match="computed in every layer"):  # hybrid_mlp: refused with the reason
        probe.main(["--checkpoint", runs["mlp"], "--export-peft", str(tmp_path / "mlp")])

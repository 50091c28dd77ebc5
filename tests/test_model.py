"""
Tests for model.py. The reference is Hugging Face transformers: tiny random Qwen2 / Qwen3 / Llama (llama3
rope scaling) / Mistral models are written with save_pretrained (safetensors; one sharded, one with tied
embeddings), loaded through our own Decoder.from_pretrained, and compared in fp32 on CPU, under the causal
mask and under custom 4D bidirectional / soft masks fed to both (HF eager uses a 4D float mask as given).

    python -m pytest -q tests/test_model.py
"""
import os

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from model import (Decoder, LoRALinear, ModelConfig, UserEncoder, add_lora, copy_strict,  # noqa: E402
                   lora_state_dict, merge_lora, rope_inv_freq)

V, D, LAYERS, HEADS, KV = 1000, 64, 2, 4, 2
TOL = 1e-4
LENGTHS = [10, 7, 4]  # right-padded batch, L = 10


def hf_model(kind, tie=False):
    """A tiny random HF causal LM of family `kind`, every parameter perturbed so biases/norms are not trivial."""
    common = dict(vocab_size=V, hidden_size=D, intermediate_size=128, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV, tie_word_embeddings=tie,
                  attn_implementation="eager", rms_norm_eps=1e-6)
    if kind == "qwen2":  # q/k/v biases
        cfg, cls = transformers.Qwen2Config(**common, rope_theta=1e6), transformers.Qwen2ForCausalLM
    elif kind == "qwen3":  # q_norm/k_norm, head_dim 32 != D / HEADS
        cfg, cls = transformers.Qwen3Config(**common, head_dim=32), transformers.Qwen3ForCausalLM
    elif kind == "llama":  # llama3 rope scaling with a short original context so every branch of it is used
        cfg = transformers.LlamaConfig(**common, attention_bias=True, max_position_embeddings=128,
                                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 16})
        cls = transformers.LlamaForCausalLM
    elif kind == "mistral":
        cfg, cls = transformers.MistralConfig(**common, sliding_window=None), transformers.MistralForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def save_hf(model, path, shard=False):
    model.save_pretrained(path, safe_serialization=True, **({"max_shard_size": "50KB"} if shard else {}))
    return str(path)


def batch():
    torch.manual_seed(1)
    L = max(LENGTHS)
    ids = torch.randint(0, V, (len(LENGTHS), L))
    am = torch.zeros(len(LENGTHS), L, dtype=torch.long)
    for b, n in enumerate(LENGTHS):
        am[b, :n] = 1
    ids = ids * am  # pad id 0
    return ids, am


# Masks written out here independently of ggsm.py: boolean predicates -> additive float masks.
def additive(allowed, dtype=torch.float32):
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[:, None]  # (B, 1, L, L)


def causal4d(am):
    L = am.shape[1]
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    return additive((j <= i)[None] & am[:, None, :].bool())


def bidir4d(am):
    L = am.shape[1]
    return additive(am[:, None, :].bool().expand(-1, L, -1))


def soft4d(am, seed=2):
    """0 on the past, log w_j (w in (0.1, 1)) on future keys, blocked on padded keys."""
    L = am.shape[1]
    g = torch.Generator().manual_seed(seed)
    logw = torch.log(0.1 + 0.9 * torch.rand(L, generator=g))
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    m = torch.where(j <= i, 0.0, logw[None, :])[None].expand(am.shape[0], -1, -1)
    return torch.where(am[:, None, :].bool(), m, torch.finfo(torch.float32).min)[:, None]


def max_diff_on_tokens(a, b, am):
    keep = am.bool()
    return (a[keep] - b[keep]).abs().max().item()


PARITY_CASES = [("qwen2", False, True), ("qwen3", True, False), ("llama", False, False), ("mistral", True, True)]


@pytest.fixture(scope="module", params=PARITY_CASES, ids=lambda c: f"{c[0]}-tied{c[1]}-sharded{c[2]}")
def pair(request, tmp_path_factory):
    kind, tie, shard = request.param
    hf = hf_model(kind, tie)
    path = save_hf(hf, tmp_path_factory.mktemp(kind), shard)
    if shard:
        assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    ours = Decoder.from_pretrained(path, dtype=torch.float32)
    return kind, hf, ours


@pytest.mark.parametrize("impl", ["sdpa", "manual"])
@pytest.mark.parametrize("mask_kind", ["causal", "bidirectional", "soft"])
def test_parity_with_transformers(pair, impl, mask_kind):
    kind, hf, ours = pair
    ours.attn_impl = impl
    ids, am = batch()
    with torch.no_grad():
        if mask_kind == "causal":  # HF builds causal+padding from the 2D mask itself
            ref = hf(ids, attention_mask=am, output_hidden_states=True)
            mask = causal4d(am)
        else:
            mask = bidir4d(am) if mask_kind == "bidirectional" else soft4d(am)
            ref = hf(ids, attention_mask=mask, output_hidden_states=True)  # 4D float mask: used as given
        hidden = ours(ids, mask=mask)
        logits = ours.logits(hidden)
        d_h = max_diff_on_tokens(hidden, ref.hidden_states[-1], am)
        d_l = max_diff_on_tokens(logits, ref.logits, am)
        assert d_h <= TOL, f"{kind}/{impl}/{mask_kind}: final hidden max |diff| vs transformers = {d_h:.2e}"
        assert d_l <= TOL, f"{kind}/{impl}/{mask_kind}: logits max |diff| vs transformers = {d_l:.2e}"
        for k in range(LAYERS + 1):  # layer by layer, so a failure points at the layer
            _, h_k = ours(ids, mask=mask, return_layer=k)
            d_k = max_diff_on_tokens(h_k, ref.hidden_states[k], am)
            assert d_k <= TOL, f"{kind}/{impl}/{mask_kind}: h_{k} max |diff| vs transformers = {d_k:.2e}"


def test_parity_default_mask_is_causal(pair):
    kind, hf, ours = pair
    ids = torch.randint(1, V, (2, 9))
    with torch.no_grad():
        d = (ours.logits(ours(ids)) - hf(ids).logits).abs().max().item()
    assert d <= TOL, f"{kind}: mask=None logits max |diff| vs transformers (no padding) = {d:.2e}"


def tiny(kind="qwen2", **kw):
    torch.manual_seed(0)
    cfg = dict(model_type=kind, vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2)
    cfg.update(kw)
    return Decoder(ModelConfig(**cfg)).eval()


@pytest.mark.parametrize("mask_kind", ["causal", "bidirectional", "soft"])
def test_sdpa_equals_manual(mask_kind):
    d = tiny("qwen3")
    ids, am = batch()
    ids = ids % 97
    mask = {"causal": causal4d, "bidirectional": bidir4d, "soft": soft4d}[mask_kind](am)
    with torch.no_grad():
        d.attn_impl = "sdpa"
        a = d(ids, mask=mask)
        d.attn_impl = "manual"
        b = d(ids, mask=mask)
    diff = (a - b).abs().max().item()
    assert diff <= 1e-5, f"sdpa vs manual ({mask_kind}) max |diff| = {diff:.2e}"


@pytest.mark.parametrize("impl", ["sdpa", "manual"])
def test_future_token_perturbation(impl):
    d = tiny()
    d.attn_impl = impl
    L, t = 8, 5
    ids = torch.randint(0, 97, (1, L))
    ids2 = ids.clone()
    ids2[0, t] = (ids[0, t] + 1) % 97
    am = torch.ones(1, L, dtype=torch.long)
    with torch.no_grad():
        for mask in (None, causal4d(am)):
            a, b = d(ids, mask=mask), d(ids2, mask=mask)
            assert torch.equal(a[:, :t], b[:, :t]), "causal: a future token changed an earlier hidden state"
            assert not torch.equal(a[:, t:], b[:, t:])
        a, b = d(ids, mask=bidir4d(am)), d(ids2, mask=bidir4d(am))
        change = (a[:, :t] - b[:, :t]).abs().amax(-1)
        assert (change > 1e-6).all(), f"bidirectional: earlier positions did not see the future token: {change}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["sdpa", "manual"])
def test_fully_masked_rows_are_finite(dtype, impl, monkeypatch):
    d = tiny().to(dtype)
    d.attn_impl = impl
    ids, am = batch()
    ids = ids % 97
    # padded query rows blocked everywhere, and a mask summed with itself (2 * finfo.min = -inf in fp32)
    row_block = additive(am[:, :, None].bool() & am[:, None, :].bool())
    for mask in (row_block, row_block + row_block, torch.full((1, 1, 10, 10), float("-inf"))):
        with torch.no_grad():
            h = d(ids, mask=mask)
        assert torch.isfinite(h).all(), f"{impl}/{dtype}: non-finite output for a fully masked row"
    # an fp32 model under bf16 autocast: SDPA runs in bf16, where fp32's finfo.min would round to -inf
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, attn_mask, **kw: seen.append(attn_mask) or sdpa(q, k, v, attn_mask=attn_mask, **kw))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        h = d.float()(ids, mask=row_block)
    assert torch.isfinite(h).all(), f"{impl}: non-finite output under autocast"
    assert all(m.dtype == torch.bfloat16 and torch.isfinite(m).all() for m in seen), "SDPA got a -inf mask"
    assert len(seen) == (LAYERS if impl == "sdpa" else 0)
    d.to(dtype)
    # and gradients through a padded row stay finite too
    x = d.model.embed_tokens(ids).detach().requires_grad_(True)
    d(inputs_embeds=x, mask=row_block + row_block).float().sum().backward()
    assert torch.isfinite(x.grad).all()


def soft_of(am, w):
    """Eq. 4 written out: 0 for j <= i, log w_j for j > i, padded keys blocked; (B, 1, L, L) fp32."""
    L = am.shape[1]
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    m = torch.where(j > i, torch.log(w)[None, :], 0.0)[None].expand(am.shape[0], -1, -1)
    return torch.where(am[:, None, :].bool(), m, torch.finfo(torch.float32).min)[:, None]


@pytest.mark.parametrize("how", ["autocast", "bf16-weights"])
@pytest.mark.parametrize("impl", ["sdpa", "manual"])
def test_soft_mask_survives_bf16(impl, how, monkeypatch):
    """GG-SM's warm-up weights differ by ~1e-4 around 0.5, and bf16 holds log(0.5 + d) as one number for |d| < 1e-3:
    a mask cast to bf16 would make two different masks the same. They must give different attention outputs."""
    d = tiny()
    d.attn_impl = impl
    ids, am = batch()
    ids = ids % 97
    L = am.shape[1]
    w1 = torch.full((L,), 0.5)
    w2 = w1 + 1e-4 * (torch.arange(L) % 2)  # odd key columns 1e-4 more visible
    m1, m2 = soft_of(am, w1), soft_of(am, w2)
    assert torch.equal(m1.to(torch.bfloat16), m2.to(torch.bfloat16)), "premise: bf16 cannot tell the masks apart"
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, attn_mask, **kw: seen.append((q.dtype, attn_mask)) or sdpa(q, k, v, attn_mask=attn_mask, **kw))
    with torch.no_grad():
        if how == "autocast":  # the CUDA recipe: fp32 weights, bf16 autocast
            with torch.autocast("cpu", dtype=torch.bfloat16):
                h1, h2 = d(ids, mask=m1), d(ids, mask=m2)
        else:  # --dtype bfloat16 without autocast
            d = d.to(torch.bfloat16)
            h1, h2 = d(ids, mask=m1), d(ids, mask=m2)
    real = am.bool()
    changed = (h1[real] != h2[real]).float().mean().item()
    assert changed > 0.05, f"{impl}/{how}: a 1e-4 change of the soft weights changed {changed:.1%} of the outputs"
    if impl == "sdpa":  # the soft mask reached SDPA in fp32, with fp32 q, k, v
        assert len(seen) == 2 * LAYERS
        assert all(dt == torch.float32 and m.dtype == torch.float32 for dt, m in seen)
        assert not torch.equal(seen[0][1], seen[LAYERS][1])
    # a 0 / finfo.min mask holds in bf16 and keeps the bf16 path (what the fp32 path costs is paid by soft masks only)
    seen.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        d.float()(ids, mask=causal4d(am))
    assert len(seen) == (LAYERS if impl == "sdpa" else 0) and all(m.dtype == torch.bfloat16 for _, m in seen)


def test_callable_mask_sees_block_inputs():
    d = tiny()
    ids, am = batch()
    ids = ids % 97
    seen = []

    def mask_fn(layer_idx, h):
        seen.append((layer_idx, h))
        return bidir4d(am)

    with torch.no_grad():
        a = d(ids, mask=mask_fn)
        b = d(ids, mask=bidir4d(am))
    assert torch.equal(a, b)
    assert [i for i, _ in seen] == list(range(LAYERS))
    for i, h in seen:  # the callable is evaluated on exactly the tensor entering block i
        with torch.no_grad():
            _, h_i = d(ids, mask=bidir4d(am), return_layer=i)
        assert torch.equal(h, h_i)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_return_layer_gradient(checkpointing):
    d = tiny()
    for p in d.parameters():
        p.requires_grad_(False)  # frozen base: h_0 would otherwise be a tensor without grad
    d.gradient_checkpointing = checkpointing
    d.train()
    ids, am = batch()
    ids = ids % 97
    for k in range(LAYERS + 1):
        hidden, h_k = d(ids, mask=causal4d(am), return_layer=k)
        (g,) = torch.autograd.grad(hidden.pow(2).sum(), h_k)
        assert g.shape == h_k.shape and g.abs().sum() > 0
    # the gradient at the input of block 1 equals that from re-running blocks 1.. from a copy of h_1
    hidden, h_1 = d(ids, mask=causal4d(am), return_layer=1)
    h_1.retain_grad()
    hidden.pow(2).sum().backward()
    x = h_1.detach().requires_grad_(True)
    f = torch.arange(ids.shape[1], dtype=torch.float32)[:, None] * rope_inv_freq(d.config)
    f = torch.cat((f, f), -1)  # (L, hd)
    y = d.model.norm(d.model.layers[1](x, f.cos(), f.sin(), causal4d(am)))
    y.pow(2).sum().backward()
    torch.testing.assert_close(h_1.grad, x.grad)


def test_gradient_checkpointing_same_loss_and_grads():
    ids, am = batch()
    ids = ids % 97
    results = []
    for ckpt in (False, True):
        d = tiny("llama", rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8})
        add_lora(d, r=4, alpha=8, dropout=0.1)
        torch.manual_seed(0)
        for m in d.modules():
            if isinstance(m, LoRALinear):
                nn.init.normal_(m.lora_B, std=0.02)
        d.train().gradient_checkpointing = ckpt
        torch.manual_seed(3)  # same dropout draws: checkpoint replays the RNG state
        loss = d.logits(d(ids, mask=soft4d(am))).logsumexp(-1).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1), f"loss differs with checkpointing: {l0.item()} vs {l1.item()}"
    assert g0.keys() == g1.keys() and len(g0) > 0
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], msg=lambda m: f"{n}: {m}")


# --- loader ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return save_hf(hf_model("qwen2"), tmp_path_factory.mktemp("q2"))


def _rewrite(src, dst, edit):
    os.makedirs(dst, exist_ok=True)
    sd = load_file(os.path.join(src, "model.safetensors"))
    edit(sd)
    save_file(sd, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = f.read()
    with open(os.path.join(dst, "config.json"), "w") as f:
        f.write(cfg)
    return str(dst)


def test_loader_names_bad_tensors(qwen2_dir, tmp_path):
    key = "model.layers.1.self_attn.k_proj.bias"
    bad = _rewrite(qwen2_dir, tmp_path / "missing", lambda sd: sd.pop(key))
    with pytest.raises(ValueError, match=r"missing.*k_proj\.bias"):
        Decoder.from_pretrained(bad)
    bad = _rewrite(qwen2_dir, tmp_path / "extra", lambda sd: sd.update({"model.layers.0.foo.weight": torch.ones(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.foo\.weight'"):
        Decoder.from_pretrained(bad)
    bad = _rewrite(qwen2_dir, tmp_path / "shape", lambda sd: sd.update({key: torch.ones(7)}))
    with pytest.raises(ValueError, match=r"k_proj\.bias.*\(7,\).*\(32,\)"):
        Decoder.from_pretrained(bad)
    with pytest.raises(FileNotFoundError):
        Decoder.from_pretrained(str(tmp_path))


def test_loader_sharded_equals_single_and_tied(tmp_path):
    hf = hf_model("qwen2", tie=True)
    one = Decoder.from_pretrained(save_hf(hf, tmp_path / "one"))
    many = Decoder.from_pretrained(save_hf(hf, tmp_path / "many", shard=True))
    assert "lm_head.weight" not in load_file(os.path.join(tmp_path, "one", "model.safetensors"))
    assert one.lm_head.weight is one.model.embed_tokens.weight
    for (n, a), (_, b) in zip(one.state_dict().items(), many.state_dict().items()):
        assert torch.equal(a, b), n
    # a tied checkpoint that stores the head anyway: accepted if identical, refused otherwise
    emb = "model.embed_tokens.weight"
    ok = _rewrite(tmp_path / "one", tmp_path / "head_ok", lambda sd: sd.update({"lm_head.weight": sd[emb].clone()}))
    assert torch.equal(Decoder.from_pretrained(ok).lm_head.weight, one.lm_head.weight)
    bad = _rewrite(tmp_path / "one", tmp_path / "head_bad", lambda sd: sd.update({"lm_head.weight": sd[emb] + 1}))
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        Decoder.from_pretrained(bad)


@pytest.mark.parametrize("src", [torch.bfloat16, torch.float16])
def test_low_precision_checkpoints(tmp_path, src):
    hf = hf_model("qwen3").to(src)
    path = save_hf(hf, tmp_path)
    ref = load_file(os.path.join(path, "model.safetensors"))
    d16 = Decoder.from_pretrained(path, dtype=torch.bfloat16)
    d32 = Decoder.from_pretrained(path, dtype=torch.float32)
    for n, p in d32.state_dict().items():
        assert p.dtype == torch.float32 and torch.equal(p, ref[n].float()), n  # exact upcast
    assert all(p.dtype == torch.bfloat16 for p in d16.parameters())
    ids, am = batch()
    with torch.no_grad():
        h16 = d16(ids, mask=soft4d(am))
        h32 = d32(ids, mask=soft4d(am))
    assert h16.dtype == torch.bfloat16 and torch.isfinite(h16).all()
    d = max_diff_on_tokens(h16.float(), h32, am)
    assert d < 0.25, f"bf16 forward strays from fp32 forward: max |diff| = {d:.3f}"


def test_config_reading_and_errors(tmp_path):
    base = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2)
    c = ModelConfig.from_hf_config({**base, "rope_theta": 5e5, "rope_scaling": {
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})
    assert c.rope_theta == 5e5 and c.rope_scaling["rope_type"] == "llama3" and c.num_key_value_heads == 2
    c = ModelConfig.from_hf_config({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}})
    assert c.rope_theta == 7.0 and c.rope_scaling is None and c.head_dim == 4
    with pytest.raises(ValueError, match="gemma"):
        ModelConfig.from_hf_config({**base, "model_type": "gemma"})
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_hf_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="vocab_size"):
        ModelConfig.from_hf_config({k: v for k, v in base.items() if k != "vocab_size"})
    # Mistral: a window no shorter than the context never applies; a real one is refused when it would apply
    assert ModelConfig.from_hf_config({**base, "model_type": "mistral", "sliding_window": None}).sliding_window is None
    mc = ModelConfig.from_hf_config({**base, "model_type": "mistral", "sliding_window": 4,
                                     "max_position_embeddings": 64})
    d = Decoder(mc)
    d(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="sliding_window"):
        d(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        d(torch.full((1, 3), 10))


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama"])
def test_save_pretrained_is_readable_by_transformers(tmp_path, kind):
    extra = {"tie_word_embeddings": True} if kind == "qwen2" else {}
    if kind == "llama":
        extra = {"rope_theta": 5e5, "attention_bias": True, "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8}}
    d = tiny(kind, **extra)
    d.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]  # no temp files left
    assert ModelConfig.from_hf_config(str(tmp_path)) == d.config
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        diff = (hf(ids).logits - d.logits(d(ids))).abs().max().item()
    assert diff <= TOL, f"{kind}: transformers reading our save_pretrained differs by {diff:.2e}"
    back = Decoder.from_pretrained(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), d.state_dict().values()))


# --- LoRA --------------------------------------------------------------------------------------------


def lora_model():
    d = tiny("qwen2")
    n = add_lora(d, r=4, alpha=8)
    assert n == LAYERS * 7
    return d


def randomise_lora(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def test_lora_starts_as_identity_and_keeps_keys():
    base = tiny("qwen2")
    keys = set(base.state_dict())
    ids, am = batch()
    ids = ids % 97
    with torch.no_grad():
        ref = base(ids, mask=soft4d(am))
    d = lora_model()
    assert set(k for k in d.state_dict() if "lora_" not in k) == keys  # base keys unchanged
    assert "model.layers.0.self_attn.q_proj.lora_A" in d.state_dict()
    with torch.no_grad():
        out = d(ids, mask=soft4d(am))
    assert torch.equal(out, ref), "LoRA with B = 0 must equal the base model"


def test_lora_merge_and_grads():
    d = lora_model()
    randomise_lora(d)
    ids, am = batch()
    ids = ids % 97
    with torch.no_grad():
        unmerged = d(ids, mask=bidir4d(am))
    d.logits(d(ids, mask=bidir4d(am))).mean().backward()
    with_grad = {n for n, p in d.named_parameters() if p.grad is not None}
    trainable = {n for n, p in d.named_parameters() if p.requires_grad}
    assert with_grad and with_grad == trainable and all("lora_" in n for n in with_grad), sorted(with_grad)[:5]
    merge_lora(d)
    merge_lora(d)  # guarded: the second call is a no-op
    with torch.no_grad():
        merged = d(ids, mask=bidir4d(am))
    diff = (merged - unmerged).abs().max().item()
    assert diff <= 1e-5, f"merged vs unmerged max |diff| = {diff:.2e}"
    with torch.no_grad():
        base = tiny("qwen2")(ids, mask=bidir4d(am))
    assert (merged - base).abs().max() > 1e-3, "the random LoRA update should change the outputs"


def test_lora_dropout_only_in_training():
    d = tiny()
    add_lora(d, targets=("q_proj",), r=2, alpha=2, dropout=0.5)
    randomise_lora(d)
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        assert torch.equal(d.eval()(ids), d(ids))
        d.train()
        assert not torch.equal(d(ids), d(ids))


def test_lora_safetensors_round_trip(tmp_path):
    d = lora_model()
    randomise_lora(d, seed=5)
    save_file(lora_state_dict(d), tmp_path / "lora.safetensors")
    ids, am = batch()
    ids = ids % 97
    with torch.no_grad():
        ref = d(ids, mask=soft4d(am))
    fresh = lora_model()
    with torch.no_grad():
        assert not torch.equal(fresh(ids, mask=soft4d(am)), ref)
    # restored through copy_strict, as UserEncoder.load_trainable_state_dict does (strict on names and shapes)
    copy_strict(lora_state_dict(fresh), load_file(tmp_path / "lora.safetensors"), "lora")
    with torch.no_grad():
        assert torch.equal(fresh(ids, mask=soft4d(am)), ref), "LoRA save -> load did not restore the outputs"
    sd = load_file(tmp_path / "lora.safetensors")
    with pytest.raises(ValueError, match="missing"):
        copy_strict(lora_state_dict(fresh), {k: v for k, v in sd.items() if "layers.1" not in k}, "lora")
    k = "model.layers.0.mlp.up_proj.lora_A"
    with pytest.raises(ValueError, match="up_proj.lora_A"):
        copy_strict(lora_state_dict(fresh), {**sd, k: torch.zeros(3, 3)}, "lora")
    with pytest.raises(ValueError, match="not merged"):
        fresh.save_pretrained(tmp_path / "dec")
    merge_lora(fresh)  # a merged model saves as a plain checkpoint
    fresh.save_pretrained(tmp_path / "dec")
    with torch.no_grad():
        out = Decoder.from_pretrained(tmp_path / "dec")(ids, mask=soft4d(am))
    diff = max_diff_on_tokens(out, ref, am)
    assert diff <= 1e-5, f"merged checkpoint vs LoRA model max |diff| = {diff:.2e}"


def test_add_lora_rejects_unknown_targets():
    with pytest.raises(ValueError, match="qkv"):
        add_lora(tiny(), targets=("qkv",))


# --- UserEncoder -------------------------------------------------------------------------------------


def encoder(pooling="token", projector_dims=None):
    d = tiny("qwen2")
    add_lora(d, r=2, alpha=4)
    specials = [97, 98, 5]  # two ids beyond the vocabulary and one spare row inside it
    return UserEncoder(d, specials, {"tabular": 3, "bill": 6}, pooling=pooling, projector_dims=projector_dims)


def test_user_encoder_special_rows():
    enc = encoder()
    W = enc.decoder.model.embed_tokens.weight
    torch.testing.assert_close(enc.special_embeds[0], W.mean(0))
    torch.testing.assert_close(enc.special_embeds[2], W[5])
    ids = torch.tensor([[1, 97, 2, 98, 5, 3]])
    with torch.no_grad():
        enc.special_embeds.add_(1.0)  # trained rows now differ from the checkpoint
        x = enc.embed(ids)
    torch.testing.assert_close(x[0, 1], enc.special_embeds[0])
    torch.testing.assert_close(x[0, 3], enc.special_embeds[1])
    torch.testing.assert_close(x[0, 4], enc.special_embeds[2])
    torch.testing.assert_close(x[0, [0, 2, 5]], W[[1, 2, 3]])
    with pytest.raises(ValueError, match="99"):
        enc.embed(torch.tensor([[99]]))


def test_user_encoder_pooling_and_vectors():
    enc = encoder()
    ids = torch.tensor([[1, 2, 97, 4, 98, 0], [7, 97, 8, 98, 0, 0]])
    am = (torch.arange(6) < torch.tensor([[5], [4]])).long()
    pool = torch.tensor([4, 3])
    vec = {"tabular": torch.randn(2, 3)}
    pos = {"tabular": torch.tensor([[0, 2], [1, 1]])}  # the <VEC>-like placeholder at (row, col)
    mask = causal4d(am)
    with torch.no_grad():
        e = enc(ids, am, pool, mask=mask, vectors=vec, vector_pos=pos)
        hidden = enc.decoder(inputs_embeds=enc.embed(ids, vec, pos), mask=mask)
    assert e.shape == (2, D // 2) and torch.allclose(e.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(e, nn.functional.normalize(hidden[[0, 1], pool], dim=-1))
    # the vector enters only at its position: under the causal mask earlier positions are untouched
    vec2 = {"tabular": torch.randn(2, 3)}  # (a constant shift would vanish in the LayerNorm)
    with torch.no_grad():
        x1, x2 = enc.embed(ids, vec, pos), enc.embed(ids, vec2, pos)
        h2 = enc.decoder(inputs_embeds=x2, mask=mask)
    changed = (x1 != x2).any(-1)
    assert changed.nonzero().tolist() == [[0, 2], [1, 1]]
    assert torch.equal(hidden[0, :2], h2[0, :2]) and not torch.equal(hidden[0, 2:5], h2[0, 2:5])
    # mean pooling over real tokens, with a projector (D, 16, 8)
    enc_m = encoder("mean", projector_dims=(D // 2, 16, 8))
    with torch.no_grad():
        e = enc_m(ids, am, pool, mask=mask)
        h = enc_m.decoder(inputs_embeds=enc_m.embed(ids), mask=mask)
        mean = torch.stack([h[0, :5].mean(0), h[1, :4].mean(0)])
    torch.testing.assert_close(e, nn.functional.normalize(enc_m.projector(mean), dim=-1))
    assert e.shape == (2, 8)


def test_user_encoder_training_surface():
    enc = encoder(projector_dims=(D // 2, 8))
    ids = torch.tensor([[1, 97, 2, 98, 3]])
    am = torch.ones(1, 5, dtype=torch.long)
    e, h1 = enc(ids, am, torch.tensor([3]), mask=bidir4d(am), vectors={"bill": torch.randn(1, 6)},
                vector_pos={"bill": torch.tensor([[0, 2]])}, return_layer=1)
    assert h1.shape == (1, 5, D // 2)
    e.sum().backward()
    grads = {n for n, p in enc.named_parameters() if p.grad is not None}
    assert "special_embeds" in grads and "adapters.bill.fc1.weight" in grads and "projector.0.weight" in grads
    assert not any(n.startswith("decoder.") and "lora_" not in n for n in grads)
    assert "adapters.tabular.fc1.weight" not in grads  # no tabular vector in this batch
    sd = enc.trainable_state_dict()
    assert "special_embeds" in sd and "projector.0.weight" in sd and "adapters.bill.norm.weight" in sd
    assert "decoder.model.layers.0.self_attn.q_proj.lora_A" in sd
    assert not any(k.startswith("decoder.") and "lora_" not in k for k in sd)
    other = encoder(projector_dims=(D // 2, 8))
    other.load_trainable_state_dict({k: v.clone() for k, v in sd.items()})
    with torch.no_grad():
        assert torch.equal(other(ids, am, torch.tensor([3])), enc(ids, am, torch.tensor([3])))


# --- real configs: the published config.json files of the target checkpoints, built on the meta device ----

REAL_CONFIGS = {
    "Qwen2.5-0.5B-Instruct": dict(
        architectures=["Qwen2ForCausalLM"], attention_dropout=0.0, bos_token_id=151643, eos_token_id=151645,
        hidden_act="silu", hidden_size=896, initializer_range=0.02, intermediate_size=4864,
        max_position_embeddings=32768, max_window_layers=21, model_type="qwen2", num_attention_heads=14,
        num_hidden_layers=24, num_key_value_heads=2, rms_norm_eps=1e-06, rope_theta=1000000.0,
        sliding_window=32768, tie_word_embeddings=True, torch_dtype="bfloat16", use_cache=True,
        use_sliding_window=False, vocab_size=151936),
    "Llama-3.2-1B": dict(
        architectures=["LlamaForCausalLM"], attention_bias=False, attention_dropout=0.0, bos_token_id=128000,
        eos_token_id=128001, head_dim=64, hidden_act="silu", hidden_size=2048, initializer_range=0.02,
        intermediate_size=8192, max_position_embeddings=131072, mlp_bias=False, model_type="llama",
        num_attention_heads=32, num_hidden_layers=16, num_key_value_heads=8, pretraining_tp=1, rms_norm_eps=1e-05,
        rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        rope_theta=500000.0, tie_word_embeddings=True, torch_dtype="bfloat16", use_cache=True, vocab_size=128256),
    "Qwen3-0.6B": dict(
        architectures=["Qwen3ForCausalLM"], attention_bias=False, attention_dropout=0.0, bos_token_id=151643,
        eos_token_id=151645, head_dim=128, hidden_act="silu", hidden_size=1024, initializer_range=0.02,
        intermediate_size=3072, max_position_embeddings=40960, max_window_layers=28, model_type="qwen3",
        num_attention_heads=16, num_hidden_layers=28, num_key_value_heads=8, rms_norm_eps=1e-06,
        rope_scaling=None, rope_theta=1000000, sliding_window=None, tie_word_embeddings=True,
        torch_dtype="bfloat16", use_cache=True, use_sliding_window=False, vocab_size=151936),
    "Mistral-7B-v0.3": dict(
        architectures=["MistralForCausalLM"], attention_dropout=0.0, bos_token_id=1, eos_token_id=2,
        hidden_act="silu", hidden_size=4096, initializer_range=0.02, intermediate_size=14336,
        max_position_embeddings=32768, model_type="mistral", num_attention_heads=32, num_hidden_layers=32,
        num_key_value_heads=8, rms_norm_eps=1e-05, rope_theta=1000000.0, sliding_window=None,
        tie_word_embeddings=False, torch_dtype="bfloat16", use_cache=True, vocab_size=32768),
}
N_PARAMS = {"Qwen2.5-0.5B-Instruct": 494_032_768, "Llama-3.2-1B": 1_235_814_400}  # published sizes


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_real_configs_match_transformers_parameters(name):
    raw = REAL_CONFIGS[name]
    cfg = ModelConfig.from_hf_config(dict(raw))
    with torch.device("meta"):
        ours = Decoder(cfg)
        hf_cfg = transformers.AutoConfig.for_model(**raw)
        ref = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    mine = {n: tuple(p.shape) for n, p in ours.named_parameters()}
    theirs = {n: tuple(p.shape) for n, p in ref.named_parameters()}
    assert mine == theirs, f"{name}: names/shapes differ: {sorted(set(mine.items()) ^ set(theirs.items()))[:6]}"
    if name in N_PARAMS:
        assert sum(p.numel() for p in ours.parameters()) == N_PARAMS[name]

"""
The decoder and the user encoder: a Qwen2 / Qwen2.5 / Qwen3 / Llama 2-3.x / Mistral decoder written out by
hand, read straight from a Hugging Face checkpoint folder (config.json + safetensors), with one explicit
additive attention mask, LoRA adapters, modality adapters and the user-embedding encoder of GG-SM.

References:
  - GG-SM: "How Do Decoder-Only LLMs Perceive Users? Rethinking Attention Masking for User
    Representation Learning", arXiv 2602.10622 (the UserEncoder: adapters, <USER> pooling, projector).
  - Hugging Face transformers models/qwen2, qwen3, llama, mistral modeling_*.py: the numerics mirrored
    here (rotate_half RoPE with cos/sin in fp32, RMSNorm in fp32, softmax in fp32) and the parameter names.
  - LoRA: Hu et al. 2021, arXiv 2106.09685; layout of microsoft/loralib and torchtune (base key unchanged).

Usage:
  decoder = Decoder.from_pretrained("/path/to/Qwen2.5-0.5B-Instruct", dtype=torch.bfloat16, device="cuda")
  add_lora(decoder, r=64, alpha=64)                       # freezes everything but lora_A / lora_B
  hidden = decoder(input_ids, mask=my_mask)               # (B, L, D), after the final norm
  python -m pytest -q tests/test_model.py                 # parity with transformers on tiny random models
"""
import json
import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import safe_open
from safetensors.torch import save_file

import pack

# -----------------------------------------------------------------------------
# Config


@dataclass
class ModelConfig:
    model_type: str                 # 'qwen2' | 'qwen3' | 'llama' | 'mistral'
    vocab_size: int                 # rows of embed_tokens / lm_head
    hidden_size: int                # D
    intermediate_size: int          # SwiGLU inner width
    num_hidden_layers: int          # number of blocks
    num_attention_heads: int        # query heads
    num_key_value_heads: int | None = None  # KV heads (GQA); None = same as query heads
    head_dim: int | None = None     # None = hidden_size // num_attention_heads (Qwen3 sets it explicitly)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None or {"rope_type": "llama3", factor, low_freq_factor, high_freq_factor,
                                      #          original_max_position_embeddings}
    attention_bias: bool | None = None  # bias on q/k/v (and on o for llama/qwen3/mistral); None = family default
    qk_norm: bool | None = None     # Qwen3 RMSNorm on q and k per head; None = family default
    tie_word_embeddings: bool = False  # lm_head.weight is embed_tokens.weight
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    sliding_window: int | None = None  # Mistral only; a window shorter than the input is refused at run time

    def __post_init__(self):
        if self.model_type not in ("qwen2", "qwen3", "llama", "mistral"):
            raise ValueError(f"ModelConfig: unknown model_type {self.model_type!r} "
                             "(supported: qwen2, qwen3, llama, mistral)")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.attention_bias is None:
            self.attention_bias = self.model_type == "qwen2"
        if self.qk_norm is None:
            self.qk_norm = self.model_type == "qwen3"
        # the reference implementations hard-wire these, so a config.json cannot change them
        if self.model_type == "qwen2" and not self.attention_bias:
            raise ValueError("ModelConfig: qwen2 always has q/k/v biases (attention_bias must be True)")
        if self.qk_norm != (self.model_type == "qwen3"):
            raise ValueError(f"ModelConfig: qk_norm={self.qk_norm} does not match model_type {self.model_type!r}")
        if self.model_type == "mistral" and self.attention_bias:
            raise ValueError("ModelConfig: mistral has no attention biases")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(f"ModelConfig: num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2 != 0:
            raise ValueError(f"ModelConfig: head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rope_scaling is not None:
            self.rope_scaling = _check_rope_scaling(self.rope_scaling)
        if self.model_type != "mistral" or (self.sliding_window or 0) >= self.max_position_embeddings:
            self.sliding_window = None  # never applies

    @property
    def o_proj_bias(self):
        # Qwen2 puts biases on q/k/v only; Llama/Qwen3 `attention_bias` covers o_proj too
        return self.attention_bias and self.model_type != "qwen2"

    @classmethod
    def from_hf_config(cls, path_or_dict):
        """Read a Hugging Face config.json (a path to the file or its folder, or the loaded dict) field by field."""
        if isinstance(path_or_dict, dict):
            c, where = path_or_dict, "config"
        else:
            where = str(path_or_dict)
            if os.path.isdir(where):
                where = os.path.join(where, "config.json")
            with open(where) as f:
                c = json.load(f)

        def need(key):
            if key not in c:
                raise ValueError(f"{where}: missing required field {key!r}")
            return c[key]

        model_type = need("model_type")
        if model_type not in ("qwen2", "qwen3", "llama", "mistral"):
            raise ValueError(f"{where}: unsupported model_type {model_type!r} "
                             "(supported: qwen2, qwen3, llama, mistral)")
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{where}: hidden_act {c['hidden_act']!r} is not supported (only silu)")
        if c.get("mlp_bias", False):
            raise ValueError(f"{where}: mlp_bias=true is not supported")
        if c.get("use_sliding_window", False):
            raise ValueError(f"{where}: use_sliding_window=true is not supported")
        layer_types = c.get("layer_types") or []
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(f"{where}: layer_types {sorted(set(layer_types))} not supported (only full_attention)")
        # transformers >= 5 writes rope_parameters {rope_type, rope_theta, ...}; older files write rope_theta
        # and rope_scaling {type|rope_type, ...} (rope_scaling null = plain RoPE)
        rope_parameters = dict(c.get("rope_parameters") or {})
        if rope_parameters and not any(k in rope_parameters for k in ("rope_theta", "rope_type", "type")):
            raise ValueError(f"{where}: per-layer rope_parameters are not supported")
        rope_theta = rope_parameters.pop("rope_theta", c.get("rope_theta", 10000.0))
        rope_scaling = c.get("rope_scaling") or rope_parameters or None
        if rope_scaling is not None:
            try:
                rope_scaling = _check_rope_scaling(rope_scaling)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        if c.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"{where}: partial_rotary_factor != 1 is not supported")
        try:
            return cls(
                model_type=model_type,
                vocab_size=need("vocab_size"),
                hidden_size=need("hidden_size"),
                intermediate_size=need("intermediate_size"),
                num_hidden_layers=need("num_hidden_layers"),
                num_attention_heads=need("num_attention_heads"),
                num_key_value_heads=c.get("num_key_value_heads"),
                head_dim=c.get("head_dim"),
                rms_norm_eps=c.get("rms_norm_eps", 1e-6),
                rope_theta=float(rope_theta),
                rope_scaling=rope_scaling,
                attention_bias=True if model_type == "qwen2" else c.get("attention_bias", False),
                qk_norm=model_type == "qwen3",
                tie_word_embeddings=c.get("tie_word_embeddings", False),
                max_position_embeddings=c.get("max_position_embeddings", 32768),
                bos_token_id=c.get("bos_token_id"),
                eos_token_id=c.get("eos_token_id"),
                sliding_window=c.get("sliding_window") if model_type == "mistral" else None,
            )
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def to_hf_dict(self):
        """A config.json that transformers (4.x and 5.x) reads as the same architecture."""
        arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[self.model_type]
        d = {"architectures": [arch], "model_type": self.model_type, "hidden_act": "silu"}
        d.update({f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("model_type", "qk_norm")})
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta, **(self.rope_scaling or {})}
        if self.model_type in ("qwen2", "qwen3"):
            d["use_sliding_window"] = False
        return d


def _check_rope_scaling(rs):
    """Normalise a rope_scaling dict; only the llama3 frequency scaling is implemented."""
    rs = {k: v for k, v in rs.items() if k != "rope_theta"}
    kind = rs.pop("rope_type", rs.pop("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ValueError(f"unsupported rope_scaling type {kind!r} (only 'llama3' or none)")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in rs]
    if missing:
        raise ValueError(f"llama3 rope_scaling is missing {missing}")
    return {"rope_type": "llama3", **{k: rs[k] for k in keys}}


# -----------------------------------------------------------------------------
# Layers. Numerics follow HF eager: RMSNorm in fp32, cos/sin in fp32, softmax in fp32.


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # normalise in fp32, cast back, then multiply by the weight (the order HF uses)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(config, device=None):
    """(head_dim/2,) fp32 inverse frequencies, with the llama3 long-context rescaling when configured."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    rs = config.rope_scaling
    if rs is not None:  # llama3: keep high frequencies, divide low ones by `factor`, blend in between
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_len = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    # x: (B, nh, L, hd); cos/sin: (L, hd) or (B, 1, L, hd), already cast to x.dtype
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """
    Grouped-query self-attention with ONE explicit additive mask.

    Notation: B batch, L sequence length, nh query heads, nkv key/value heads, hd head dim.

    Mask convention (the one used everywhere in this project): a float tensor broadcastable to
    (B, nh, L, L) that is ADDED to the scores before the softmax,
        softmax(Q K^T / sqrt(hd) + mask) V,   row i = query position i, column j = key position j,
    with 0 = attend, torch.finfo(dtype).min = blocked, log(w) = attend with soft weight w in (0, 1].
    Padded keys are always blocked; because finfo.min is finite (never -inf), a row that is blocked everywhere
    becomes a uniform softmax instead of 0/0, so padded rows never produce NaN. ggsm.py's docstring works
    the convention through on a 4x4 example.
    """

    def __init__(self, config):
        super().__init__()
        D, nh, nkv, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.nh, self.nkv, self.hd = nh, nkv, hd
        self.q_proj = nn.Linear(D, nh * hd, bias=config.attention_bias)
        self.k_proj = nn.Linear(D, nkv * hd, bias=config.attention_bias)
        self.v_proj = nn.Linear(D, nkv * hd, bias=config.attention_bias)
        self.o_proj = nn.Linear(nh * hd, D, bias=config.o_proj_bias)
        if config.qk_norm:  # Qwen3: RMSNorm over head_dim of each head, before RoPE
            self.q_norm = RMSNorm(hd, config.rms_norm_eps)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, impl="sdpa"):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.nh, self.hd)    # (B, L, nh, hd)
        k = self.k_proj(x).view(B, L, self.nkv, self.hd)   # (B, L, nkv, hd)
        v = self.v_proj(x).view(B, L, self.nkv, self.hd)   # (B, L, nkv, hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh|nkv, L, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # k, v stay (B, nkv, L, hd): _attend groups them
        if impl not in ("sdpa", "manual"):
            raise ValueError(f"Attention: attn_impl must be 'sdpa' or 'manual', got {impl!r}")
        dt = compute_dtype(q)  # what attention runs in: under autocast the autocast dtype, else q's
        if torch.finfo(mask.dtype).bits > torch.finfo(dt).bits:
            # a mask wider than the compute dtype carries log-weights dt cannot hold (Decoder.forward keeps a
            # soft mask in fp32 for this reason: in bf16, log(0.5 + d) is one number for every |d| < 1e-3 and the
            # GG-SM weights differ by ~1e-4): this layer's attention runs in fp32, scores + fp32 mask, fp32
            # softmax, so the weights reach the output; projections and MLP stay in dt
            with torch.autocast(q.device.type, enabled=False):
                y = _attend(q.float(), k.float(), v.float(), mask.float(), self.hd, impl).to(q.dtype)
        else:
            # SDPA wants the mask in the dtype it really runs in; cast and clamp again, since an fp32 finfo.min
            # rounds to -inf in bf16
            if mask.dtype != dt:
                mask = mask.to(dt).clamp(min=torch.finfo(dt).min)
            y = _attend(q, k, v, mask, self.hd, impl)
        y = y.transpose(1, 2).reshape(B, L, self.nh * self.hd)  # (B, L, nh*hd)
        return self.o_proj(y)


def causal_additive(L, dtype, device):
    """(1, 1, L, L) additive causal mask: 0 on and below the diagonal, finfo(dtype).min above."""
    return torch.full((L, L), torch.finfo(dtype).min, device=device).triu(1)[None, None]


def compute_dtype(x):
    """The dtype x's matmuls run in: the autocast dtype when autocast is on for x's device, else x.dtype."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


# torch >= 2.5: SDPA groups the query heads over the KV heads itself (enable_gqa), without copying K and V
SDPA_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def _attend(q, k, v, mask, hd, impl):
    """softmax(q k^T / sqrt(hd) + mask) v; q (B, nh, L, hd), k, v (B, nkv, L, hd), mask broadcastable to
    (B, nh, L, L). Query head h reads KV head h // (nh // nkv)."""
    groups = q.shape[1] // k.shape[1]
    if impl == "sdpa" and SDPA_GQA and groups > 1:  # never with is_causal: the mask says it all
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    # GQA spelled out: repeat each KV head for its group of query heads, (B, nkv, L, hd) -> (B, nh, L, hd)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # manual: the readable spec; also where attention weights could be read off
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))  # (B, nh, L, L)
    att = torch.softmax(scores.float() + mask.float(), dim=-1).to(q.dtype)
    return att @ v                                              # (B, nh, L, hd)


def holds(mask, dtype):
    """True when casting the additive mask to `dtype` loses nothing that matters: every open entry (above
    finfo(dtype).min; lower ones are blocked in any dtype) survives the round trip exactly. 0 / finfo.min
    masks (causal, bidirectional, window, global query) hold in bf16; GG-SM's log-weights do not."""
    if not mask.is_floating_point() or torch.finfo(mask.dtype).bits <= torch.finfo(dtype).bits:
        return True
    open_ = mask > torch.finfo(dtype).min
    return bool(torch.where(open_, mask.to(dtype).to(mask.dtype) == mask, True).all())


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        D, I = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(D, I, bias=False)
        self.up_proj = nn.Linear(D, I, bias=False)
        self.down_proj = nn.Linear(I, D, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, impl="sdpa"):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, impl)
        return x + self.mlp(self.post_attention_layernorm(x))


# -----------------------------------------------------------------------------
# Decoder


class Decoder(nn.Module):
    """Embeddings -> blocks -> final RMSNorm; lm_head on demand. Parameter names = HF checkpoint keys."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList([Block(config) for _ in range(config.num_hidden_layers)]),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.attn_impl = "sdpa"              # or "manual": same numbers (tested), manual is the readable spec
        self.gradient_checkpointing = False  # recompute each block in backward (long user histories)
        # random init as in HF (normal, std 0.02; zero biases; norms at one); from_pretrained overwrites all
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                continue
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=0.02)
        self.tie_weights()

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids=None, mask=None, inputs_embeds=None, return_layer=None, position_ids=None):
        """
        input_ids (B, L) long, or inputs_embeds (B, L, D). mask: an additive float tensor broadcastable to
        (B, nh, L, L) (convention in Attention), or a callable mask(layer_idx, h) -> tensor evaluated on the
        hidden state entering each block, or None = causal. position_ids (B, L) long: the RoPE position of
        each slot (packed rows restart at 0 for each user, pack.py); None = 0..L-1 in every row. Returns the
        final normed hidden (B, L, D); with return_layer=k returns (hidden, h_k), h_k the tensor entering
        block k (k = n_layers: hidden itself).
        """
        cfg, emb = self.config, self.model.embed_tokens
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Decoder.forward: pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= cfg.vocab_size):
                raise ValueError(f"Decoder.forward: token ids must lie in [0, {cfg.vocab_size}), got "
                                 f"[{int(input_ids.min())}, {int(input_ids.max())}]")
            h = emb(input_ids)
        else:
            h = inputs_embeds.to(emb.weight.dtype)
        B, L, _ = h.shape
        n = cfg.num_hidden_layers
        if return_layer is not None and not 0 <= return_layer <= n:
            raise ValueError(f"Decoder.forward: return_layer must be in [0, {n}], got {return_layer}")
        if cfg.sliding_window is not None and L > cfg.sliding_window:
            raise ValueError(f"Decoder.forward: sequence length {L} exceeds the model's sliding_window "
                             f"{cfg.sliding_window}; sliding-window attention is not implemented")
        dtype = h.dtype
        # cos/sin computed in fp32, cast to the compute dtype at the end (as HF does)
        if position_ids is None:
            pos = torch.arange(L, device=h.device, dtype=torch.float32)  # (L,)
        else:
            if position_ids.shape != (B, L):
                raise ValueError(f"Decoder.forward: position_ids shape {tuple(position_ids.shape)} is not (B, L) = "
                                 f"{(B, L)}")
            if mask is None:
                raise ValueError("Decoder.forward: with position_ids, pass the mask (a packed row needs its "
                                 "block-diagonal mask; the default causal mask would cross users)")
            pos = position_ids.to(h.device, torch.float32)[:, None]  # (B, 1, L): broadcasts over the heads
        freqs = pos[..., None] * rope_inv_freq(cfg, h.device)
        freqs = torch.cat((freqs, freqs), dim=-1)  # (L, hd), or (B, 1, L, hd) with position_ids
        cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
        if mask is None:
            mask = causal_additive(L, dtype, h.device)

        compute = compute_dtype(h)  # bf16 under bf16 autocast or with bf16 weights

        def prepare(m):  # cast to the compute dtype; clamp so a sum of blocks is finfo.min, never -inf
            if m.dim() > 4 or m.shape[-2:] != (L, L):
                raise ValueError(f"Decoder.forward: mask shape {tuple(m.shape)} is not broadcastable to "
                                 f"(B, heads, {L}, {L})")
            m = m.to(h.device)
            # paper [mask precision]: not discussed; official code: fp32 bias under bf16 autocast
            if not holds(m, compute):
                # soft weights the compute dtype would erase: keep them in fp32; Attention then runs in fp32
                return m.float().clamp(min=torch.finfo(torch.float32).min)
            return m.to(compute).clamp(min=torch.finfo(compute).min)

        static_mask = None if callable(mask) else prepare(mask)

        def capture(h):  # h_k must be the very tensor used downstream, with a graph even under a frozen base
            if torch.is_grad_enabled() and not h.requires_grad:
                h = h.detach().requires_grad_(True)  # so autograd.grad(loss, h_k) works
            return h

        h_k = None
        for i, block in enumerate(self.model.layers):
            if i == return_layer:
                h = h_k = capture(h)
            m = prepare(mask(i, h)) if static_mask is None else static_mask
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(block, h, cos, sin, m, self.attn_impl, use_reentrant=False)
            else:
                h = block(h, cos, sin, m, self.attn_impl)
        h = self.model.norm(h)
        if return_layer is None:
            return h
        if return_layer == n:
            h = h_k = capture(h)
        return h, h_k

    def logits(self, hidden):
        return self.lm_head(hidden)  # (B, L, V)

    # --- checkpoints: safetensors + config.json, HF folder layout -----------------------------------

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """
        Load an HF-layout folder: config.json and model.safetensors or model.safetensors.index.json (shards).
        Parameters are allocated once, directly in `dtype` on `device`, then filled tensor by tensor from
        safetensors (bf16/fp16/fp32 sources), so no second full copy and no pickle. Strict: a missing,
        unexpected or mis-shaped tensor raises an error naming it. Returns the model in eval mode.
        """
        config = ModelConfig.from_hf_config(os.path.join(path, "config.json"))
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]  # tensor name -> shard file
            shards = {}
            for key, shard in weight_map.items():
                shards.setdefault(shard, []).append(key)
        elif os.path.exists(single):
            shards = {"model.safetensors": None}
        else:
            raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json found")

        with torch.device("meta"):  # shapes only, no memory
            model = cls(config)
        model = model.to(dtype).to_empty(device=device)  # one allocation, in the target dtype
        model.tie_weights()  # to_empty makes new Parameters, which unties shared ones
        params = dict(model.named_parameters())  # a tied lm_head.weight appears once, as embed_tokens
        loaded, redundant_head = set(), None
        with torch.no_grad():
            for shard, listed in shards.items():
                file = os.path.join(path, shard)
                if not os.path.exists(file):
                    raise FileNotFoundError(f"{path}: shard {shard} listed in the index is missing")
                with safe_open(file, framework="pt", device="cpu") as f:
                    keys = set(f.keys())
                    if listed is not None and set(listed) - keys:
                        raise ValueError(f"{file}: tensors {sorted(set(listed) - keys)} listed in the index are absent")
                    for key in sorted(keys):
                        if key.endswith("rotary_emb.inv_freq"):  # old exports save this buffer; we recompute it
                            continue
                        if key == "lm_head.weight" and config.tie_word_embeddings:
                            redundant_head = file  # a tied head saved anyway; checked against the embedding below
                            continue
                        if key not in params:
                            raise ValueError(f"{file}: unexpected tensor {key!r} (not a parameter of this "
                                             f"{config.model_type} model)")
                        shape = tuple(f.get_slice(key).get_shape())
                        if shape != tuple(params[key].shape):
                            raise ValueError(f"{file}: tensor {key!r} has shape {shape}, "
                                             f"expected {tuple(params[key].shape)}")
                        params[key].copy_(f.get_tensor(key))  # casts to dtype and moves to device
                        loaded.add(key)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"{path}: checkpoint is missing tensors {missing}")
        if redundant_head is not None:
            with safe_open(redundant_head, framework="pt", device="cpu") as f:
                head = f.get_tensor("lm_head.weight")
            if head.shape != model.lm_head.weight.shape or not torch.equal(head.to(dtype), model.lm_head.weight.cpu()):
                raise ValueError(f"{redundant_head}: lm_head.weight differs from model.embed_tokens.weight but "
                                 "config.json says tie_word_embeddings=true")
        return model.eval()

    def save_pretrained(self, path):
        """Write config.json + model.safetensors (each to a temp name, then os.replace: atomic)."""
        unmerged = [n for n, m in self.named_modules() if isinstance(m, LoRALinear) and not m.merged]
        if unmerged:
            raise ValueError(f"save_pretrained: LoRA layers {unmerged[:3]}... are not merged; call merge_lora() "
                             "first, or save lora_state_dict() separately")
        os.makedirs(path, exist_ok=True)
        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if "lora_" not in k}
        if self.config.tie_word_embeddings:
            sd.pop("lm_head.weight")  # same storage as the embedding; HF omits it too
        tmp = os.path.join(path, "model.safetensors.tmp")
        save_file(sd, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(path, "model.safetensors"))
        stale_index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(stale_index):  # from_pretrained would prefer an old sharded copy over this file
            os.remove(stale_index)
        cfg = self.config.to_hf_dict()
        cfg["torch_dtype"] = str(self.model.embed_tokens.weight.dtype).replace("torch.", "")
        tmp = os.path.join(path, "config.json.tmp")
        with open(tmp, "w") as f:
            json.dump(cfg, f, indent=2)
        os.replace(tmp, os.path.join(path, "config.json"))


# -----------------------------------------------------------------------------
# LoRA (loralib / torchtune layout: the base `weight` keeps its key, lora_A / lora_B sit beside it)


class LoRALinear(nn.Module):
    """
        y = x W^T + b + (alpha / r) * dropout(x) A^T B^T

        x ──┬── W (frozen, out x in) ───────────────┐
            └── dropout ── A (r x in) ── B (out x r) ── * alpha/r ──(+)── y

    A: Kaiming-uniform, B: zeros, so a fresh adapter leaves the model unchanged. A and B are kept in fp32
    (stable optimiser updates on a bf16 base); the branch is cast back to the base dtype. merge() folds
    B A into W once (guarded by `merged`); after it the branch is skipped.
    """

    def __init__(self, base, r=8, alpha=16, dropout=0.0):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRALinear: rank r must be positive, got {r}")
        w = base.weight
        self.in_features, self.out_features, self.r = base.in_features, base.out_features, r
        self.weight, self.bias = w, base.bias  # the very same Parameters as `base`: no copy, same keys
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=w.device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=w.device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear / loralib
        self.scaling = alpha / r
        self.lora_dropout = nn.Dropout(dropout)
        self.merged = False

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        # scale at rank r, not at width out: (x A^T s) B^T = s x A^T B^T, with an (..., r) multiply instead of (..., out)
        a = (self.lora_dropout(x).to(self.lora_A.dtype) @ self.lora_A.t()) * self.scaling  # (..., r)
        if a.dtype != y.dtype:  # a bf16 base without autocast: the branch in fp32, cast back
            return y + (a @ self.lora_B.t()).to(y.dtype)
        # y + a B^T as one BLAS call (addmm's beta = 1): no (..., out) temporary and no separate add
        return torch.addmm(y.reshape(-1, self.out_features), a.reshape(-1, self.r), self.lora_B.t()).view(y.shape)

    @torch.no_grad()
    def merge(self):
        if self.merged:  # merging twice would add B A twice
            return
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling  # (out, in)
        self.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
        self.merged = True

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling}, "
                f"merged={self.merged}")


def add_lora(module, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
             r=8, alpha=16, dropout=0.0):
    """Replace every nn.Linear child whose attribute name is in `targets` by a LoRALinear sharing its weight,
    then freeze every parameter of `module` except lora_A / lora_B. Returns the number of layers wrapped."""
    targets = set(targets)
    n = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and type(child) is nn.Linear:
                setattr(parent, name, LoRALinear(child, r, alpha, dropout))
                n += 1
    if n == 0 and not any(isinstance(m, LoRALinear) for m in module.modules()):
        raise ValueError(f"add_lora: no nn.Linear named any of {sorted(targets)} in {type(module).__name__}")
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)
    return n


def lora_state_dict(module):
    return {k: v for k, v in module.state_dict().items() if "lora_" in k}


def copy_strict(own, sd, where):
    """Copy tensors sd into the tensors own (same names); a missing, unexpected or mis-shaped one is an error."""
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(f"{where}: missing {missing}, unexpected {unexpected}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{where}: {k!r} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)


def load_lora_state_dict(module, sd):
    """Copy LoRA tensors (as written by lora_state_dict) back into `module`; strict on names and shapes."""
    if any(m.merged for m in module.modules() if isinstance(m, LoRALinear)):
        raise ValueError("load_lora_state_dict: the LoRA layers are already merged into the base weights")
    copy_strict(lora_state_dict(module), sd, "load_lora_state_dict")


def merge_lora(module):
    for m in module.modules():
        if isinstance(m, LoRALinear):
            m.merge()


# -----------------------------------------------------------------------------
# User encoder: modality adapters + decoder + pooling + projector


class ModalityAdapter(nn.Module):
    """LayerNorm(in) -> Linear(in, hidden) -> GELU -> Linear(hidden, D): one event vector -> one token embedding."""

    def __init__(self, in_dim, out_dim, hidden_dim=None):
        super().__init__()
        hidden_dim = hidden_dim or in_dim
        self.norm = nn.LayerNorm(in_dim, eps=1e-6)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


def frozen_token_mean(decoder):
    """The default event encoder of the event-level form (data.Template event_modalities): an event's token ids ->
    the mean of the decoder's frozen input-embedding rows, a (D,) float32 array. It needs no download (the paper
    uses one gte-base-zh per modality; a record's own precomputed `vector` events take the same adapter path). The
    base rows never train, so each event is encoded once, with the data."""
    W = decoder.model.embed_tokens.weight.detach().float().cpu()  # (V, D)

    def encode(ids):
        return W[torch.as_tensor(ids, dtype=torch.long)].mean(0).numpy()  # (D,)

    return encode


class UserEncoder(nn.Module):
    """
    Token ids (+ event vectors) -> decoder -> pooled, optionally projected, L2-normalised embedding (B, E).
    The special tokens of the template (<USER>, block tags, <VEC>...) get trainable rows `special_embeds`
    (their ids may be >= vocab_size); the base embedding stays frozen. New trainable parts are fp32.
    """

    def __init__(self, decoder, special_token_ids, vector_dims, pooling="token", projector_dims=None,
                 standardize=False, bn_momentum=0.05):
        super().__init__()
        if pooling not in ("token", "mean"):
            raise ValueError(f"UserEncoder: pooling must be 'token' or 'mean', got {pooling!r}")
        ids = [int(i) for i in special_token_ids]
        if len(set(ids)) != len(ids) or any(i < 0 for i in ids):
            raise ValueError(f"UserEncoder: special_token_ids must be distinct non-negative ids, got {ids}")
        self.decoder, self.pooling = decoder, pooling
        self.pack = True  # forward without a packing runs its users packed into shared rows (pack.py): same numbers
        self.key_cost = pack.key_cost(decoder.config)  # how long the packed rows are worth making (pack.best_capacity)
        decoder.model.embed_tokens.weight.requires_grad_(False)  # the base rows stay as pretrained
        W = decoder.model.embed_tokens.weight.detach()
        V, D = W.shape
        self.register_buffer("special_ids", torch.tensor(ids, dtype=torch.long, device=W.device), persistent=False)
        mean_row = W.float().mean(0)
        init = torch.stack([W[i].float() if i < V else mean_row for i in ids]) if ids else W.new_zeros(0, D).float()
        self.special_embeds = nn.Parameter(init.clone())  # (n_special, D)
        self.adapters = nn.ModuleDict({m: ModalityAdapter(f, D) for m, f in vector_dims.items()}).to(W.device)
        self.projector = None
        if projector_dims is not None:
            dims = tuple(projector_dims)
            if len(dims) < 2 or dims[0] != D:
                raise ValueError(f"UserEncoder: projector_dims must start with the hidden size {D}, got {dims}")
            layers = []
            for i in range(len(dims) - 1):
                layers += [nn.Linear(dims[i], dims[i + 1]), nn.GELU()]
            self.projector = nn.Sequential(*layers[:-1]).to(W.device)  # no activation after the last Linear
        # per-tower standardisation of the pooled (projected) state before the L2 normalisation: batch statistics
        # in training, running statistics at inference (kept with the trainable state). A decoder's pooled states
        # share one dominant direction; without it the cosine's gradient vanishes and the embeddings collapse.
        # paper [pooled state before the L2 norm]: used as is (Eq. 13), standardize=False
        self.standardize = None
        if standardize:
            E = projector_dims[-1] if projector_dims is not None else D
            self.standardize = nn.ModuleDict({t: nn.BatchNorm1d(E, affine=False, momentum=bn_momentum)
                                              for t in ("user", "answer")}).to(W.device)

    def embed(self, input_ids, vectors=None, vector_pos=None):
        """(B, L) ids -> (B, L, D) input embeddings with special rows and adapter outputs spliced in."""
        emb = self.decoder.model.embed_tokens
        V = emb.weight.shape[0]
        hit = input_ids[..., None] == self.special_ids      # (B, L, n_special)
        is_special = hit.any(-1)                            # (B, L)
        bad = (input_ids < 0) | ((input_ids >= V) & ~is_special)
        if bad.any():
            raise ValueError(f"UserEncoder: token ids {input_ids[bad].unique().tolist()} are neither in the "
                             f"vocabulary [0, {V}) nor special tokens")
        x = emb(input_ids.clamp(0, V - 1))                  # ids >= V looked up as V-1, replaced just below
        if len(self.special_ids):  # (argmax over zero special tokens is undefined)
            special = self.special_embeds[hit.long().argmax(-1)].to(x.dtype)  # (B, L, D)
            x = torch.where(is_special[..., None], special, x)
        vectors, vector_pos = vectors or {}, vector_pos or {}
        if set(vectors) != set(vector_pos):
            raise ValueError(f"UserEncoder: vectors {sorted(vectors)} and vector_pos {sorted(vector_pos)} differ")
        for m, vec in vectors.items():
            if m not in self.adapters:
                raise ValueError(f"UserEncoder: no adapter for modality {m!r} (have {sorted(self.adapters)})")
            pos = vector_pos[m]  # (N, 2): (row, col) of the placeholder token
            if vec.shape[0] != pos.shape[0]:
                raise ValueError(f"UserEncoder: modality {m!r} has {vec.shape[0]} vectors but {pos.shape[0]} positions")
            # runs even when N = 0: the adapter then still takes part in the graph (zero gradient), so DDP
            # sees every trainable parameter used on every rank, whatever modalities a micro-batch holds
            out = self.adapters[m](vec.float()).to(x.dtype)  # (N, D)
            x = x.index_put((pos[:, 0], pos[:, 1]), out)      # out of place, so gradients reach the adapter
        return x

    def forward(self, input_ids, attention_mask, pool_index, mask=None, vectors=None, vector_pos=None,
                return_layer=None, tower="user", finish=True, packing=None):
        """-> (B, E) embeddings (and h_k at return_layer). finish=False stops before finish(): the trainer
        gathers the pooled states of every rank first, so the standardisation sees the global batch.
        packing: a pack.Packing of attention_mask; False: padded rows; None: packed when self.pack and no
        return_layer. Packed, the decoder runs on shared rows, the mask (a tensor or a per-layer callable of the
        unpacked batch) made block-diagonal; the result is the unpacked one up to round-off, but h_k comes back
        PACKED, (R, Lp, D): the tensor the graph used, whose .grad the caller unpacks with its Packing."""
        if packing is None:  # with return_layer, no Packing would reach the caller to unpack h_k's gradient
            packing = self.pack and return_layer is None and pack.Packing(attention_mask, key_cost=self.key_cost)
        x = self.embed(input_ids, vectors, vector_pos)  # (B, L, D)
        position_ids = None
        if packing:
            if mask is None:  # the decoder's default, causal, made explicit: a packed row needs its blocks
                mask = causal_additive(x.shape[1], torch.float32, x.device)
            mask = packing.layer_mask(mask) if callable(mask) else packing.mask(mask)
            x, position_ids = packing.pack(x), packing.position_ids  # (R, Lp, D), (R, Lp)
        out = self.decoder(inputs_embeds=x, mask=mask, return_layer=return_layer, position_ids=position_ids)  # Eq. 11
        hidden, h_k = out if return_layer is not None else (out, None)
        if packing:
            hidden = packing.unpack(hidden)  # (B, L, D)
        # pooling, projector and normalisation in fp32, whatever the decoder's dtype
        if self.pooling == "token":  # Eq. 12: u = h_{t_USER} for users; the answer side pools its EOS (App. A.3)
            e = hidden[torch.arange(hidden.shape[0], device=hidden.device), pool_index].float()  # (B, D)
        else:  # mean over real tokens
            w = attention_mask.float()[..., None]  # (B, L, 1)
            e = (hidden.float() * w).sum(1) / w.sum(1).clamp(min=1)
        if self.projector is not None:
            e = self.projector(e)
        if finish:
            e = self.finish(e, tower)
        return (e, h_k) if return_layer is not None else e

    def finish(self, e, tower="user"):
        """(B, E) pooled, projected states -> the tower's standardisation (if any) -> Eq. 13: e / ||e||."""
        if self.standardize is not None:
            e = self.standardize[tower](e)
        return F.normalize(e, dim=-1)

    def trainable_state_dict(self):
        """LoRA tensors, special rows, adapters, projector and standardisation statistics: everything training changes."""
        return {k: v for k, v in self.state_dict().items()
                if "lora_" in k or k == "special_embeds" or k.startswith(("adapters.", "projector.", "standardize."))}

    def load_trainable_state_dict(self, sd):
        copy_strict(self.trainable_state_dict(), sd, "UserEncoder.load_trainable_state_dict")

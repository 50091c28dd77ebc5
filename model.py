"""
GG-SM's decoder and user encoder (arXiv 2602.10622): a Qwen2/2.5, Qwen3, Llama 2-3.x or Mistral decoder written out by
hand and read from a Hugging Face folder (config.json + safetensors), one explicit additive attention mask, LoRA (arXiv
2106.09685; loralib / torchtune layout) and modality adapters. Names and numerics mirror transformers' modeling_*.py
(RoPE cos/sin, RMSNorm and softmax in fp32; tests/test_model.py: parity on tiny random models). Usage:
  decoder = Decoder.from_pretrained("/path/to/Qwen2.5-0.5B-Instruct", dtype=torch.bfloat16, device="cuda")
  add_lora(decoder, r=64, alpha=64)          # freezes everything but lora_A / lora_B
  hidden = decoder(input_ids, mask=my_mask)  # (B, L, D), after the final norm
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

_ARCH = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM",
         "mistral": "MistralForCausalLM"}  # the supported families and their transformers classes

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
    rope_scaling: dict | None = None  # None = plain RoPE, or the llama3 scaling (_check_rope_scaling)
    attention_bias: bool | None = None  # bias on q/k/v (and on o for llama/qwen3/mistral); None = family default
    qk_norm: bool | None = None     # Qwen3 RMSNorm on q and k per head; None = family default
    tie_word_embeddings: bool = False  # lm_head.weight is embed_tokens.weight
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    sliding_window: int | None = None  # Mistral only; a window shorter than the input is refused at run time

    def __post_init__(self):
        if self.model_type not in _ARCH:
            raise ValueError(f"ModelConfig: unknown model_type {self.model_type!r} (supported: {', '.join(_ARCH)})")
        for name, value in dict(num_key_value_heads=self.num_attention_heads, attention_bias=self.model_type == "qwen2",
                                head_dim=self.hidden_size // self.num_attention_heads,
                                qk_norm=self.model_type == "qwen3").items():  # None = the family default
            if getattr(self, name) is None:
                setattr(self, name, value)
        family, nh, nkv = self.model_type, self.num_attention_heads, self.num_key_value_heads  # first 3: hard-wired
        for bad, what in ((family == "qwen2" and not self.attention_bias, "qwen2 always has q/k/v biases"),
                          (self.qk_norm != (family == "qwen3"), f"qk_norm={self.qk_norm} does not match {family!r}"),
                          (family == "mistral" and self.attention_bias, "mistral has no attention biases"),
                          (nh % nkv != 0, f"num_attention_heads={nh} is not a multiple of num_key_value_heads={nkv}"),
                          (self.head_dim % 2 != 0, f"head_dim={self.head_dim} must be even for rotary embeddings")):
            if bad:
                raise ValueError(f"ModelConfig: {what}")
        self.rope_scaling = _check_rope_scaling(self.rope_scaling or {})
        if self.model_type != "mistral" or (self.sliding_window or 0) >= self.max_position_embeddings:
            self.sliding_window = None  # never applies

    @classmethod
    def from_hf_config(cls, path_or_dict):
        """Read a Hugging Face config.json (the file, its folder or the loaded dict); errors name the file and field."""
        c, where = path_or_dict, "config"
        if not isinstance(c, dict):
            where = os.path.join(c, "config.json") if os.path.isdir(c) else str(c)
            with open(where) as f:
                c = json.load(f)
        try:
            model_type, layer_types = c["model_type"], c.get("layer_types") or []
            rope = dict(c.get("rope_parameters") or {})  # transformers >= 5; older files: rope_theta, rope_scaling
            for bad, what in (
                    (model_type not in _ARCH, f"model_type {model_type!r} (supported: {', '.join(_ARCH)})"),
                    (c.get("hidden_act", "silu") != "silu", f"hidden_act {c.get('hidden_act')!r} (only silu)"),
                    (c.get("mlp_bias"), "mlp_bias=true"), (c.get("use_sliding_window"), "use_sliding_window=true"),
                    (any(t != "full_attention" for t in layer_types), f"layer_types {sorted(set(layer_types))}"),
                    (rope and not {"rope_theta", "rope_type", "type"} & set(rope), "per-layer rope_parameters"),
                    (c.get("partial_rotary_factor", 1.0) != 1.0, "partial_rotary_factor != 1")):
                if bad:
                    raise ValueError(f"unsupported {what}")
            fixed = dict(rope_scaling=_check_rope_scaling(c.get("rope_scaling") or rope),
                         rope_theta=float(rope.pop("rope_theta", c.get("rope_theta", 10000.0))), qk_norm=None,
                         attention_bias=True if model_type == "qwen2" else c.get("attention_bias", False),
                         sliding_window=c.get("sliding_window") if model_type == "mistral" else None)
            # model_type .. num_attention_heads are required; the other fields as written (absent: the default)
            return cls(*[c[f.name] for f in fields(cls)[:6]], **fixed,
                       **{f.name: c[f.name] for f in fields(cls)[6:] if f.name in c and f.name not in fixed})
        except KeyError as e:
            raise ValueError(f"{where}: missing required field {e}") from None
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def to_hf_dict(self):
        """A config.json that transformers (4.x and 5.x) reads as the same architecture."""
        return {"architectures": [_ARCH[self.model_type]], "model_type": self.model_type, "hidden_act": "silu",
                **{f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("model_type", "qk_norm")},
                "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta, **(self.rope_scaling or {})},
                **({"use_sliding_window": False} if self.model_type in ("qwen2", "qwen3") else {})}

def _check_rope_scaling(rs):
    """A rope_scaling dict, normalised (None = plain RoPE); only the llama3 frequency scaling is implemented."""
    rs = {k: v for k, v in rs.items() if k != "rope_theta"}
    kind = rs.pop("rope_type", rs.pop("type", "default"))
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    if kind not in ("default", "llama3"):
        raise ValueError(f"unsupported rope_scaling type {kind!r} (only 'llama3' or none)")
    if kind == "llama3" and (missing := [k for k in keys if k not in rs]):
        raise ValueError(f"llama3 rope_scaling is missing {missing}")
    return {"rope_type": "llama3", **{k: rs[k] for k in keys}} if kind == "llama3" else None

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):  # normalise in fp32, cast back, then multiply by the weight (the order HF uses)
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

def rope_inv_freq(config, device=None):
    """(head_dim/2,) fp32 inverse frequencies, with the llama3 long-context rescaling when configured."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    if (rs := config.rope_scaling) is not None:  # llama3: high frequencies kept, low ones / factor, blended between
        factor, lo, hi, old_len = (rs[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                   "original_max_position_embeddings"))
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

def apply_rope(x, cos, sin):  # x: (B, nh, L, hd); cos/sin: (L, hd) or (B, 1, L, hd), already cast to x.dtype
    return x * cos + rotate_half(x) * sin

class Attention(nn.Module):
    """Grouped-query self-attention (B batch, L length, nh query / nkv key-value heads, hd head dim) with ONE explicit
    additive mask. The mask convention of the whole project: a float tensor broadcastable to (B, nh, L, L), row i =
    query i, column j = key j, ADDED to the scores: softmax(Q K^T / sqrt(hd) + mask) V, with 0 = attend,
    torch.finfo(dtype).min = blocked, log(w) = soft weight w in (0, 1]. Padded keys are always blocked; finfo.min is
    finite (never -inf), so a row blocked everywhere becomes a uniform softmax, never NaN. ggsm.py's docstring works
    the convention through on a 4x4 example."""

    def __init__(self, config):
        super().__init__()
        D, nh, nkv, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.nh, self.nkv, self.hd = nh, nkv, hd
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(D, n * hd, bias=config.attention_bias)
                                                 for n in (nh, nkv, nkv))
        # Qwen2 puts biases on q/k/v only; Llama/Qwen3 `attention_bias` covers o_proj too
        self.o_proj = nn.Linear(nh * hd, D, bias=config.attention_bias and config.model_type != "qwen2")
        if config.qk_norm:  # Qwen3: RMSNorm over head_dim of each head, before RoPE
            self.q_norm, self.k_norm = RMSNorm(hd, config.rms_norm_eps), RMSNorm(hd, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, impl="sdpa"):
        if impl not in ("sdpa", "manual"):
            raise ValueError(f"Attention: attn_impl must be 'sdpa' or 'manual', got {impl!r}")
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.nh, self.hd)    # (B, L, nh, hd)
        k = self.k_proj(x).view(B, L, self.nkv, self.hd)   # (B, L, nkv, hd)
        v = self.v_proj(x).view(B, L, self.nkv, self.hd)   # (B, L, nkv, hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh|nkv, L, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # k, v stay (B, nkv, L, hd): _attend groups them
        dt = compute_dtype(q)
        if torch.finfo(mask.dtype).bits > torch.finfo(dt).bits:  # log-weights dt cannot hold (holds): fp32 attention
            with torch.autocast(q.device.type, enabled=False):
                y = _attend(q.float(), k.float(), v.float(), mask.float(), self.hd, impl).to(q.dtype)
        else:
            if mask.dtype != dt:  # SDPA wants the mask in its own dtype; clamp again: fp32's finfo.min is -inf in bf16
                mask = mask.to(dt).clamp(min=torch.finfo(dt).min)
            y = _attend(q, k, v, mask, self.hd, impl)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, self.nh * self.hd))  # (B, L, nh*hd) -> (B, L, D)

def causal_additive(L, dtype, device):
    """(1, 1, L, L) additive causal mask: 0 on and below the diagonal, finfo(dtype).min above."""
    return torch.full((L, L), torch.finfo(dtype).min, device=device).triu(1)[None, None]

def compute_dtype(x):  # the dtype x's matmuls run in: the autocast dtype when autocast is on there, else x.dtype
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype

# torch >= 2.5: SDPA groups the query heads over the KV heads itself (enable_gqa), without copying K and V
SDPA_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)

def _attend(q, k, v, mask, hd, impl):
    """softmax(q k^T / sqrt(hd) + mask) v; q (B, nh, L, hd), k, v (B, nkv, L, hd); query head h reads KV head
    h // (nh // nkv)."""
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
    """True when every open entry of the additive mask (above finfo(dtype).min) survives a cast to `dtype`: 0 / blocked
    masks do in bf16; GG-SM's log-weights (~1e-4 apart; bf16 holds log(0.5 + d) as one number for |d| < 1e-3) do not."""
    return (not mask.is_floating_point() or torch.finfo(mask.dtype).bits <= torch.finfo(dtype).bits
            or bool(torch.where(mask > torch.finfo(dtype).min, mask.to(dtype).to(mask.dtype) == mask, True).all()))

class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        D, I = config.hidden_size, config.intermediate_size
        self.gate_proj, self.up_proj = nn.Linear(D, I, bias=False), nn.Linear(D, I, bias=False)
        self.down_proj = nn.Linear(I, D, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU

class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm, self.self_attn = RMSNorm(config.hidden_size, config.rms_norm_eps), Attention(config)
        self.post_attention_layernorm, self.mlp = RMSNorm(config.hidden_size, config.rms_norm_eps), MLP(config)

    def forward(self, x, cos, sin, mask, impl="sdpa"):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, impl)
        return x + self.mlp(self.post_attention_layernorm(x))

class Decoder(nn.Module):
    """Embeddings -> blocks -> final RMSNorm; lm_head on demand. Parameter names = HF checkpoint keys."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
                                        layers=nn.ModuleList([Block(config) for _ in range(config.num_hidden_layers)]),
                                        norm=RMSNorm(config.hidden_size, config.rms_norm_eps)))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.attn_impl = "sdpa"              # or "manual": same numbers (tested), manual is the readable spec
        self.gradient_checkpointing = False  # recompute each block in backward (long user histories)
        for name, p in self.named_parameters():  # HF's random init (N(0, 0.02), zero biases, norms at one)
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif not name.endswith("norm.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02)
        self.tie_weights()

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids=None, mask=None, inputs_embeds=None, return_layer=None, position_ids=None):
        """input_ids (B, L) long, or inputs_embeds (B, L, D). mask: additive, broadcastable to (B, nh, L, L) (convention
        in Attention), a callable mask(layer_idx, h) on the state entering each block, or None = causal. position_ids
        (B, L): RoPE positions (a packed row restarts at 0 per user, pack.py); None = 0..L-1. -> the final normed
        hidden (B, L, D); with return_layer=k, (hidden, h_k), h_k the tensor entering block k (k = n_layers: hidden)."""
        cfg, emb, n = self.config, self.model.embed_tokens, self.config.num_hidden_layers
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Decoder.forward: pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None and input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= cfg.vocab_size):
            raise ValueError(f"Decoder.forward: token ids must lie in [0, {cfg.vocab_size}), got "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        h = emb(input_ids) if input_ids is not None else inputs_embeds.to(emb.weight.dtype)
        B, L, _ = h.shape
        if return_layer is not None and not 0 <= return_layer <= n:
            raise ValueError(f"Decoder.forward: return_layer must be in [0, {n}], got {return_layer}")
        if cfg.sliding_window is not None and L > cfg.sliding_window:
            raise ValueError(f"Decoder.forward: sequence length {L} exceeds sliding_window {cfg.sliding_window} "
                             "(sliding-window attention is not implemented)")
        if position_ids is not None and position_ids.shape != (B, L):
            raise ValueError(f"Decoder.forward: position_ids shape {tuple(position_ids.shape)} is not (B, L) {(B, L)}")
        if position_ids is not None and mask is None:
            raise ValueError("Decoder.forward: with position_ids, pass the mask (a packed row needs its block-diagonal "
                             "mask; the default causal mask would cross users)")
        pos = torch.arange(L, device=h.device, dtype=torch.float32) if position_ids is None else \
            position_ids.to(h.device, torch.float32)[:, None]  # (L,), or (B, 1, L): broadcasts over the heads
        freqs = pos[..., None] * rope_inv_freq(cfg, h.device)
        freqs = torch.cat((freqs, freqs), dim=-1)  # (L, hd), or (B, 1, L, hd) with position_ids
        cos, sin = freqs.cos().to(h.dtype), freqs.sin().to(h.dtype)  # computed in fp32, cast at the end (as HF does)
        mask = causal_additive(L, h.dtype, h.device) if mask is None else mask
        compute = compute_dtype(h)  # bf16 under bf16 autocast or with bf16 weights

        def prepare(m):  # cast to the compute dtype; clamp so a sum of blocks is finfo.min, never -inf
            if m.dim() > 4 or m.shape[-2:] != (L, L):
                raise ValueError(f"Decoder.forward: mask shape {tuple(m.shape)} not broadcastable to (B, nh, {L}, {L})")
            # paper [mask precision]: not discussed; official code: fp32 bias under bf16 autocast
            dt = compute if holds(m, compute) else torch.float32  # log-weights compute would erase: fp32 attention
            return m.to(h.device, dt).clamp(min=torch.finfo(dt).min)
        def capture(h):  # h_k: the very tensor used downstream, with a graph (for autograd.grad) even if frozen
            return h.detach().requires_grad_(True) if torch.is_grad_enabled() and not h.requires_grad else h
        static_mask, h_k = None if callable(mask) else prepare(mask), None
        for i, block in enumerate(self.model.layers):
            if i == return_layer:
                h = h_k = capture(h)
            m = prepare(mask(i, h)) if static_mask is None else static_mask
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(block, h, cos, sin, m, self.attn_impl, use_reentrant=False)
            else:
                h = block(h, cos, sin, m, self.attn_impl)
        h = self.model.norm(h)
        if return_layer == n:
            h = h_k = capture(h)
        return h if return_layer is None else (h, h_k)

    def logits(self, hidden):
        return self.lm_head(hidden)  # (B, L, V)

    @classmethod
    @torch.no_grad()
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """An HF folder (config.json, model.safetensors or shards) in eval mode, allocated once in `dtype` on `device`,
        filled tensor by tensor (no second copy, no pickle); a missing, unexpected or mis-shaped tensor is an error."""
        config = ModelConfig.from_hf_config(os.path.join(path, "config.json"))
        index = os.path.join(path, "model.safetensors.index.json")
        shards = {"model.safetensors": None}  # shard file -> the tensors the index lists in it
        if os.path.exists(index):
            with open(index) as f:
                shards = {}
                for key, shard in json.load(f)["weight_map"].items():  # tensor name -> shard file
                    shards.setdefault(shard, []).append(key)
        elif not os.path.exists(os.path.join(path, "model.safetensors")):
            raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json found")
        with torch.device("meta"):  # shapes only, no memory
            model = cls(config)
        model = model.to(dtype).to_empty(device=device)  # one allocation, in the target dtype
        model.tie_weights()  # to_empty makes new Parameters, which unties shared ones
        params = dict(model.named_parameters())  # a tied lm_head.weight appears once, as embed_tokens
        loaded, redundant_head = set(), None
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
                        raise ValueError(f"{file}: unexpected tensor {key!r} (not a {config.model_type} parameter)")
                    shape, want = tuple(f.get_slice(key).get_shape()), tuple(params[key].shape)
                    if shape != want:
                        raise ValueError(f"{file}: tensor {key!r} has shape {shape}, expected {want}")
                    params[key].copy_(f.get_tensor(key))  # casts to dtype and moves to device
                    loaded.add(key)
        if missing := sorted(set(params) - loaded):
            raise ValueError(f"{path}: checkpoint is missing tensors {missing}")
        if redundant_head is not None:
            with safe_open(redundant_head, framework="pt", device="cpu") as f:
                head = f.get_tensor("lm_head.weight")
            if head.shape != model.lm_head.weight.shape or not torch.equal(head.to(dtype), model.lm_head.weight.cpu()):
                raise ValueError(f"{redundant_head}: lm_head.weight differs from model.embed_tokens.weight but "
                                 "config.json says tie_word_embeddings=true")
        return model.eval()

    def save_pretrained(self, path):
        """Write config.json + model.safetensors, each to a temp name then os.replace (atomic)."""
        if unmerged := [n for n, m in self.named_modules() if isinstance(m, LoRALinear) and not m.merged]:
            raise ValueError(f"save_pretrained: LoRA layers {unmerged[:3]}... are not merged; call merge_lora() "
                             "first, or save lora_state_dict() separately")
        os.makedirs(path, exist_ok=True)
        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if "lora_" not in k}
        if self.config.tie_word_embeddings:
            sd.pop("lm_head.weight")  # same storage as the embedding; HF omits it too
        file = os.path.join(path, "model.safetensors")
        save_file(sd, file + ".tmp", metadata={"format": "pt"})
        os.replace(file + ".tmp", file)
        if os.path.exists(file + ".index.json"):  # from_pretrained would prefer an old sharded copy over this file
            os.remove(file + ".index.json")
        file = os.path.join(path, "config.json")
        with open(file + ".tmp", "w") as f:
            dtype = str(self.model.embed_tokens.weight.dtype).replace("torch.", "")
            json.dump({**self.config.to_hf_dict(), "torch_dtype": dtype}, f, indent=2)
        os.replace(file + ".tmp", file)

class LoRALinear(nn.Module):
    """y = x W^T + b + (alpha / r) * dropout(x) A^T B^T; W frozen (out x in), A (r x in) Kaiming-uniform, B (out x r)
    zeros: a fresh adapter changes nothing. A, B in fp32 (stable updates on a bf16 base), the branch cast back to the
    base dtype. merge() folds B A into W once (guarded by `merged`); after it the branch is skipped."""

    def __init__(self, base, r=8, alpha=16, dropout=0.0):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRALinear: rank r must be positive, got {r}")
        self.in_features, self.out_features, self.r = base.in_features, base.out_features, r
        self.weight, self.bias = base.weight, base.bias  # the very same Parameters as `base`: no copy, same keys
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=base.weight.device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=base.weight.device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear / loralib
        self.scaling, self.lora_dropout, self.merged = alpha / r, nn.Dropout(dropout), False

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        # scale at rank r, not at width out: (x A^T s) B^T = s x A^T B^T, an (..., r) multiply instead of (..., out)
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
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling}, " \
               f"merged={self.merged}"

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

def add_lora(module, targets=LORA_TARGETS, r=8, alpha=16, dropout=0.0):
    """Replace every nn.Linear child whose attribute name is in `targets` by a LoRALinear sharing its weight,
    then freeze every parameter of `module` except lora_A / lora_B. Returns the number of layers wrapped."""
    targets, n = set(targets), 0
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

@torch.no_grad()
def copy_strict(own, sd, where):
    """Copy tensors sd into the tensors own (same names); a missing, unexpected or mis-shaped one is an error."""
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(f"{where}: missing {missing}, unexpected {unexpected}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{where}: {k!r} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
    for k, v in sd.items():
        own[k].copy_(v)

def merge_lora(module):
    for m in module.modules():
        if isinstance(m, LoRALinear):
            m.merge()

class ModalityAdapter(nn.Module):
    """LayerNorm(in) -> Linear(in, hidden) -> GELU -> Linear(hidden, D): one event vector -> one token embedding."""

    def __init__(self, in_dim, out_dim, hidden_dim=None):
        super().__init__()
        self.norm, self.fc1 = nn.LayerNorm(in_dim, eps=1e-6), nn.Linear(in_dim, hidden_dim or in_dim)
        self.fc2 = nn.Linear(hidden_dim or in_dim, out_dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.norm(x))))

def frozen_token_mean(decoder):
    """The default event encoder of the event form (data.Template event_modalities): token ids -> the mean of the
    decoder's frozen embedding rows, (D,) float32, encoded once with the data (the paper: gte-base-zh per modality)."""
    W = decoder.model.embed_tokens.weight.detach().float().cpu()  # (V, D)
    return lambda ids: W[torch.as_tensor(ids, dtype=torch.long)].mean(0).numpy()  # (D,)

class UserEncoder(nn.Module):
    """Token ids (+ event vectors) -> decoder -> pooled, optionally projected, L2-normalised embedding (B, E). The
    template's special tokens (<USER>, tags, <VEC>; ids may be >= vocab_size) get trainable fp32 `special_embeds`."""

    def __init__(self, decoder, special_token_ids, vector_dims, pooling="token", projector_dims=None,
                 standardize=False, bn_momentum=0.05):
        super().__init__()
        if pooling not in ("token", "mean"):
            raise ValueError(f"UserEncoder: pooling must be 'token' or 'mean', got {pooling!r}")
        ids = [int(i) for i in special_token_ids]
        if len(set(ids)) != len(ids) or any(i < 0 for i in ids):
            raise ValueError(f"UserEncoder: special_token_ids must be distinct non-negative ids, got {ids}")
        self.decoder, self.pooling = decoder, pooling
        self.pack = True  # forward runs its users packed into shared rows (pack.py): the same numbers
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
            if len(dims := tuple(projector_dims)) < 2 or dims[0] != D:
                raise ValueError(f"UserEncoder: projector_dims must start with the hidden size {D}, got {dims}")
            layers = [m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.GELU())]
            self.projector = nn.Sequential(*layers[:-1]).to(W.device)  # no activation after the last Linear
        # per-tower standardisation before the L2 norm (batch statistics in training, running ones at inference): the
        # pooled states share one dominant direction; without it the cosine's gradient vanishes and embeddings collapse
        # paper [pooled state before the L2 norm]: used as is (Eq. 13), standardize=False
        E = projector_dims[-1] if projector_dims is not None else D
        self.standardize = nn.ModuleDict({t: nn.BatchNorm1d(E, affine=False, momentum=bn_momentum)
                                          for t in ("user", "answer")}).to(W.device) if standardize else None

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
            # F.embedding, not special_embeds[...]: indexing's backward is index_put_(accumulate=True), which on
            # 2+ CPU threads adds a row's many tokens in any order (same-seed runs differed); embedding's backward
            # adds them in token order, bit for bit the 1-thread sum
            special = F.embedding(hit.long().argmax(-1), self.special_embeds).to(x.dtype)  # (B, L, D)
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
            # runs even when N = 0 (zero gradient), so DDP sees every adapter used on every rank, whatever the batch
            out = self.adapters[m](vec.float()).to(x.dtype)  # (N, D)
            x = x.index_put((pos[:, 0], pos[:, 1]), out)      # out of place, so gradients reach the adapter
        return x

    def forward(self, input_ids, attention_mask, pool_index, mask=None, vectors=None, vector_pos=None,
                return_layer=None, tower="user", finish=True):
        """-> (B, E) embeddings; with return_layer=k also h_k (B, L, D), the state entering block k, whose .grad holds
        dL/dh_k after backward (Eq. 5). finish=False stops before finish() (the trainer standardises the global batch).
        With self.pack the users run packed into shared rows (pack.py), the mask (a tensor or a per-layer callable of
        the unpacked batch) made block-diagonal: the same numbers up to round-off, everything returned unpacked."""
        packing = self.pack and pack.Packing(attention_mask, key_cost=self.key_cost)
        x, position_ids = self.embed(input_ids, vectors, vector_pos), None  # (B, L, D)
        if packing:  # the decoder's default mask, causal, made explicit: a packed row needs its blocks
            mask = causal_additive(x.shape[1], torch.float32, x.device) if mask is None else mask
            mask = packing.layer_mask(mask) if callable(mask) else packing.mask(mask)
            x, position_ids = packing.pack(x), packing.position_ids  # (R, Lp, D), (R, Lp)
        out = self.decoder(inputs_embeds=x, mask=mask, return_layer=return_layer, position_ids=position_ids)  # Eq. 11
        hidden, h_k = out if return_layer is not None else (out, None)
        if packing:
            hidden = packing.unpack(hidden)  # (B, L, D)
            if h_k is not None:  # h_k unpacked, (R, Lp, D) -> (B, L, D); in backward a hook unpacks dL/dh_k onto .grad
                h_packed, h_k = h_k, packing.unpack(h_k.detach())
                if h_packed.requires_grad:
                    h_packed.register_hook(lambda g, out=h_k: setattr(out, "grad", packing.unpack(g)))
        elif h_k is not None and h_k.requires_grad:
            h_k.retain_grad()
        # pooling, projector and normalisation in fp32, whatever the decoder's dtype
        if self.pooling == "token":  # Eq. 12: u = h_{t_USER} for users; the answer side pools its EOS (App. A.3)
            e = hidden[torch.arange(hidden.shape[0], device=hidden.device), pool_index].float()  # (B, D)
        else:  # mean over real tokens
            w = attention_mask.float()[..., None]  # (B, L, 1)
            e = (hidden.float() * w).sum(1) / w.sum(1).clamp(min=1)
        e = self.projector(e) if self.projector is not None else e
        e = self.finish(e, tower) if finish else e
        return (e, h_k) if return_layer is not None else e

    def finish(self, e, tower="user"):
        """(B, E) pooled, projected states -> the tower's standardisation (if any) -> Eq. 13: e / ||e||."""
        return F.normalize(self.standardize[tower](e) if self.standardize is not None else e, dim=-1)

    def trainable_state_dict(self):
        """Everything training changes: LoRA, special rows, adapters, projector, standardisation statistics."""
        return {k: v for k, v in self.state_dict().items()
                if "lora_" in k or k == "special_embeds" or k.startswith(("adapters.", "projector.", "standardize."))}

    def load_trainable_state_dict(self, sd):
        copy_strict(self.trainable_state_dict(), sd, "UserEncoder.load_trainable_state_dict")

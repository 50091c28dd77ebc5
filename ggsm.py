"""
The attention masks of arXiv 2602.10622 (Table 2, Eq. 4-8, 15), as pure masks and as strategies driven by
train.train_step; GG-SM's gradient importance; the masked InfoNCE. Official code: github.com/JhCircle/Deepfind-GGSM.
Deviations from paper and official code are marked "# paper [aspect]: ..." / "# official code [aspect]: ..." where
implemented, one per row of the docs' tables (a test keeps them in step).

Mask convention (shared by model.py): an additive float tensor broadcastable to (B, heads, L, L); row = query i,
column = key j; 0 = attend, torch.finfo(dtype).min = blocked, log w = attend with soft weight w in (0, 1] (softmax(s +
log w) reweights key j by w before normalising). Padded keys are always blocked. Never -inf: a row whose keys are all
blocked (a padded query of an all-pad sequence) gets a uniform softmax instead of NaN. Worked 4x4 example, GG-SM
warm-up with future weights w = (., .6, .5, .7), one padded token at the end (attention_mask = [1, 1, 1, 0]), X = min:

    key j ->    0        1         2        3
    query 0 [   0     log .6    log .5      X ]
    query 1 [   0       0       log .5      X ]
    query 2 [   0       0         0         X ]
    query 3 [   0       0         0         X ]   <- padded query row: finite, its output is unused

The causal mask puts X where the example has log w; the bidirectional mask puts 0 there.
"""

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

NORMALIZE = ("none", "max", "mean", "zscore")
SEGMENTS = ("history", "all")  # where the hybrids relax causality (paper: the user-history segment)

# -----------------------------------------------------------------------------
# Masks as index predicates (nanochat row_idx/col_idx; modded-nanogpt `causal & window`)
def _check(where, attention_mask, *dtype):
    """attention_mask: (B, L) integer or bool, 1 = token, 0 = pad; dtype, when passed: a floating torch dtype."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError(f"{where}: attention_mask must be a (B, L) tensor of 1 = token / 0 = pad, "
                         f"got {type(attention_mask).__name__} {tuple(getattr(attention_mask, 'shape', ()))}")
    if attention_mask.is_floating_point():
        raise ValueError(f"{where}: attention_mask is {attention_mask.dtype}: a float additive mask, not a padding mask")
    if dtype and not (isinstance(dtype[0], torch.dtype) and dtype[0].is_floating_point):
        raise ValueError(f"{where}: dtype must be a floating torch dtype, got {dtype[0]}")

def _grid(L, device):
    """Query index i down the rows, key index j along the columns: row >= col is the causal predicate."""
    return torch.arange(L, device=device).view(L, 1), torch.arange(L, device=device).view(1, L)  # (L, 1) i, (1, L) j

def _to_additive(allowed, attention_mask, dtype, log_w=None):
    """allowed, log_w (None: 0) broadcastable to (B, L, L) -> (B, 1, L, L): log_w if allowed and a real key, else min."""
    # official code [padding]: no key-padding mask (real tokens attend to pads, and an all-ones mask at inference);
    # here padded keys are blocked, once, for every strategy
    allowed = allowed & attention_mask.bool()[:, None, :]  # (B, L, L); (B, 1, L): key j is a token
    work = torch.promote_types(dtype, torch.float32)  # build in >= fp32 so finfo(dtype).min is exact
    if log_w is None:
        log_w = torch.zeros((), dtype=work, device=attention_mask.device)
    blocked = torch.tensor(torch.finfo(dtype).min, dtype=work, device=attention_mask.device)
    out = torch.where(allowed, log_w.to(work), blocked)  # (B, L, L)
    # clamp: a log-weight below finfo(dtype).min (w ~ 0 in fp16) must not turn into -inf on the cast
    return out.clamp(min=torch.finfo(dtype).min).to(dtype).unsqueeze(1)  # (B, 1, L, L)

def causal_mask(attention_mask, dtype=torch.float32):
    """The paper's M^causal: M_ij = 0 if j <= i, blocked otherwise."""
    _check("causal_mask", attention_mask, dtype)
    row, col = _grid(attention_mask.shape[1], attention_mask.device)
    return _to_additive(row >= col, attention_mask, dtype)

def bidirectional_mask(attention_mask, dtype=torch.float32):
    """The paper's M^bi: M_ij = 0 for every real key."""
    _check("bidirectional_mask", attention_mask, dtype)
    L = attention_mask.shape[1]
    return _to_additive(torch.ones(L, L, dtype=torch.bool, device=attention_mask.device), attention_mask, dtype)

def window_mask(attention_mask, delta, dtype=torch.float32):
    """Scheduler-based transition (App. A.4 Bidirectional b): query i sees keys j <= i + delta ("attention up to
    position min(i + delta, L)"); 0 is causal, >= L - 1 bidirectional. delta: an integer or a (B,) integer tensor."""
    _check("window_mask", attention_mask, dtype)
    B, L = attention_mask.shape
    d = torch.as_tensor(delta, device=attention_mask.device)
    if d.is_floating_point() or d.dim() > 1 or (d.dim() == 1 and d.shape != (B,)) or (d < 0).any():
        raise ValueError(f"window_mask: delta must be an integer >= 0 or a ({B},) tensor of them, got {delta}")
    row, col = _grid(L, attention_mask.device)
    return _to_additive(col <= row + d.long().view(-1, 1, 1), attention_mask, dtype)  # (B or 1, L, L)

def soft_future_mask(attention_mask, weights, dtype=torch.float32, segment=None):
    """Eq. 4: M_ij = 0 for j <= i, log w_j for j > i; weights (L,) in (0, 1], 0 taken as finfo.tiny (blocked in effect).
    segment: None (every future key), or (B, L) bool (history_segment): only future keys with both ends in it."""
    _check("soft_future_mask", attention_mask, dtype)
    L = attention_mask.shape[1]
    if not isinstance(weights, torch.Tensor) or weights.shape != (L,):
        raise ValueError(f"soft_future_mask: weights must be a ({L},) tensor, got {getattr(weights, 'shape', type(weights))}")
    row, col = _grid(L, attention_mask.device)
    w = weights.to(device=attention_mask.device, dtype=torch.promote_types(weights.dtype, torch.float32))
    log_w = torch.log(w.clamp(min=torch.finfo(torch.float32).tiny))  # (L,) never log(0)
    # paper [soft mask]: Eq. 4, w_ij depends on j only; official code: one [B,1,L,L] bias for every layer and head, as here
    log_w = torch.where(col > row, log_w.view(1, L), torch.zeros((), dtype=w.dtype, device=w.device))  # Eq. 4, (L, L)
    return _to_additive(_relaxed(row, col, attention_mask, segment, "soft_future_mask"), attention_mask, dtype, log_w)

def history_segment(history, L):
    """history: (B, 2) [start, end) of each row's user-history segment (data.Side.history) -> (B, L) bool."""
    if not isinstance(history, torch.Tensor) or history.dim() != 2 or history.shape[1] != 2:
        raise ValueError(f"history_segment: history must be a (B, 2) tensor, got {getattr(history, 'shape', type(history))}")
    pos = torch.arange(L, device=history.device).view(1, L)  # (1, L)
    return (pos >= history[:, :1]) & (pos < history[:, 1:])  # (B, L)

def _relaxed(row, col, attention_mask, segment, where):
    """The (i, j) a soft mask may open: all, or with a segment the past and the future pairs inside the segment."""
    if segment is None:
        return torch.ones_like(row >= col)  # (L, L)
    if segment.shape != attention_mask.shape:
        raise ValueError(f"{where}: segment {tuple(segment.shape)} is not (B, L) like attention_mask's")
    seg = segment.to(attention_mask.device).bool()
    return (row >= col) | (seg[:, :, None] & seg[:, None, :])  # (B, L, L)

def global_query_mask(attention_mask, dtype=torch.float32):
    """hybrid_gq (App. A.4 Hybrid c): row 0, the learnable <GLOBAL> token, sees every real key; the other rows stay
    causal but see column 0, so from the second block on future information reaches them only through <GLOBAL>."""
    _check("global_query_mask", attention_mask, dtype)
    row, col = _grid(attention_mask.shape[1], attention_mask.device)
    # paper [hybrid_gq]: the global token attends bidirectionally to the history tokens, its attention weights supervise
    # block-level integration; here its row sees every real key and there is no supervision term
    return _to_additive((row >= col) | (row == 0), attention_mask, dtype)

# -----------------------------------------------------------------------------
# The trained bias of hybrid_mlp, and GG-SM's gradient importance (Eq. 5)
class HybridMLPBias(nn.Module):
    """hybrid_mlp (App. A.4 Hybrid b: "a lightweight MLP predicts attention bias for j > i ... based on h_i"): per
    decoder layer l, bias_ij = logsigmoid(mlp_l(h_i)) for j > i, h the input of block l. LayerNorm first: a pretrained
    residual stream changes scale by orders of magnitude across layers. Every future key starts at init_weight (last
    weight 0): nearly causal, as the decoder was trained, while d logsigmoid/dx = 0.98 keeps the opening gradient."""

    def __init__(self, n_layers, hidden_size, mlp_hidden=64, init_weight=0.02):
        super().__init__()
        if not (0.0 < init_weight < 1.0):
            raise ValueError(f"HybridMLPBias: init_weight must be in (0, 1), got {init_weight}")
        self.n_layers = n_layers
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, 1))
            for _ in range(n_layers))
        for mlp in self.mlps:
            nn.init.zeros_(mlp[-1].weight)
            nn.init.constant_(mlp[-1].bias, math.log(init_weight / (1.0 - init_weight)))  # sigmoid(b) = init_weight

    def forward(self, layer_idx, h, attention_mask, dtype=None, segment=None):
        """-> (B, 1, L, L) additive mask; segment: as in soft_future_mask."""
        _check("HybridMLPBias", attention_mask)
        if not 0 <= layer_idx < self.n_layers:
            raise ValueError(f"HybridMLPBias: layer_idx {layer_idx} outside [0, {self.n_layers})")
        if h.dim() != 3 or h.shape[:2] != attention_mask.shape:
            raise ValueError(f"HybridMLPBias: h {tuple(h.shape)} is not (B, L, D) like attention_mask's (B, L)")
        mlp = self.mlps[layer_idx]
        x = mlp(h.to(mlp[-1].weight.dtype)).squeeze(-1).float()  # (B, L): one logit per query row i
        # paper [hybrid_mlp]: an MLP on h_i predicts the bias for j > i; here one small MLP per layer, bias logsigmoid(.)
        log_w = F.logsigmoid(x)  # (B, L) log of a weight in (0, 1)
        row, col = _grid(h.shape[1], h.device)
        log_w = torch.where(col > row, log_w[:, :, None], torch.zeros((), device=h.device))  # (B, L, L): j > i only
        allowed = _relaxed(row, col, attention_mask, segment, "HybridMLPBias")
        return _to_additive(allowed, attention_mask, dtype or h.dtype, log_w)

class GradientImportance:
    """I_j = mean of ||dL/dh_j||_2 over the rows with a token at j in one optimizer step's micro-steps (a per-row
    gradient of a batch-mean loss carries a 1/N; Eq. 5 is applied to it as written). end_step all-reduces, so every
    rank holds the same I, then I <- ema I + (1 - ema) I_step (I_step at a first sighting); unseen positions get the
    seen mean. normalize (off: raw norms are O(1e-4), so sigma ~ 0.5) rescales the seen positions before sigma."""

    def __init__(self, ema=0.0, normalize="none"):
        # official code [EMA]: an ema_decay field whose effective value is 0.0 (the argparse 0.99 is never used); default 0.0
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"GradientImportance: ema must be in [0, 1), got {ema}")
        if normalize not in NORMALIZE:
            raise ValueError(f"GradientImportance: normalize must be one of {NORMALIZE}, got {normalize!r}")
        self.ema, self.normalize = ema, normalize
        # official code [step 0]: sigma(0) = 0.5 on every future key before any gradient; the same here (I = 0)
        self.importance = torch.zeros(0, dtype=torch.float64)  # (n_seen,) I_j, positions 0..n_seen-1
        self.updates = 0  # optimizer steps that contributed
        self._sum = self._count = None  # (L,) this step's sum of ||g_{b,j}|| over rows, and rows with a token at j

    def accumulate(self, grad, attention_mask):
        """grad: (B, L, D) = dL/dh of the step's loss, one micro-step of the user tower."""
        _check("GradientImportance.accumulate", attention_mask)
        if grad is None:
            raise ValueError("GradientImportance.accumulate: grad is None; call h.retain_grad() before backward")
        if grad.dim() != 3 or grad.shape[:2] != attention_mask.shape:
            raise ValueError(f"GradientImportance.accumulate: grad {tuple(grad.shape)} is not (B, L, D) as attention_mask")
        real = attention_mask.to(grad.device).bool()
        norms = grad.detach().double().norm(dim=-1)  # (B, L) ||dL/dh_{b,j}||_2 over the hidden dim
        # official code [batch aggregation]: a sum over the micro-batch; here a mean over the rows with a token at j
        s, c = (norms * real).sum(0), real.sum(0).double()  # (L,) each, padded positions ignored
        self._sum, self._count = (s, c) if self._sum is None else (_add_padded(self._sum, s), _add_padded(self._count, c))

    def end_step(self):
        """After the optimizer step, on every rank (a collective under torch.distributed)."""
        s, c = self._sum, self._count
        self._sum = self._count = None
        if dist.is_available() and dist.is_initialized():
            # ranks may have seen different lengths: agree on the longest, pad, then sum norms and counts
            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
            n = torch.tensor([0 if s is None else s.numel()], dtype=torch.int64, device=dev)
            dist.all_reduce(n, op=dist.ReduceOp.MAX)
            buf = torch.zeros(2, int(n.item()), dtype=torch.float64, device=dev)  # (2, L) sums; counts
            if s is not None:
                buf[0, :s.numel()], buf[1, :c.numel()] = s.to(dev), c.to(dev)
            # official code [multi-GPU]: the importance is a DDP buffer, rank 0's copy wins; here sums and counts of every rank
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            s, c = buf[0], buf[1]
        if s is None or s.numel() == 0:
            return
        s, c = s.cpu(), c.cpu()
        seen = c > 0
        n_new = int(seen.sum())  # right padding: a row with a token at j has tokens at 0..j, so seen is a prefix
        if not seen[:n_new].all():
            raise ValueError("GradientImportance.end_step: tokens are not a prefix; padding must be on the right")
        step_imp = s[:n_new] / c[:n_new]  # (n_new,) mean over real rows
        old, k = self.importance, min(self.importance.numel(), n_new)
        # EMA where a previous value exists, the step's value at a first sighting, the old value where unseen
        self.importance = torch.cat([self.ema * old[:k] + (1.0 - self.ema) * step_imp[:k], step_imp[k:], old[n_new:]])
        self.updates += 1

    def normalized(self):
        """The importance of the seen positions after the optional normalisation, (n_seen,) float64."""
        return _normalize(self.importance, self.normalize)

    def weights(self, L, device=None):
        """Eq. 5 warm-up branch: w_j = sigma(I_j) for j < L, with the fallback beyond n_seen. (L,) float32."""
        return torch.sigmoid(_extend(self.normalized(), L)).float().to(device)

    def state_dict(self):  # at a step boundary: no step sums; float64, an exact round trip
        return {"importance": self.importance.clone(), "updates": int(self.updates)}

    def load_state_dict(self, state):
        _check_keys(state, ("importance", "updates"), "GradientImportance.load_state_dict")
        imp = state["importance"]
        if not isinstance(imp, torch.Tensor) or imp.dim() != 1:
            raise ValueError(f"GradientImportance.load_state_dict: 'importance' must be a 1-D tensor, got {imp!r}")
        self.importance, self.updates = imp.detach().double().cpu().clone(), int(state["updates"])
        self._sum = self._count = None

def _add_padded(a, b):
    """a + b for 1-D tensors of possibly different lengths (missing positions count as 0)."""
    a, b = (b, a) if a.numel() < b.numel() else (a, b)
    return torch.cat([a[:b.numel()] + b, a[b.numel():]])

# paper [normalisation]: none, sigma(||g||); how='none' (default) is the paper's, the others are options
def _normalize(x, how):
    if x.numel() == 0 or how == "none":
        return x
    if how in ("max", "mean"):
        return x / getattr(x, how)().clamp(min=1e-30)  # x.max() or x.mean()
    if how == "zscore":
        return (x - x.mean()) / x.std(unbiased=False).clamp(min=1e-30)
    raise ValueError(f"normalize must be one of {NORMALIZE}, got {how!r}")

# official code [unseen lengths]: every sequence padded to 512, so no position is unseen; here the seen mean
def _extend(x, L):
    """x (n,) -> (L,): truncate, or pad positions >= n with the mean of x (0 if x is empty)."""
    if L <= x.numel():
        return x[:L]
    fill = x.mean() if x.numel() else torch.zeros((), dtype=x.dtype)
    return torch.cat([x, fill.expand(L - x.numel())])

def _check_keys(state, expected, where):
    missing, unexpected = [k for k in expected if k not in state], [k for k in state if k not in expected]
    if missing or unexpected:
        raise KeyError(f"{where}: missing keys {missing}, unexpected keys {unexpected}")

# -----------------------------------------------------------------------------
# Strategies: which mask each tower gets at which optimizer step
def mean_future_weight(mask, attention_mask):
    """Figure 1's "Soft Mask Average Weight" of an additive mask (B, 1|H, L, L) as used: the mean of exp(M_ij) over
    the pairs j > i of real tokens, the batch and the heads (0 = causal, 1 = bidirectional; nan without a pair)."""
    real = attention_mask.bool()
    row, col = _grid(real.shape[1], real.device)
    pairs = (col > row) & real[:, :, None] & real[:, None, :]  # (B, L, L): future key j of query i, both real
    n = int(pairs.sum())
    if n == 0:
        return float("nan")
    w = mask.detach().double().exp().mean(1)  # (B, L, L) weight exp(M_ij); finfo.min -> 0
    return float((w * pairs).sum() / n)

class Strategy:
    """An attention-mask strategy: each tower's mask at 0-based optimizer step `step`. The base keeps the run's length,
    the model's shape and any other option (self.options). A subclass implements train_mask -> a (B, 1, L, L) additive
    mask, or a callable mask(layer_idx, h) evaluated at the input of each block, and overrides the defaults below as
    needed. tower: "user" or "answer"; history: the user side's (B, 2) [start, end) of its user-history segment
    (data.Side.history). end_step runs on every rank: what a strategy learns from gradients it all-reduces there."""

    global_token = False  # a <GLOBAL> token the template puts first (hybrid_gq)

    def __init__(self, total_steps, warmup_steps=0, n_layers=None, hidden_size=None, n_heads=None, **options):
        for name, v, least in (("total_steps", total_steps, 1), ("warmup_steps", warmup_steps, 0)):
            if int(v) != v or v < least:
                raise ValueError(f"{type(self).__name__}: {name} must be an integer >= {least}, got {v}")
        # official code [schedule units]: T_warm, T_total count micro-batches (fixed 200 / 2000); here optimizer steps
        self.total_steps, self.warmup_steps = int(total_steps), int(warmup_steps)
        self.n_layers, self.hidden_size, self.n_heads, self.options = n_layers, hidden_size, n_heads, options
        self.capture_layer = self.module = None  # GG-SM's dL/dh block; hybrid_mlp's nn.Module, trained with the encoder

    def train_mask(self, step, attention_mask, dtype=torch.float32, tower="user", history=None):
        raise NotImplementedError(f"{type(self).__name__}.train_mask")

    def inference_mask(self, attention_mask, dtype=torch.float32, tower="user", history=None):  # export and probe
        return self.train_mask(self.total_steps, attention_mask, dtype, tower, history)

    # the defaults: a word for the logs, no gradients, no end-of-step work, no state (a checkpoint's tensors and ints)
    def phase(self, step): return "fixed"
    def wants_gradients(self, step): return False
    def accumulate(self, grad, attention_mask): raise RuntimeError(f"{type(self).__name__}.accumulate: no gradients")
    def end_step(self, step): pass
    def state_dict(self): return {}
    def load_state_dict(self, state): _check_keys(state, [], f"{type(self).__name__}.load_state_dict")

def _check_segment(segment, where):
    if segment not in SEGMENTS:
        raise ValueError(f"{where}: segment must be one of {SEGMENTS}, got {segment!r}")
    return segment

def _segment_of(strategy, attention_mask, tower, history):
    """-> the (B, L) bool positions a hybrid relaxes: None = all (segment="all"), none on the answer tower."""
    where = f"{type(strategy).__name__}.train_mask"
    _check(where, attention_mask)
    if tower not in ("user", "answer"):
        raise ValueError(f"{where}: tower must be 'user' or 'answer', got {tower!r}")
    # paper [hybrid segment]: a hybrid "relaxes causality over the user-history segment"; segment='all' opens every
    # future key of both towers instead (this project's former behaviour)
    if strategy.segment == "all":
        return None
    if tower == "answer":
        return torch.zeros_like(attention_mask, dtype=torch.bool)
    if history is None:
        raise ValueError(f"{where}: segment='history' needs history= (data.Side.history) on the user tower")
    return history_segment(history.to(attention_mask.device), attention_mask.shape[1])

class Causal(Strategy):
    """M^causal at training and at inference: the mask of pretraining."""
    def train_mask(self, step, attention_mask, dtype=torch.float32, tower="user", history=None):
        return causal_mask(attention_mask, dtype)

class Bidirectional(Strategy):
    """"Direct" (App. A.4 Bidirectional a): M^bi from step 0."""
    def train_mask(self, step, attention_mask, dtype=torch.float32, tower="user", history=None):
        return bidirectional_mask(attention_mask, dtype)

class Scheduler(Strategy):
    """App. A.4 Bidirectional b: window_mask with delta(t) = floor(L t / T_total), L each row's own length (so a
    user's window does not depend on its batch-mates); causal at t = 0, bidirectional from T_total on."""

    def window_delta(self, step, L):  # L: an int or a (B,) integer tensor of lengths
        return (L * min(step, self.total_steps)) // self.total_steps  # integer floor, exact

    def phase(self, step):
        return "window" if step < self.total_steps else "bidirectional"

    def train_mask(self, step, attention_mask, dtype=torch.float32, tower="user", history=None):
        if step >= self.total_steps:
            return bidirectional_mask(attention_mask, dtype)
        _check("Scheduler.train_mask", attention_mask)
        lengths = attention_mask.long().sum(1)  # (B,) real tokens; paper: "min(i + delta(e), L)", L the user's length
        # paper [scheduler baseline]: Delta(e) linear or cosine, "up to position min(i + Delta(e), L)"; linear only here
        return window_mask(attention_mask, self.window_delta(step, lengths), dtype)

class GGSM(Strategy):
    """Gradient-Guided Soft Masking (Eq. 4, 5, 15); both towers get the same column weights, each at its own length.
      t < T_warm: w_j = sigma(I_j), I from the steps before t (none at t = 0: w = 0.5); end_step(T_warm - 1) freezes
          w_frozen = sigma(I), that step's gradients included;
      T_warm <= t < T_total: w = (1 - a_t) w_frozen + a_t, a_t = (t - T_warm) / (T_total - T_warm);
      from T_total on, and at inference: bidirectional.
    capture_layer, where dL/dh is read: "last-block" (the input of the last block), "final" (= n_layers), a block index."""

    ramps = True  # ramp to bidirectional after warm-up (hybrid_mask keeps the frozen mask)

    def __init__(self, total_steps, warmup_steps=0, n_layers=None, capture_layer="last-block", ema=0.0,
                 normalize="none", **settings):
        super().__init__(total_steps, warmup_steps, n_layers=n_layers, **settings)
        where = type(self).__name__
        if self.ramps and self.warmup_steps >= self.total_steps:
            raise ValueError(f"{where}: warmup_steps ({warmup_steps}) must be < total_steps ({total_steps}) to ramp")
        if capture_layer in ("last-block", "final"):
            if n_layers is None:
                raise ValueError(f"{where}: pass n_layers (or a block index as capture_layer) to place capture_layer")
            # paper [gradient source]: h_j = "Last Hidden" (capture_layer='final'); official code: hidden_states[-1] after the
            # final norm; default here: the input of the last block, where the gradient differs by position
            capture_layer = n_layers - 1 if capture_layer == "last-block" else n_layers
        if not str(capture_layer).isdigit() or (n_layers is not None and int(capture_layer) > n_layers):
            raise ValueError(f"{where}: capture_layer: 'last-block', 'final' or 0..{n_layers}, not {capture_layer!r}")
        self.capture_layer = int(capture_layer)
        self.importance = GradientImportance(ema=ema, normalize=normalize)
        self.frozen = self._unfrozen()

    def _unfrozen(self):  # before any freeze: none, or without a warm-up the empty importance (w = sigma(0) = 0.5)
        return torch.zeros(0, dtype=torch.float64) if self.warmup_steps == 0 else None

    def phase(self, step):
        if step < self.warmup_steps:
            return "warmup"
        if not self.ramps:
            return "frozen"
        return "ramp" if step < self.total_steps else "bidirectional"

    def future_weights(self, step, L, device=None):
        """w_j for j < L at step t (Eq. 5 / Eq. 15), (L,) float32."""
        phase = self.phase(step)
        if phase == "warmup":
            return self.importance.weights(L, device)  # Eq. 5, t < T_warm
        if phase == "bidirectional":
            return torch.ones(L, device=device)
        if self.frozen is None:
            raise RuntimeError(f"{type(self).__name__}: step {step} is past warm-up but no weights were frozen; "
                               "call end_step(step) after every optimizer step, or load_state_dict from a checkpoint")
        w_frozen = torch.sigmoid(_extend(self.frozen, L)).float().to(device)  # sigma(||grad L_warm||)
        if phase == "frozen":
            return w_frozen
        alpha = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)  # alpha_t in [0, 1)
        # paper [ramp (Eq. 5, 15)]: w = (1 - a_t) w_frozen + a_t; official code: the same, with a log(alpha) fallback that
        # fails at alpha = 0 when nothing was frozen (here T_warm = 0 freezes sigma(0) = 0.5)
        return (1.0 - alpha) * w_frozen + alpha  # Eq. 5 second branch = Eq. 15

    def train_mask(self, step, attention_mask, dtype=torch.float32, tower="user", history=None):
        if self.phase(step) == "bidirectional":  # from T_total on, and so at inference (Strategy.inference_mask)
            # paper [inference]: fully bidirectional; official code: an all-ones additive mask (pads attended)
            return bidirectional_mask(attention_mask, dtype)  # exactly 0 bias, no log(1) round-off
        _check(f"{type(self).__name__}.train_mask", attention_mask)
        w = self.future_weights(step, attention_mask.shape[1], attention_mask.device)
        # official code [answer tower]: the same soft bias on both towers; here the same column weights at each tower's
        # own length (tower is not consulted)
        return soft_future_mask(attention_mask, w, dtype)  # Eq. 4

    def wants_gradients(self, step):
        return step < self.warmup_steps

    def accumulate(self, grad, attention_mask):
        """Each warm-up micro-step, after backward: grad = dL/dh of the user tower at capture_layer, (B, L, D)."""
        self.importance.accumulate(grad, attention_mask)

    def end_step(self, step):
        """All-reduce + EMA of the importance (a collective: every rank calls it); freeze at T_warm - 1."""
        if step < self.warmup_steps:
            self.importance.end_step()
            if step == self.warmup_steps - 1:
                # paper [freezing]: frozen at the end of warm-up, L_warm the loss of t = T_warm - 1 (its gradients included)
                self.frozen = self.importance.normalized().clone()

    def state_dict(self):
        sd = {"importance": self.importance.importance.clone(), "importance_updates": int(self.importance.updates)}
        return sd if self.frozen is None else {**sd, "frozen_importance": self.frozen.clone()}

    def load_state_dict(self, state):
        expected = ["importance", "importance_updates"] + (["frozen_importance"] if "frozen_importance" in state else [])
        _check_keys(state, expected, f"{type(self).__name__}.load_state_dict")
        self.importance.load_state_dict({"importance": state["importance"], "updates": state["importance_updates"]})
        fz = state.get("frozen_importance")
        self.frozen = fz.detach().double().cpu().clone() if fz is not None else self._unfrozen()

class HybridMask(GGSM):
    """App. A.4 Hybrid a: GG-SM's warm-up mask, frozen at T_warm - 1, never ramped, kept at inference (the paper does
    not say; before the freeze: the latest warm-up weights). segment="history" (default): future keys open only with
    query and key both in the user-history segment (so the answer tower stays causal); "all": every future key."""

    ramps = False

    def __init__(self, total_steps, warmup_steps=0, n_layers=None, segment="history", **settings):
        super().__init__(total_steps, warmup_steps, n_layers=n_layers, **settings)
        # paper [hybrid_mask]: importance from "a frozen left-tower encoder"; here from the encoder being trained
        self.segment = _check_segment(segment, "HybridMask")

    def train_mask(self, step, attention_mask, dtype=torch.float32, tower="user", history=None):
        seg = _segment_of(self, attention_mask, tower, history)
        if seg is not None and not seg.any():
            return causal_mask(attention_mask, dtype)  # nothing to relax (the answer tower): exactly causal
        w = self.future_weights(step, attention_mask.shape[1], attention_mask.device)
        return soft_future_mask(attention_mask, w, dtype, segment=seg)  # Eq. 4 inside the segment

    def inference_mask(self, attention_mask, dtype=torch.float32, tower="user", history=None):
        return self.train_mask(self.warmup_steps if self.frozen is not None else 0, attention_mask, dtype, tower, history)

class GGSMZero(GGSM):
    """Not in the paper, a control: GG-SM with zero importance (warm-up weights sigma(0) = 0.5, frozen as such, then
    the same ramp); what GG-SM gains over it is what the gradient guidance adds."""

    def wants_gradients(self, step):
        return False

    def end_step(self, step):
        if step == self.warmup_steps - 1:
            self.frozen = torch.zeros(0, dtype=torch.float64)  # the empty importance: sigma(0) = 0.5 everywhere

class HybridMLP(Strategy):
    """App. A.4 Hybrid b: HybridMLPBias, trained with the encoder, as a callable mask(layer_idx, h) the decoder
    evaluates at the input of each block. segment: as in HybridMask."""

    def __init__(self, total_steps, warmup_steps=0, n_layers=None, hidden_size=None, segment="history", **settings):
        super().__init__(total_steps, warmup_steps, n_layers=n_layers, hidden_size=hidden_size, **settings)
        if n_layers is None or hidden_size is None:
            raise ValueError("HybridMLP: n_layers and hidden_size are required")
        self.segment = _check_segment(segment, "HybridMLP")
        self.module = HybridMLPBias(n_layers, hidden_size)

    def phase(self, step):
        return "mlp"

    def train_mask(self, step, attention_mask, dtype=torch.float32, tower="user", history=None):
        seg = _segment_of(self, attention_mask, tower, history)
        if seg is not None and not seg.any():
            return causal_mask(attention_mask, dtype)  # nothing to relax (the answer tower): exactly causal
        module = self.module
        return lambda layer_idx, h: module(layer_idx, h, attention_mask, dtype, seg)  # h: block input (B, L, D)

    def state_dict(self):
        return {"mlp." + k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state):
        _check_keys(state, list(self.state_dict()), "HybridMLP.load_state_dict")
        self.module.load_state_dict({k[len("mlp."):]: v for k, v in state.items()})

class HybridGQ(Strategy):
    """App. A.4 Hybrid c: global_query_mask on the user tower, whose template puts <GLOBAL> first; the answers carry
    no <GLOBAL>, so the answer tower stays causal. <GLOBAL> is trained by the InfoNCE loss alone."""

    global_token = True

    def phase(self, step):
        return "global_query"

    def train_mask(self, step, attention_mask, dtype=torch.float32, tower="user", history=None):
        if tower not in ("user", "answer"):
            raise ValueError(f"HybridGQ.train_mask: tower must be 'user' or 'answer', got {tower!r}")
        return global_query_mask(attention_mask, dtype) if tower == "user" else causal_mask(attention_mask, dtype)

# Table 2's order, and ggsm_zero. The only list of strategies: train.py --mask, probe.py, the tools and tests read it.
STRATEGIES = {"causal": Causal, "hybrid_mask": HybridMask, "hybrid_mlp": HybridMLP, "hybrid_gq": HybridGQ,
              "bidirectional": Bidirectional, "scheduler": Scheduler, "ggsm": GGSM, "ggsm_zero": GGSMZero}

# -----------------------------------------------------------------------------
# Masked InfoNCE (Eq. 6-8)
def info_nce(user, answer, tau, margin, same_side=True):
    """Eq. 6: L = -(1/N) sum_i log(e^{s(u_i, a_i)/tau} / Z_i)
    Eq. 7: Z_i = e^{s(u_i,a_i)/tau} + sum_{j!=i} m e^{s(u_i,a_j)/tau}
                 [+ sum_{j!=i} m e^{s(u_i,u_j)/tau} + sum_{j!=i} m e^{s(a_i,a_j)/tau}]   (same_side)
    Eq. 8: m = 0 if that term's similarity > s(u_i, a_i) + margin, else 1: each term against the same (detached)
           positive, as in Qwen3-Embedding; a near-duplicate counts as a false negative and is dropped.
    user, answer: (N, E), row i of each a positive pair (may be gathered across ranks); s: the cosine; in >= fp32."""
    if user.dim() != 2 or user.shape != answer.shape or user.shape[0] < 1:
        raise ValueError(f"info_nce: user, answer must be (N, E), N >= 1, got {tuple(user.shape)}, {tuple(answer.shape)}")
    # official code [τ, margin]: tau = 0.02, margin = 0.1; the paper gives neither (train.py's --tau, --margin)
    if not tau > 0:
        raise ValueError(f"info_nce: tau must be > 0, got {tau}")
    work = torch.promote_types(user.dtype, torch.float32)
    u, a = F.normalize(user.to(work), dim=-1), F.normalize(answer.to(work), dim=-1)
    s_ua = u @ a.T  # (N, N) s(u_i, a_j)
    pos = s_ua.diagonal()  # (N,) s(u_i, a_i)
    threshold = (pos + margin).detach()[:, None]  # (N, 1) Eq. 8
    off_diag = ~torch.eye(u.shape[0], dtype=torch.bool, device=u.device)
    def negatives(s):  # (N, N) -> logits with m_ij = 0 terms set to -inf
        return (s / tau).masked_fill(~_kept_negatives(s, threshold, off_diag), float("-inf"))
    terms = [pos[:, None] / tau, negatives(s_ua)]  # Eq. 7 first two terms
    if same_side:
        # paper [loss negatives]: Eq. 7 adds u-u and a-a; official code: u->a only (same_side=False)
        terms += [negatives(u @ u.T), negatives(a @ a.T)]  # Eq. 7 same-side terms
    logits = torch.cat(terms, dim=1)  # (N, 1 + N) or (N, 1 + 3N); column 0, the positive, is always finite
    return (torch.logsumexp(logits, dim=1) - pos / tau).mean()  # Eq. 6

def _kept_negatives(s, threshold, off_diag):
    """Eq. 8: m_ij = 1 for j != i unless the term's similarity exceeds the positive + margin."""
    # paper [false-negative mask]: Eq. 8, every term against the positive + margin; official code: u->a terms only
    return off_diag & (s <= threshold)

def batch_diagnostics(user, answer, margin):
    """Collapse diagnostics of positive pairs (N, E), floats: alignment (mean positive cosine); cos_uu, cos_aa (mean
    off-diagonal cosine, 1.0: one direction); uniformity (log mean_{i != j} exp(-2 ||u_i - u_j||^2), Wang & Isola 2020:
    -4 spread out, 0 collapsed); effective_rank (exp entropy of the users' normalised singular values, Roy & Vetterli
    2007: 1 to min(N, E)); drop_ua, drop_uu, drop_aa (the share of negatives Eq. 8 drops)."""
    with torch.no_grad():
        u, a = F.normalize(user.double(), dim=-1), F.normalize(answer.double(), dim=-1)
        off_diag = ~torch.eye(u.shape[0], dtype=torch.bool, device=u.device)
        s_ua, s_uu, s_aa = u @ a.T, u @ u.T, a @ a.T
        pos, n_off = s_ua.diagonal(), int(off_diag.sum())
        threshold = (pos + margin)[:, None]
        sv = torch.linalg.svdvals(u)
        p = sv[sv > 0] / sv.sum()
        out = {"alignment": float(pos.mean()), "effective_rank": float(torch.exp(-(p * p.log()).sum()))}
        for name, s in (("ua", s_ua), ("uu", s_uu), ("aa", s_aa)):
            out["drop_" + name] = 1.0 - float(_kept_negatives(s, threshold, off_diag).sum()) / n_off if n_off else float("nan")
        out["cos_uu"] = float(s_uu[off_diag].mean()) if n_off else float("nan")
        out["cos_aa"] = float(s_aa[off_diag].mean()) if n_off else float("nan")
        # ||u_i - u_j||^2 = 2 - 2 cos for unit vectors
        out["uniformity"] = float(torch.exp(-2 * (2 - 2 * s_uu[off_diag])).mean().log()) if n_off else float("nan")
    return out

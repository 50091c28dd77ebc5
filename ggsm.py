"""
Attention-mask strategies for user-representation learning with a decoder-only LLM, Gradient-Guided
Soft Masking (GG-SM) and the masked InfoNCE loss.

Reference: "How Do Decoder-Only LLMs Perceive Users? Rethinking Attention Masking for User
Representation Learning", arXiv 2602.10622 (Sec. 4 Eq. 4-8, App. A.4 Eq. 15, Table 2). The official
code is github.com/JhCircle/Deepfind-GGSM; every row of the README's deviations tables is marked where it
is implemented by a comment "# paper [aspect]: ..." or "# official code [aspect]: ..." (most of them here;
the rest in model.py, train.py, probe.py), and a test keeps the two in step.

What is here (every strategy of the paper's Table 2):
    causal_mask, bidirectional_mask, window_mask, soft_future_mask, global_query_mask   pure functions
    HybridMLPBias        hybrid_mlp: a small per-layer MLP predicting the future bias of each query row
    GradientImportance   per-position ||dL/dh_j|| collected over micro-steps, all-reduced across ranks
    Strategy             the base class of a mask strategy; STRATEGIES: name -> class, the only list:
                         causal | hybrid_mask | hybrid_mlp | hybrid_gq | bidirectional | scheduler | ggsm,
                         and ggsm_zero (GG-SM with zero importance, a control)
    mean_future_weight   the logged "Soft Mask Average Weight" of a mask as used
    info_nce             the masked InfoNCE of Eq. 6-8 with same-side negatives

The mask convention (shared by model.py): a mask is an additive float tensor broadcastable to
(B, heads, L, L); row = query i, column = key j; 0 = attend, torch.finfo(dtype).min = blocked, log w
= attend with soft weight w in (0, 1] (softmax(s + log w) reweights key j by w before normalising).
Padded keys are always blocked. Never -inf: a row whose keys are all blocked (a padded query row of an
all-pad sequence) gets a uniform softmax instead of NaN. Worked 4x4 example, GG-SM warm-up with
future weights w = (., .6, .5, .7) and one padded token at the end (attention_mask = [1, 1, 1, 0]),
X = finfo.min:

    key j ->    0        1         2        3
    query 0 [   0     log .6    log .5      X ]
    query 1 [   0       0       log .5      X ]
    query 2 [   0       0         0         X ]
    query 3 [   0       0         0         X ]   <- padded query row: finite, its output is unused

The causal mask puts X where the example has log w; the bidirectional mask puts 0 there.

How a strategy is driven (train.train_step is one iteration of the outer loop):

    strategy = STRATEGIES["ggsm"](total_steps=S, warmup_steps=W, n_layers=..., hidden_size=..., n_heads=...)
    for step in range(S):
        capture = strategy.capture_layer if strategy.wants_gradients(step) else None
        for batch in micro_batches:                    # n micro-steps of one optimizer step
            mask_u = strategy.train_mask(step, batch.user.attention_mask, dtype)
            mask_a = strategy.train_mask(step, batch.answer.attention_mask, dtype, tower="answer")
            u, a, h = towers(batch, mask_u, mask_a, capture)     # h: the user tower at capture, retain_grad()
            (info_nce(u, a, tau, margin) / n).backward()
            if capture is not None:
                strategy.accumulate(h.grad * n, batch.user.attention_mask)   # dL/dh of the step's loss
        optimizer.step(); strategy.end_step(step)      # every rank: end_step all-reduces
    embedding export / probe: strategy.inference_mask(attention_mask, dtype[, tower="answer"])

Tests: python -m pytest -q tests/test_ggsm.py
"""

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

NORMALIZE = ("none", "max", "mean", "zscore")

# -----------------------------------------------------------------------------
# Masks as index predicates (nanochat row_idx/col_idx; modded-nanogpt `causal & window`)


def _check_attention_mask(attention_mask, where):
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError(f"{where}: attention_mask must be a (B, L) tensor of 1 = token / 0 = pad, "
                         f"got {type(attention_mask).__name__} {tuple(getattr(attention_mask, 'shape', ()))}")
    if attention_mask.is_floating_point():
        raise ValueError(f"{where}: attention_mask must be integer or bool (1 = token, 0 = pad), got "
                         f"{attention_mask.dtype}; a float additive mask is not a padding mask")


def _check_dtype(dtype, where):
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"{where}: dtype must be a floating torch dtype, got {dtype}")


def _grid(L, device):
    """Query index i down the rows, key index j along the columns: row >= col is the causal predicate."""
    row = torch.arange(L, device=device).view(L, 1)  # (L, 1) query i
    col = torch.arange(L, device=device).view(1, L)  # (1, L) key j
    return row, col


def _everywhere(L, device):
    return torch.ones(L, L, dtype=torch.bool, device=device)  # (L, L) the bidirectional predicate


def _to_additive(allowed, attention_mask, dtype, log_w=None):
    """
    allowed: bool, broadcastable to (B, L, L); log_w: float log-weights broadcastable to (B, L, L) or
    None (all 0). Returns (B, 1, L, L) in `dtype`: log_w where allowed and the key is a real token,
    finfo(dtype).min elsewhere. Padded keys are blocked here, once, for every strategy.
    """
    # official code [padding]: no key-padding mask (real tokens attend to pads, and an all-ones mask at inference);
    # here padded keys are blocked, once, for every strategy
    key_real = attention_mask.bool()[:, None, :]  # (B, 1, L): key j is a token
    allowed = allowed & key_real  # (B, L, L)
    work = torch.promote_types(dtype, torch.float32)  # build in >= fp32 so finfo(dtype).min is exact
    if log_w is None:
        log_w = torch.zeros((), dtype=work, device=attention_mask.device)
    blocked = torch.tensor(torch.finfo(dtype).min, dtype=work, device=attention_mask.device)
    out = torch.where(allowed, log_w.to(work), blocked)  # (B, L, L)
    # clamp: a log-weight below finfo(dtype).min (w ~ 0 in fp16) must not turn into -inf on the cast
    return out.clamp(min=torch.finfo(dtype).min).to(dtype).unsqueeze(1)  # (B, 1, L, L)


def causal_mask(attention_mask, dtype=torch.float32):
    """M_ij = 0 if j <= i, blocked otherwise (the paper's M^causal), padded keys blocked."""
    _check_attention_mask(attention_mask, "causal_mask")
    _check_dtype(dtype, "causal_mask")
    row, col = _grid(attention_mask.shape[1], attention_mask.device)
    return _to_additive(row >= col, attention_mask, dtype)


def bidirectional_mask(attention_mask, dtype=torch.float32):
    """M_ij = 0 for every real key (the paper's M^bi), padded keys blocked."""
    _check_attention_mask(attention_mask, "bidirectional_mask")
    _check_dtype(dtype, "bidirectional_mask")
    return _to_additive(_everywhere(attention_mask.shape[1], attention_mask.device), attention_mask, dtype)


def window_mask(attention_mask, delta, dtype=torch.float32):
    """
    Scheduler-based transition (App. A.4 Bidirectional b): query i sees keys j <= i + delta, i.e.
    "attention up to position min(i + delta, L)". delta = 0 is causal, delta >= L - 1 bidirectional.
    delta: one integer for the batch, or a (B,) integer tensor, one window per row (Scheduler: each
    user's own length sets its window).
    """
    _check_attention_mask(attention_mask, "window_mask")
    _check_dtype(dtype, "window_mask")
    B, L = attention_mask.shape
    d = torch.as_tensor(delta, device=attention_mask.device)
    if d.is_floating_point() or d.dim() > 1 or (d.dim() == 1 and d.shape != (B,)) or (d < 0).any():
        raise ValueError(f"window_mask: delta must be an integer >= 0 or a ({B},) tensor of them, got {delta}")
    row, col = _grid(L, attention_mask.device)
    return _to_additive(col <= row + d.long().view(-1, 1, 1), attention_mask, dtype)  # (B or 1, L, L)


def soft_future_mask(attention_mask, weights, dtype=torch.float32, segment=None):
    """
    Eq. 4: M_ij = 0 for j <= i and log w_j for j > i, one weight per key column j (Eq. 5 depends on
    j only), padded keys blocked. weights: (L,) in (0, 1]; a weight of 0 is clamped to finfo.tiny
    (log ~ -87, blocked in effect) so log(0) never happens.
    segment: None (every future key soft, Eq. 4 as written, GG-SM), or (B, L) bool, the positions whose
    causality is relaxed (the hybrids: the user-history segment, history_segment): a future key j > i
    gets log w_j only when i and j both lie in the segment, and stays blocked otherwise (causal).
    """
    _check_attention_mask(attention_mask, "soft_future_mask")
    _check_dtype(dtype, "soft_future_mask")
    L = attention_mask.shape[1]
    if not isinstance(weights, torch.Tensor) or weights.shape != (L,):
        raise ValueError(f"soft_future_mask: weights must be a ({L},) tensor (one weight per key position), "
                         f"got {tuple(getattr(weights, 'shape', ()))}")
    row, col = _grid(L, attention_mask.device)
    w = weights.to(device=attention_mask.device, dtype=torch.promote_types(weights.dtype, torch.float32))
    log_w = torch.log(w.clamp(min=torch.finfo(torch.float32).tiny))  # (L,) never log(0)
    # paper [soft mask]: Eq. 4, w_ij depends on j only; official code: one [B,1,L,L] bias for every layer and head, as here
    log_w = torch.where(col > row, log_w.view(1, L), torch.zeros((), dtype=w.dtype, device=w.device))  # Eq. 4, (L, L)
    return _to_additive(_relaxed(row, col, attention_mask, segment, "soft_future_mask"), attention_mask, dtype, log_w)


def history_segment(history, L):
    """history: (B, 2) long [start, end) of each row's user-history segment (data.Side.history) -> (B, L) bool,
    True at the positions start <= j < end."""
    if not isinstance(history, torch.Tensor) or history.dim() != 2 or history.shape[1] != 2:
        raise ValueError(f"history_segment: history must be a (B, 2) tensor of [start, end), got "
                         f"{type(history).__name__} {tuple(getattr(history, 'shape', ()))}")
    pos = torch.arange(L, device=history.device).view(1, L)  # (1, L)
    return (pos >= history[:, :1]) & (pos < history[:, 1:])  # (B, L)


def _relaxed(row, col, attention_mask, segment, where):
    """Which (i, j) a relaxed-causal mask may open: every pair without a segment; with one, the past (j <= i)
    and the future pairs with both ends in the segment. Broadcastable to (B, L, L)."""
    if segment is None:
        return torch.ones_like(row >= col)  # (L, L)
    if segment.shape != attention_mask.shape:
        raise ValueError(f"{where}: segment must be (B, L) like attention_mask {tuple(attention_mask.shape)}, "
                         f"got {tuple(segment.shape)}")
    seg = segment.to(attention_mask.device).bool()
    return (row >= col) | (seg[:, :, None] & seg[:, None, :])  # (B, L, L)


def global_query_mask(attention_mask, dtype=torch.float32):
    """
    hybrid_gq (App. A.4 Hybrid c): position 0 holds the learnable <GLOBAL> token, whose row sees every
    real key (bidirectional); all other rows stay causal. Other rows do see column 0, so from the
    second block on future information reaches them only through the global token; that channel is
    the "guidance" of the paper's description.
    """
    _check_attention_mask(attention_mask, "global_query_mask")
    _check_dtype(dtype, "global_query_mask")
    row, col = _grid(attention_mask.shape[1], attention_mask.device)
    # paper [hybrid_gq]: the global token attends bidirectionally to the history tokens, its attention weights supervise
    # block-level integration; here its row sees every real key and there is no supervision term
    return _to_additive((row >= col) | (row == 0), attention_mask, dtype)


# -----------------------------------------------------------------------------
# hybrid_mlp (App. A.4 Hybrid b): "a lightweight MLP predicts attention bias for j > i ... based on h_i"


class HybridMLPBias(nn.Module):
    """
    One small MLP per decoder layer l: bias_ij = logsigmoid(mlp_l(h_i)) for j > i, 0 for j <= i,
    padded keys blocked. h is the hidden state entering block l (the decoder calls the mask callable
    there), so the opening is decided per query row and per layer, and exp(bias) is a weight in (0, 1).

    Input LayerNorm: the residual stream of a pretrained LLM changes scale by orders of magnitude
    across layers (and has a few massive channels), so the MLP reads a normalised h.
    Initialisation: the last layer's weight is zero and its bias is logit(init_weight), so every future
    key starts at weight init_weight = 0.02 (bias ~ -3.9): the pretrained decoder was trained causal,
    so starting nearly causal leaves its representations intact at step 0, while d logsigmoid/dx =
    1 - 0.02 keeps the gradient that opens the future almost undamped. The zero weight still receives
    a gradient at step 0 (the input features are non-zero), so the first layer learns from step 1.
    """

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
        """-> (B, 1, L, L) additive mask; segment: as in soft_future_mask (None: every future key, (B, L) bool: only
        future keys with query and key both in it)."""
        _check_attention_mask(attention_mask, "HybridMLPBias")
        if not 0 <= layer_idx < self.n_layers:
            raise ValueError(f"HybridMLPBias: layer_idx {layer_idx} outside [0, {self.n_layers})")
        if h.dim() != 3 or h.shape[:2] != attention_mask.shape:
            raise ValueError(f"HybridMLPBias: h must be (B, L, D) matching attention_mask {tuple(attention_mask.shape)}, "
                             f"got {tuple(h.shape)}")
        mlp = self.mlps[layer_idx]
        x = mlp(h.to(mlp[-1].weight.dtype)).squeeze(-1).float()  # (B, L): one logit per query row i
        # paper [hybrid_mlp]: an MLP on h_i predicts the bias for j > i; here one small MLP per layer, bias logsigmoid(.)
        log_w = F.logsigmoid(x)  # (B, L) log of a weight in (0, 1)
        row, col = _grid(h.shape[1], h.device)
        log_w = torch.where(col > row, log_w[:, :, None], torch.zeros((), device=h.device))  # (B, L, L): j > i only
        allowed = _relaxed(row, col, attention_mask, segment, "HybridMLPBias")
        return _to_additive(allowed, attention_mask, dtype or h.dtype, log_w)


# -----------------------------------------------------------------------------
# Gradient importance: ||dL/dh_j|| per position j (Eq. 5)


class GradientImportance:
    """
    Per-position importance I_j = mean over the rows b with a real token at j of ||dL/dh_{b,j}||_2
    (L2 over the hidden dimension), collected over the micro-steps of one optimizer step.

    Aggregation: a mean over the rows where j is a token. Official code: a sum over the micro-batch,
    which scales the weight with the micro-batch size (and counts a column once per row long enough
    to reach it, so late positions get smaller sums). Note the per-row gradient of a batch-mean loss
    still carries a 1/N factor; Eq. 5 is applied to it as written.
    DDP: at end_step the per-position sums and counts are all-reduced, so every rank holds the same
    importance. Official code: the importance is a registered buffer that DDP overwrites with rank 0's
    copy, so the mask follows rank 0's gradients only.
    EMA: I <- ema * I + (1 - ema) * I_step at each optimizer step; default 0.0 (the official effective
    value: the dataclass default, the argparse 0.99 is never used). A position seen for the first time
    takes I_step directly (no bias towards the zero start).
    Fallback: positions beyond the longest sequence seen so far get the mean importance of the seen
    positions; before any gradient has been seen the importance is 0 everywhere (sigma(0) = 0.5, the
    official step-0 value).
    Normalisation (optional, off by default so Eq. 5 runs as written): raw norms are O(1e-4) and make
    sigma(||g||) = 0.5 everywhere. 'max' divides by the largest seen importance
    (weights in [0.5, 0.73]), 'mean' by the mean (weights around 0.73), 'zscore' standardises
    ((I - mean) / std, weights on both sides of 0.5). Applied over the seen positions, before sigma.
    """

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
        self._sum = None  # (L,) this step's sum over rows of ||g_{b,j}||, on the gradient's device
        self._count = None  # (L,) this step's number of rows with a token at j

    def accumulate(self, grad, attention_mask):
        """grad: (B, L, D) = dL/dh of the step's loss for one micro-step of the user tower (a trainer
        that backpropagates a scaled loss rescales the gradient first)."""
        _check_attention_mask(attention_mask, "GradientImportance.accumulate")
        if grad is None:
            raise ValueError("GradientImportance.accumulate: grad is None; call h.retain_grad() before backward")
        if grad.dim() != 3 or grad.shape[:2] != attention_mask.shape:
            raise ValueError(f"GradientImportance.accumulate: grad must be (B, L, D) matching attention_mask "
                             f"{tuple(attention_mask.shape)}, got {tuple(grad.shape)}")
        real = attention_mask.to(grad.device).bool()
        norms = grad.detach().double().norm(dim=-1)  # (B, L) ||dL/dh_{b,j}||_2 over the hidden dim
        # official code [batch aggregation]: a sum over the micro-batch; here a mean over the rows with a token at j
        s = (norms * real).sum(0)  # (L,) padded positions ignored
        c = real.sum(0).double()  # (L,)
        if self._sum is None:
            self._sum, self._count = s, c
        else:
            self._sum, self._count = _add_padded(self._sum, s), _add_padded(self._count, c)

    def end_step(self):
        """After the optimizer step, on every rank (it is a collective under torch.distributed)."""
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
        # right padding: a row with a token at j has tokens at 0..j, so the seen positions are a prefix
        n_new = int(seen.sum())
        if not seen[:n_new].all():
            raise ValueError("GradientImportance.end_step: the positions with tokens are not a prefix; padding must be on the right")
        step_imp = s[:n_new] / c[:n_new]  # (n_new,) mean over real rows
        old = self.importance
        new = torch.zeros(max(old.numel(), n_new), dtype=torch.float64)
        new[:old.numel()] = old  # positions not seen this step keep their value
        k = min(old.numel(), n_new)
        new[:k] = self.ema * old[:k] + (1.0 - self.ema) * step_imp[:k]  # EMA where a previous value exists
        new[k:n_new] = step_imp[k:]  # first sighting: the step's value
        self.importance = new
        self.updates += 1

    def discard_step(self):
        """Drop this step's sums without using them (after warm-up the gradients are not needed)."""
        self._sum = self._count = None

    def normalized(self):
        """The importance of the seen positions after the optional normalisation, (n_seen,) float64."""
        return _normalize(self.importance, self.normalize)

    def weights(self, L, device=None):
        """Eq. 5 warm-up branch: w_j = sigma(I_j) for j < L, with the fallback beyond n_seen. (L,) float32."""
        return torch.sigmoid(_extend(self.normalized(), L)).float().to(device)

    def state_dict(self):
        # saved at step boundaries (after end_step), so the per-step sums are empty and not part of it
        return {"importance": self.importance.clone(), "updates": int(self.updates)}  # float64: exact round trip

    def load_state_dict(self, state):
        _check_keys(state, ("importance", "updates"), "GradientImportance.load_state_dict")
        imp = state["importance"]
        if not isinstance(imp, torch.Tensor) or imp.dim() != 1:
            raise ValueError(f"GradientImportance.load_state_dict: 'importance' must be a 1-D tensor, got {imp!r}")
        self.importance = imp.detach().double().cpu().clone()
        self.updates = int(state["updates"])
        self._sum = self._count = None


def _add_padded(a, b):
    """a + b for 1-D tensors of possibly different lengths (missing positions count as 0)."""
    if a.numel() < b.numel():
        a, b = b, a
    a = a.clone()
    a[:b.numel()] += b
    return a


# paper [normalisation]: none, sigma(||g||); how='none' (default) is the paper's, the others are options
def _normalize(x, how):
    if x.numel() == 0 or how == "none":
        return x
    if how == "max":
        return x / x.max().clamp(min=1e-30)
    if how == "mean":
        return x / x.mean().clamp(min=1e-30)
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
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise KeyError(f"{where}: missing keys {missing}, unexpected keys {unexpected}")


# -----------------------------------------------------------------------------
# Strategies: which mask each tower gets at which optimizer step. STRATEGIES is the only list of them.


def mean_future_weight(mask, attention_mask):
    """Figure 1's "Soft Mask Average Weight" of a mask as used: the mean of exp(M_ij) over the pairs j > i
    of real tokens, over the batch and the heads (0 = causal, 1 = bidirectional). mask: additive
    (B, 1|H, L, L); attention_mask (B, L). nan when no row has two tokens."""
    real = attention_mask.bool()
    row, col = _grid(real.shape[1], real.device)
    pairs = (col > row) & real[:, :, None] & real[:, None, :]  # (B, L, L): future key j of query i, both real
    n = int(pairs.sum())
    if n == 0:
        return float("nan")
    w = mask.detach().double().exp().mean(1)  # (B, L, L) weight exp(M_ij); finfo.min -> 0
    return float((w * pairs).sum() / n)


class Strategy:
    """
    An attention-mask strategy: the mask of each tower at optimizer step `step` (0-based; steps are
    OPTIMIZER steps. Official code: its schedule counts micro-batches, so T_warm and T_total shrink by
    the accumulation factor). Constructed with keyword arguments; the base stores the run's length
    (total_steps, warmup_steps), the model's shape (n_layers, hidden_size, n_heads) and any other
    option (self.options), so a subclass that needs nothing else has no __init__ of its own.

    A subclass implements
        train_mask(step, attention_mask, dtype, tower, history)   a (B, 1, L, L) additive mask, or a
                                                         callable mask(layer_idx, h) the decoder evaluates at
                                                         the input of each block
        inference_mask(attention_mask, dtype, tower, history)   embedding export and probing (default here:
                                                         the training mask at step total_steps)
    tower is "user" or "answer": both towers run the same strategy at their own lengths unless a
    strategy says otherwise (hybrid_gq; the hybrids restricted to the history segment). history is the
    user side's (B, 2) [start, end) of the user-history segment (data.Side.history; None on the answer side);
    a strategy that does not need it ignores it. Defaults below, overridden where a strategy needs them:
        capture_layer = None, wants_gradients(step) False   no dL/dh read (GG-SM, hybrid_mask read it)
        module = None           a trainable nn.Module trained with the encoder (hybrid_mlp)
        global_token = False    a <GLOBAL> token the template puts first (hybrid_gq)
        end_step(step)          after every optimizer step on every rank; nothing here
        state_dict()            what a checkpoint keeps: tensors and ints; empty here
    Every rank must build the same mask: whatever a strategy learns from gradients it all-reduces in
    end_step.
    """

    global_token = False

    def __init__(self, total_steps, warmup_steps=0, n_layers=None, hidden_size=None, n_heads=None, **options):
        where = type(self).__name__
        if int(total_steps) != total_steps or total_steps < 1:
            raise ValueError(f"{where}: total_steps must be an integer >= 1, got {total_steps}")
        if int(warmup_steps) != warmup_steps or warmup_steps < 0:
            raise ValueError(f"{where}: warmup_steps must be an integer >= 0, got {warmup_steps}")
        # official code [schedule units]: T_warm, T_total count micro-batches (fixed 200 / 2000); here optimizer steps
        self.total_steps, self.warmup_steps = int(total_steps), int(warmup_steps)
        self.n_layers, self.hidden_size, self.n_heads = n_layers, hidden_size, n_heads
        self.options = options
        self.capture_layer = None
        self.module = None

    def train_mask(self, step, attention_mask, dtype=torch.float32, tower="user", history=None):
        raise NotImplementedError(f"{type(self).__name__}.train_mask")

    def inference_mask(self, attention_mask, dtype=torch.float32, tower="user", history=None):
        return self.train_mask(self.total_steps, attention_mask, dtype, tower, history)

    def phase(self, step):
        """A word for the logs: where in its schedule the strategy is at `step`."""
        return "fixed"

    def wants_gradients(self, step):
        return False

    def accumulate(self, grad, attention_mask):
        raise RuntimeError(f"{type(self).__name__}.accumulate: this strategy uses no gradients")

    def end_step(self, step):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        _check_keys(state, [], f"{type(self).__name__}.load_state_dict")


SEGMENTS = ("history", "all")  # where the hybrids relax causality (paper: the user-history segment)


def _check_segment(segment, where):
    if segment not in SEGMENTS:
        raise ValueError(f"{where}: segment must be one of {SEGMENTS}, got {segment!r}")
    return segment


def _segment_of(segment, attention_mask, tower, history, where):
    """The (B, L) bool positions a hybrid relaxes, or None for every future key (segment="all"). The answer tower
    holds no user history: an all-False segment (causal)."""
    if tower not in ("user", "answer"):
        raise ValueError(f"{where}: tower must be 'user' or 'answer', got {tower!r}")
    # paper [hybrid segment]: a hybrid "relaxes causality over the user-history segment"; segment='all' opens every
    # future key of both towers instead (this project's former behaviour)
    if segment == "all":
        return None
    if tower == "answer":
        return torch.zeros_like(attention_mask, dtype=torch.bool)
    if history is None:
        raise ValueError(f"{where}: segment='history' needs history= on the user tower (data.Side.history, the (B, 2) "
                         "[start, end) of the user-history segment); segment='all' opens every future key instead")
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
    """App. A.4 Bidirectional b: window_mask with delta(t) = floor(L t / T_total), L = each row's own length (its
    real tokens), so a user's window does not depend on its batch-mates or on the padding; causal at t = 0,
    bidirectional from T_total on and at inference. Linear in t only (the paper also names a cosine schedule)."""

    def window_delta(self, step, L):
        """L: an int or a (B,) integer tensor of lengths."""
        return (L * min(step, self.total_steps)) // self.total_steps  # integer floor, exact

    def phase(self, step):
        return "window" if step < self.total_steps else "bidirectional"

    def train_mask(self, step, attention_mask, dtype=torch.float32, tower="user", history=None):
        if step >= self.total_steps:
            return bidirectional_mask(attention_mask, dtype)
        _check_attention_mask(attention_mask, "Scheduler.train_mask")
        lengths = attention_mask.long().sum(1)  # (B,) real tokens; paper: "min(i + delta(e), L)", L the user's length
        # paper [scheduler baseline]: Delta(e) linear or cosine, "up to position min(i + Delta(e), L)"; linear only here
        return window_mask(attention_mask, self.window_delta(step, lengths), dtype)


class GGSM(Strategy):
    """
    Gradient-Guided Soft Masking, Eq. 4, 5, 15.
      warm-up t < T_warm: w_j = sigma(I_j), I from the gradients of the steps before t (none at t = 0:
          I = 0, w = sigma(0) = 0.5 everywhere, as in the official code); end_step(T_warm - 1) freezes
          w_frozen = sigma(I) including that step's gradients (L_warm is the loss of step T_warm - 1);
      ramp T_warm <= t < T_total: w = (1 - a_t) w_frozen + a_t, a_t = (t - T_warm) / (T_total - T_warm);
      bidirectional from T_total on and at inference (paper: "at inference, M employs a fully
      bidirectional" mask).
    The answer tower gets the same column weights at its own length, as in the official code (which adds
    the same soft bias to both towers), with the same fallback beyond the seen length.

    Options: capture_layer, where dL/dh is read: "last-block" (default, the input of the last block), "final"
    (the paper's literal final normed output, = n_layers) or a block index. The literal choice is
    degenerate: with mean pooling every position gets the same gradient dL/dpool / n, with <USER> pooling
    it is zero except at the pooled token. ema and normalize: see GradientImportance.
    """

    ramps = True  # ramp to bidirectional after warm-up (hybrid_mask keeps the frozen mask)

    def __init__(self, total_steps, warmup_steps=0, n_layers=None, capture_layer="last-block", ema=0.0,
                 normalize="none", **settings):
        super().__init__(total_steps, warmup_steps, n_layers=n_layers, **settings)
        where = type(self).__name__
        if self.ramps and self.warmup_steps >= self.total_steps:
            raise ValueError(f"{where}: warmup_steps ({warmup_steps}) must be < total_steps ({total_steps}), "
                             "else alpha_t = (t - T_warm) / (T_total - T_warm) is undefined")
        if capture_layer in ("last-block", "final"):
            if n_layers is None:
                raise ValueError(f"{where}: pass n_layers (or a block index as capture_layer) to place capture_layer")
            # paper [gradient source]: h_j = "Last Hidden" (capture_layer='final'); official code: hidden_states[-1] after the
            # final norm; default here: the input of the last block, where the gradient differs by position
            capture_layer = n_layers - 1 if capture_layer == "last-block" else n_layers
        if not str(capture_layer).isdigit() or (n_layers is not None and int(capture_layer) > n_layers):
            raise ValueError(f"{where}: capture_layer must be 'last-block', 'final' or a block index in "
                             f"[0, {n_layers}], got {capture_layer!r}")
        self.capture_layer = int(capture_layer)
        self.importance = GradientImportance(ema=ema, normalize=normalize)
        # no warm-up: freeze the empty importance, i.e. w = sigma(0) = 0.5
        self.frozen = torch.zeros(0, dtype=torch.float64) if self.warmup_steps == 0 else None

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
        if self.phase(step) == "bidirectional":
            return bidirectional_mask(attention_mask, dtype)  # exactly 0 bias, no log(1) round-off
        _check_attention_mask(attention_mask, f"{type(self).__name__}.train_mask")
        w = self.future_weights(step, attention_mask.shape[1], attention_mask.device)
        # official code [answer tower]: the same soft bias on both towers; here the same column weights at each tower's
        # own length (tower is not consulted)
        return soft_future_mask(attention_mask, w, dtype)  # Eq. 4

    def inference_mask(self, attention_mask, dtype=torch.float32, tower="user", history=None):
        # paper [inference]: fully bidirectional; official code: an all-ones additive mask (pads attended)
        return bidirectional_mask(attention_mask, dtype)

    def wants_gradients(self, step):
        return step < self.warmup_steps

    def accumulate(self, grad, attention_mask):
        """Each micro-step, after backward: grad = dL/dh of the user tower at capture_layer, (B, L, D)."""
        self.importance.accumulate(grad, attention_mask)

    def end_step(self, step):
        """All-reduce + EMA of the importance (a collective: every rank calls it); freeze at T_warm - 1."""
        if step < self.warmup_steps:
            self.importance.end_step()
            if step == self.warmup_steps - 1:
                # paper [freezing]: frozen at the end of warm-up, L_warm the loss of t = T_warm - 1 (its gradients included)
                self.frozen = self.importance.normalized().clone()
        else:
            self.importance.discard_step()  # after warm-up gradients are not used

    def state_dict(self):
        imp = self.importance.state_dict()
        sd = {"importance": imp["importance"], "importance_updates": imp["updates"]}
        if self.frozen is not None:
            sd["frozen_importance"] = self.frozen.clone()
        return sd

    def load_state_dict(self, state):
        expected = ["importance", "importance_updates"] + (["frozen_importance"] if "frozen_importance" in state else [])
        _check_keys(state, expected, f"{type(self).__name__}.load_state_dict")
        self.importance.load_state_dict({"importance": state["importance"], "updates": state["importance_updates"]})
        fz = state.get("frozen_importance")
        self.frozen = fz.detach().double().cpu().clone() if fz is not None else (
            torch.zeros(0, dtype=torch.float64) if self.warmup_steps == 0 else None)


class HybridMask(GGSM):
    """
    App. A.4 Hybrid a: GG-SM's warm-up mask, frozen at T_warm - 1 and never ramped. The frozen mask is
    also the inference mask (the paper does not say; a model trained with a soft mask is evaluated with
    it); if training stops before the freeze, the latest warm-up weights are used.

    segment="history" (default; paper: a hybrid "selectively relaxes causality over the user-history
    segment while maintaining causal constraints for future tokens"): the soft weights open future keys
    only inside the user-history segment (query and key both in it); the instruction, query and <USER>
    stay causal, and so does the answer tower, which holds no user history. segment="all": every future
    key of both towers, as GG-SM's warm-up mask (this project's behaviour before the restriction).
    Differs from the paper: the importance comes from the gradients of the encoder being trained, as in
    GG-SM; the paper computes it "using gradients from a frozen left-tower encoder" (not implemented: it
    needs a second, frozen copy of the user tower run forward and backward at every warm-up step).
    """

    ramps = False

    def __init__(self, total_steps, warmup_steps=0, n_layers=None, segment="history", **settings):
        super().__init__(total_steps, warmup_steps, n_layers=n_layers, **settings)
        # paper [hybrid_mask]: importance from "a frozen left-tower encoder"; here from the encoder being trained
        self.segment = _check_segment(segment, "HybridMask")

    def train_mask(self, step, attention_mask, dtype=torch.float32, tower="user", history=None):
        _check_attention_mask(attention_mask, "HybridMask.train_mask")
        seg = _segment_of(self.segment, attention_mask, tower, history, "HybridMask.train_mask")
        if seg is not None and not seg.any():
            return causal_mask(attention_mask, dtype)  # nothing to relax (the answer tower): exactly causal
        w = self.future_weights(step, attention_mask.shape[1], attention_mask.device)
        return soft_future_mask(attention_mask, w, dtype, segment=seg)  # Eq. 4 inside the segment

    def inference_mask(self, attention_mask, dtype=torch.float32, tower="user", history=None):
        step = self.warmup_steps if self.frozen is not None else 0
        return self.train_mask(step, attention_mask, dtype, tower, history)


class GGSMZero(GGSM):
    """Control for the ablation: GG-SM with the gradient importance replaced by zeros. Warm-up weights are the
    constant sigma(0) = 0.5, frozen as such, then the same ramp to bidirectional: what GG-SM gains over this
    is what the gradient guidance adds."""

    def wants_gradients(self, step):
        return False

    def end_step(self, step):
        if step == self.warmup_steps - 1:
            self.frozen = torch.zeros(0, dtype=torch.float64)  # the empty importance: sigma(0) = 0.5 everywhere


class HybridMLP(Strategy):
    """App. A.4 Hybrid b: HybridMLPBias, trained with the encoder; the mask is a callable mask(layer_idx, h)
    the decoder evaluates at the input of each block. segment="history" (default) / "all": as in HybridMask,
    the MLP's bias opens future keys inside the user-history segment only (the answer tower stays causal), or
    every future key of both towers."""

    def __init__(self, total_steps, warmup_steps=0, n_layers=None, hidden_size=None, segment="history", **settings):
        super().__init__(total_steps, warmup_steps, n_layers=n_layers, hidden_size=hidden_size, **settings)
        if n_layers is None or hidden_size is None:
            raise ValueError("HybridMLP: n_layers and hidden_size are required")
        self.segment = _check_segment(segment, "HybridMLP")
        self.module = HybridMLPBias(n_layers, hidden_size)

    def phase(self, step):
        return "mlp"

    def train_mask(self, step, attention_mask, dtype=torch.float32, tower="user", history=None):
        _check_attention_mask(attention_mask, "HybridMLP.train_mask")
        seg = _segment_of(self.segment, attention_mask, tower, history, "HybridMLP.train_mask")
        if seg is not None and not seg.any():
            return causal_mask(attention_mask, dtype)  # nothing to relax (the answer tower): exactly causal
        module = self.module

        def mask(layer_idx, h):  # h = the input of block layer_idx, (B, L, D)
            return module(layer_idx, h, attention_mask, dtype, seg)

        return mask

    def state_dict(self):
        return {"mlp." + k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state):
        _check_keys(state, list(self.state_dict()), "HybridMLP.load_state_dict")
        self.module.load_state_dict({k[len("mlp."):]: v for k, v in state.items()})


class HybridGQ(Strategy):
    """App. A.4 Hybrid c: global_query_mask on the user tower, whose template puts <GLOBAL> first; the
    answers carry no <GLOBAL> token, so the answer tower stays causal.
    Differs from the paper: its global token's "attention weights supervise block-level contextual integration";
    the paper defines no such loss and none is implemented here, so <GLOBAL> is trained by the InfoNCE loss
    alone. Its row sees every real key (the paper: "all history tokens")."""

    global_token = True

    def phase(self, step):
        return "global_query"

    def train_mask(self, step, attention_mask, dtype=torch.float32, tower="user", history=None):
        if tower not in ("user", "answer"):
            raise ValueError(f"HybridGQ.train_mask: tower must be 'user' or 'answer', got {tower!r}")
        return global_query_mask(attention_mask, dtype) if tower == "user" else causal_mask(attention_mask, dtype)


# Table 2's order. The only list of strategies: train.py --mask, ablate.py, probe.py and the tests read it.
STRATEGIES = {
    "causal": Causal,
    "hybrid_mask": HybridMask,
    "hybrid_mlp": HybridMLP,
    "hybrid_gq": HybridGQ,
    "bidirectional": Bidirectional,
    "scheduler": Scheduler,
    "ggsm": GGSM,
    "ggsm_zero": GGSMZero,  # not in the paper: GG-SM without its gradient guidance, a control
}


# -----------------------------------------------------------------------------
# Masked InfoNCE (Eq. 6-8)


def info_nce(user, answer, tau, margin, same_side=True):
    """
    Eq. 6: L = -(1/N) sum_i log(e^{s(u_i, a_i)/tau} / Z_i)
    Eq. 7: Z_i = e^{s(u_i,a_i)/tau} + sum_{j!=i} m e^{s(u_i,a_j)/tau}
                 [+ sum_{j!=i} m e^{s(u_i,u_j)/tau} + sum_{j!=i} m e^{s(a_i,a_j)/tau}]   (same_side)
    Eq. 8: m = 0 if that term's similarity > s(u_i, a_i) + margin, else 1: each term is thresholded
           against the same (detached) positive, as in Qwen3-Embedding; a near-duplicate counts as a
           false negative and is dropped.
    user, answer: (N, E), row i of each is a positive pair; may be the global batch gathered across
    ranks. s is the cosine: inputs are re-normalised here (a no-op on the encoders' L2-normalised
    outputs). Computed in >= fp32 with logsumexp over [positive, kept negatives], masked terms -inf.
    Official code: user->answer negatives only (no same-side terms), tau = 0.02, margin = 0.1.
    """
    if user.dim() != 2 or user.shape != answer.shape or user.shape[0] < 1:
        raise ValueError(f"info_nce: user and answer must both be (N, E) with N >= 1, got {tuple(user.shape)} "
                         f"and {tuple(answer.shape)}")
    # official code [τ, margin]: tau = 0.02, margin = 0.1; the paper gives neither (train.py's --tau, --margin)
    if not tau > 0:
        raise ValueError(f"info_nce: tau must be > 0, got {tau}")
    work = torch.promote_types(user.dtype, torch.float32)
    u = F.normalize(user.to(work), dim=-1)
    a = F.normalize(answer.to(work), dim=-1)
    N = u.shape[0]
    s_ua = u @ a.T  # (N, N) s(u_i, a_j)
    pos = s_ua.diagonal()  # (N,) s(u_i, a_i)
    threshold = (pos + margin).detach()[:, None]  # (N, 1) Eq. 8
    off_diag = ~torch.eye(N, dtype=torch.bool, device=u.device)

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
    """
    Collapse diagnostics of one batch of positive pairs (N, E) (re-normalised here), as floats:
        alignment       mean positive cosine s(u_i, a_i)
        cos_uu, cos_aa  mean off-diagonal user-user and answer-answer cosine (1.0: every row points one way)
        uniformity      log mean_{i != j} exp(-2 ||u_i - u_j||^2) over the users (Wang & Isola 2020; -4 is the
                        floor of spread-out unit vectors, 0 a collapsed batch)
        effective_rank  exp(entropy of the normalised singular values) of the user matrix (Roy & Vetterli
                        2007): 1 = one direction, N or E at most
        drop_ua, drop_uu, drop_aa   the fraction of each term's negatives that Eq. 8 drops
    """
    with torch.no_grad():
        u, a = F.normalize(user.double(), dim=-1), F.normalize(answer.double(), dim=-1)
        N = u.shape[0]
        off_diag = ~torch.eye(N, dtype=torch.bool, device=u.device)
        s_ua, s_uu, s_aa = u @ a.T, u @ u.T, a @ a.T
        pos = s_ua.diagonal()
        threshold = (pos + margin)[:, None]
        n_off = int(off_diag.sum())
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

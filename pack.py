"""Packed rows: several users share one row of the decoder's input, so padding nearly disappears.

A right-padded batch (B, L) of users with lengths n_b holds B * L slots, of which sum(n_b) are tokens. Packing
places the users one after the other into R <= B rows of Lp slots (first-fit decreasing; Lp the longest user,
or up to twice that where longer, fuller rows cost fewer multiply-adds: best_capacity), and
  - RoPE positions restart at 0 for each user (Decoder.forward's position_ids);
  - the additive mask is block-diagonal: user b's own (n_b, n_b) mask from the strategy, unchanged, on its
    block; every entry between two users, and every key in a row's padded tail, blocked (finfo.min).
Row r, query p of user b at local position i sees exactly the keys user b's unpacked mask lets i see, with
the same positions, so every token's hidden state is the unpacked one (up to float round-off of the
differently shaped matmuls): the same embeddings, losses and gradients (tests/test_pack.py, every strategy).

    packing = Packing(attention_mask, key_cost=key_cost(decoder.config))  # (B, L) 1 = token
    x_packed = packing.pack(x)                   # (B, L, D) -> (R, Lp, D)
    m_packed = packing.mask(m)                   # (B, H, L, L) additive -> (R, H, Lp, Lp) block-diagonal
    h = decoder(inputs_embeds=x_packed, mask=m_packed, position_ids=packing.position_ids)
    h_users = packing.unpack(h)                  # (R, Lp, D) -> (B, L, D), padded slots 0
    h_users = packing.decode(decoder, m, ids)    # the same from token ids, in one call

pack and unpack are gathers and index_puts, so gradients flow through them both ways.
"""
import torch

class Packing:
    """Where each user of a right-padded (B, L) batch sits in the packed (R, Lp) batch."""

    def __init__(self, attention_mask, capacity=None, key_cost=None):
        """capacity: slots per row (at least the longest user; default the longest user). key_cost: choose the
        capacity with best_capacity instead (attention's multiply-adds per key over the projections' per token)."""
        if attention_mask.dim() != 2 or attention_mask.is_floating_point():
            raise ValueError(f"Packing: attention_mask must be a (B, L) integer/bool tensor of 1 = token, got "
                             f"{attention_mask.dtype} {tuple(attention_mask.shape)}")
        am = attention_mask.bool()
        n = am.sum(1)  # (B,)
        # right padding: the tokens are the first n_b slots (as data.collate writes them)
        if not torch.equal(am, torch.arange(am.shape[1], device=am.device)[None, :] < n[:, None]):
            raise ValueError("Packing: attention_mask must be right-padded (1s first, then 0s in every row)")
        self.B, self.L = am.shape
        self.lengths = [int(v) for v in n.tolist()]
        if key_cost is not None:
            capacity = best_capacity(self.lengths, key_cost)
        row_of, offset, fill = first_fit(self.lengths, max(self.lengths + [capacity or 0]))
        Lp = max(fill, default=0)  # the fullest row: no row needs more slots
        self.R, self.Lp = len(fill), Lp
        self.rows, self.offsets = row_of, offset  # user b: row rows[b], first slot offsets[b]
        row = torch.tensor(row_of, dtype=torch.long, device=am.device)     # (B,)
        off = torch.tensor(offset, dtype=torch.long, device=am.device)     # (B,)
        # one entry per token: its user b and local position j, and the packed slot (r, p) it goes to
        self.tok_b, self.tok_j = am.nonzero(as_tuple=True)                     # (T,), (T,)
        self.dst_r = row[self.tok_b]                                             # (T,)
        self.dst_p = off[self.tok_b] + self.tok_j                                # (T,)
        self.position_ids = torch.zeros(self.R, Lp, dtype=torch.long, device=am.device)  # (R, Lp)
        self.position_ids[self.dst_r, self.dst_p] = self.tok_j  # RoPE restarts at 0 for each user
        self.attention_mask = torch.zeros(self.R, Lp, dtype=torch.long, device=am.device)
        self.attention_mask[self.dst_r, self.dst_p] = 1         # (R, Lp) 1 = a token of some user

    def slots(self):
        """Token slots the packed batch computes (R * Lp), against B * L for the padded one."""
        return self.R * self.Lp

    def pack(self, x):
        """(B, L, ...) -> (R, Lp, ...): each user's tokens at its slots, zeros in the rows' tails."""
        out = x.new_zeros((self.R, self.Lp) + tuple(x.shape[2:]))
        return out.index_put((self.dst_r, self.dst_p), x[self.tok_b, self.tok_j])

    def unpack(self, y):
        """(R, Lp, ...) -> (B, L, ...): each user's tokens back in its own row, zeros at the padded slots."""
        out = y.new_zeros((self.B, self.L) + tuple(y.shape[2:]))
        return out.index_put((self.tok_b, self.tok_j), y[self.dst_r, self.dst_p])

    def mask(self, m):
        """Additive mask broadcastable to (B, H, L, L) -> (R, H, Lp, Lp): user b's (n_b, n_b) top-left block of
        m at its place on its row's diagonal, every other entry blocked (finfo(m.dtype).min)."""
        if m.dim() != 4 or m.shape[-2:] != (self.L, self.L) or m.shape[0] not in (1, self.B):
            raise ValueError(f"Packing.mask: mask shape {tuple(m.shape)} is not broadcastable to "
                             f"(B={self.B}, H, {self.L}, {self.L})")
        out = m.new_full((self.R, m.shape[1], self.Lp, self.Lp), torch.finfo(m.dtype).min)
        for b, n in enumerate(self.lengths):  # B slice copies: the block of each user, as its strategy built it
            r, o = self.rows[b], self.offsets[b]
            out[r, :, o:o + n, o:o + n] = m[b if m.shape[0] > 1 else 0, :, :n, :n]
        return out

    def decode(self, decoder, mask, input_ids):
        """decoder on the packed rows of input_ids (B, L) under the block-diagonal mask (B, H, L, L), positions
        restarting per user -> the final hidden states (B, L, D) in the unpacked layout."""
        return self.unpack(decoder(input_ids=self.pack(input_ids), mask=self.mask(mask), position_ids=self.position_ids))

    def layer_mask(self, mask):
        """A per-layer mask callable mask(layer_idx, h) of the unpacked batch -> the same for the packed batch:
        it reads the packed h unpacked (so the strategy's module sees each user as it would unpacked) and packs
        what it returns."""
        return lambda layer_idx, h: self.mask(mask(layer_idx, self.unpack(h)))

def first_fit(lengths, capacity):
    """First-fit decreasing: the longest users first, each into the first row with room (ties by index: stable).
    -> (row of each user, its first slot there, tokens in each row)."""
    fill, row_of, offset = [], [0] * len(lengths), [0] * len(lengths)
    for b in sorted(range(len(lengths)), key=lambda b: -lengths[b]):
        for r, used in enumerate(fill):
            if used + lengths[b] <= capacity:
                break
        else:
            r = len(fill)
            fill.append(0)
        row_of[b], offset[b] = r, fill[r]
        fill[r] += lengths[b]
    return row_of, offset, fill

def best_capacity(lengths, key_cost, factors=(1.0, 1.25, 1.5, 2.0)):
    """The row length, among `factors` x the longest user, whose packed batch costs the fewest multiply-adds:
    R rows of Lp slots cost R * Lp * (1 + key_cost * Lp), 1 for the projections of a slot and key_cost for
    each key of its row in attention (the dense mask computes every entry of a row, blocked ones too). Longer
    rows fill better but attend over more keys: on a 512-wide decoder 1.5x the longest user wins, on the
    128-wide default decoder 1x."""
    longest = max(lengths)

    def cost(capacity):
        fill = first_fit(lengths, capacity)[2]
        return len(fill) * max(fill) * (1 + key_cost * max(fill))

    return min((int(f * longest) for f in factors), key=cost)

def key_cost(config):
    """Attention's multiply-adds per key of a row (Q K^T and P V, every head) over the projections' per token
    (q, k, v, o and the SwiGLU MLP), for a model.ModelConfig: best_capacity's trade-off for that decoder."""
    D, I, nh, nkv, hd = (config.hidden_size, config.intermediate_size, config.num_attention_heads,
                         config.num_key_value_heads, config.head_dim)
    return 2 * nh * hd / (2 * D * nh * hd + 2 * D * nkv * hd + 3 * D * I)

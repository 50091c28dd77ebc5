"""Packed rows: several users share one row of the decoder's input, so padding nearly disappears.

A right-padded batch (B, L) of users with lengths n_b holds B * L slots, of which sum(n_b) are tokens. Packing
places the users one after the other into R <= B rows of Lp slots (first-fit decreasing, Lp = the longest user,
so no row is longer than the padded batch's and the attention per row costs no more), and
  - RoPE positions restart at 0 for each user (Decoder.forward's position_ids);
  - the additive mask is block-diagonal: user b's own (n_b, n_b) mask from the strategy, unchanged, on its
    block; every entry between two users, and every key in a row's padded tail, blocked (finfo.min).
Row r, query p of user b at local position i sees exactly the keys user b's unpacked mask lets i see, with
the same positions, so every token's hidden state is the unpacked one (up to float round-off of the
differently shaped matmuls): the same embeddings, losses and gradients (tests/test_pack.py, every strategy).

    packing = Packing(attention_mask)            # (B, L) 1 = token
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

    def __init__(self, attention_mask):
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
        Lp = max(self.lengths, default=0)
        # first-fit decreasing: longest users first, each into the first row with room (ties by index: stable)
        rows, row_of, offset = [], [0] * self.B, [0] * self.B
        for b in sorted(range(self.B), key=lambda b: -self.lengths[b]):
            for r, used in enumerate(rows):
                if used + self.lengths[b] <= Lp:
                    break
            else:
                r = len(rows)
                rows.append(0)
            row_of[b], offset[b] = r, rows[r]
            rows[r] += self.lengths[b]
        self.R, self.Lp = len(rows), Lp
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

"""Serving a batch with a paged KV cache: a toy decode loop with random weights.

Requests of different prompt lengths arrive in a queue; up to MAX_BATCH of them
decode at once, one token per step, each stopping after its own number of new
tokens. Their keys and values live in one shared pool of pages
(``flexattn.paged.PagedKVCache``): a sequence reserves a page when it grows past
a page boundary and gives its pages back (``erase``) when it finishes, and the
next request reuses them. The user's mask_mod (causal + sliding window, by
query position) and score_mod (ALiBi) are written for logical positions and
reused unchanged through the page table. Every step checks the paged output
against flex_attention on contiguous per-sequence K/V with the logical mask.

The batch always has MAX_BATCH rows (row b is slot b; an idle slot is fully
masked), so every step traces to the very same IR: only buffer contents change.

Run: ``python examples/paged_attention.py``
"""

from __future__ import annotations

import torch

from flexattn import create_block_mask, flex_attention
from flexattn.paged import PagedKVCache
from flexattn.trace import trace_mask_mod

MAX_BATCH, N_PAGES, PAGE_SIZE, MAX_LEN = 4, 24, 16, 128  # the pool (384) is smaller than 4 * MAX_LEN
BLOCK_SIZE = (1, 16)  # one query row per tile (decode); kv tiles must divide PAGE_SIZE
H_Q, H_KV, HEAD_DIM, MODEL_DIM, WINDOW = 4, 2, 16, 64, 48
REQUESTS = [(5, 30), (40, 12), (17, 60), (3, 25), (60, 20), (9, 45), (33, 8), (21, 33)]  # (prompt, new tokens)


def main(steps: int = 200, seed: int = 0) -> float:
    """Decode up to ``steps`` tokens per slot; returns the largest |paged - contiguous| seen."""
    torch.manual_seed(seed)
    w_q, w_k, w_v = (torch.randn(MODEL_DIM, h * HEAD_DIM) / MODEL_DIM ** 0.5 for h in (H_Q, H_KV, H_KV))
    w_out = torch.randn(H_Q * HEAD_DIM, MODEL_DIM) / (H_Q * HEAD_DIM) ** 0.5

    # --- the paged cache: a few lines of user code -------------------------------
    cache = PagedKVCache(N_PAGES, PAGE_SIZE, MAX_BATCH)
    k_cache = torch.zeros(1, H_KV, cache.n_positions, HEAD_DIM)
    v_cache = torch.zeros_like(k_cache)
    # Contiguous K/V per slot, only to check the paged result.
    k_contiguous = torch.zeros(MAX_BATCH, H_KV, MAX_LEN, HEAD_DIM)
    v_contiguous = torch.zeros_like(k_contiguous)

    query_pos = torch.full((MAX_BATCH,), -1)  # logical position of each row's query; -1: idle slot
    slopes = torch.exp2(-torch.arange(1, H_Q + 1) * 8.0 / H_Q)

    def sliding_causal(b, h, q_idx, kv_idx):
        q = query_pos[b] + q_idx
        return (kv_idx <= q) & (q - kv_idx < WINDOW)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (query_pos[b] + q_idx - kv_idx)

    paged_alibi = cache.get_score_mod(alibi)

    queue = list(enumerate(REQUESTS))
    slot_request = [None] * MAX_BATCH   # request id per slot
    remaining = [0] * MAX_BATCH         # new tokens still to generate
    length = [0] * MAX_BATCH            # tokens in the cache
    hidden = torch.zeros(MAX_BATCH, MODEL_DIM)
    committed_pages = 0                 # pages active requests will need by their end
    worst, ir_keys, done = 0.0, set(), []

    def project(x, w, heads):  # (rows, MODEL_DIM) -> (rows, heads, 1, HEAD_DIM)
        return (x @ w).view(-1, heads, 1, HEAD_DIM)

    for step in range(steps):
        # Admit waiting requests into idle slots while the pool can hold them to the end.
        for slot in range(MAX_BATCH):
            if slot_request[slot] is None and queue:
                request, (prompt, new_tokens) = queue[0]
                pages = -(-(prompt + new_tokens) // PAGE_SIZE)
                if committed_pages + pages > N_PAGES:
                    break
                queue.pop(0)
                committed_pages += pages
                slot_request[slot], remaining[slot], length[slot] = request, new_tokens, prompt
                prompt_hidden = torch.randn(prompt, MODEL_DIM)
                k = project(prompt_hidden, w_k, H_KV).permute(2, 1, 0, 3)  # (1, H_KV, prompt, D)
                v = project(prompt_hidden, w_v, H_KV).permute(2, 1, 0, 3)
                cache.reserve(slot, prompt)
                cache.assign(torch.tensor([slot]), torch.arange(prompt)[None], k, v, k_cache, v_cache)
                k_contiguous[slot, :, :prompt], v_contiguous[slot, :, :prompt] = k[0], v[0]
                hidden[slot] = prompt_hidden[-1]
        active = [s for s in range(MAX_BATCH) if slot_request[s] is not None]
        if not active:
            break

        # One decode step: the new token's K/V go into the cache, its query attends.
        rows = torch.tensor(active)
        for slot in active:
            cache.reserve(slot, length[slot] + 1)  # a new page only at a page boundary
        new_pos = torch.tensor([length[s] for s in active])
        k_new, v_new = project(hidden[rows], w_k, H_KV), project(hidden[rows], w_v, H_KV)
        cache.assign(rows, new_pos[:, None], k_new, v_new, k_cache, v_cache)
        k_contiguous[rows, :, new_pos], v_contiguous[rows, :, new_pos] = k_new[:, :, 0], v_new[:, :, 0]
        query_pos.fill_(-1)
        query_pos[rows] = new_pos
        q = project(hidden, w_q, H_Q)

        logical_mask = create_block_mask(sliding_causal, MAX_BATCH, None, 1, MAX_LEN, BLOCK_SIZE=BLOCK_SIZE)
        paged_mask = cache.convert_logical_block_mask(logical_mask)
        out = flex_attention(q, *cache.expand_kv(k_cache, v_cache, MAX_BATCH), score_mod=paged_alibi,
                             block_mask=paged_mask, enable_gqa=True)

        expected = flex_attention(q, k_contiguous, v_contiguous, score_mod=alibi, block_mask=logical_mask,
                                  enable_gqa=True)
        error = (out - expected).abs().max().item()
        assert error < 1e-5, f"step {step}: paged and contiguous attention differ by {error}"
        worst = max(worst, error)
        ir_keys.add(trace_mask_mod(paged_mask.mask_mod).graph.structural_key())

        hidden = torch.tanh(out.reshape(MAX_BATCH, -1) @ w_out)
        for slot in active:
            length[slot] += 1
            remaining[slot] -= 1
            if remaining[slot] == 0:  # finished: its pages go back to the pool
                done.append((slot_request[slot], step, length[slot]))
                committed_pages -= -(-length[slot] // PAGE_SIZE)
                cache.erase(slot)
                slot_request[slot] = None

    for request, step, final_length in done:
        print(f"request {request} finished at step {step:3d} with {final_length:3d} tokens")
    print(f"{len(done)} of {len(REQUESTS)} requests done in {step + 1} steps; pages free now: {cache.free_pages}; "
          f"max |paged - contiguous| = {worst:.2e}; distinct paged mask IRs: {len(ir_keys)}")
    return worst


if __name__ == "__main__":
    main()

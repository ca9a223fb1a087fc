"""The host side of the Triton back end: argument packing and launches."""

from __future__ import annotations

import math

import torch

from codegen.decoding import MAX_Q_LEN
from flexattn.block_mask import DEFAULT_BLOCK_SIZE
from flexattn.call import check_heads
from flexattn.errors import LoweringError

# Tile sizes (rows of Q x rows of K/V) when kernel_options name none; each must divide the
# BlockMask's BLOCK_SIZE. 128 x 64 is FlashAttention-2's forward tile on H100-class GPUs.
FORWARD_TILE = (128, 64)
BACKWARD_TILE = (64, 64)
# Split-KV decoding on a GPU: enough (unit, split) programs to fill every SM about twice.
PROGRAMS_PER_SM = 2


def _pad(d: int) -> int:
    """Head dims go to the next power of two (>= 16): tl.arange and tl.dot need it."""
    return max(16, 1 << (d - 1).bit_length())


def _strides_or_zero(t: torch.Tensor, dims: int) -> list[int]:
    """Strides of the first ``dims`` dims, 0 where the size is 1 (a broadcast B or H)."""
    return [0 if t.shape[i] == 1 else t.stride(i) for i in range(dims)] + list(t.stride()[dims:])


def _pair_tables(partial, full):
    """A (num, idx) pair of PARTIAL and of FULL tiles; a missing one becomes "no tiles", same layout."""
    if partial[0] is None:
        partial = (torch.zeros_like(full[0]), torch.zeros_like(full[1]))
    if full[0] is None:
        full = (torch.zeros_like(partial[0]), torch.zeros_like(partial[1]))
    return partial, full


def _sparse_args(num, idx, device):
    """(num, idx, num strides (3), idx strides (4)), int32 on ``device``."""
    num = num.to(device=device, dtype=torch.int32).contiguous()
    idx = idx.to(device=device, dtype=torch.int32).contiguous()
    return [num, idx, *_strides_or_zero(num, 2), *_strides_or_zero(idx, 2)]


def _buffer_args(buffers) -> tuple[list, list[torch.Tensor]]:
    """Pointer, sizes, strides per buffer (bool passed as uint8); also the contiguous tensors."""
    args, tensors = [], []
    for buf in buffers:
        buf = buf.detach().contiguous()
        tensors.append(buf)
        args += [buf.view(torch.uint8) if buf.dtype == torch.bool else buf, *buf.shape, *buf.stride()]
    return args, tensors


class Kernel:
    """A compiled Triton module bound to one pair of graphs' constants.

    ``kernel(query, key, value, *, score_buffers, mask_buffers, block_mask,
    scale, enable_gqa) -> (out, lse, max_scores)``: query (B, Hq, L, E), key
    (B, Hkv, S, E), value (B, Hkv, S, Ev) on one device; out (B, Hq, L, Ev) in
    query's dtype, lse and max_scores float32 (B, Hq, L); a fully masked row
    gives out 0 and lse -inf. ``kernel.decode`` (same call) is the split-KV
    path for Q_LEN <= 16. ``kernel.source`` is the generated Triton code.
    Raises ``LoweringError`` for float64 inputs or tiles that do not divide the BlockMask's, and
    ``InputError`` for mismatched heads.
    """

    def __init__(self, source: str, module, score_constants: list, mask_constants: list,
                 grad_buffers: list[int], options: dict):
        self.source, self.module, self.options = source, module, options
        self.constants = (list(score_constants), list(mask_constants))
        self.grad_buffers = grad_buffers

    def _setup(self, query, key, value, score_buffers, mask_buffers, block_mask, scale, enable_gqa, tile):
        if query.dtype == torch.float64:
            raise LoweringError("the triton back end computes in float32; float64 inputs need backend='torch'")
        B, Hq, L, E = query.shape
        Hkv, S, Ev = key.shape[1], key.shape[2], value.shape[3]
        check_heads(Hq, Hkv, enable_gqa)
        if block_mask is None:
            size = self.options.get("BLOCK_SIZE", DEFAULT_BLOCK_SIZE)
            sparse = (size, size)
            rows, cols = math.ceil(L / size), math.ceil(S / size)
            full = torch.arange(cols, dtype=torch.int32).expand(1, 1, rows, cols)
            every_q = (torch.full((1, 1, cols), rows), torch.arange(rows, dtype=torch.int32).expand(1, 1, cols, rows))
            every_kv = (torch.full((1, 1, rows), cols), full)
            # No BlockMask: every tile is FULL (as in the reference, the mask_mod is not applied).
            tables = dict(kv=(None, None), full_kv=every_kv, q=(None, None), full_q=every_q)
        else:
            sparse = tuple(block_mask.BLOCK_SIZE)
            tables = dict(kv=(block_mask.kv_num_blocks, block_mask.kv_indices),
                          full_kv=(block_mask.full_kv_num_blocks, block_mask.full_kv_indices),
                          q=(block_mask.q_num_blocks, block_mask.q_indices),
                          full_q=(block_mask.full_q_num_blocks, block_mask.full_q_indices))
        block_m = min(self.options.get(f"{tile}_BLOCK_M", (FORWARD_TILE if tile == "FWD" else BACKWARD_TILE)[0]), sparse[0])
        block_n = min(self.options.get(f"{tile}_BLOCK_N", (FORWARD_TILE if tile == "FWD" else BACKWARD_TILE)[1]), sparse[1])
        if sparse[0] % block_m or sparse[1] % block_n:
            raise LoweringError(f"tile {block_m}x{block_n} must divide the BlockMask's BLOCK_SIZE {sparse}")
        tables["kv"], tables["full_kv"] = _pair_tables(tables["kv"], tables["full_kv"])
        tables["q"], tables["full_q"] = _pair_tables(tables["q"], tables["full_q"])
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
        score_args, score_tensors = _buffer_args(score_buffers)
        mask_args, _ = _buffer_args(mask_buffers)
        mod_args = score_args + self.constants[0] + mask_args + self.constants[1]
        return dict(q=q, k=k, v=v, B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, E=E, Ev=Ev,
                    tables=tables, sparse=sparse, block=(block_m, block_n), mod_args=mod_args,
                    score_tensors=score_tensors, scale=1.0 / math.sqrt(E) if scale is None else float(scale),
                    consts=dict(SPARSE_M=sparse[0], SPARSE_N=sparse[1], BLOCK_M=block_m, BLOCK_N=block_n,
                                D=E, DV=Ev, D_PAD=_pad(E), DV_PAD=_pad(Ev),
                                DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32"))

    def __call__(self, query, key, value, *, score_buffers=(), mask_buffers=(), block_mask=None,
                 scale=None, enable_gqa=False):
        a = self._setup(query, key, value, score_buffers, mask_buffers, block_mask, scale, enable_gqa, "FWD")
        q, k, v, B, Hq, L = a["q"], a["k"], a["v"], a["B"], a["Hq"], a["L"]
        out = torch.empty(B, Hq, L, a["Ev"], dtype=query.dtype, device=query.device)
        lse = torch.empty(B, Hq, L, dtype=torch.float32, device=query.device)
        max_scores = torch.empty_like(lse)
        kv = _sparse_args(*a["tables"]["kv"], q.device)
        full_kv = _sparse_args(*a["tables"]["full_kv"], q.device)
        sparse = kv[0:2] + full_kv[0:2] + kv[2:9]  # kv_num, kv_idx, full_num, full_idx, shared strides
        grid = (math.ceil(L / a["block"][0]), B * Hq)
        self.module.attention_forward[grid](
            q, k, v, out, lse, max_scores, a["scale"], L, a["S"], Hq, Hq // a["Hkv"],
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *sparse,
            *a["mod_args"], **a["consts"])
        return out, lse, max_scores

    def backward(self, query, key, value, out, lse, grad_out, *, grad_lse=None, score_buffers=(), mask_buffers=(),
                 block_mask=None, scale=None, enable_gqa=False, buffer_grads=False):
        """(dq, dk, dv, [grads of the score_mod's float buffers, or None]) for d loss / d out = grad_out
        and d loss / d lse = grad_lse (None: zero)."""
        a = self._setup(query, key, value, score_buffers, mask_buffers, block_mask, scale, enable_gqa, "BWD")
        q, k, v, B, Hq, Hkv, L, S = (a[n] for n in ("q", "k", "v", "B", "Hq", "Hkv", "L", "S"))
        do = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        delta = (out.float() * grad_out.float()).sum(-1)  # rowsum(dO * O) = rowsum(dP * P)
        if grad_lse is not None:  # d lse / d s = P: the lse's gradient joins dS = P * (dP - delta)
            delta = delta - torch.where(torch.isneginf(lse), 0.0, grad_lse.float())
        delta = delta.contiguous()
        lse = lse.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        common = [a["scale"], L, S]
        strides = [*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3]]
        kv = _sparse_args(*a["tables"]["kv"], q.device)
        full_kv = _sparse_args(*a["tables"]["full_kv"], q.device)
        sparse = kv[0:2] + full_kv[0:2] + kv[2:9]
        self.module.attention_backward_dq[(math.ceil(L / a["block"][0]), B * Hq)](
            q, k, v, do, lse, delta, dq, *common, Hq, Hq // Hkv, *strides, *sparse,
            *a["mod_args"], **a["consts"])
        qm = _sparse_args(*a["tables"]["q"], q.device)
        full_q = _sparse_args(*a["tables"]["full_q"], q.device)
        grads = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) if i in self.grad_buffers else None
                 for i, t in enumerate(a["score_tensors"])]
        grad_args = [g for g in grads if g is not None]
        self.module.attention_backward_dkdv[(math.ceil(S / a["block"][1]), B * Hkv)](
            q, k, v, do, lse, delta, dk, dv, *common, Hq, Hkv, Hq // Hkv, *strides,
            *(qm[0:2] + full_q[0:2] + qm[2:9]), *a["mod_args"], *grad_args, **a["consts"],
            BUFFER_GRAD=bool(buffer_grads and grad_args))
        return dq, dk, dv, grads

    def decode(self, query, key, value, *, score_buffers=(), mask_buffers=(), block_mask=None,
               scale=None, enable_gqa=False):
        """Split-KV decoding: ``(out, lse, max_scores)`` as ``__call__`` gives, forward only.

        For L <= ``MAX_Q_LEN`` query rows: one program per (batch, KV head,
        q block, split) takes all query rows of the KV head's G = Hq / Hkv
        query heads and one share of their KV blocks; a second kernel merges
        the splits by log-sum-exp. A BlockMask with a per-head dimension may
        list different blocks for the heads of a group, so such a call takes
        one query head per program instead. The split count is
        ``ceil(KV tiles / tiles per SPLIT_KV_CHUNK)`` when ``kernel_options``
        name ``SPLIT_KV_CHUNK`` (KV positions, rounded up to whole sparse
        blocks), else enough programs for ``PROGRAMS_PER_SM`` per SM on a GPU,
        and 1 elsewhere (the interpreter runs programs one after another).
        Each row's visited blocks are divided evenly among the splits.

        Raises ``LoweringError`` for L > ``MAX_Q_LEN`` and as ``__call__``.

        Example::

            >>> out, lse, max_scores = kernel.decode(q, k, v, block_mask=bm, enable_gqa=True)  # q (B, Hq, 1, E)
        """
        B, Hq, L = query.shape[:3]
        if L > MAX_Q_LEN:
            raise LoweringError(f"split-KV decoding handles Q_LEN <= {MAX_Q_LEN}, got {L}")
        a = self._setup(query, key, value, score_buffers, mask_buffers, block_mask, scale, enable_gqa, "FWD")
        q, k, v, S, Ev = a["q"], a["k"], a["v"], a["S"], a["Ev"]
        sparse_m, sparse_n = a["sparse"]
        group = Hq // a["Hkv"]
        per_head_mask = block_mask is not None and block_mask.kv_num_blocks.shape[1] > 1
        heads = 1 if per_head_mask else group
        rows_per_head = min(L, sparse_m)
        q_blocks = math.ceil(L / sparse_m)
        units = B * (Hq // heads) * q_blocks
        splits = self._decode_splits(math.ceil(S / sparse_n), sparse_n, units, q.device)
        f32 = dict(dtype=torch.float32, device=q.device)
        m_part, l_part = torch.empty(B * Hq, splits, L, **f32), torch.empty(B * Hq, splits, L, **f32)
        acc_part = torch.empty(B * Hq, splits, L, Ev, **f32)
        kv = _sparse_args(*a["tables"]["kv"], q.device)
        full_kv = _sparse_args(*a["tables"]["full_kv"], q.device)
        consts = {name: value for name, value in a["consts"].items() if name != "BLOCK_M"}  # rows: ROWS
        self.module.attention_decode[(units, splits)](
            q, k, v, m_part, l_part, acc_part, a["scale"], L, S, Hq, group, heads, q_blocks, splits,
            rows_per_head, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *(kv[0:2] + full_kv[0:2] + kv[2:9]), *a["mod_args"], ROWS=_pad(heads * rows_per_head), **consts)
        out = torch.empty(B, Hq, L, Ev, dtype=query.dtype, device=q.device)
        lse, max_scores = torch.empty(B, Hq, L, **f32), torch.empty(B, Hq, L, **f32)
        self.module.attention_decode_merge[(B * Hq,)](
            m_part, l_part, acc_part, out, lse, max_scores, L, Hq, splits, *out.stride()[:3],
            ROWS=_pad(L), DV=Ev, DV_PAD=consts["DV_PAD"])
        return out, lse, max_scores

    def _decode_splits(self, kv_tiles: int, sparse_n: int, units: int, device: torch.device) -> int:
        """How many splits each unit's KV blocks are cut into (see ``decode``)."""
        if "SPLIT_KV_CHUNK" in self.options:
            tiles_per_split = math.ceil(max(1, int(self.options["SPLIT_KV_CHUNK"])) / sparse_n)
            return math.ceil(kv_tiles / tiles_per_split)
        if device.type != "cuda":
            return 1
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(kv_tiles, math.ceil(PROGRAMS_PER_SM * sms / units)))

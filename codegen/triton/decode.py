"""The split-KV decoding kernels' templates (Q_LEN <= 16 against a long KV cache).

Decoding has one to a few query rows per head, so the general forward's tiles
would be mostly padding and its programs would each read all of K/V for one
query head: the cost is the K/V read, and these kernels are organised around
it. ``DECODE`` uses the same hook points as ``codegen.triton.templates`` and
calls its ``_forward_tiles`` (the score tile, the mods and the online softmax
are shared), so it is filled into the same generated module after ``FORWARD``.
"""

# One program stacks every (query head, position) row of HEADS query heads that
# share a KV head into one ROWS x D tile (row r: head h0 + r // ROWS_PER_HEAD,
# position r % ROWS_PER_HEAD of its q block), so each K/V tile is read once for
# all of them, and walks one of SPLITS contiguous shares of the row's sparse
# blocks (the FULL list, then the PARTIAL list). Each share's partial (max, sum,
# unnormalised output) goes to scratch; attention_decode_merge merges them by
# log-sum-exp.
DECODE = '''
@triton.jit
def attention_decode(Q, K, V, M_PART, L_PART, ACC_PART, scale, L, S, HQ, GROUP, HEADS, Q_BLOCKS, SPLITS,
                     ROWS_PER_HEAD, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn,
                     kv_num, kv_idx, full_num, full_idx, bm_sb, bm_sh, bm_sm, bi_sb, bi_sh, bi_sm, bi_sn,
                     {MOD_PARAMS}
                     ROWS: tl.constexpr, SPARSE_M: tl.constexpr, SPARSE_N: tl.constexpr, BLOCK_N: tl.constexpr,
                     D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """One program: one split of the KV blocks, for all rows of HEADS query heads in one q block."""
    unit = tl.program_id(0)
    split = tl.program_id(1)
    q_block = unit % Q_BLOCKS
    units_per_batch = HQ // HEADS
    b = (unit // Q_BLOCKS // units_per_batch).to(tl.int64)
    h0 = (unit // Q_BLOCKS % units_per_batch).to(tl.int64) * HEADS
    h_kv = h0 // GROUP
    r = tl.arange(0, ROWS)
    g = r // ROWS_PER_HEAD
    h = h0 + tl.minimum(g, HEADS - 1)
    # Padding rows (past the HEADS heads) sit at position L, so the bounds check masks them.
    offs_m = tl.where(g < HEADS, q_block * SPARSE_M + r % ROWS_PER_HEAD, L)
    in_m = offs_m < L
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=in_m[:, None] & (offs_d[None, :] < D), other=0.0)
    K_base = K + b * stride_kb + h_kv * stride_kh
    V_base = V + b * stride_vb + h_kv * stride_vh
    # The heads of a program share their block lists (the host makes HEADS 1 for per-head masks).
    row = b * bm_sb + h0 * bm_sh + q_block * bm_sm
    idx_row = b * bi_sb + h0 * bi_sh + q_block * bi_sm
    n_full = tl.load(full_num + row)
    total = n_full + tl.load(kv_num + row)
    # This split's share of the concatenated list [FULL..., PARTIAL...]: every split of a row gets
    # an equal share of the blocks it visits, however sparse the row.
    share = tl.cdiv(total, SPLITS)
    start = tl.minimum(split * share, total)
    end = tl.minimum(start + share, total)
    full_start, full_end = tl.minimum(start, n_full), tl.minimum(end, n_full)
    part_start, part_end = tl.maximum(start, n_full) - n_full, tl.maximum(end, n_full) - n_full
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, DV_PAD], tl.float32)
    acc, m_i, l_i = _forward_tiles(q, acc, m_i, l_i, b, h[:, None], offs_m, K_base, V_base,
                                   full_end - full_start, full_idx + idx_row + full_start * bi_sn,
                                   bi_sn, stride_kn, stride_vn, S, L, scale, {MOD_ARGS} False, SPARSE_N, BLOCK_N,
                                   D, DV, D_PAD, DV_PAD, DOT_PRECISION)
    acc, m_i, l_i = _forward_tiles(q, acc, m_i, l_i, b, h[:, None], offs_m, K_base, V_base,
                                   part_end - part_start, kv_idx + idx_row + part_start * bi_sn,
                                   bi_sn, stride_kn, stride_vn, S, L, scale, {MOD_ARGS} True, SPARSE_N, BLOCK_N,
                                   D, DV, D_PAD, DV_PAD, DOT_PRECISION)
    # Partials laid out (B * HQ, SPLITS, L) and (B * HQ, SPLITS, L, DV), all float32.
    part = ((b * HQ + h) * SPLITS + split) * L + offs_m
    tl.store(M_PART + part, m_i, mask=in_m)
    tl.store(L_PART + part, l_i, mask=in_m)
    tl.store(ACC_PART + part[:, None] * DV + offs_dv[None, :], acc, mask=in_m[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def attention_decode_merge(M_PART, L_PART, ACC_PART, Out, LSE, MAX, L, HQ, SPLITS,
                           stride_ob, stride_oh, stride_om,
                           ROWS: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr):
    """One program: the splits of one (batch, query head) merged by log-sum-exp into out, lse, max."""
    bh = tl.program_id(0)
    b = bh // HQ
    h = bh % HQ
    offs_m = tl.arange(0, ROWS)
    offs_dv = tl.arange(0, DV_PAD)
    in_m = offs_m < L
    in_out = in_m[:, None] & (offs_dv[None, :] < DV)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, DV_PAD], tl.float32)
    for split in range(SPLITS):
        part = (bh * SPLITS + split) * L + offs_m
        m_s = tl.load(M_PART + part, mask=in_m, other=float("-inf"))
        l_s = tl.load(L_PART + part, mask=in_m, other=0.0)
        acc_s = tl.load(ACC_PART + part[:, None] * DV + offs_dv[None, :], mask=in_out, other=0.0)
        # Each split's sum and output are relative to its own max: rescale both to the common one
        # (an empty split has max -inf and contributes 0).
        m_new = tl.maximum(m_i, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2((m_i - m_safe) * LOG2E)
        beta = tl.exp2((m_s - m_safe) * LOG2E)
        l_i = l_i * alpha + l_s * beta
        acc = acc * alpha[:, None] + acc_s * beta[:, None]
        m_i = m_new
    out, lse = _normalise(acc, m_i, l_i)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :],
             out.to(Out.dtype.element_ty), mask=in_out)
    tl.store(LSE + bh * L + offs_m, lse, mask=in_m)
    tl.store(MAX + bh * L + offs_m, m_i, mask=in_m)
'''

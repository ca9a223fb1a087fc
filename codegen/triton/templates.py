"""Triton kernel templates: FlashAttention-style loops with hook points for the mods.

Hook points (filled by ``codegen.triton.source``):
``{MOD_PARAMS}`` kernel parameters of the captured buffers and constants,
``{SCORE_MOD}`` lines turning ``score`` (a BLOCK_M x BLOCK_N float32 tile) into
the modded score, ``{MASK_MOD}`` lines setting ``keep`` for PARTIAL tiles,
``{DSCORE}`` lines setting ``dscore`` (d modded score / d raw score) and
``{BUFFER_GRADS}`` atomic adds of the captured buffers' gradients.

Iteration is block-sparse: each program walks the BlockMask's FULL tiles
(``MASKED=False``: no mask_mod, only sequence bounds) then its PARTIAL tiles
(``MASKED=True``), ``SPARSE_*`` sized blocks split into BLOCK_M/BLOCK_N tiles.
"""

HELPERS = '''
import triton
import triton.language as tl
from triton.language.extra import libdevice

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)
# Read when this module is loaded, as triton.jit reads it to choose the interpreter for its kernels.
INTERPRET = tl.constexpr(triton.knobs.runtime.interpret)


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr):
    # Triton's CPU interpreter keeps bfloat16 tiles as their uint16 bit patterns (numpy has no
    # bf16) and its tl.dot multiplies those patterns as integers (triton-lang/triton#11584; loads,
    # stores and casts do convert). Its matmul is fp32 whatever the operands or DOT_PRECISION, so
    # widening them there changes only bf16, and makes it right. On a GPU INTERPRET is False, the
    # branch is not compiled and the MMA takes the operands as they are.
    if INTERPRET:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _floordiv_int(a, b):
    # Python's floor division: round toward -inf, not toward zero.
    q = a // b
    return q - ((a % b != 0) & ((a < 0) != (b < 0))).to(q.dtype)


@triton.jit
def _mod_int(a, b):
    r = a % b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)


@triton.jit
def _floordiv_float(a, b):
    return tl.floor(a / b)


@triton.jit
def _mod_float(a, b):
    return a - b * tl.floor(a / b)


@triton.jit
def _normalise(acc, m_i, l_i):
    # out = acc / l and lse = m + log(l); a fully masked row (l = 0) gets out 0 and lse -inf.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    return out, lse
'''

# The score of one tile: raw q.k * scale, the score_mod, bounds and (PARTIAL tiles) the mask_mod.
# (Printed at the loop body's indentation by ``codegen.triton.source``.)
SCORE_TILE = '''
q_idx = offs_m[:, None].to(tl.int64)
kv_idx = offs_n[None, :].to(tl.int64)
score = _dot(q, tl.trans(k), DOT_PRECISION) * scale
{SCORE_MOD}
keep = (q_idx < L) & (kv_idx < S)
if MASKED:
{MASK_MOD}
score = tl.where(keep, score, float("-inf"))
'''

# The walk over a row's listed sparse blocks (KV blocks: N; for dK/dV, query blocks: M), each
# split into kernel tiles: offs_n / offs_m are the tile's positions.
TILE_WALK = '''    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    for i in range(num):
        sparse_block = tl.load(indices + i * idx_stride)
        for sub in range(SPARSE_X // BLOCK_X):
            offs_x = sparse_block * SPARSE_X + sub * BLOCK_X + tl.arange(0, BLOCK_X)'''

# The parameters of the KV-tile loops of the forward and dQ kernels, after their accumulators.
KV_WALK_PARAMS = '''b, h, offs_m, K_base, V_base, num, indices, idx_stride, stride_kn, stride_vn, S, L, scale,
    {MOD_PARAMS} MASKED: tl.constexpr, SPARSE_N: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr'''

# The head of the KV-tile loop shared by the forward and dq kernels: walk the
# listed sparse blocks, split each into BLOCK_N kernel tiles, load K and V
# (zero beyond S and beyond the head dims, which are padded to powers of two).
KV_TILES = '''{TILE_WALK_N}
            in_n = offs_n[:, None] < S
            k = tl.load(K_base + offs_n[:, None] * stride_kn + offs_d[None, :],
                        mask=in_n & (offs_d[None, :] < D), other=0.0)
            v = tl.load(V_base + offs_n[:, None] * stride_vn + offs_dv[None, :],
                        mask=in_n & (offs_dv[None, :] < DV), other=0.0)
'''

FORWARD = '''
@triton.jit
def _forward_tiles(q, acc, m_i, l_i, {KV_WALK_PARAMS}):
{KV_TILES}
{SCORE_TILE}
            # Online softmax in fp32; a row with no kept score yet has max -inf, use 0 instead.
            m_new = tl.maximum(m_i, tl.max(score, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2((m_i - m_safe) * LOG2E)
            p = tl.exp2((score - m_safe[:, None]) * LOG2E)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION)
            m_i = m_new
    return acc, m_i, l_i


@triton.jit
def attention_forward(Q, K, V, Out, LSE, MAX, scale, L, S, HQ, GROUP,
                      stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                      stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                      {QUERY_PROGRAM_PARAMS}):
    """One program: BLOCK_M query rows of one (batch, query head)."""
{QUERY_PROGRAM}
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=(offs_m[:, None] < L) & (offs_d[None, :] < D), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    acc, m_i, l_i = _forward_tiles(q, acc, m_i, l_i, b, h, offs_m, K_base, V_base,
                                   tl.load(full_num + row), full_idx + idx_row, bi_sn, stride_kn, stride_vn,
                                   S, L, scale, {MOD_ARGS} False, SPARSE_N, BLOCK_N, D, DV, D_PAD, DV_PAD,
                                   DOT_PRECISION)
    acc, m_i, l_i = _forward_tiles(q, acc, m_i, l_i, b, h, offs_m, K_base, V_base,
                                   tl.load(kv_num + row), kv_idx + idx_row, bi_sn, stride_kn, stride_vn,
                                   S, L, scale, {MOD_ARGS} True, SPARSE_N, BLOCK_N, D, DV, D_PAD, DV_PAD,
                                   DOT_PRECISION)
    out, lse = _normalise(acc, m_i, l_i)
    in_m = offs_m < L
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :],
             out.to(Out.dtype.element_ty), mask=in_m[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + bh * L + offs_m, lse, mask=in_m)
    tl.store(MAX + bh * L + offs_m, m_i, mask=in_m)
'''

BACKWARD_DQ = '''
@triton.jit
def _dq_tiles(q, do, lse, delta, dq, {KV_WALK_PARAMS}):
{KV_TILES}
{SCORE_TILE}
{DSCORE}
            p = tl.exp2((score - lse[:, None]) * LOG2E)
            dp = _dot(do, tl.trans(v), DOT_PRECISION)
            # dS through softmax, then through the score_mod (chain rule); masked scores get 0.
            ds = tl.where(keep, p * (dp - delta[:, None]) * dscore, 0.0)
            dq += _dot(ds.to(k.dtype), k, DOT_PRECISION)
    return dq


@triton.jit
def attention_backward_dq(Q, K, V, DO, LSE, DELTA, DQ, scale, L, S, HQ, GROUP,
                          stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                          stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                          {QUERY_PROGRAM_PARAMS}):
    """One program: dQ for BLOCK_M query rows of one (batch, query head); DQ is laid out like Q."""
{QUERY_PROGRAM}
    in_m = offs_m < L
    q_offsets = b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(Q + q_offsets, mask=in_m[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :],
                 mask=in_m[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse = tl.load(LSE + bh * L + offs_m, mask=in_m, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # fully masked row: p = 0
    delta = tl.load(DELTA + bh * L + offs_m, mask=in_m, other=0.0)
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    dq = _dq_tiles(q, do, lse, delta, dq, b, h, offs_m, K_base, V_base, tl.load(full_num + row),
                   full_idx + idx_row, bi_sn, stride_kn, stride_vn, S, L, scale, {MOD_ARGS}
                   False, SPARSE_N, BLOCK_N, D, DV, D_PAD, DV_PAD, DOT_PRECISION)
    dq = _dq_tiles(q, do, lse, delta, dq, b, h, offs_m, K_base, V_base, tl.load(kv_num + row),
                   kv_idx + idx_row, bi_sn, stride_kn, stride_vn, S, L, scale, {MOD_ARGS}
                   True, SPARSE_N, BLOCK_N, D, DV, D_PAD, DV_PAD, DOT_PRECISION)
    tl.store(DQ + q_offsets, (dq * scale).to(DQ.dtype.element_ty), mask=in_m[:, None] & (offs_d[None, :] < D))
'''

BACKWARD_DKDV = '''
@triton.jit
def _dkdv_tiles(k, v, dk, dv, b, h, offs_n, Q_base, DO_base, LSE_base, DELTA_base, num, indices,
                idx_stride, stride_qm, stride_dom, S, L, scale, {MOD_PARAMS} {GRAD_PARAMS}
                MASKED: tl.constexpr, SPARSE_M: tl.constexpr, BLOCK_M: tl.constexpr,
                D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                DOT_PRECISION: tl.constexpr, BUFFER_GRAD: tl.constexpr):
{TILE_WALK_M}
            in_m = offs_m < L
            q = tl.load(Q_base + offs_m[:, None] * stride_qm + offs_d[None, :],
                        mask=in_m[:, None] & (offs_d[None, :] < D), other=0.0)
            do = tl.load(DO_base + offs_m[:, None] * stride_dom + offs_dv[None, :],
                         mask=in_m[:, None] & (offs_dv[None, :] < DV), other=0.0)
            lse = tl.load(LSE_base + offs_m, mask=in_m, other=0.0)
            lse = tl.where(lse == float("-inf"), float("inf"), lse)  # fully masked row: p = 0
            delta = tl.load(DELTA_base + offs_m, mask=in_m, other=0.0)
{SCORE_TILE}
{DSCORE}
            p = tl.exp2((score - lse[:, None]) * LOG2E)
            dv += _dot(tl.trans(p.to(do.dtype)), do, DOT_PRECISION)
            dp = _dot(do, tl.trans(v), DOT_PRECISION)
            ds = tl.where(keep, p * (dp - delta[:, None]), 0.0)  # d loss / d modded score
            if BUFFER_GRAD:
{BUFFER_GRADS}
            ds = tl.where(keep, ds * dscore, 0.0)
            dk += _dot(tl.trans(ds.to(q.dtype)), q, DOT_PRECISION)
    return dk, dv


@triton.jit
def attention_backward_dkdv(Q, K, V, DO, LSE, DELTA, DKEY, DVALUE, scale, L, S, HQ, HKV, GROUP,
                            stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                            stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                            q_num, q_idx, full_num, full_idx, bm_sb, bm_sh, bm_sn, bi_sb, bi_sh, bi_sn, bi_sm,
                            {MOD_PARAMS} {GRAD_PARAMS}
                            SPARSE_M: tl.constexpr, SPARSE_N: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr,
                            DV_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, BUFFER_GRAD: tl.constexpr):
    """One program: dK, dV for BLOCK_N keys of one (batch, KV head), summed over its query heads."""
    start_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    h_kv = (bh % HKV).to(tl.int64)
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    in_n = offs_n[:, None] < S
    k_offsets = b * stride_kb + h_kv * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_offsets = b * stride_vb + h_kv * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :]
    k = tl.load(K + k_offsets, mask=in_n & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + v_offsets, mask=in_n & (offs_dv[None, :] < DV), other=0.0)
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, DV_PAD], tl.float32)
    sparse_n = start_n * BLOCK_N // SPARSE_N
    for g in range(GROUP):
        h = h_kv * GROUP + g
        Q_base = Q + b * stride_qb + h * stride_qh
        DO_base = DO + b * stride_dob + h * stride_doh
        LSE_base = LSE + (b * HQ + h) * L
        DELTA_base = DELTA + (b * HQ + h) * L
        row = b * bm_sb + h * bm_sh + sparse_n * bm_sn
        idx_row = b * bi_sb + h * bi_sh + sparse_n * bi_sn
        dk, dv = _dkdv_tiles(k, v, dk, dv, b, h, offs_n, Q_base, DO_base, LSE_base, DELTA_base,
                             tl.load(full_num + row), full_idx + idx_row, bi_sm, stride_qm, stride_dom,
                             S, L, scale, {MOD_ARGS} {GRAD_ARGS} False, SPARSE_M, BLOCK_M, D, DV, D_PAD,
                             DV_PAD, DOT_PRECISION, BUFFER_GRAD)
        dk, dv = _dkdv_tiles(k, v, dk, dv, b, h, offs_n, Q_base, DO_base, LSE_base, DELTA_base,
                             tl.load(q_num + row), q_idx + idx_row, bi_sm, stride_qm, stride_dom,
                             S, L, scale, {MOD_ARGS} {GRAD_ARGS} True, SPARSE_M, BLOCK_M, D, DV, D_PAD,
                             DV_PAD, DOT_PRECISION, BUFFER_GRAD)
    # DKEY, DVALUE are laid out like K, V.
    tl.store(DKEY + k_offsets, (dk * scale).to(DKEY.dtype.element_ty), mask=in_n & (offs_d[None, :] < D))
    tl.store(DVALUE + v_offsets, dv.to(DVALUE.dtype.element_ty), mask=in_n & (offs_dv[None, :] < DV))
'''

# The parameters after the strides of a program over query rows (the forward's and dQ's): the
# BlockMask's KV lists and their strides, the mods' buffers, the block sizes.
QUERY_PROGRAM_PARAMS = '''kv_num, kv_idx, full_num, full_idx, bm_sb, bm_sh, bm_sm, bi_sb, bi_sh, bi_sm, bi_sn,
    {MOD_PARAMS}
    SPARSE_M: tl.constexpr, SPARSE_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr'''

# The start of a program over BLOCK_M query rows of one (batch, query head): the forward's and dQ's.
QUERY_PROGRAM = '''    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    h = (bh % HQ).to(tl.int64)
    h_kv = h // GROUP  # GQA: query heads share a KV head
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    K_base = K + b * stride_kb + h_kv * stride_kh
    V_base = V + b * stride_vb + h_kv * stride_vh
    sparse_m = start_m * BLOCK_M // SPARSE_M
    row = b * bm_sb + h * bm_sh + sparse_m * bm_sm
    idx_row = b * bi_sb + h * bi_sh + sparse_m * bi_sm'''

KV_TILES = KV_TILES.replace("{TILE_WALK_N}", TILE_WALK.replace("_X", "_N").replace("offs_x", "offs_n"))
BACKWARD_DKDV = BACKWARD_DKDV.replace("{TILE_WALK_M}", TILE_WALK.replace("_X", "_M").replace("offs_x", "offs_m"))
FORWARD, BACKWARD_DQ = (template.replace("{KV_TILES}\n", KV_TILES).replace("{QUERY_PROGRAM}", QUERY_PROGRAM)
                        .replace("{QUERY_PROGRAM_PARAMS}", QUERY_PROGRAM_PARAMS).replace("{KV_WALK_PARAMS}", KV_WALK_PARAMS)
                        for template in (FORWARD, BACKWARD_DQ))

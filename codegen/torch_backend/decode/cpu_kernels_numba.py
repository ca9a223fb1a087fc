"""The numba kernels behind ``cpu_kernels`` (see there); imported on first use only.

Module-level functions, so that numba's disk cache (``cache=True``) holds
them: the first process compiles them (several seconds), later ones load them.
"""

import numba
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

# Constants live here, not imported: numba's disk cache notices changes to this file only.
QUERIES_PER_PASS = 4  # queries served per read of a row: the kernels' four accumulators
PREFETCH_ROWS = 8  # how many positions ahead rows are asked for (4 KB of fp32 rows of 128)


@intrinsic
def prefetch(typingctx, table, row, col):
    """LLVM's prefetch hint (read, keep in all cache levels) for the address of ``table[row, col]``;
    a hint never faults."""
    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        array = context.make_array(array_type)(context, builder, args[0])
        address = cgutils.get_item_pointer2(
            context, builder, array.data, cgutils.unpack_tuple(builder, array.shape),
            cgutils.unpack_tuple(builder, array.strides), array_type.layout, [args[1], args[2]], wraparound=False)
        byte_pointer, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        hint = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]), "llvm.prefetch.p0i8")
        # operands: address, read (0), keep in all levels (3), data cache (1)
        builder.call(hint, [builder.bitcast(address, byte_pointer), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(table, row, col), codegen


@numba.njit(cache=True, nogil=True)
def ask_ahead(table, row):
    """Prefetch a whole row. Pages end every few positions, and the hardware prefetcher follows a
    stream only after missing on it, so rows are asked for a few positions ahead where positions
    jump (``scattered``); on one long run of rows the hints only cost instructions
    (docs/performance.md)."""
    for e in range(0, table.shape[1], max(1, 64 // table.itemsize)):
        prefetch(table, row, e)


# reassoc/contract let the sums over E run in SIMD lanes (a different rounding order than a
# matmul's, within fp32 tolerance); no assumptions about NaN: unread slots may hold any value.
parallel_kernel = numba.njit(parallel=True, fastmath={"reassoc", "contract"}, cache=True, nogil=True)


@parallel_kernel
def scores(table, base, positions, queries, reads, scattered, out):
    """out[b, h, m, n] = queries[b, h, m] . table[base[b, h] + positions[b, n]] for n < reads[b];
    the rest of out is left as it was; rows asked for ahead where ``scattered``."""
    B, H, M, E = queries.shape
    # A (row, KV head) per task, heads outermost: threads take equal runs of tasks, and rows
    # of a batch differ in length, so each run holds every row (not the long rows in one run).
    for unit in numba.prange(B * H):
        b, h = unit % B, unit // B
        for m in range(0, M, QUERIES_PER_PASS):
            # A short last group repeats its last query (computed, not stored).
            q0, q1 = queries[b, h, m], queries[b, h, min(m + 1, M - 1)]
            q2, q3 = queries[b, h, min(m + 2, M - 1)], queries[b, h, min(m + 3, M - 1)]
            for n in range(reads[b]):
                if scattered and n + PREFETCH_ROWS < reads[b]:
                    ask_ahead(table, base[b, h] + positions[b, n + PREFETCH_ROWS])
                key = table[base[b, h] + positions[b, n]]
                s0 = s1 = s2 = s3 = key[0] * 0
                for e in range(E):
                    s0 += key[e] * q0[e]
                    s1 += key[e] * q1[e]
                    s2 += key[e] * q2[e]
                    s3 += key[e] * q3[e]
                out[b, h, m, n] = s0
                if m + 1 < M:
                    out[b, h, m + 1, n] = s1
                if m + 2 < M:
                    out[b, h, m + 2, n] = s2
                if m + 3 < M:
                    out[b, h, m + 3, n] = s3


@parallel_kernel
def values(table, base, positions, weights, reads, scattered, out):
    """out[b, h, m] = sum over n < reads[b] of weights[b, h, m, n] * table[base[b, h] + positions[b, n]];
    out (B, H, M rounded up to QUERIES_PER_PASS, Ev) zeroed, its rows past M scratch."""
    B, H, M, _ = weights.shape
    Ev = table.shape[1]
    for unit in numba.prange(B * H):  # tasks as in scores
        b, h = unit % B, unit // B
        for m in range(0, M, QUERIES_PER_PASS):
            w0, w1 = weights[b, h, m], weights[b, h, min(m + 1, M - 1)]
            w2, w3 = weights[b, h, min(m + 2, M - 1)], weights[b, h, min(m + 3, M - 1)]
            o0, o1, o2, o3 = out[b, h, m], out[b, h, m + 1], out[b, h, m + 2], out[b, h, m + 3]
            for n in range(reads[b]):
                if scattered and n + PREFETCH_ROWS < reads[b]:
                    ask_ahead(table, base[b, h] + positions[b, n + PREFETCH_ROWS])
                value = table[base[b, h] + positions[b, n]]
                p0, p1, p2, p3 = w0[n], w1[n], w2[n], w3[n]
                for e in range(Ev):
                    o0[e] += p0 * value[e]
                    o1[e] += p1 * value[e]
                    o2[e] += p2 * value[e]
                    o3[e] += p3 * value[e]

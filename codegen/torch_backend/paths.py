"""The torch back end's paths, in the order ``choose`` tries them: THE table is ``PATHS`` below.

Each entry is one small class: ``why_not(call)`` says why it does not serve a call (None: it
does), ``run(call)`` computes it. Decoding shapes on a long cache come first (split-KV, forward
only), then torch's fused CPU flash kernel: packed documents, a short KV as one whole matrix
(with a score_mod: the whole matrix in torch ops, forward only), plans of tiles where they pay,
then the generated block-sparse loop, which serves every call. Adding a path is one class here
and one line in ``PATHS``.
"""

from __future__ import annotations

from codegen.paths import Path, ServesEveryCall
from codegen.torch_backend import compiled, fused_paths
from codegen.torch_backend.decode import decoding, why_not_split_kv
from codegen.torch_backend.decode.batch import whole_batch, why_not_copied, why_not_in_place
from codegen.torch_backend.decode.chunks import chunked
from codegen.torch_backend.decode.pool import Pool, pool_major
from codegen.torch_backend.dense_scores import dense_scores, why_not_dense_scores
from codegen.torch_backend.kernel import compile_kernel, outside_compiled_graphs
from codegen.torch_backend.small_dense import small_dense, why_not_small_dense
from flexattn.call import Call


def _why_not_split_kv(call: Call, path: str) -> str | None:
    # A decoding call with no EMPTY tile has nothing to skip: its whole score matrix, one fused
    # call (no score_mod) or a few torch ops (a score_mod), beats split-KV's per-call tensor ops
    # (docs/performance.md).
    reason = why_not_split_kv(call, path)
    if reason is not None or call.forces(path):
        return reason
    if _why_not_small_dense(call) is None:
        return "small_dense serves it: no score_mod and no EMPTY tile, the whole score matrix in one fused call"
    if _why_not_dense_scores(call) is None:
        return "dense_scores serves it: no EMPTY tile, the whole score matrix in a few torch ops"
    return None


def _why_not_small_dense(call: Call) -> str | None:
    # Asked by each split-KV path and by small_dense itself: once per call.
    return call.derived("why_not_small_dense", lambda: why_not_small_dense(call, False))


def _why_not_dense_scores(call: Call) -> str | None:
    # Asked by each split-KV path and by dense_scores itself: once per call.
    return call.derived("why_not_dense_scores", lambda: why_not_dense_scores(call, False))


def _pool(call: Call) -> Pool:
    return call.derived("decode_pool", lambda: Pool(decoding(call)))


class DecodeBatchInPlace(Path):
    name = "decode_batch_in_place"
    summary = "split-KV decoding, the whole batch at once, K/V read where they lie by the CPU kernels"

    def why_not(self, call: Call) -> str | None:
        return _why_not_split_kv(call, self.name) or why_not_in_place(decoding(call), call.forces(self.name))

    def run(self, call: Call):
        return whole_batch(decoding(call), in_place=True)


class DecodeBatchCopied(Path):
    name = "decode_batch_copied"
    summary = "split-KV decoding, the whole batch at once, K/V by views and copies of tiles"

    def why_not(self, call: Call) -> str | None:
        return _why_not_split_kv(call, self.name) or why_not_copied(decoding(call), call.forces(self.name))

    def run(self, call: Call):
        return whole_batch(decoding(call), in_place=False)


class DecodePool(Path):
    name = "decode_pool"
    summary = "split-KV decoding over a paged pool shared by the batch, tile by tile, read in place"

    def why_not(self, call: Call) -> str | None:
        return _why_not_split_kv(call, self.name) or _pool(call).why_not(call.forces(self.name))

    def run(self, call: Call):
        return pool_major(decoding(call), _pool(call))


class DecodeChunks(Path):
    name = "decode_chunks"
    summary = "split-KV decoding per sequence, KV chunks merged by their log-sum-exp"

    def why_not(self, call: Call) -> str | None:
        return _why_not_split_kv(call, self.name)

    def run(self, call: Call):
        return chunked(decoding(call))


class SmallDense(Path):
    name = "small_dense"
    summary = "a call on a short KV (fewer than 8 KV tiles): its whole score matrix at once on torch's fused CPU kernel"

    def why_not(self, call: Call) -> str | None:
        return why_not_small_dense(call, True) if call.forces(self.name) else _why_not_small_dense(call)

    def run(self, call: Call):
        return outside_compiled_graphs(small_dense)(call)


class DenseScores(Path):
    name = "dense_scores"
    summary = ("a decoding step on a short KV or one that visits every tile, with no gradient: its whole "
               "score matrix, score_mod and mask in a few torch ops")

    def why_not(self, call: Call) -> str | None:
        return why_not_dense_scores(call, True) if call.forces(self.name) else _why_not_dense_scores(call)

    def run(self, call: Call):
        return dense_scores(call)


class FusedDocuments(Path):
    name = "fused_documents"
    summary = "torch's fused CPU flash kernel, one call per packed document"

    def why_not(self, call: Call) -> str | None:
        return fused_paths.why_not_fused(call) or fused_paths.document_plan(call)[1]

    def run(self, call: Call):
        return outside_compiled_graphs(fused_paths.run_fused)(call, fused_paths.document_plan(call)[0])


class FusedTiles(Path):
    name = "fused_tiles"
    summary = ("torch's fused CPU flash kernel on causal squares and rectangles of FULL tiles, PARTIAL tiles "
               "in batches (a separable bias as extra head-dim features)")

    def _forced(self, call: Call) -> bool:
        return call.forces(self.name) or call.options.get("FUSED") is True

    def why_not(self, call: Call) -> str | None:
        return (fused_paths.why_not_fused(call) or fused_paths.why_not_bias_span(call)
                or fused_paths.tile_plan(call, self._forced(call))[1])

    def run(self, call: Call):
        units = fused_paths.tile_plan(call, self._forced(call))[0]
        return outside_compiled_graphs(fused_paths.run_fused)(call, units)


class CompiledLoop(Path):
    name = "compiled_loop"
    summary = ("the generated block-sparse loop with its per-tile elementwise work compiled by torch.compile "
               "(built in the background; matmuls on BLAS)")

    def why_not(self, call: Call) -> str | None:
        found = call.derived("compiled_kernel", lambda: compiled.kernel_for(call))
        return found if isinstance(found, str) else None

    def run(self, call: Call):
        compiled.STATS["served"] += 1
        return call.derived("compiled_kernel", lambda: compiled.kernel_for(call))(call)


class GeneratedLoop(ServesEveryCall):
    name = "generated_loop"
    summary = "the generated block-sparse flash loop (forward and backward), cached by the mods' structure"

    def run(self, call: Call):
        return compile_kernel(call.score_graph, call.mask_graph)(call)


PATHS: tuple[Path, ...] = (
    DecodeBatchInPlace(),
    DecodeBatchCopied(),
    DecodePool(),
    DecodeChunks(),
    FusedDocuments(),
    SmallDense(),
    DenseScores(),
    FusedTiles(),
    CompiledLoop(),
    GeneratedLoop(),
)

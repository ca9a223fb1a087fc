"""The Triton back end's split-KV decoding kernels equal the dense reference and the general
Triton forward, under TRITON_INTERPRET=1 on CPU tensors (so every shape here is a few tiles)."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton back end cannot run")

from backends import BACKENDS
from codegen.triton import compile_kernel
from flexattn import dispatch
from flexattn.errors import InputError
from codegen.triton.kernel import Kernel
from flexattn.analysis import create_block_mask
from flexattn.trace import trace_mask_mod, trace_score_mod

SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625])


def _mods(name: str, L: int, S: int):
    """(score_mod, mask_mod, per_head) of a case; the L queries are the last L positions of S."""
    offset = torch.tensor(S - L)  # a captured 0-dim tensor, as a decode loop would pass it
    doc_id = torch.arange(S) // 45

    def causal(b, h, q, kv):
        return q + offset >= kv

    def sliding(b, h, q, kv):
        return (q + offset >= kv) & (q + offset - kv < 70)

    def documents(b, h, q, kv):
        return (doc_id[q + offset] == doc_id[kv]) | (kv < 10)

    def per_head(b, h, q, kv):  # even heads see a prefix of 64 keys, odd heads a causal window of 50
        return ((h % 2 == 0) & (kv < 64)) | ((h % 2 == 1) & (q + offset >= kv) & (q + offset - kv < 50))

    def empty_row(b, h, q, kv):  # query row 1 sees nothing
        return (q != 1) & (q + offset >= kv)

    def alibi(score, b, h, q, kv):
        return score + SLOPES[h] * (kv - q - offset)

    def softcap(score, b, h, q, kv):
        return 5.0 * torch.tanh(score / 5.0)

    return {"causal": (None, causal, False), "sliding window": (None, sliding, False),
            "documents": (None, documents, False), "per-head mask": (None, per_head, True),
            "empty row": (None, empty_row, False), "alibi": (alibi, causal, False),
            "softcap": (softcap, None, False)}[name]


def _inputs(name, L, Hq, Hkv, S, block=(32, 32)):
    """q, k, v and the back-end arguments (graphs, buffers, BlockMask) of a case."""
    torch.manual_seed(0)
    score_mod, mask_mod, per_head = _mods(name, L, S)
    score = trace_score_mod(score_mod) if score_mod else None
    mask = trace_mask_mod(mask_mod) if mask_mod else None
    bm = create_block_mask(mask_mod, 1, Hq if per_head else None, L, S, BLOCK_SIZE=block) if mask_mod else None
    q, k, v = torch.randn(1, Hq, L, 16), torch.randn(1, Hkv, S, 16), torch.randn(1, Hkv, S, 24)
    args = dict(score_graph=score.graph if score else None, score_buffers=list(score.buffers) if score else [],
                mask_graph=mask.graph if mask else None, mask_buffers=list(mask.buffers) if mask else [],
                block_mask=bm, scale=None, enable_gqa=True)
    return q, k, v, args


def _assert_close(got, want, out_tol=1e-5):
    """out within ``out_tol`` and the finite lse within 1e-5 relative error; the same rows fully masked."""
    (out, lse, _), (ref, ref_lse, _) = got, want
    assert ((out.float() - ref).norm() / ref.norm()).item() < out_tol
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert ((lse - ref_lse)[finite].norm() / ref_lse[finite].norm()).item() < 1e-5


# (case, L, Hq, Hkv, S, SPLIT_KV_CHUNK, BLOCK_SIZE): GQA ratios 1, 2, 4; KV lengths that are not
# multiples of the block; chunks of 1-3 blocks, so each row's blocks go to several splits.
CASES = [
    ("causal", 1, 4, 1, 257, 64, (32, 32)),
    ("causal", 3, 4, 2, 230, 32, (2, 32)),  # three query rows over two q blocks
    ("sliding window", 3, 4, 2, 300, 64, (32, 32)),
    ("documents", 3, 2, 2, 173, 32, (32, 32)),
    ("per-head mask", 3, 4, 2, 200, 64, (32, 32)),
    ("empty row", 3, 4, 2, 150, 64, (32, 32)),
    ("alibi", 1, 4, 2, 300, 96, (32, 32)),
    ("softcap", 3, 2, 1, 100, 32, (32, 32)),
    ("alibi", 3, 4, 2, 190, None, (32, 32)),  # the default split count (1 on CPU)
]


@pytest.mark.parametrize("name, L, Hq, Hkv, S, chunk, block", CASES,
                         ids=[f"{c[0]}-L{c[1]}-G{c[2] // c[3]}-S{c[4]}" for c in CASES])
def test_decode_matches_reference_and_general_forward(monkeypatch, name, L, Hq, Hkv, S, chunk, block):
    q, k, v, args = _inputs(name, L, Hq, Hkv, S, block)
    splits = []
    original = Kernel._decode_splits
    monkeypatch.setattr(Kernel, "_decode_splits", lambda self, *a: splits.append(original(self, *a)) or splits[-1])
    options = {"BLOCK_SIZE": 32, **({"SPLIT_KV_CHUNK": chunk} if chunk else {})}  # BLOCK_SIZE: no BlockMask
    kernel = compile_kernel(args["score_graph"], args["mask_graph"], options)
    call = {key: args[key] for key in ("mask_buffers", "block_mask", "scale", "enable_gqa")}
    got = kernel.decode(q, k, v, score_buffers=args["score_buffers"], **call)
    assert splits[0] > 1 if chunk else splits[0] == 1
    _assert_close(got, BACKENDS["reference"](q, k, v, kernel_options={}, **args))
    _assert_close(got, kernel(q, k, v, score_buffers=args["score_buffers"], **call))
    if name == "empty row":
        assert torch.all(got[0][:, :, 1] == 0) and torch.all(got[1][:, :, 1] == float("-inf"))


@pytest.mark.parametrize("name, L, Hq, Hkv, S, chunk",
                         [("alibi", 1, 4, 2, 300, 96), ("per-head mask", 3, 4, 2, 200, 64)])
def test_decode_bfloat16_matches_fp32_reference(name, L, Hq, Hkv, S, chunk):
    """bf16 out within 1e-2 of the reference on the same values in fp32; lse (fp32 throughout) as tight as fp32."""
    q, k, v, args = _inputs(name, L, Hq, Hkv, S)
    kernel = compile_kernel(args["score_graph"], args["mask_graph"], {"SPLIT_KV_CHUNK": chunk})
    call = {key: args[key] for key in ("mask_buffers", "block_mask", "scale", "enable_gqa")}
    q, k, v = (t.bfloat16() for t in (q, k, v))
    got = kernel.decode(q, k, v, score_buffers=args["score_buffers"], **call)
    assert got[0].dtype == torch.bfloat16
    _assert_close(got, BACKENDS["reference"](q.float(), k.float(), v.float(), kernel_options={}, **args), out_tol=1e-2)


def _path(q, k, v, options, args) -> str:
    return dispatch.choose("triton", dispatch.call_of(q, k, v, kernel_options=options, **args)).path.name


def test_decode_shapes_take_the_split_kv_kernels():
    """Q_LEN <= 16 without gradients takes the split-KV kernels; SPLIT_KV=False, gradients or long
    queries take the block-sparse kernels; forcing split-KV on a long query names the reason."""
    q, k, v, args = _inputs("causal", 1, 4, 2, 96)
    assert _path(q, k, v, {}, args) == "decode_split_kv"
    _assert_close(BACKENDS["triton"](q, k, v, kernel_options={}, **args),
                  BACKENDS["reference"](q, k, v, kernel_options={}, **args))
    _assert_close(BACKENDS["triton"](q, k, v, kernel_options={"PATH": "block_sparse"}, **args),
                  BACKENDS["reference"](q, k, v, kernel_options={}, **args))
    assert _path(q, k, v, {"SPLIT_KV": False}, args) == "block_sparse"
    assert _path(q.requires_grad_(), k, v, {}, args) == "block_sparse"
    q17, k, v, args = _inputs("causal", 17, 2, 2, 64)
    assert _path(q17, k, v, {}, args) == "block_sparse"
    with pytest.raises(InputError, match="Q_LEN=17 > 16"):
        BACKENDS["triton"](q17, k, v, kernel_options={"PATH": "decode_split_kv"}, **args)


def test_generated_source_has_the_decode_kernels_and_no_torch():
    kernel = compile_kernel(None, trace_mask_mod(lambda b, h, q, kv: q >= kv).graph, {})
    assert "def attention_decode(" in kernel.source and "def attention_decode_merge(" in kernel.source
    assert "torch." not in kernel.source

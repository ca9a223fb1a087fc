"""Every path of every back end's table: reached by a call that ``choose`` sends to it, and forced
by ``kernel_options["PATH"]`` against the dense reference; a forced path that cannot serve a call
raises ``InputError`` with its reason."""

import pytest
import torch

import flexattn
from codegen.torch_backend.decode.cpu_kernels import load_kernels

load_kernels()  # else the in-place decode path would give way while the kernels load


def _inputs(B, Hq, Hkv, L, S, E=16, seed=0, layout=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, E, generator=g)
    k, v = (torch.randn(B, Hkv, S, E, generator=g) for _ in range(2))
    if layout == "keys transposed":  # rows not contiguous: no table view, so nothing reads them in place
        k, v = (x.transpose(2, 3).contiguous().transpose(2, 3) for x in (k, v))
    return q, k, v


def _decode_window():  # every sequence a short window: the whole batch in one pass
    q, k, v = _inputs(2, 4, 2, 1, 512)
    bm = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx >= 480 - 64 * b, 2, None, 1, 512,
                                    BLOCK_SIZE=(1, 32))
    return dict(query=q, key=k, value=v, block_mask=bm, enable_gqa=True)


def _decode_window_transposed():  # the same with K/V rows that no table view covers
    return {**_decode_window(), **dict(zip(("query", "key", "value"), _inputs(2, 4, 2, 1, 512, layout="keys transposed")))}


def _decode_pool_stripes():  # one sequence, scattered tiles filling most of their range, K/V not a table
    q, k, v = _inputs(1, 4, 2, 1, 576, layout="keys transposed")
    bm = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: (kv_idx // 32) % 3 != 2, None, None, 1, 576,
                                    BLOCK_SIZE=(1, 32))
    return dict(query=q, key=k, value=v, block_mask=bm, enable_gqa=True, kernel_options={"SPLIT_KV_CHUNK": 32})


def _decode_per_head():  # the mask depends on the head, EMPTY tiles: per sequence and KV head, in chunks
    q, k, v = _inputs(2, 4, 2, 2, 400)
    bm = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: (kv_idx % (h + 2) != 0) & (kv_idx >= 64 * h), 2, 4,
                                    2, 400, BLOCK_SIZE=(2, 32))
    return dict(query=q, key=k, value=v, block_mask=bm, enable_gqa=True, score_mod=lambda s, b, h, q, kv: s * 0.5)


def _decode_short_padded():  # a short cache, left padding in one sequence: the whole matrix at once
    q, k, v = _inputs(2, 4, 2, 2, 90)
    bm = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx + 88) & (kv_idx >= 20 * b), 2, None,
                                    2, 90, BLOCK_SIZE=(2, 32))
    return dict(query=q, key=k, value=v, block_mask=bm, enable_gqa=True)


def _decode_short_softcap():  # the same with a score_mod: the whole matrix in torch ops
    return {**_decode_short_padded(), "score_mod": lambda s, b, h, q, kv: torch.tanh(s / 5) * 5}


def _documents():
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor([150, 100, 134]))
    q, k, v = _inputs(1, 2, 2, 384, 384)
    bm = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: (ids[q_idx] == ids[kv_idx]) & (q_idx >= kv_idx),
                                    None, None, 384, 384, BLOCK_SIZE=64)
    return dict(query=q, key=k, value=v, block_mask=bm)


def _causal_alibi():
    slopes = torch.tensor([0.5, 0.25])
    q, k, v = _inputs(1, 2, 2, 1024, 1024)
    bm = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, 1024, 1024,
                                    BLOCK_SIZE=64)
    return dict(query=q, key=k, value=v, block_mask=bm, score_mod=lambda s, b, h, q, kv: s + slopes[h] * (kv - q))


def _softcap_with_grads():
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 2, 70, 90))
    bm = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx + 20 >= kv_idx, None, None, 70, 90,
                                    BLOCK_SIZE=16)
    return dict(query=q, key=k, value=v, block_mask=bm, score_mod=lambda s, b, h, q, kv: torch.tanh(s / 5) * 5)


def _softcap_compiled():  # waits for its compiled kernel (the suite's default serves eagerly)
    return _with(_softcap_with_grads(), COMPILED=True)


TORCH_CASES = {
    "decode_batch_in_place": _decode_window,
    "decode_batch_copied": _decode_window_transposed,
    "decode_pool": _decode_pool_stripes,
    "decode_chunks": _decode_per_head,
    "fused_documents": _documents,
    "small_dense": _decode_short_padded,
    "dense_scores": _decode_short_softcap,
    "fused_tiles": _causal_alibi,
    "compiled_loop": _softcap_compiled,
    "generated_loop": _softcap_with_grads,
}


def _with(args, **options):
    return {**args, "kernel_options": {**args.get("kernel_options", {}), **options}}


def _assert_matches_reference(args, got):
    want = flexattn.flex_attention(**args, backend="reference", return_aux=flexattn.AuxRequest(lse=True))
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1].lse, want[1].lse, rtol=1e-5, atol=1e-5)


def test_the_torch_table_is_the_documented_order():
    assert flexattn.explain_call(**_decode_window(), print_it=False).table == tuple(TORCH_CASES)


@pytest.mark.parametrize("path", TORCH_CASES)
def test_each_torch_path_is_chosen_for_its_call_and_equals_the_reference(path):
    args = TORCH_CASES[path]()
    choice = flexattn.explain_call(**args, backend="torch", print_it=False)
    assert choice.path.name == path, str(choice)
    assert [name for name, _ in choice.skipped] == list(TORCH_CASES)[:list(TORCH_CASES).index(path)]
    _assert_matches_reference(args, flexattn.flex_attention(**args, backend="torch",
                                                            return_aux=flexattn.AuxRequest(lse=True)))


@pytest.mark.parametrize("case", TORCH_CASES)
def test_every_torch_path_forced_serves_or_names_its_reason(case):
    """Each path forced on each call: it equals the reference, or raises InputError with its reason."""
    args = TORCH_CASES[case]()
    served = []
    for path in TORCH_CASES:
        # Forced, the compiled loop waits for its compiler: only its own case pays for that.
        no_compile = {"COMPILED": False} if path == "compiled_loop" and case != path else {}
        forced = _with(args, PATH=path, **no_compile)
        try:
            choice = flexattn.explain_call(**forced, backend="torch", print_it=False)
        except flexattn.InputError as error:
            assert f"kernel_options['PATH']={path!r} cannot serve this call: " in str(error)
            with pytest.raises(flexattn.InputError, match="cannot serve this call"):
                flexattn.flex_attention(**forced, backend="torch")
            continue
        assert choice.forced and choice.path.name == path and choice.skipped == ()
        _assert_matches_reference(args, flexattn.flex_attention(**forced, backend="torch",
                                                                return_aux=flexattn.AuxRequest(lse=True)))
        served.append(path)
    assert case in served and "generated_loop" in served


def test_forcing_an_impossible_path_gives_its_reason():
    args = _softcap_with_grads()
    with pytest.raises(flexattn.InputError, match="'fused_tiles' cannot serve this call: the score_mod is not a "
                                                  "separable bias"):
        flexattn.flex_attention(**_with(args, PATH="fused_tiles"), backend="torch")
    with pytest.raises(flexattn.InputError, match="Q_LEN=70 > 16: not a decoding shape"):
        flexattn.flex_attention(**_with(args, PATH="decode_chunks"), backend="torch")
    with pytest.raises(flexattn.InputError, match="'no_such_path' is not a path of the torch back end"):
        flexattn.flex_attention(**_with(args, PATH="no_such_path"), backend="torch")


def test_max_scores_requests_skip_the_fused_paths_with_the_reason():
    args = _causal_alibi()
    choice = flexattn.explain_call(**args, return_aux=flexattn.AuxRequest(max_scores=True), print_it=False)
    assert choice.path.name == "generated_loop"
    assert dict(choice.skipped)["fused_tiles"] == "max_scores was requested and the fused kernel does not return it"


def test_the_reference_table_has_one_path():
    args = _softcap_with_grads()
    choice = flexattn.explain_call(**_with(args, PATH="dense"), backend="reference", print_it=False)
    assert choice.table == ("dense",) and choice.forced
    with pytest.raises(flexattn.InputError, match="'generated_loop' is not a path of the reference back end"):
        flexattn.explain_call(**_with(args, PATH="generated_loop"), backend="reference")


def _head_dim_outermost(x: torch.Tensor) -> torch.Tensor:
    """``x`` stored with its head dim outermost (stride(-1) != 1), same values."""
    return x.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_(x.requires_grad)


@pytest.mark.parametrize("path", [p for p in TORCH_CASES if p != "compiled_loop"])  # its tiles: matmuls only
def test_each_path_on_inputs_whose_head_dim_is_not_innermost(path):
    """torch's fused CPU kernel misreads a head dim of stride != 1 with no error: each path, on q, k, v
    (and a grad_out) stored head dim outermost, equals the reference, gradients too where it has them."""
    args = TORCH_CASES[path]()
    args.update({name: _head_dim_outermost(args[name]) for name in ("query", "key", "value")})
    _assert_matches_reference(args, flexattn.flex_attention(**args, backend="torch",
                                                            return_aux=flexattn.AuxRequest(lse=True)))
    forced = _with(args, PATH=path)
    try:
        got = flexattn.flex_attention(**forced, backend="torch", return_aux=flexattn.AuxRequest(lse=True))
    except flexattn.InputError as error:  # a path that reads K/V in place may refuse the layout
        assert "cannot serve this call" in str(error) and path.startswith("decode_")
        return
    _assert_matches_reference(args, got)
    if path in ("fused_documents", "fused_tiles", "generated_loop"):
        inputs = {name: args[name].detach().requires_grad_() for name in ("query", "key", "value")}
        grad_out = _head_dim_outermost(torch.randn_like(got[0]))
        grads = []
        for backend, options in (("torch", forced), ("reference", args)):
            leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.items()}
            flexattn.flex_attention(**{**options, **leaves}, backend=backend).backward(grad_out)
            grads.append([leaves[name].grad for name in ("query", "key", "value")])
        for mine, want in zip(*grads):
            torch.testing.assert_close(mine, want, rtol=1e-4, atol=1e-4)

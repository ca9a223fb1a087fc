"""The in-place cache reads of the batched split-KV rows equal reading gathered copies."""

import torch
from hypothesis import given, settings, strategies as st

from codegen.torch_backend.decode.cpu_kernels import scores_at, values_at
from codegen.torch_backend.decode.reads import row_table


def _cache(layout: str, B: int, H: int, S: int, D: int, dtype) -> torch.Tensor:
    """K or V (B, H, S, D) in one of the layouts decode meets."""
    if layout == "per row":
        return torch.randn(B, H, S, D, dtype=dtype)
    if layout == "shared pool":  # a paged pool: every row reads the same memory
        return torch.randn(1, H, S, D, dtype=dtype).expand(B, -1, -1, -1)
    if layout == "heads inner":  # (B, S, H, D) memory seen as (B, H, S, D): rows evenly spaced, not adjacent
        return torch.randn(B, S, H, D, dtype=dtype).transpose(1, 2)
    return torch.randn(B, H, D, S, dtype=dtype).transpose(2, 3)  # "keys transposed": rows not contiguous


@settings(max_examples=40, deadline=None)
@given(layout=st.sampled_from(["per row", "shared pool", "heads inner", "keys transposed"]),
       B=st.integers(1, 3), H=st.integers(1, 3), M=st.integers(1, 9), S=st.integers(1, 50), N=st.integers(1, 20),
       D=st.sampled_from([8, 24]), dtype=st.sampled_from([torch.float32, torch.float64]), scattered=st.booleans(),
       data=st.data())
def test_in_place_reads_equal_gathered_reads(layout, B, H, M, S, N, D, dtype, scattered, data):
    """Row b reads its first reads[b] positions; the rest of its slots point at position S, which
    holds NaN (padding may point anywhere: what is not read must not reach the weighted values;
    its scores are undefined).
    M spans several passes of the kernels' four queries, with short last groups."""
    torch.manual_seed(0)
    x = _cache(layout, B, H, S + 1, D, dtype)
    rows = row_table(x)
    if rows is None:  # rows not evenly spaced and contiguous: reading in place would copy the cache
        assert layout in ("heads inner", "keys transposed")
        return
    assert layout in ("per row", "shared pool") or min(H, S) == 1
    table, base = rows
    assert table.data_ptr() == x.data_ptr()  # a view, not a copy
    reads = torch.tensor(data.draw(st.lists(st.integers(0, N), min_size=B, max_size=B)))
    read = torch.arange(N).view(1, N) < reads.view(B, 1)  # (B, N)
    positions = torch.tensor(data.draw(st.lists(st.integers(0, S - 1), min_size=B * N, max_size=B * N))).view(B, N)
    positions = torch.where(read, positions, S)
    (x[:1] if x.stride(0) == 0 else x)[:, :, S] = float("nan")  # a shared pool's rows are one memory
    gathered = x[torch.arange(B).view(B, 1, 1), torch.arange(H).view(1, H, 1), positions.view(B, 1, N)]  # (B, H, N, D)

    q_rows = torch.randn(B, H, M, D, dtype=dtype)
    scores = scores_at(table, base, positions, q_rows, reads, scattered)
    was_read = read.view(B, 1, 1, N).expand(B, H, M, N)
    torch.testing.assert_close(scores[was_read], torch.einsum("bhmd,bhnd->bhmn", q_rows, gathered)[was_read])
    p = torch.rand(B, H, M, N, dtype=dtype)
    want = torch.einsum("bhmn,bhnd->bhmd", p * read.view(B, 1, 1, N), gathered.nan_to_num(nan=0.0))
    torch.testing.assert_close(values_at(table, base, positions, p, reads, scattered), want)


def test_kernels_take_tensors_that_require_grad_under_no_grad():
    """Inference code holds caches that require grad (a model's parameters' outputs) under no_grad."""
    table = torch.randn(10, 4, requires_grad=True)
    base, positions = torch.zeros(1, 1, dtype=torch.long), torch.arange(10).view(1, 10)
    q = torch.randn(1, 1, 2, 4, requires_grad=True)
    with torch.no_grad():
        s = scores_at(table, base, positions, q, torch.tensor([10]), scattered=False)
        o = values_at(table, base, positions, s.softmax(-1), torch.tensor([10]), scattered=False)
    torch.testing.assert_close(s, (q @ table.T).detach())
    torch.testing.assert_close(o, (s.softmax(-1) @ table).detach())


def test_kernels_from_several_threads_at_once():
    """Launches from several threads (a server's workers) are serialised, each result its own."""
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(0)
    table, base = torch.randn(4000, 32), torch.tensor([[0, 2000]])
    positions = torch.randint(0, 2000, (1, 500))
    queries = [torch.randn(1, 2, 4, 32) for _ in range(8)]
    want = [torch.einsum("hmd,hnd->hmn", q[0], table[base.view(2, 1) + positions]).unsqueeze(0) for q in queries]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda q: scores_at(table, base, positions, q, torch.tensor([500]), True), queries))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)

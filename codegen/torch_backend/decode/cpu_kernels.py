"""K/V read where they lie in a cache, on the CPU: two small numba kernels.

A paged pool scatters a sequence's keys and values over pages, and torch has no CPU matmul that
reads an operand through an index: a copy of the pages is read twice (once to copy, once to
multiply). These kernels walk each (sequence, KV head)'s positions, read each key or value row
once and use it for the sequence's few queries while it is in registers, and, where pages
interleave, ask for rows a few positions ahead. What else was tried, and the measurements, are in
docs/performance.md.

* ``scores_at``: s[b, h, m, n] = q[b, h, m] . K[base[b, h] + positions[b, n]]
* ``values_at``: o[b, h, m] = sum_n p[b, h, m, n] V[base[b, h] + positions[b, n]]

Loading the kernels means importing numba and compiling them (once per machine: numba caches
them on disk) or reading them from numba's cache (once per process). So that a first decode call
does not wait for it, ``kernels_ready`` starts loading in a background thread the first time it
is asked and answers False until the float32 kernels are in; the decode paths that read K/V in
place say so and another path serves meanwhile. ``load_kernels`` loads them now (benchmarks,
tests). ``import flexattn`` imports nothing of numba.
"""

from __future__ import annotations

import threading

import torch

# numba's fallback threading layer ("workqueue", where no OpenMP or TBB runtime is found)
# aborts the process when two threads launch parallel kernels at once: one launch at a time.
_launch = threading.Lock()
_loaded = threading.Event()
_loader: list = []  # the background loading thread, once started
_start = threading.Lock()


def kernels_ready() -> bool:
    """Whether the kernels are loaded. The first call starts loading them in a background
    thread (see the module docstring) and returns False, as do calls until they are in."""
    if _loaded.is_set():
        return True
    with _start:
        if not _loader:
            _loader.append(threading.Thread(target=load_kernels, name="flexattn-cpu-kernels", daemon=True))
            _loader[0].start()
    return _loaded.is_set()


def load_kernels() -> None:
    """Import numba and compile the float32 kernels, or read them from numba's disk cache, now.

    Example::

        >>> load_kernels()  # before timing decode calls
        >>> kernels_ready()
        True
    """
    if _loaded.is_set():
        return
    table, rows = torch.zeros(8, 4), torch.zeros(1, 1, dtype=torch.int64)
    positions, reads = torch.arange(8).view(1, 8), torch.tensor([8])
    scores = scores_at(table, rows, positions, torch.zeros(1, 1, 1, 4), reads, True)
    values_at(table, rows, positions, scores, reads, True)
    _loaded.set()


def scores_at(table: torch.Tensor, base: torch.Tensor, positions: torch.Tensor, queries: torch.Tensor,
              reads: torch.Tensor, scattered: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """Scores (B, H, M, N) of queries (B, H, M, E), already scaled, against the keys at rows
    ``base[b, h] + positions[b, n]`` of ``table`` (R, E); sequence b reads only its first ``reads[b]``
    positions, and its scores past them are undefined (the caller masks them). ``scattered``:
    whether sequences' positions jump (a paged pool's pages), where the kernel asks for rows ahead of
    time; runs of consecutive rows are left to the hardware prefetcher, which does better there.
    ``out``: a contiguous (B, H, M, N) tensor to write into (else a new one).

    ``table`` is a CPU float32/float64 tensor with contiguous rows (a
    ``reads.row_table`` view of the cache); base (B, H), positions
    (B, N) and reads (B,) are integer tensors, base + positions in [0, R)
    where read: not checked, the kernel reads without bounds checks.

    Example::

        >>> table, base = row_table(k_pool)  # a paged pool seen as rows
        >>> s = scores_at(table, base, positions, q_rows * scale, reads, scattered=True)
    """
    B, H, M, _ = queries.shape
    if out is None:
        out = torch.empty(B, H, M, positions.shape[1], dtype=queries.dtype)
    _launch_kernel("scores", table, _indices(base), _indices(positions), queries.contiguous(), _indices(reads),
                   scattered, out)
    return out


def values_at(table: torch.Tensor, base: torch.Tensor, positions: torch.Tensor, weights: torch.Tensor,
              reads: torch.Tensor, scattered: bool) -> torch.Tensor:
    """Sums (B, H, M, Ev) of the values at rows ``base[b, h] + positions[b, n]`` of ``table`` (R, Ev)
    weighted by ``weights`` (B, H, M, N); sequence b reads only its first ``reads[b]`` positions (the rest
    may hold anything, NaN included). ``scattered`` as for ``scores_at``.

    Same conditions as ``scores_at``. Example::

        >>> o = values_at(v_table, base, positions, p, reads, scattered=True)  # p: softmax numerators
    """
    B, H, M, _ = weights.shape
    per_pass = _kernels().QUERIES_PER_PASS  # the kernel's scratch rows round M up to whole passes
    out = torch.zeros(B, H, -(-M // per_pass) * per_pass, table.shape[1], dtype=weights.dtype)
    _launch_kernel("values", table, _indices(base), _indices(positions), weights.contiguous(), _indices(reads),
                   scattered, out)
    return out[:, :, :M]


def _indices(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.int64).contiguous()


def _kernels():
    from codegen.torch_backend.decode import cpu_kernels_numba  # imports numba; compiles on first call

    return cpu_kernels_numba


def _launch_kernel(name: str, *arguments) -> None:
    import numba

    with _launch:
        numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
        getattr(_kernels(), name)(*(a.detach().numpy() if isinstance(a, torch.Tensor) else a for a in arguments))

"""The pictures of a BlockMask: torch's ``to_string``, flexattn's ``tile_string``, ``plot``'s PNG, and
``explain``'s account of how its tiles were decided.

``torch_picture`` reproduces torch's ``BlockMask.to_string`` character for character (a
drop-in caller may compare or parse it): each character pair summarises a section of tiles,
``██`` when every tile of the section is visited, ``░░`` when some are, blank when none, so
it does not tell full tiles from partial ones. ``tile_picture`` draws one character pair per
tile and does: ``██`` full, ``░░`` partial, blank empty.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from flexattn.errors import BlockMaskError

EMPTY, PARTIAL, FULL = 0, 1, 2  # tile classes, as stored in a tile-class tensor
# The kinds of a square PARTIAL tile on a diagonal (``flexattn.analysis.diagonals``): it keeps
# exactly its q >= kv positions (LOWER, a causal triangle), exactly its q <= kv ones (UPPER), or neither.
NEITHER, LOWER, UPPER = 0, 1, 2
_MORE = ("To print out more, set BlockMask.to_string(limit=N)",
         "You can also index (BlockMask[batch, head]) to choose a specific batch or head")


def _grid(grid_size, limit) -> tuple[int, int]:
    pair = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    if len(pair) != 2 or not all(isinstance(x, int) and x != 0 for x in pair) or not isinstance(limit, int):
        raise BlockMaskError(f"to_string takes grid_size=int, (rows, cols) or -1 (not 0) and limit=int, got "
                             f"grid_size={grid_size!r}, limit={limit!r}")
    return pair


def torch_picture(dense: torch.Tensor, grid_size, limit: int) -> str:
    """torch's ``to_string`` of the visited-tile matrix ``dense`` (..., Q_BLOCKS, KV_BLOCKS)."""
    max_rows, max_cols = _grid(grid_size, limit)
    visited = dense.to(torch.bool).numpy()
    *lead, n_rows, n_cols = visited.shape
    # torch's steps: ceil(n / max) as (n + max - 1) // max, at least 1 (so -1 draws every tile).
    row_step, col_step = max(1, (n_rows + max_rows - 1) // max_rows), max(1, (n_cols + max_cols - 1) // max_cols)
    row_starts, col_starts = np.arange(0, n_rows, row_step), np.arange(0, n_cols, col_step)
    pictures = []
    for count, at in enumerate(itertools.product(*(range(n) for n in lead))):
        if count == limit:
            pictures += ["...", *_MORE]
            break
        tiles = visited[at].astype(np.int64)
        seen = np.add.reduceat(np.add.reduceat(tiles, row_starts, axis=0), col_starts, axis=1)
        sizes = np.add.reduceat(np.add.reduceat(np.ones_like(tiles), row_starts, axis=0), col_starts, axis=1)
        chars = np.where(seen == sizes, "██", np.where(seen == 0, "  ", "░░"))
        pictures.append(f"{at}\n" + "".join("".join(row) + "\n" for row in chars))
    return "\n".join(pictures)


def tile_picture(classes: torch.Tensor, grid_size, limit: int) -> str:
    """One character pair per tile of ``classes`` (..., Q_BLOCKS, KV_BLOCKS): full, partial, empty."""
    pair = _grid(grid_size, limit)
    *lead, n_q, n_kv = classes.shape
    rows, cols = (n if m == -1 else m for m, n in zip(pair, (n_q, n_kv)))
    note = "" if n_q <= rows and n_kv <= cols else f" (first {rows}x{cols} of {n_q}x{n_kv} tiles)"
    glyph = {EMPTY: "  ", PARTIAL: "░░", FULL: "██"}
    pictures = []
    for count, at in enumerate(itertools.product(*(range(n) for n in lead))):
        if count == limit:
            pictures.append("...\n" + "\n".join(_MORE))
            break
        name = ", ".join(f"{dim}={i}" for dim, i in zip(("b", "h"), at)) or "tiles"
        picture = ["".join(glyph[int(c)] for c in row) for row in classes[at][:rows, :cols]]
        pictures.append(f"{name}{note}\n" + "\n".join(picture))
    return "\n".join(pictures)


def explanation(mask) -> str:
    """``BlockMask.explain``: tile counts, and how the analysis decided them (``mask.stats``)."""
    counts = torch.bincount(mask.tile_classes().flatten().long(), minlength=3).tolist()
    lines = [f"{counts[FULL]} full, {counts[PARTIAL]} partial, {counts[EMPTY]} empty tiles "
             f"of {mask.BLOCK_SIZE[0]}x{mask.BLOCK_SIZE[1]} (sparsity {mask.sparsity():.1f}%)"]
    stats = mask.stats
    if stats:
        lines.append(f"{stats['decided_symbolically']} of {stats['tiles']} distinct tiles decided "
                     f"symbolically ({stats.get('subdivided', 0)} of them from pieces of the tile), "
                     f"{stats['refined']} refined densely, "
                     f"{stats['left_partial']} left partial (exact=False); "
                     f"the mask depends on {', '.join(stats['depends_on']) or 'nothing'}")
    return "\n".join(lines)


def plot_tiles(mask, path, batch: int, head: int) -> None:
    """``BlockMask.plot``: a PNG of one (batch, head)'s tile classes (matplotlib, imported here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    colours = ["#f2f2f2", "#f4a261", "#264653"]
    classes = mask.tile_classes()[batch, head].numpy()
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(classes, cmap=ListedColormap(colours), vmin=0, vmax=2, interpolation="nearest")
    ax.set_xlabel(f"kv block ({mask.BLOCK_SIZE[1]} keys)")
    ax.set_ylabel(f"q block ({mask.BLOCK_SIZE[0]} queries)")
    ax.set_title(f"{getattr(mask.mask_mod, '__name__', 'mask')}: sparsity {mask.sparsity():.1f}%")
    ax.legend(handles=[Patch(color=c, label=n) for c, n in zip(colours, ("empty", "partial", "full"))],
              loc="upper right", bbox_to_anchor=(1.0, -0.08), ncol=3)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)

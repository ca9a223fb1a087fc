"""The kernel cache shared by back ends: in memory, and on disk as generated source.

An entry is the generated source of one kernel, keyed by ``kernel_key`` (the
structure of both mods) under its back end's name. On disk it lives at
``$FLEXATTN_CACHE_DIR/<backend>/<key>.py`` (default ``~/.cache/flexattn``)
and starts with a header line::

    # flexattn-kernel format=1 generator=<version> sha256=<digest of the rest>

A file whose header is missing, names another format or generator version,
or whose checksum does not match is stale or corrupt: it is rebuilt and
rewritten, never used. Writes go to a temporary file in the same directory
and are moved into place with ``os.replace``, so a reader never sees half a
file. An unwritable cache directory only costs the disk copy (a warning).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, TypeVar

from flexattn.ir import Graph

FORMAT = 1
HEADER_PREFIX = "# flexattn-kernel "

T = TypeVar("T")


def cache_dir() -> Path:
    """``$FLEXATTN_CACHE_DIR`` if set, else ``~/.cache/flexattn`` (read at every use)."""
    configured = os.environ.get("FLEXATTN_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "flexattn"


def kernel_key(score_graph: Graph | None, mask_graph: Graph | None) -> str:
    """The cache key of a kernel: the structure of both mods, without constants or buffer shapes
    (those are run-time arguments, so one kernel serves every window size or bias table)."""
    parts = [graph.structural_key(constants=False, shapes=False) if graph is not None else "-"
             for graph in (score_graph, mask_graph)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def _header(generator: str, body: str) -> str:
    digest = hashlib.sha256(body.encode()).hexdigest()
    return f"{HEADER_PREFIX}format={FORMAT} generator={generator} sha256={digest}\n"


class KernelCache:
    """Memory + disk cache of generated kernels.

    ``stats`` counts ``builds`` (the source was generated), ``disk_hits``,
    ``memory_hits`` and ``rejected`` (corrupt or stale disk entries).

    Example::

        >>> cache = KernelCache()
        >>> kernel = cache.get("torch", key, "v1", build=lambda: source, load=compile_source)
    """

    def __init__(self, directory: Path | None = None):
        self._directory = directory
        self._memory: dict[tuple[str, str, str], object] = {}
        self.stats = {"builds": 0, "disk_hits": 0, "memory_hits": 0, "rejected": 0}

    @property
    def directory(self) -> Path:
        return self._directory if self._directory is not None else cache_dir()

    def path(self, backend: str, key: str, suffix: str = ".py") -> Path:
        """Where the entry for ``key`` lives on disk (``suffix``: ``.txt`` for text that is not Python)."""
        return self.directory / backend / f"{key}{suffix}"

    def get(self, backend: str, key: str, generator: str, build: Callable[[], str],
            load: Callable[[str, str], T]) -> T:
        """The loaded kernel for ``key``: from memory, else disk, else ``build()``.

        ``build()`` returns source text; ``load(source, filename)`` turns it into
        the kernel object kept in memory. ``generator`` is the back end's
        code-generator version: entries written by another version are rebuilt.
        """
        slot = (backend, key, generator)
        if slot in self._memory:
            self.stats["memory_hits"] += 1
            return self._memory[slot]  # type: ignore[return-value]
        path = self.path(backend, key)
        source = self.read(path, generator)
        if source is not None:
            self.stats["disk_hits"] += 1
        else:
            source = build()
            self.stats["builds"] += 1
            self.write(path, generator, source)
        kernel = load(source, str(path))
        self._memory[slot] = kernel
        return kernel

    def clear_memory(self) -> None:
        """Forget the in-memory kernels (the disk entries stay)."""
        self._memory.clear()

    def read(self, path: Path, generator: str) -> str | None:
        """The body of the entry at ``path``, or None when it is missing, corrupt or written by another
        ``generator`` (counted in ``stats["rejected"]``)."""
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            return None
        header, _, body = text.partition("\n")
        if header + "\n" != _header(generator, body):
            self.stats["rejected"] += 1
            return None
        return body

    def write(self, path: Path, generator: str, source: str) -> None:
        """Write ``source`` at ``path`` with its header, atomically (an unwritable directory warns)."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(_header(generator, source) + source)
                os.replace(temp, path)
            except BaseException:
                os.unlink(temp)
                raise
        except OSError as error:
            warnings.warn(f"flexattn: cannot write the kernel cache at {path} ({error}); "
                          "kernels are kept in memory only", RuntimeWarning, stacklevel=3)


KERNELS = KernelCache()

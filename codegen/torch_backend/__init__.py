"""The torch back end: IR -> generated block-sparse flash attention in torch code, plus faster
paths for the calls that have one (decoding shapes, torch's fused CPU flash kernel).

``PATHS`` (``paths.py``) is the ordered table of its paths; ``codegen.paths.choose`` picks one for
a ``flexattn.call.Call``. ``compile_kernel`` (``kernel.py``) returns the generated loop for a pair
of mods, cached by structure in memory and on disk (``codegen.cache``).
"""

from __future__ import annotations

from codegen.cache import kernel_key
from codegen.torch_backend.kernel import GENERATOR_VERSION, Kernel, compile_kernel
from codegen.torch_backend.paths import PATHS

__all__ = ["GENERATOR_VERSION", "Kernel", "PATHS", "compile_kernel", "kernel_key"]

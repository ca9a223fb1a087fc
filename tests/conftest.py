"""Suite-wide settings.

The torch back end compiles a kernel for every new mod in a background thread by default
(``codegen.torch_backend.compiled``); across hundreds of test mods on a 2-core CI machine that
would cost many minutes and switch paths mid-test. ``FLEXATTN_COMPILED=0`` keeps the default on the
eager loop; tests of the compiled path ask for it with ``kernel_options={"COMPILED": True}``.

Triton runs under its CPU interpreter (``TRITON_INTERPRET=1``), set here before any test module
imports Triton: the interpreter is chosen when a kernel is defined, so a module setting it at its
own import would depend on the order modules are collected in. ``TRITON_INTERPRET=0`` in the
environment runs the Triton tests on a GPU instead.
"""

import os

os.environ.setdefault("FLEXATTN_COMPILED", "0")
os.environ.setdefault("TRITON_INTERPRET", "1")

"""Suite-wide settings.

The torch back end compiles a kernel for every new mod in a background thread by default
(``codegen.torch_backend.compiled``); across hundreds of test mods on a 2-core CI machine that
would cost many minutes and switch paths mid-test. ``FLEXATTN_COMPILED=0`` keeps the default on the
eager loop; tests of the compiled path ask for it with ``kernel_options={"COMPILED": True}``.
"""

import os

os.environ.setdefault("FLEXATTN_COMPILED", "0")

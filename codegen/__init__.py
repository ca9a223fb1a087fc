"""flexattn's compiler back ends: one module (or package) per target.

Every back end has one ordered table of paths, ``PATHS`` (``codegen.paths.Path``: ``why_not(call)``
and ``run(call) -> (out, lse, max_scores)``), and is called with one frozen
``flexattn.call.Call``: the validated tensors, the IR graphs with their buffers, the BlockMask and
the analysis facts. Back ends never see the user's callables and never import the API
(``flexattn.api``) or the analysis (``flexattn.analysis``); the API owns the table of back ends
(``flexattn.dispatch``). ``max_scores`` may be None unless ``Call.max_scores`` is set.

* ``reference``: dense ground truth;
* ``torch_backend``: the generated block-sparse loop and the faster paths for decoding shapes
  (``torch_backend/decode/``) and torch's fused CPU flash kernel;
* ``triton``: generated Triton kernels.

Generating back ends also expose ``compile_kernel`` (the kernel for a pair of mods).
"""

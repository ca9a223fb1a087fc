"""Known failure classes of the conformance suite, each marked xfail with its reason.

Every entry is an open gap of the drop-in issue (see the closing note that added it); remove an
entry when its class is fixed. Marks are not strict, so a class fixed in part (some of its
cases passing) does not fail the suite.
"""

import pytest

KNOWN = {
    "test_conformance_block_mask_api.py::test_to_string[": "BlockMask.to_string text differs from torch's",
    "test_conformance_block_mask_api.py::test_str": "str(BlockMask) differs from torch's",
    "test_conformance_block_mask_api.py::test_sliced_block_mask_refuses_attention_like_torch":
        "attention with a sliced BlockMask is not refused as torch refuses it",
    "test_conformance_fuzz.py::test_fuzz_gradients": "gradients of generated programs: a mod whose output "
                                                     "does not depend on a differentiated input raises",
    "test_conformance_ops.py::test_op_forward[tanh_method]": "unbound Tensor methods (torch.Tensor.tanh(x))",
    "test_conformance_ops.py::test_op_forward[div_method]": "unbound Tensor methods (torch.Tensor.div(x, y))",
    "test_conformance_ops.py::test_op_forward[pow]": "the case raises negative bases to fractional powers: "
                                                     "NaN in the output (the case, not the op, needs fixing)",
    "test_conformance_ops.py::test_op_forward[masked_fill]": "Tensor.masked_fill is not traced",
    "test_conformance_ops.py::test_op_forward[gcd]": "torch.gcd is not traced",
    "test_conformance_ops.py::test_op_gradients[lerp]": "lerp's gradient with a float weight fails (dtype)",
    "test_conformance_torch_calls.py::test_block_mask_built_for_other_lengths_is_a_value_error":
        "the message for a BlockMask of other lengths does not use torch's wording",
}


def pytest_collection_modifyitems(items):
    for item in items:
        for prefix, reason in KNOWN.items():
            if item.nodeid.split("tests/conformance/")[-1].startswith(prefix):
                item.add_marker(pytest.mark.xfail(reason=reason, strict=False))

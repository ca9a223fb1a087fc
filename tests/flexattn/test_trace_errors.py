"""Every TraceError names the construct, the user's file:line and the fix."""

import inspect
import math

import pytest
import torch

from flexattn import TraceError, trace_mask_mod, trace_score_mod

TABLE = torch.arange(10)


def _line_of(fn, needle: str) -> int:
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, line in enumerate(lines) if needle in line)


def _expect(fn, tracer, needle: str, *words: str):
    with pytest.raises(TraceError) as info:
        tracer(fn)
    message = str(info.value)
    assert f"{__file__}:{_line_of(fn, needle)}" in message, message
    for word in words:
        assert word in message, message
    return message


def test_if_on_traced_value():
    def mask(b, h, q_idx, kv_idx):
        if q_idx > kv_idx:
            return True
        return False

    _expect(mask, trace_mask_mod, "if q_idx", "control flow", "torch.where")


def test_not_on_traced_value():
    def mask(b, h, q_idx, kv_idx):
        return not (q_idx > kv_idx)

    _expect(mask, trace_mask_mod, "return not", "`not`", "~")


def test_and_or_on_traced_values():
    def with_and(b, h, q_idx, kv_idx):
        return (q_idx > kv_idx) and (q_idx < 5)

    def with_or(b, h, q_idx, kv_idx):
        return (q_idx > kv_idx) or (q_idx < 5)

    _expect(with_and, trace_mask_mod, "and (q_idx", "`and`", "&")
    _expect(with_or, trace_mask_mod, "or (q_idx", "`or`", "|")


def test_python_min_suggests_torch_minimum():
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + min(q_idx, kv_idx)

    _expect(score_mod, trace_score_mod, "min(q_idx", "torch.minimum")


@pytest.mark.parametrize("convert,word", [(int, "int()"), (float, "float()"), (bool, "control flow")])
def test_python_conversions(convert, word):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + convert(q_idx)

    _expect(score_mod, trace_score_mod, "convert(q_idx)", word)


def test_math_functions_point_to_torch():
    def score_mod(score, b, h, q_idx, kv_idx):
        return math.exp(score)

    _expect(score_mod, trace_score_mod, "math.exp", "float()", "torch.exp")


def test_item_on_traced_value():
    def score_mod(score, b, h, q_idx, kv_idx):
        return score * q_idx.item()

    _expect(score_mod, trace_score_mod, ".item()", ".item()")


def test_in_place_ops():
    def method(score, b, h, q_idx, kv_idx):
        return score.add_(1)

    def assign(score, b, h, q_idx, kv_idx):
        TABLE[q_idx] = 3
        return score

    _expect(method, trace_score_mod, "add_", "in-place", ".add()")
    _expect(assign, trace_score_mod, "TABLE[q_idx] = 3", "assigning into a captured tensor")


def test_unsupported_torch_function_is_named():
    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.digamma(score)

    _expect(score_mod, trace_score_mod, "torch.digamma", "torch.digamma is not supported", "Supported:")


def test_wrong_arity_points_at_definition():
    def three(b, h, q_idx):
        return q_idx > 0

    _expect(three, trace_mask_mod, "def three", "must take 4 arguments", "(b, h, q_idx)")


def test_mask_mod_must_return_bool():
    def returns_int(b, h, q_idx, kv_idx):
        return q_idx - kv_idx

    _expect(returns_int, trace_mask_mod, "def returns_int", "must return a bool", "int64")


def test_return_value_of_wrong_kind():
    def returns_list(score, b, h, q_idx, kv_idx):
        return [score]

    _expect(returns_list, trace_score_mod, "def returns_list", "returned list")


def test_whole_captured_tensor_used_as_value():
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + TABLE

    # torch broadcasts: the mod returns a tensor per position, which the output check refuses.
    _expect(score_mod, trace_score_mod, "def score_mod", "shape [10]", "reduce it")


def test_float_index_is_rejected():
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + TABLE[q_idx * 0.5]

    _expect(score_mod, trace_score_mod, "q_idx * 0.5", "must be an integer", ".long()")


def test_slicing_a_captured_tensor_is_rejected():
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + TABLE[1:3][q_idx]

    # Slicing with Python ints happens eagerly (a real tensor view), so this traces;
    # slicing with a traced bound does not.
    trace_score_mod(score_mod)

    def traced_slice(score, b, h, q_idx, kv_idx):
        return score + TABLE[q_idx:]

    _expect(traced_slice, trace_score_mod, "TABLE[q_idx:]", "slicing")

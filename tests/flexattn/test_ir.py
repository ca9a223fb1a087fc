"""The IR: printer, structural key, passes and dependence analysis."""

import torch

from flexattn import passes, trace_mask_mod, trace_score_mod
from flexattn.ir import Op


def test_printer_reads_like_assembly():
    text = str(trace_mask_mod(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx).graph)
    assert "%0 = input q_idx : int64" in text
    assert "%2 = ge %0 %1 : bool" in text
    assert text.strip().endswith("return %2")


def _window(size):
    return lambda b, h, q_idx, kv_idx: (q_idx - kv_idx <= size) & (q_idx >= kv_idx)


def test_structural_key_ignores_the_python_function_object():
    a, b = trace_mask_mod(_window(4)).graph, trace_mask_mod(_window(4)).graph
    assert a.structural_key() == b.structural_key()


def test_structural_key_sees_constants_unless_asked_not_to():
    a, b = trace_mask_mod(_window(4)).graph, trace_mask_mod(_window(9)).graph
    assert a.structural_key() != b.structural_key()
    assert a.structural_key(constants=False) == b.structural_key(constants=False)


def test_structural_key_sees_structure_and_buffer_shapes():
    doc_a, doc_b = torch.zeros(16, dtype=torch.long), torch.zeros(32, dtype=torch.long)
    key = lambda doc: trace_mask_mod(lambda b, h, q, kv: doc[q] == doc[kv]).graph.structural_key  # noqa: E731
    assert key(doc_a)() != key(doc_b)()
    assert key(doc_a)(shapes=False) == key(doc_b)(shapes=False)
    assert trace_mask_mod(_window(4)).graph.structural_key() != trace_mask_mod(
        lambda b, h, q, kv: (q - kv < 4) & (q >= kv)).graph.structural_key()


def test_buffer_contents_are_not_part_of_the_graph():
    table = torch.arange(8)
    before = trace_mask_mod(lambda b, h, q, kv: table[q] > kv)
    table.mul_(3)
    after = trace_mask_mod(lambda b, h, q, kv: table[q] > kv)
    assert before.graph.structural_key() == after.graph.structural_key()
    assert after.buffers[0] is table


def test_simplify_folds_identities_and_shares_subexpressions():
    def mask(b, h, q_idx, kv_idx):
        d1, d2 = q_idx - kv_idx, q_idx - kv_idx
        return ((d1 + 0) * 1 >= d2) & torch.ones_like(q_idx, dtype=torch.bool) & ~~(q_idx >= 0)

    graph = trace_mask_mod(mask).graph
    ops = [n.op for n in graph.nodes]
    assert ops.count(Op.SUB) == 1
    assert Op.NOT not in ops and Op.MUL not in ops and Op.ADD not in ops
    assert all(not (n.op is Op.CONST and n.arg is True) for n in graph.nodes)


def test_constant_folding_evaluates_constant_subtrees():
    graph = trace_score_mod(lambda s, b, h, q, kv: s + torch.where(q >= 0, 2, 3) * 0 + torch.full_like(s, 2.5)).graph
    consts = [n.arg for n in graph.nodes if n.op is Op.CONST]
    assert 2.5 in consts


def test_dependencies():
    slopes = torch.ones(4)
    graph = trace_score_mod(lambda s, b, h, q, kv: s + slopes[h] * (q - kv)).graph
    assert passes.depends_on(graph) == {"score", "h", "q_idx", "kv_idx"}
    mask = trace_mask_mod(lambda b, h, q, kv: q >= 3).graph
    assert passes.depends_on(mask) == {"q_idx"}
    deps = passes.dependencies(graph)
    assert any(d == {"h"} for n, d in deps.items() if n.op is Op.LOAD)

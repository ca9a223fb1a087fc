"""attn_implementation="flexattn" in transformers: tiny random models against transformers' eager attention.

Each case builds the same random float32 model twice (eager and flexattn) from a config (no
downloads), and compares logits at real (non-padding) positions, the loss, every weight's gradient
and greedily generated tokens.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flexattn.integrations import transformers as flex_hf  # noqa: E402

flex_hf.register()
TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=128)


def _config(name: str):
    if name == "llama":
        return transformers.LlamaConfig(**TINY, num_attention_heads=4, num_key_value_heads=2)
    if name == "qwen2":
        return transformers.Qwen2Config(**TINY, num_attention_heads=6, num_key_value_heads=2)
    if name == "qwen3":
        return transformers.Qwen3Config(**TINY, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                        use_sliding_window=True, sliding_window=6, max_window_layers=1)
    if name == "gemma2":
        return transformers.Gemma2Config(**TINY, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                         sliding_window=6, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                                         query_pre_attn_scalar=12)
    if name == "gemma3":
        return transformers.Gemma3TextConfig(**TINY, num_attention_heads=4, num_key_value_heads=1, head_dim=12,
                                             sliding_window=6, layer_types=["sliding_attention", "full_attention"])
    if name == "gpt_oss":
        return transformers.GptOssConfig(**TINY, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                         num_local_experts=4, num_experts_per_tok=2, sliding_window=6,
                                         layer_types=["sliding_attention", "full_attention"])
    if name == "doge":  # a dynamic mask of its own, which takes the model's mask only as a tensor
        return transformers.DogeConfig(**TINY, num_attention_heads=4, num_key_value_heads=2, keep_window_size=8)
    raise KeyError(name)


def _pair(name: str):
    models = []
    for impl in ("eager", flex_hf.NAME):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(_config(name), attn_implementation=impl,
                                                              dtype=torch.float32)
        if name == "gpt_oss":  # random sinks: zeros would hide a wrong sink formula
            for layer in model.model.layers:
                torch.nn.init.normal_(layer.self_attn.sinks, std=1.0)
        models.append(model)
    assert models[1].config._attn_implementation == flex_hf.NAME
    return models


def _run(model, real: torch.Tensor, **inputs):
    model.zero_grad()
    # A label counts where its token and the one predicting it are real: padding rows attend nowhere,
    # where eager averages every key and flexattn gives 0 (both are ignored by the model's outputs).
    labels = inputs["input_ids"].masked_fill(~(real & real.roll(1, -1)), -100)
    out = model(**inputs, labels=labels)
    out.loss.backward()
    return out.logits[real], out.loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / a.norm().clamp_min(1e-30)).item()


# doge: the gradient of its dynamic mask's A cancels to ~1e-5 of its terms, so float32 rounding alone
# moves it by about 1e-5 relative (sdpa against eager: 7e-6); its eager attention gives NaN in float64.
GRAD_TOLERANCE = {"doge": 1e-4}


def _compare(name: str, real: torch.Tensor | None = None, **inputs):
    eager, flex = _pair(name)
    real = torch.ones_like(inputs["input_ids"], dtype=torch.bool) if real is None else real
    (logits_e, loss_e, grads_e), (logits_f, loss_f, grads_f) = (_run(m, real, **inputs) for m in (eager, flex))
    assert _rel(logits_e, logits_f) < 1e-5
    assert abs(loss_e.item() - loss_f.item()) < 1e-5 * abs(loss_e.item())
    assert grads_e.keys() == grads_f.keys() and len(grads_e) > 5
    worst = max(grads_e, key=lambda n: _rel(grads_e[n], grads_f[n]))
    assert _rel(grads_e[worst], grads_f[worst]) < GRAD_TOLERANCE.get(name, 1e-5), worst
    return eager, flex


def _ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def _generate_same(eager, flex, **inputs):
    tokens = [m.generate(**inputs, max_new_tokens=6, do_sample=False) for m in (eager, flex)]
    assert torch.equal(tokens[0], tokens[1])


def _left_padding(batch: int, length: int) -> torch.Tensor:
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :5] = 0
    return mask


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma2", "gemma3", "qwen3", "gpt_oss", "doge"])
def test_left_padding_matches_eager_and_generates_the_same(name):
    ids, mask = _ids(2, 20), _left_padding(2, 20)
    eager, flex = _compare(name, real=mask.bool(), input_ids=ids, attention_mask=mask)
    _generate_same(eager, flex, input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_packed_documents_through_position_ids(name):
    position_ids = torch.cat([torch.arange(7), torch.arange(9), torch.arange(4)])[None]
    _compare(name, input_ids=_ids(1, 20), position_ids=position_ids)


def test_4d_float_mask():
    L = 16
    allowed = torch.ones(L, L).tril().bool() & (torch.rand(L, L, generator=torch.Generator().manual_seed(3)) > 0.3)
    allowed |= torch.eye(L, dtype=torch.bool)
    mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None].expand(2, 1, L, L)
    _compare("llama", input_ids=_ids(2, L), attention_mask=mask)


def test_static_cache_generate():
    eager, flex = _pair("gemma2")
    ids, mask = _ids(2, 12), _left_padding(2, 12)
    tokens = [m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                         cache_implementation="static") for m in (eager, flex)]
    assert torch.equal(tokens[0], tokens[1])


def test_dropout_is_refused_with_the_fix():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(flex_hf.InputError, match="attention_dropout"):
        flex_hf.attention_forward(None, q, q, q, None, dropout=0.1)


def test_sinks_shape_is_checked():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(flex_hf.InputError, match="one logit per query head"):
        flex_hf.attention_forward(None, q, q, q, None, s_aux=torch.zeros(3))


def test_compiled_model_trains_like_eager():
    """torch.compile over a model with left padding: the BlockMask's captured tensors (the padding)
    enter the graph as inputs, so the compiled training step equals the eager one (it raised in
    AOTAutograd when they were constants of the op)."""
    torch._dynamo.reset()
    eager, flex = _pair("llama")
    ids, mask = _ids(2, 20), _left_padding(2, 20)
    real = mask.bool()
    compiled = torch.compile(flex, backend="aot_eager")
    logits_f, loss_f, grads_f = _run(flex, real, input_ids=ids, attention_mask=mask)
    logits_c, loss_c, grads_c = _run(compiled, real, input_ids=ids, attention_mask=mask)
    grads_c = {name.removeprefix("_orig_mod."): grad for name, grad in grads_c.items()}
    assert _rel(logits_f, logits_c) < 1e-6 and abs(loss_f.item() - loss_c.item()) < 1e-6
    assert grads_f.keys() == grads_c.keys()
    for name in grads_f:
        assert _rel(grads_f[name], grads_c[name]) < 1e-5, name
    other = _left_padding(2, 20)
    other[1, :3] = 0  # new padding values, same shapes: a stale mask would differ from eager here
    logits_f, _, _ = _run(flex, other.bool(), input_ids=ids, attention_mask=other)
    logits_c, _, _ = _run(compiled, other.bool(), input_ids=ids, attention_mask=other)
    assert _rel(logits_f, logits_c) < 1e-6


def _compiled_step(model, ids, mask, real, **extra):
    """One forward and backward, on a fresh graph of gradients; (logits at real positions, loss, grads)."""
    inputs = dict(input_ids=ids, **extra)
    if mask is not None:
        inputs["attention_mask"] = mask
    logits, loss, grads = _run(model, real, **inputs)
    return logits, loss, {name.removeprefix("_orig_mod."): grad for name, grad in grads.items()}


@pytest.mark.parametrize("padded", [False, True])
def test_fullgraph_compile_trains_like_eager_without_recompiles(padded):
    """torch.compile(fullgraph=True, dynamic=True) over the whole model: the block mask is built
    inside the graph (flexattn.integrations.hf_compiled), so there is no graph break; logits, loss
    and every gradient equal transformers' eager attention, and a second sequence length runs the
    same graph (no recompile). dynamo specialises on a single tile row (ceil(L / 128) == 1, through
    shape checks of the tile counting), so 150 after 37 compiles once more, and 260 after 150 not."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    eager, flex = _pair("llama")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(flex, fullgraph=True, dynamic=True, backend=counter)
    frames = []
    lengths = (20, 37, 150, 260) if padded else (20, 37)
    for length in lengths:
        ids = _ids(2, length, seed=length)
        mask = _left_padding(2, length) if padded else None
        real = torch.ones(2, length, dtype=torch.bool) if mask is None else mask.bool()
        logits_e, loss_e, grads_e = _compiled_step(eager, ids, mask, real, use_cache=False)
        logits_c, loss_c, grads_c = _compiled_step(compiled, ids, mask, real, use_cache=False)
        assert _rel(logits_e, logits_c) < 1e-5
        assert abs(loss_e.item() - loss_c.item()) < 1e-5 * abs(loss_e.item())
        assert grads_e.keys() == grads_c.keys() and len(grads_e) > 5
        for name in grads_e:
            assert _rel(grads_e[name], grads_c[name]) < 1e-5, name
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[1] == frames[0] and frames[-1] == frames[-2], frames


def test_fullgraph_compile_packed_documents_and_cache():
    """The mask functions transformers builds inside the graph (packed documents from position_ids,
    a cache's offsets) are traced by dynamo into the mask: same logits as eager."""
    torch._dynamo.reset()
    eager, flex = _pair("llama")
    compiled = torch.compile(flex, fullgraph=True, dynamic=True, backend="aot_eager")
    position_ids = torch.cat([torch.arange(7), torch.arange(9), torch.arange(4)])[None]
    inputs = dict(input_ids=_ids(1, 20), position_ids=position_ids, use_cache=False)
    with torch.no_grad():
        assert _rel(eager(**inputs).logits, compiled(**inputs).logits) < 1e-5
        ids, mask = _ids(2, 20), _left_padding(2, 20)
        real = mask.bool()
        logits_e = eager(input_ids=ids, attention_mask=mask).logits  # a DynamicCache: offsets from the cache
        logits_c = compiled(input_ids=ids, attention_mask=mask).logits
        assert _rel(logits_e[real], logits_c[real]) < 1e-5


def test_fullgraph_compile_softcap_and_sliding_window_train_like_eager():
    """gemma2: softcapping (a score_mod made inside the graph: ``HFScoreMod``, a pytree) and sliding
    windows, with left padding; fullgraph forward and backward equal eager attention."""
    torch._dynamo.reset()
    eager, flex = _pair("gemma2")
    compiled = torch.compile(flex, fullgraph=True, dynamic=True, backend="aot_eager")
    ids, mask = _ids(2, 20), _left_padding(2, 20)
    logits_e, loss_e, grads_e = _compiled_step(eager, ids, mask, mask.bool(), use_cache=False)
    logits_c, loss_c, grads_c = _compiled_step(compiled, ids, mask, mask.bool(), use_cache=False)
    assert _rel(logits_e, logits_c) < 1e-5 and abs(loss_e.item() - loss_c.item()) < 1e-5 * abs(loss_e.item())
    assert grads_e.keys() == grads_c.keys()
    for name in grads_e:
        assert _rel(grads_e[name], grads_c[name]) < 1e-5, name


def test_fullgraph_compile_4d_float_mask():
    """A user's 4-D float mask becomes a bias of an ``HFScoreMod`` inside the graph: no graph break."""
    torch._dynamo.reset()
    eager, flex = _pair("llama")
    L = 16
    allowed = torch.ones(L, L).tril().bool() & (torch.rand(L, L, generator=torch.Generator().manual_seed(3)) > 0.3)
    allowed |= torch.eye(L, dtype=torch.bool)
    mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None].expand(2, 1, L, L)
    compiled = torch.compile(flex, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        inputs = dict(input_ids=_ids(2, L), attention_mask=mask, use_cache=False)
        assert _rel(eager(**inputs).logits, compiled(**inputs).logits) < 1e-5

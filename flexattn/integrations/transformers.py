"""flexattn as an attention implementation of Hugging Face transformers (5.x).

``register()`` adds ``"flexattn"`` to transformers' two public registries: ``AttentionInterface``
(the attention call of every layer) and ``AttentionMaskInterface`` (the mask a model builds once
per forward from its 2-D padding mask, cache offsets, sliding window, packed documents). After it,
``AutoModelForCausalLM.from_config(config, attn_implementation="flexattn")`` runs flexattn in every
attention layer, for every model whose transformers code calls these interfaces.

What a layer hands the attention call, and what flexattn makes of it:

- a BlockMask (built by ``block_mask_interface`` below) or None: the block-sparse mask;
- a 4-D tensor mask (a user's): float is added to the scores, bool keeps where True;
- ``softcap``: ``softcap * tanh(score / softcap)`` in the score_mod (Gemma 2);
- ``s_aux`` (attention sinks, gpt-oss): a per-head logit in every row's softmax that takes
  probability but gives no value. With the row's log-sum-exp L, the row's output is
  ``out * exp(L) / (exp(L) + exp(sink)) = out * sigmoid(L - sink)``, exactly transformers' eager
  softmax over ``[scores, sink]`` with the sink dropped; flexattn's lse is differentiable, so the
  sinks, queries and keys get their gradients through it;
- grouped-query attention with any head count (flexattn needs no power-of-two heads).

Nothing of transformers is imported until ``register()`` is called.
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from flexattn.api import AuxRequest, flex_attention
from flexattn.block_mask import BlockMask
from flexattn.errors import InputError
from flexattn.integrations.hf_compiled import compiled_block_mask
from flexattn.integrations.hf_masks import TENSOR_MASK_MODELS, block_mask_interface

NAME = "flexattn"


def register(name: str = NAME) -> str:
    """Register flexattn with transformers as ``attn_implementation=name``; returns ``name``.

    Registers ``attention_forward`` with ``transformers.AttentionInterface`` and
    ``mask_interface`` with ``transformers.AttentionMaskInterface`` (global, for every model).
    Calling it again is harmless.

    Raises ``ImportError`` naming the extra to install when transformers is missing.

    Example::

        >>> from flexattn.integrations import transformers as fa_hf
        >>> fa_hf.register()
        'flexattn'
        >>> # model = AutoModelForCausalLM.from_config(config, attn_implementation="flexattn")
    """
    try:
        import transformers
    except ImportError as error:
        raise ImportError("flexattn.integrations.transformers needs transformers: "
                          "pip install 'flexattn[transformers]'") from error
    transformers.AttentionInterface.register(name, attention_forward)
    transformers.AttentionMaskInterface.register(name, mask_interface)
    return name


def mask_interface(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
                   attention_mask: torch.Tensor | None = None, device="cpu", **kwargs):
    """transformers' ``AttentionMaskInterface`` entry: ``hf_masks.block_mask_interface``, or while
    dynamo compiles, ``hf_compiled.compiled_block_mask`` (traced into the graph: no graph break).

    Same arguments and result as ``block_mask_interface``. Under ``torch.compile`` a model of
    ``TENSOR_MASK_MODELS`` keeps the eager build (one graph break).

    Example: ``mask_interface(2, 8, 8, attention_mask=torch.ones(2, 8)).shape == (1, 1, 8, 8)``.
    """
    if torch.compiler.is_compiling() and getattr(kwargs.get("config"), "model_type", None) not in TENSOR_MASK_MODELS:
        from transformers.masking_utils import causal_mask_function

        return compiled_block_mask(batch_size, q_length, kv_length, q_offset, kv_offset,
                                   mask_function or causal_mask_function, attention_mask, device)
    return block_mask_interface(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                                device, **kwargs)


def _score_mod(softcap: float | None, biases: tuple):
    """score_mod: softcapping, then each (tensor, batch stride, head stride, keep-mask?) bias in turn."""

    def hf_score_mod(score, b, h, q_idx, kv_idx):
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        for bias, sb, sh, is_bool in biases:
            value = bias[b * sb, h * sh, q_idx, kv_idx]
            score = torch.where(value, score, float("-inf")) if is_bool else score + value
        return score

    return hf_score_mod


class HFScoreMod:
    """``_score_mod(softcap, biases)`` as a pytree (softcap, a 0-dim float32 tensor, and the bias
    tensors its leaves, the strides its context): under ``torch.compile`` it is made inside the graph and still reaches
    ``flexattn.custom_op``'s op, its tensors graph inputs (a closure would break the graph there)."""

    def __init__(self, softcap: torch.Tensor | None, biases: tuple):
        self.softcap, self.biases = softcap, tuple(biases)

    def __call__(self, score, b, h, q_idx, kv_idx):
        return _score_mod(self.softcap, self.biases)(score, b, h, q_idx, kv_idx)


def _flatten_score_mod(mod: HFScoreMod):
    # The softcap a 0-dim tensor leaf: dynamo may trace a config's float as a symbol, never a constant.
    softcap = [] if mod.softcap is None else [mod.softcap]
    return softcap + [bias[0] for bias in mod.biases], (bool(softcap), tuple(bias[1:] for bias in mod.biases))


def _unflatten_score_mod(tensors, context) -> HFScoreMod:
    has_softcap, layouts = context
    softcap, tensors = (tensors[0], tensors[1:]) if has_softcap else (None, tensors)
    return HFScoreMod(softcap, tuple((tensor, *layout) for tensor, layout in zip(tensors, layouts)))


pytree.register_pytree_node(HFScoreMod, _flatten_score_mod, _unflatten_score_mod,
                            serialized_type_name="flexattn.integrations.transformers.HFScoreMod")


def _bias(tensor: torch.Tensor, name: str, batch: int, heads: int, q_len: int, kv_len: int) -> tuple:
    if tensor.dim() != 4:
        raise InputError(f"{name} must be 4-D (B or 1, H or 1, Q_LEN, KV_LEN), got shape {list(tensor.shape)}")
    tensor = tensor[..., :kv_len]  # a static cache's mask may be longer than the keys, as in transformers
    if tensor.shape[0] not in (1, batch) or tensor.shape[1] not in (1, heads) or tensor.shape[2:] != (q_len, kv_len):
        raise InputError(f"{name} has shape {list(tensor.shape)}, which does not fit queries ({batch}, {heads}, "
                         f"{q_len}) and {kv_len} keys; give it shape ({batch} or 1, {heads} or 1, {q_len}, >= {kv_len})")
    return tensor, int(tensor.shape[0] > 1), int(tensor.shape[1] > 1), tensor.dtype == torch.bool


def attention_forward(module, query, key, value, attention_mask, scaling: float | None = None,
                      dropout: float = 0.0, softcap: float | None = None, s_aux: torch.Tensor | None = None,
                      position_bias: torch.Tensor | None = None, **kwargs):
    """transformers' attention call: query (B, Hq, L, E), key/value (B, Hkv, S, E) -> ((B, L, Hq, Ev), None).

    ``attention_mask``: a BlockMask (flexattn's or torch's), a 4-D float (added) or bool (kept where
    True) tensor, or None. ``s_aux``: attention sinks, one logit per query head. ``kwargs`` may hold
    ``kernel_options``; the rest (``sliding_window``, ``is_causal``: already in the mask) is ignored.
    Attention weights are not materialised: the second result is None.

    Raises ``InputError`` for ``dropout > 0`` (flex attention has no dropout: set the config's
    ``attention_dropout`` to 0) and for masks or sinks whose shapes do not fit.

    Example::

        >>> q = k = v = torch.randn(1, 2, 8, 16)
        >>> attention_forward(None, q, k, v, None)[0].shape
        torch.Size([1, 8, 2, 16])
    """
    if dropout and dropout > 0:
        raise InputError(f"flexattn has no attention dropout (got dropout={dropout}); set the config's "
                         "attention_dropout to 0.0 or call model.eval()")
    B, Hq, L, _ = query.shape
    S = key.shape[-2]
    block_mask, biases = None, []
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        block_mask = attention_mask if isinstance(attention_mask, BlockMask) else BlockMask.from_torch(attention_mask)
    elif attention_mask is not None:
        biases.append(_bias(attention_mask, "attention_mask", B, Hq, L, S))
    if position_bias is not None:
        biases.append(_bias(position_bias, "position_bias", B, Hq, L, S))
    score_mod = None
    if softcap is not None or biases:  # a closure is cached by what it captures; under compile, a pytree
        score_mod = _score_mod(softcap, tuple(biases))
        if torch.compiler.is_compiling():
            cap = None if softcap is None else torch.as_tensor(softcap, dtype=torch.float32, device=query.device)
            score_mod = HFScoreMod(cap, biases)
    common = dict(score_mod=score_mod, block_mask=block_mask, scale=scaling, enable_gqa=Hq != key.shape[1],
                  kernel_options=kwargs.get("kernel_options"))
    if s_aux is None:
        out = flex_attention(query, key, value, **common)
    else:
        if s_aux.numel() != Hq:
            raise InputError(f"s_aux (attention sinks) must hold one logit per query head ({Hq}), "
                             f"got shape {list(s_aux.shape)}")
        out, aux = flex_attention(query, key, value, return_aux=AuxRequest(lse=True), **common)
        keep = torch.sigmoid(aux.lse - s_aux.reshape(1, Hq, 1).to(aux.lse.dtype))
        out = (out * keep.unsqueeze(-1)).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None

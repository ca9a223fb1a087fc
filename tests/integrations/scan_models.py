"""Every transformers causal-LM family that declares flex attention support, tiny and random, with
attn_implementation="flexattn" against "eager": logits at real positions of a left-padded batch.

Not part of the suite (a few minutes, and most families need no test of their own): run it after
changing the integration or upgrading transformers. Families whose tiny config does not build or
whose eager forward fails are reported as such, not as flexattn failures.
Usage: python tests/integrations/scan_models.py [--first N] [--last N] [--seconds 60]
"""

import argparse
import copy
import signal
import traceback
import warnings

import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from flexattn.integrations import transformers as flex_hf

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=256, head_dim=16)


def _tiny_config(name: str):
    config = transformers.AutoConfig.for_model(name)
    for key, value in TINY.items():
        if hasattr(config, key):
            setattr(config, key, value)
    if isinstance(getattr(config, "layer_types", None), list) and len(config.layer_types) >= 2:
        config.layer_types = config.layer_types[:2]
    return config


def scan(name: str) -> str:
    model_class = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[name], None)
    if model_class is None or not getattr(model_class, "_supports_flex_attn", False):
        return ""
    try:
        config = _tiny_config(name)
        models = []
        for impl in ("eager", flex_hf.NAME):
            torch.manual_seed(0)
            models.append(model_class._from_config(copy.deepcopy(config), attn_implementation=impl,
                                                   dtype=torch.float32).eval())
        models[1].load_state_dict(models[0].state_dict())
    except Exception as error:  # noqa: BLE001 - a config this script cannot shrink
        return f"config does not build ({type(error).__name__})"
    ids = torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[0, :4] = 0
    outputs = []
    for impl, model in zip(("eager", "flexattn"), models):
        try:
            with torch.no_grad():
                outputs.append(model(input_ids=ids, attention_mask=mask).logits[mask.bool()])
        except Exception as error:  # noqa: BLE001
            where = "; ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno}"
                              for f in traceback.extract_tb(error.__traceback__)[-3:])
            return f"{impl} fails: {type(error).__name__}: {str(error)[:120]} @ {where}"
    rel = ((outputs[0] - outputs[1]).norm() / outputs[0].norm()).item()
    return f"rel {rel:.1e} {'OK' if rel < 1e-5 else 'DIFFERS'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--last", type=int, default=len(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
    parser.add_argument("--seconds", type=int, default=60, help="per family")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    flex_hf.register()

    def too_long(*_):
        raise TimeoutError

    signal.signal(signal.SIGALRM, too_long)
    for name in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)[args.first:args.last]:
        signal.alarm(args.seconds)
        try:
            line = scan(name)
        except TimeoutError:
            line = f"over {args.seconds} s"
        signal.alarm(0)
        if line:
            print(f"{name:24s} {line}", flush=True)


if __name__ == "__main__":
    main()

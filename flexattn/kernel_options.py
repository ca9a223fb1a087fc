"""``kernel_options``: every key flexattn accepts, what it means here, and its check.

torch's documented keys (``FlexKernelOptions``) are accepted with their meaning where it
applies to flexattn's back ends; keys that only tune torch's own GPU kernels are accepted and
documented as hints, so a call written for torch runs unchanged. An unknown key, a value of the
wrong type, or a torch key that asks for something flexattn cannot do raises ``InputError``
(naming the key, the valid values and the fix) before any work is done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from flexattn.errors import InputError


@dataclass(frozen=True)
class Option:
    """One key: the check of its value (returns an error text or None) and its meaning."""

    check: Callable[[object], str | None]
    meaning: str


def _positive_int(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return "a positive int"
    return None


def _block_size(value) -> str | None:
    pair = value if isinstance(value, (tuple, list)) else (value,)
    if len(pair) not in (1, 2) or any(_positive_int(x) for x in pair):
        return "a positive int or a (q, kv) pair of them"
    return None


def _flag(value) -> str | None:
    return None if isinstance(value, bool) else "True or False"


def _name(value) -> str | None:
    return None if isinstance(value, str) and value else "a path name (flexattn.explain_call lists them)"


def _one_of(*choices):
    return lambda value: None if value in choices else f"one of {', '.join(map(repr, choices))}"


_HINT = "accepted for torch compatibility: it tunes torch's GPU kernels and changes nothing here"
TORCH_BACKENDS = ("AUTO", "TRITON", "FLASH", "TRITON_DECODE")

OPTIONS: dict[str, Option] = {
    # flexattn's own keys
    "BLOCK_SIZE": Option(_block_size, "tile size (q, kv) when no block_mask is given (default 128)"),
    "FUSED": Option(_one_of(True, False, "auto"), "torch back end: force (True) or forbid (False) the fused "
                    "SDPA path for mask-only and separable-bias calls"),
    "PATH": Option(_name, "force one path of the back end's table (flexattn.explain_call shows the table and the "
                   "reasons); InputError with the reason when that path cannot serve the call"),
    "SPLIT_KV": Option(_flag, "False: never take the split-KV decoding path"),
    "SPLIT_KV_CHUNK": Option(_positive_int, "keys per split-KV chunk"),
    "max_tiles": Option(_positive_int, "torch back end: KV tiles gathered per piece of the generated loop"),
    "FWD_BLOCK_M": Option(_positive_int, "Triton forward kernel: query rows per program"),
    "FWD_BLOCK_N": Option(_positive_int, "Triton forward kernel: keys per inner step"),
    "BWD_BLOCK_M": Option(_positive_int, "Triton backward kernels: query rows per step"),
    "BWD_BLOCK_N": Option(_positive_int, "Triton backward kernels: keys per step"),
    # torch's keys
    "BACKEND": Option(_one_of(*TORCH_BACKENDS), "'TRITON': the block-sparse (non-decoding) path; "
                      "'TRITON_DECODE': the split-KV decoding path wherever the shape allows it; 'AUTO': flexattn chooses; "
                      "'FLASH' (torch's CuTe kernels) is not available in flexattn"),
    "FORCE_USE_FLEX_ATTENTION": Option(_flag, "True: never take the split-KV decoding path (as BACKEND='TRITON')"),
    "BLOCK_M": Option(_positive_int, "Triton forward kernel: query rows per program (as FWD_BLOCK_M)"),
    "BLOCK_N": Option(_positive_int, "Triton forward kernel: keys per inner step (as FWD_BLOCK_N)"),
    "BLOCK_M1": Option(_positive_int, _HINT), "BLOCK_N1": Option(_positive_int, _HINT),
    "BLOCK_M2": Option(_positive_int, _HINT), "BLOCK_N2": Option(_positive_int, _HINT),
    "num_warps": Option(_positive_int, _HINT), "num_stages": Option(_positive_int, _HINT),
    "PRESCALE_QK": Option(_flag, "accepted: flexattn always scales q once before q @ k^T"),
    "ROWS_GUARANTEED_SAFE": Option(_flag, "accepted: fully masked rows are always handled (0 output, -inf lse)"),
    "BLOCKS_ARE_CONTIGUOUS": Option(_flag, _HINT), "WRITE_DQ": Option(_flag, _HINT),
    "USE_TMA": Option(_flag, _HINT), "kpack": Option(_positive_int, _HINT),
    "matrix_instr_nonkdim": Option(_positive_int, _HINT), "waves_per_eu": Option(_positive_int, _HINT),
}
# torch's names of flexattn's own keys: the value goes to the flexattn key unless that is set too.
_ALIASES = {"BLOCK_M": "FWD_BLOCK_M", "BLOCK_N": "FWD_BLOCK_N"}


def normalize(kernel_options: dict | None) -> dict:
    """Check ``kernel_options`` and return the options the back ends read.

    torch's keys are translated (``BACKEND``, ``FORCE_USE_FLEX_ATTENTION``, ``BLOCK_M``/``BLOCK_N``);
    hints are dropped. Raises ``InputError`` for a key not in ``OPTIONS`` (listing the valid ones),
    a bad value, ``BACKEND='FLASH'``, or ``BACKEND`` combined with ``FORCE_USE_FLEX_ATTENTION``
    (as torch does).

    Example::

        >>> normalize({"BACKEND": "TRITON", "num_warps": 4})
        {'SPLIT_KV': False}
    """
    given = dict(kernel_options or {})
    for key, value in given.items():
        if key not in OPTIONS:
            raise InputError(f"kernel_options has an unknown key {key!r}; valid keys: {', '.join(sorted(OPTIONS))}")
        wrong = OPTIONS[key].check(value)
        if wrong is not None:
            raise InputError(f"kernel_options[{key!r}] must be {wrong}, got {value!r}")
    if "BACKEND" in given and given.get("FORCE_USE_FLEX_ATTENTION"):
        raise InputError("kernel_options: BACKEND cannot be combined with FORCE_USE_FLEX_ATTENTION (as in torch); "
                         "keep BACKEND only")
    backend = given.pop("BACKEND", "AUTO")
    if backend == "FLASH":
        raise InputError("kernel_options['BACKEND']='FLASH' (torch's CuTe flash kernels) is not available in "
                         "flexattn; use 'AUTO', 'TRITON' or 'TRITON_DECODE'")
    if backend == "TRITON" or given.pop("FORCE_USE_FLEX_ATTENTION", False):
        given["SPLIT_KV"] = False
    elif backend == "TRITON_DECODE":
        given["SPLIT_KV"] = True
    for torch_key, ours in _ALIASES.items():
        if torch_key in given:
            given.setdefault(ours, given[torch_key])
    return {key: value for key, value in given.items() if key not in _ALIASES and OPTIONS[key].meaning != _HINT
            and key not in ("PRESCALE_QK", "ROWS_GUARANTEED_SAFE")}

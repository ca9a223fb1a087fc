"""Analysis passes over the IR that produce facts back ends use (the BlockMask above all)."""

from flexattn.analysis.build import create_block_mask

__all__ = ["create_block_mask"]

"""Context parallelism: one attention call over many processes, laid out by the block mask's work.

See ``docs/api.md`` (Distributed) and ``docs/architecture.md``: ``plan_context_parallel`` chooses
which positions each rank owns; ``shard`` / ``unshard`` lay a full sequence out and back;
``context_parallel_attention`` runs attention on the shards with torch.distributed.
"""

from flexattn.distributed.plan import ContextParallelPlan, plan_context_parallel

__all__ = ["ContextParallelPlan", "plan_context_parallel"]

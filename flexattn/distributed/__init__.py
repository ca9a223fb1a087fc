"""Context parallelism: one attention call over many processes, laid out by the block mask's work.

``plan_context_parallel`` chooses which positions each rank owns (balancing non-empty tiles);
``shard`` / ``unshard`` lay a full sequence out across ranks and back;
``context_parallel_attention`` runs flex attention on the shards with torch.distributed.
See docs/api.md (Context parallelism) and docs/architecture.md.
"""

from flexattn.distributed.context_parallel import context_parallel_attention
from flexattn.distributed.layout import shard, unshard
from flexattn.distributed.plan import ContextParallelPlan, plan_context_parallel
from flexattn.errors import DistributedError

__all__ = ["ContextParallelPlan", "DistributedError", "context_parallel_attention", "plan_context_parallel", "shard",
           "unshard"]

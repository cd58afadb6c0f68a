"""attnlab.distributed: attention past one device. `ring_attention` runs context parallelism
over a torch.distributed group, each rank holding a shard of the sequence placed by `shard`
(and gathered back by `unshard`); `ring_attention_with_stats` also says what each step spent."""
from attnlab.distributed.ring import LAYOUTS, RingStats, ring_attention, ring_attention_with_stats, shard, unshard

__all__ = ["LAYOUTS", "RingStats", "ring_attention", "ring_attention_with_stats", "shard", "unshard"]

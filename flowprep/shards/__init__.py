"""Shard files: the layout of an output folder, its plan, its writer and its reader."""

from flowprep.shards.reader import ShardReader
from flowprep.shards.writer import commit_shard, write_shard

__all__ = ["ShardReader", "commit_shard", "write_shard"]

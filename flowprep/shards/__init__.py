"""Shard files: the layout of an output folder, its writer and its reader."""

from flowprep.shards.reader import ShardReader
from flowprep.shards.writer import ShardWriter

__all__ = ["ShardReader", "ShardWriter"]

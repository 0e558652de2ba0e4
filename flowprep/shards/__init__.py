"""Shard files: the layout of an output folder (``layout``), its plan (``plan``), its writer
(``writer``) and its reader. Only the reader is imported here: reading shards needs neither a
video decoder nor a flow solver."""

from flowprep.shards.reader import ShardReader

__all__ = ["ShardReader"]

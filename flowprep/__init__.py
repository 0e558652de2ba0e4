"""flowprep: Kinetics-style videos to sharded RGB and TV-L1 optical-flow tensors.

>>> from flowprep import ShardReader
>>> reader = ShardReader("shards/")
>>> reader.rgb(reader.video_ids[0], 0, 64).shape   # (64, H, W, 3) uint8
"""

__version__ = "0.1.0"

from flowprep.shards.reader import ShardReader  # noqa: E402

__all__ = ["ShardReader", "__version__"]

"""flowprep: Kinetics-style videos to sharded RGB and TV-L1 optical-flow tensors.

>>> from flowprep import ShardReader, ClipDataset
>>> reader = ShardReader("out/")
>>> reader.rgb(reader.video_ids[0], 0, 64).shape   # (64, H, W, 3) uint8
>>> ClipDataset("out/", modalities=("rgb", "flow"))[0]["flow"].shape  # [2, 64, 224, 224]
"""

__version__ = "0.1.0"

from flowprep.shards.reader import ShardReader  # noqa: E402

__all__ = ["ClipDataset", "ClipSampler", "ShardReader", "__version__"]


def __getattr__(name: str):
    # torch is imported only by code that asks for the training dataset, not by the CLI.
    if name in ("ClipDataset", "ClipSampler"):
        from flowprep import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'flowprep' has no attribute {name!r}")

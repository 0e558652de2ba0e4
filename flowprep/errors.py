"""Errors that fail one video (and only that video): each names the pipeline stage it came from."""


class VideoError(Exception):
    """A video that cannot be extracted; ``stage`` goes to failures.jsonl."""

    stage = "video"


class DecodeError(VideoError):
    stage = "decode"


class FlowError(VideoError):
    stage = "flow"

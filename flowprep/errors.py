"""Errors that fail one video (and only that video), each naming the pipeline stage it came from;
and :class:`OptionError`, a bad option or input that stops a run before anything is written."""


class VideoError(Exception):
    """A video that cannot be extracted; ``stage`` goes to failures.jsonl."""

    stage = "video"


class DecodeError(VideoError):
    stage = "decode"


class FlowError(VideoError):
    stage = "flow"


class OptionError(ValueError):
    """An option value, or an input named by one, that cannot work (a NaN bound, ``warps=0``, an
    empty source folder, a crop larger than the frames). ``option`` is the
    :class:`~flowprep.pipeline.ExtractConfig` field, ``extract`` or :class:`~flowprep.ClipDataset`
    argument, or training option it concerns (the commands name the option from it and exit with
    status 2)."""

    def __init__(self, message: str, option: str):
        super().__init__(message)
        self.option = option

    def __reduce__(self):  # pickled (e.g. by Ray) with its option
        return type(self), (str(self), self.option)


class WorkerError(VideoError):
    """A video lost to cluster faults on every attempt; a later run tries it again."""

    stage = "worker"

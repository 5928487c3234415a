"""The checkpoint package's one-line error."""

from mmfm.errors import MmfmError


class CheckpointError(MmfmError):
    pass

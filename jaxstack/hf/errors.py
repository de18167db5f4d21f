"""The one exception type for unusable checkpoints."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model.

    The message is one line naming the problem and the file or tensor key it concerns.
    """

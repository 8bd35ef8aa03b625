"""User-facing errors.

Anything a user can cause (a bad config value, a missing file, a corrupt
checkpoint, a mismatched tokenizer) raises :class:`HDLMError` with one line
that names the problem. The CLI prints that line and exits with status 2.
"""


class HDLMError(ValueError):
    """A problem with the user's input, reported as one clear line."""

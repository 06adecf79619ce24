class SplitringError(Exception):
    """The base of every error splitring raises on purpose (catch it to catch them all); each subclass's
    message says what went wrong and, where it can, what to do."""


class ProtocolError(SplitringError, ValueError):
    """A message that cannot be accepted. `code` is a stable machine-readable reason."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

class ProtocolError(ValueError):
    """A message that cannot be accepted. `code` is a stable machine-readable reason."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

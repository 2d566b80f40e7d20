"""The exceptions the codec raises when bytes or values do not form valid protocol messages."""

from __future__ import annotations


class ProtocolViolation(ValueError):
    """Bytes that are not a valid message, or a value that cannot be put on the wire."""


class MessageTooLarge(ProtocolViolation):
    """A declared or encoded length beyond the configured maximum."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"message length {length} exceeds the maximum of {limit} bytes")
        self.length = length
        self.limit = limit

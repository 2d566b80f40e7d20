"""The common shape of a typed message: a frozen value with decode(body) and encode()."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Self

from gateway.protocol._errors import ProtocolViolation
from gateway.protocol._wire import frame


@dataclass(frozen=True, slots=True)
class Message:
    """One typed message; subclasses set `type_code` and implement `decode` and `_body`."""

    type_code: ClassVar[int]

    @classmethod
    def decode(cls, body: bytes) -> Self:
        raise NotImplementedError

    def _body(self) -> bytes:
        raise NotImplementedError

    def encode(self) -> bytes:
        """The whole frame: type byte, int32 length, body."""
        return frame(self.type_code, self._body())


@dataclass(frozen=True, slots=True)
class EmptyMessage(Message):
    """A message whose body is always empty (Sync, BindComplete, ...)."""

    @classmethod
    def decode(cls, body: bytes) -> Self:
        if body:
            raise ProtocolViolation(f"malformed {cls.__name__}: {len(body)} bytes, expected none")
        return cls()

    def _body(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class OpaqueMessage(Message):
    """A message whose whole body is data the codec does not interpret (COPY rows, auth tokens)."""

    data: bytes

    @classmethod
    def decode(cls, body: bytes) -> Self:
        return cls(bytes(body))

    def _body(self) -> bytes:
        return self.data

"""CopyData and CopyDone: the two messages both peers send, with the same layout either way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Self

from gateway.protocol._message import EmptyMessage, Message


@dataclass(frozen=True, slots=True)
class CopyData(Message):
    type_code: ClassVar[int] = ord("d")
    data: bytes

    @classmethod
    def decode(cls, body: bytes) -> Self:
        return cls(bytes(body))

    def _body(self) -> bytes:
        return self.data


@dataclass(frozen=True, slots=True)
class CopyDone(EmptyMessage):
    type_code: ClassVar[int] = ord("c")

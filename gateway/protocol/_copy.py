"""CopyData and CopyDone: the two messages both peers send, with the same layout either way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from gateway.protocol import codes
from gateway.protocol._message import EmptyMessage, OpaqueMessage


@dataclass(frozen=True, slots=True)
class CopyData(OpaqueMessage):
    type_code: ClassVar[int] = codes.COPY_DATA


@dataclass(frozen=True, slots=True)
class CopyDone(EmptyMessage):
    type_code: ClassVar[int] = codes.COPY_DONE

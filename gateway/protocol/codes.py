"""The type byte of every v3 message, named once: the codec's message types and every
relay that reads a frame's first byte compare against these, never a bare number."""

from __future__ import annotations

from typing import Final

# Frontend (client to server).
BIND: Final = 0x42  # 'B'
CLOSE: Final = 0x43  # 'C'
DESCRIBE: Final = 0x44  # 'D'
EXECUTE: Final = 0x45  # 'E'
FUNCTION_CALL: Final = 0x46  # 'F'
FLUSH: Final = 0x48  # 'H'
PARSE: Final = 0x50  # 'P'
QUERY: Final = 0x51  # 'Q'
SYNC: Final = 0x53  # 'S'
TERMINATE: Final = 0x58  # 'X'
COPY_FAIL: Final = 0x66  # 'f'
# PasswordMessage, SASLInitialResponse, SASLResponse and GSSResponse share one type byte:
# which one it is follows from the authentication request it answers.
PASSWORD: Final = 0x70  # 'p'

# Both directions.
COPY_DONE: Final = 0x63  # 'c'
COPY_DATA: Final = 0x64  # 'd'

# Backend (server to client).
PARSE_COMPLETE: Final = 0x31  # '1'
BIND_COMPLETE: Final = 0x32  # '2'
CLOSE_COMPLETE: Final = 0x33  # '3'
NOTIFICATION_RESPONSE: Final = 0x41  # 'A'
COMMAND_COMPLETE: Final = 0x43  # 'C'
DATA_ROW: Final = 0x44  # 'D'
ERROR_RESPONSE: Final = 0x45  # 'E'
COPY_IN_RESPONSE: Final = 0x47  # 'G'
COPY_OUT_RESPONSE: Final = 0x48  # 'H'
EMPTY_QUERY_RESPONSE: Final = 0x49  # 'I'
BACKEND_KEY_DATA: Final = 0x4B  # 'K'
NOTICE_RESPONSE: Final = 0x4E  # 'N'
AUTHENTICATION: Final = 0x52  # 'R'
PARAMETER_STATUS: Final = 0x53  # 'S'
ROW_DESCRIPTION: Final = 0x54  # 'T'
FUNCTION_CALL_RESPONSE: Final = 0x56  # 'V'
COPY_BOTH_RESPONSE: Final = 0x57  # 'W'
READY_FOR_QUERY: Final = 0x5A  # 'Z'
NO_DATA: Final = 0x6E  # 'n'
PORTAL_SUSPENDED: Final = 0x73  # 's'
PARAMETER_DESCRIPTION: Final = 0x74  # 't'
NEGOTIATE_PROTOCOL_VERSION: Final = 0x76  # 'v'

# ReadyForQuery's transaction status byte.
STATUS_IDLE: Final = 0x49  # 'I'
STATUS_IN_TRANSACTION: Final = 0x54  # 'T'
STATUS_FAILED: Final = 0x45  # 'E'

# The one-byte answers to SSLRequest and GSSENCRequest.
ENCRYPTION_ACCEPTED: Final = 0x53  # 'S'
ENCRYPTION_REFUSED: Final = 0x4E  # 'N'

"""The OIDs of the built-in types pgwarden reads values of (RowDescription and
ParameterDescription name types by OID), named once: PostgreSQL fixes them in
pg_type.dat, the same in every database and version."""

from __future__ import annotations

from typing import Final

BOOL: Final = 16
BYTEA: Final = 17
NAME: Final = 19
INT8: Final = 20
INT2: Final = 21
INT4: Final = 23
TEXT: Final = 25
OID: Final = 26
JSON: Final = 114
FLOAT4: Final = 700
FLOAT8: Final = 701
BPCHAR: Final = 1042
VARCHAR: Final = 1043
UUID: Final = 2950
JSONB: Final = 3802

# Types whose values are text on the wire in binary format too.
TEXTLIKE: Final = frozenset({TEXT, VARCHAR, BPCHAR, NAME})

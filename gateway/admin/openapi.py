"""The admin API's OpenAPI document as committed beside this module (openapi.json), built
from the same code the listener serves; `python -m gateway.admin.openapi` writes it again."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, cast

from prometheus_client import CollectorRegistry

from gateway.admin.app import AdminAccess, admin_app
from gateway.admin.login import PersonTokens
from gateway.identity.device_codes import DeviceCodes
from gateway.identity.principal import Principal
from gateway.settings import Settings

DOCUMENT = Path(__file__).with_name("openapi.json")


async def _no_token(token: str) -> Principal:
    raise AssertionError("the document is built, never served")


def openapi_document() -> dict[str, Any]:
    """The document of an admin app with every part (the parts are not called)."""
    app = admin_app(
        registry=CollectorRegistry(),
        readiness=cast(Any, None),
        access=AdminAccess(open_access=True, verify=_no_token, groups=["admins"]),
        approvals=cast(Any, object()),
        sessions=cast(Any, object()),
        audit=cast(Any, object()),
        logins=PersonTokens(
            settings=Settings(),
            verify=_no_token,
            signer=cast(Any, None),
            store=cast(Any, None),
            listener_port=6543,
        ),
        device_codes=DeviceCodes(lifetime_seconds=600, interval_seconds=5),
    )
    return app.openapi()


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    DOCUMENT.write_text(render(openapi_document()))
    sys.stdout.write(f"wrote {DOCUMENT}\n")

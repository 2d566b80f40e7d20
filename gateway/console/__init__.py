"""The web console for people (approvers, auditors), served under /console by the admin
listener: `mount_console(app, deps)` (gateway/console/app.py) adds it to the admin app.

A part of the console is a module with a `..._router(deps: ConsoleDeps) -> APIRouter`
whose routes carry their full paths (/console/...), included by `mount_console`. Its pages
render templates extending base.html through `render.page`; its routes take the signed-in
person with `Depends(current_person)`; its changes are POSTs, whose CSRF token the console
middleware checks before the route runs (web_session.py)."""

from gateway.console.app import mount_console
from gateway.console.deps import ConsoleDeps

__all__ = ["ConsoleDeps", "mount_console"]

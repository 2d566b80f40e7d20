"""`python -m gateway.audit FD STATE_DIR`: the audit writer process; `python -m
gateway.audit index STATE_DIR`: the audit index process (both started by the gateway)."""

import sys

if len(sys.argv) > 1 and sys.argv[1] == "index":
    from gateway.audit.index_process import main
else:
    from gateway.audit.process import main

main()

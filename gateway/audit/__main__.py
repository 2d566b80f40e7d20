"""`python -m gateway.audit FD STATE_DIR`: the audit writer process (started by the gateway)."""

from gateway.audit.process import main

main()

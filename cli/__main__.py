"""`python -m cli`: the pgwarden command without the console script."""

from cli.main import app

app()

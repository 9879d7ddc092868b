"""``tuneq ui``: the live web dashboard."""

from __future__ import annotations

import gc

import click

from tuneq.cli.context import engine, settings


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 lets other machines in.")  # fmt: skip
@click.option("--port", default=8600, show_default=True, help="Port to listen on.")
def ui(host: str, port: int) -> None:
    """Serve a live dashboard of the queue, jobs, groups, models and workers, its JSON API
    (/api/…, the documents that --json prints) and Prometheus metrics (/metrics).

    It reads the same database as the workers (TUNEQ_DATABASE_URL), so it runs on any machine
    that reaches it. Pages are read-only; cancel, retry, tag and submit need the token from
    TUNEQ_UI_TOKEN, or the one printed at start, typed into the page or sent by a script as
    `Authorization: Bearer TOKEN`.

    \b
    Examples:
      tuneq ui
      TUNEQ_UI_TOKEN=s3cret tuneq ui --host 0.0.0.0 --port 8080
      curl -s localhost:8600/api/jobs?status=failed
      curl -s -X POST -H "Authorization: Bearer s3cret" localhost:8600/api/jobs/3f2a9c/cancel
    """
    import uvicorn

    from tuneq.ui.app import create_app
    from tuneq.ui.guard import LOOPBACK, allowed_hosts, new_token

    config = settings()
    token = config.ui_token or new_token()
    app = create_app(config, token=token, engine=engine(), listen_host=host)
    where = "this machine only" if host in LOOPBACK else "the network"
    click.echo(f"tuneq ui: http://{host}:{port}/ (listening for {where}; --host to change)")
    hosts = allowed_hosts(host, config.ui_hosts)
    click.echo(f"answering requests for {', '.join(hosts)} (TUNEQ_UI_HOSTS adds names)")
    if config.ui_token:
        click.echo("actions need the token in TUNEQ_UI_TOKEN")
    else:
        click.echo(f"actions need this token (set TUNEQ_UI_TOKEN to choose one): {token}")
    # A request builds thousands of short-lived dicts; collecting the young generation every
    # 700 allocations, and rescanning the startup objects each full pass, made the slowest
    # answers twice the median (bench/ui.py).
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    uvicorn.run(app, host=host, port=port, log_level="warning")

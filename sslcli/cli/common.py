"""What every command shares: consoles, logging setup, and the one place errors become exit codes."""

from __future__ import annotations

import functools
import json
import logging
from typing import Any, Callable

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from sslcli.errors import SSLError

stdout = Console()
stderr = Console(stderr=True)


def exits_on_errors(command: Callable) -> Callable:
    """Map typed errors to exit codes: one line on stderr, then exit with the error's code
    (2 bad input, 1 failure during work, 130 interrupted). Ctrl-C outside training exits 130."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SSLError as e:
            text = escape(str(e))  # messages quote paths and library errors: "[...]" is not markup
            stderr.print(f"[bold red]error:[/] {text}" if e.exit_code != 130 else f"[yellow]{text}[/]",
                         highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            stderr.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def setup_logging(quiet: bool = False) -> None:
    """sslcli's log records to stderr through rich (INFO, or WARNING with --quiet)."""
    logger = logging.getLogger("sslcli")
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        handler = RichHandler(console=stderr, show_path=False, markup=False, rich_tracebacks=False)
        logger.addHandler(handler)
    for h in logger.handlers:
        if isinstance(h, RichHandler):
            h.setLevel(logging.WARNING if quiet else logging.INFO)


def emit_json(obj: Any) -> None:
    """The JSON object alone on stdout (for `--json`)."""
    typer.echo(json.dumps(obj, indent=2))

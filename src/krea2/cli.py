"""The `krea2` command line. Sub-commands live next to the code they drive and are mounted here."""

from __future__ import annotations

import sys

import typer

from krea2.errors import Krea2Error

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Krea 2: generate, train, evaluate, curate.")


def _mount() -> None:
    # Imported lazily so `krea2 --help` stays fast and one broken extra never takes the whole CLI down. Once per
    # process: every registration adds the commands again, and typer rebuilds them all on each call (a process that
    # calls main() repeatedly, as tests and embedding code do, slowed down with every call).
    if app.registered_commands:
        return
    from krea2.commands import register

    register(app)


def usage_errors() -> tuple[type[Exception], ...]:
    """Click's usage-error class and the copy typer bundles (typer >= 0.16 raises its own): print usage, exit 2."""
    import click

    bundled = getattr(getattr(typer, "_click", None), "exceptions", None)
    return (click.ClickException,) + ((bundled.ClickException,) if bundled is not None else ())


def main() -> None:
    _mount()
    run(app)


def run(typer_app: typer.Typer) -> None:
    """Run a typer app as a console script: Krea2Error -> one line on stderr, exit 2; usage errors -> usage, exit 2."""
    try:
        rc = typer_app(standalone_mode=False)
    except Krea2Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(130)
    except usage_errors() as e:
        e.show()
        sys.exit(e.exit_code)
    if isinstance(rc, int) and rc:  # click returns Ctrl-C's 130 instead of raising in this mode
        sys.exit(rc)


if __name__ == "__main__":
    main()

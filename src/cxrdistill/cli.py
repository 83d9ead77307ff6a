"""The `cxrdistill` command line: one Typer app.

Each module in `cxrdistill.commands` defines `register(app)` and adds its own commands, so
features stay in their own files and this one only assembles them.
"""

from __future__ import annotations

import importlib
import pkgutil

import typer

import cxrdistill.commands as _commands

app = typer.Typer(
    name="cxrdistill",
    help="Train chest X-ray detectors and classifiers with teacher-student distillation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_commands() -> None:
    for info in sorted(pkgutil.iter_modules(_commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{_commands.__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)


_register_commands()


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()

"""Console output of record text: everything from a file or a manifest is printed as plain text.

Rich reads ``[...]`` as markup, so a file name ``a[/]b.png`` crashed ``prepare`` and a message
``bbox [nan, 1, 2, 3]`` lost its box. These helpers keep the markup for our own prefix only::

    say(console, "skipped", issue, style="yellow")   # "skipped image 3 (a[/]b.png): ..."
    error(console, err)                              # "error: <message>"
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.text import Text


def plain(value: Any) -> Text:
    """`str(value)` as a Rich Text that is never parsed as markup."""
    return Text(str(value))


def say(console: Console, prefix: str, value: Any, *, style: str = "") -> None:
    """Print ``<prefix> <value>`` with `prefix` styled and `value` verbatim."""
    text = Text.assemble((prefix, style), " ", str(value)) if prefix else Text(str(value))
    console.print(text, highlight=False, soft_wrap=True)


def error(console: Console, err: BaseException | str) -> None:
    """Print ``error: <message>`` (bold red prefix, message verbatim)."""
    say(console, "error:", err, style="bold red")


__all__ = ["error", "escape", "plain", "say"]

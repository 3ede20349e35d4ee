"""The project's consoles print text as it is.

Run paths, stage ids, sample ids, reasons and error messages come from the user or the data, and
any of them may hold ``[bold]``, ``[/x]`` or ``:smile:``: parsed as rich markup or emoji codes they
would change what is printed or raise ``MarkupError``. So every console is made here with markup,
emoji codes and highlighting off, and the project's own colours are styles put on spans of a
``Text`` (``styled``), never markup mixed into a string.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.text import Text


def console(*, stderr: bool = False, **options: Any) -> Console:
    return Console(stderr=stderr, markup=False, emoji=False, highlight=False, **options)


def styled(*parts: str | tuple[str, str]) -> Text:
    """One line from plain parts and ``(text, style)`` parts: ``styled(("error:", "red"), " ", message)``."""
    return Text.assemble(*parts)

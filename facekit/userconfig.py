"""Reading what a user wrote: one bounded YAML loader, one error type, errors that show bounded values.

Every YAML a user can hand us (a pipeline or training config, a ``--set`` value, a run folder's
``run.yaml``) goes through :func:`load_yaml`. YAML aliases make a document's size unrelated to its
text: a few hundred bytes of nested anchors ("billion laughs") expand to billions of nodes, and
merge keys (``<<:``) copy pairs eagerly while the document is built. PyYAML shares aliased objects,
so loading such a document is quick; whatever walks the result afterwards (validation, deep copies,
``run.yaml``, error messages) sees every expanded node. So the loader composes the document, counts
the nodes and scalar characters it would expand to (each shared node counted once per place it
appears, in time linear in the text) and refuses it, before building any Python object, when the
expansion, the nesting or the text itself passes a limit that no real config comes near.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

MAX_YAML_BYTES = 4 * 1024 * 1024  # text, and characters of scalars after alias expansion
MAX_YAML_NODES = 100_000  # nodes after alias expansion (a full pipeline config has a few hundred)
MAX_YAML_DEPTH = 64  # nested mappings/sequences (a pipeline config nests about 8 deep)
MAX_SHOWN_CHARS = 200  # of a value echoed in an error message
MAX_MESSAGE_CHARS = 500  # of one validation message (a validator may quote its input)

NOT_FINITE = "expected a finite number: NaN and infinity are not numbers a threshold or parameter can use"


class ConfigError(ValueError):
    """A config problem, with the key path and what was expected."""


def clip(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """``text``, or its first ``limit`` characters and how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} chars)"


def shown(value: Any) -> str:
    """A value as an error message quotes it: its repr, clipped."""
    return clip(repr(value))


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses documents nested deeper than MAX_YAML_DEPTH while composing them."""

    def __init__(self, stream: str, where: str) -> None:
        super().__init__(stream)
        self.where = where
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise ConfigError(f"{self.where}: nested more than {MAX_YAML_DEPTH} levels deep; refused")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _check_expansion(root: yaml.Node, where: str) -> None:
    """Refuse a document whose alias expansion passes the node, character or depth limits."""
    done: dict[int, tuple[int, int, int]] = {}  # id(node) -> (nodes, scalar chars, depth) once expanded
    open_: set[int] = set()

    def size(node: yaml.Node) -> tuple[int, int, int]:
        key = id(node)
        if key in done:
            return done[key]
        if key in open_:
            raise ConfigError(f"{where}: an alias refers to a node that contains it (a recursive document); "
                              "refused")
        if isinstance(node, yaml.ScalarNode):
            result = (1, len(node.value), 1)
        else:
            open_.add(key)
            children: list[yaml.Node] = ([n for pair in node.value for n in pair]
                                         if isinstance(node, yaml.MappingNode) else list(node.value))
            nodes, chars, depth = 1, 0, 0
            for child in children:
                n, c, d = size(child)
                nodes, chars, depth = nodes + n, chars + c, max(depth, d)
                # Checked as the sums grow, so a bomb is refused after the first few levels.
                if nodes > MAX_YAML_NODES:
                    raise ConfigError(f"{where}: its aliases expand to more than {MAX_YAML_NODES:,} nodes; refused "
                                      "(use anchors for small shared blocks only)")
                if chars > MAX_YAML_BYTES:
                    raise ConfigError(f"{where}: its aliases expand to more than {MAX_YAML_BYTES:,} characters; "
                                      "refused (use anchors for small shared blocks only)")
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise ConfigError(f"{where}: its aliases nest more than {MAX_YAML_DEPTH} levels deep; refused")
            open_.discard(key)
            result = (nodes, chars, depth)
        done[key] = result
        return result

    size(root)


def load_yaml(text: str | bytes, where: str) -> Any:
    """Parse one YAML document of user text, bounded in size, nesting and alias expansion.

    ``where`` names the source (a path, ``--set key``) in the ConfigError that refuses it.
    """
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{where}: {len(text):,} bytes; a config may have at most {MAX_YAML_BYTES:,}")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{where} is not UTF-8 text: {exc}") from None
    loader = _BoundedLoader(text, where)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, where)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {clip(str(exc), MAX_MESSAGE_CHARS)}") from None
    finally:
        loader.dispose()


def load_yaml_file(path: str | Path) -> Any:
    """:func:`load_yaml` of a local file, refused by its size before it is read."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_YAML_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    if len(data) > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: more than {MAX_YAML_BYTES:,} bytes; a config may have at most that")
    return load_yaml(data, str(path))


def key_path(loc: tuple[Any, ...]) -> str:
    """A validation location as the user writes it: ``stages[1].params.min_mean``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def format_errors(exc: ValidationError, prefix: str = "") -> str:
    """One line per error: the key path, what was expected, and the value given (clipped)."""
    lines = []
    for err in exc.errors():
        path = key_path(tuple(err["loc"]))
        if prefix:
            path = prefix + ("" if path == "<root>" else ("" if path.startswith("[") else ".") + path)
        msg = NOT_FINITE if err["type"] == "finite_number" else clip(err["msg"], MAX_MESSAGE_CHARS)
        got = "" if err["type"] == "missing" else f" (got {shown(err.get('input'))})"
        lines.append(f"  {path}: {msg}{got}")
    return "\n".join(lines)

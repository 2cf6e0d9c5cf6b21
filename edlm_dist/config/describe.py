"""The config keys as text for ``edlm <command> --help``: generated from the schema, never written by hand.

For every field of the sections a command reads: its dotted key, type, default, the help text, and the
rule the schema attaches to the field (``dataclasses.field(metadata={...})``, see :mod:`edlm_dist.config.fields`:
a range, choices or a named check), so keys and ranges added to the schema appear here without touching
this module. The
help text is the field's ``metadata["help"]`` when present, else the field's trailing ``# comment`` in
``schema.py`` (read with :mod:`tokenize`, so the comment written next to a default is its documentation).
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import sys
import tokenize
import typing
from functools import lru_cache
from typing import Any, Iterator, Optional

from edlm_dist.config.schema import RunConfig


@lru_cache(maxsize=None)
def _comments(cls: type) -> dict[str, str]:
    """``{field name: its trailing comment}`` from the class's source (empty when the source is unavailable)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found: dict[str, str] = {}
    name: Optional[str] = None
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NEWLINE or token.type == tokenize.NL:
            name = None
        elif token.type == tokenize.NAME and name is None and token.start[1] == 4:
            name = token.string  # a field line starts at the class body's indentation
        elif token.type == tokenize.COMMENT and name is not None:
            found[name] = token.string.lstrip("#").strip()
    return found


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation.replace("Optional[", "").rstrip("]") if annotation.startswith("Optional[") else annotation
    return getattr(annotation, "__name__", str(annotation)).replace("typing.", "")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def config_keys(cls: type = RunConfig, prefix: str = "") -> Iterator[dict]:
    """One record per leaf key: ``key``, ``type``, ``default``, ``help`` and the field's other metadata."""
    hints = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))
    comments = _comments(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        kind = hints.get(f.name, f.type)
        if dataclasses.is_dataclass(kind):
            yield from config_keys(kind, key + ".")
            continue
        metadata = dict(f.metadata)
        each = metadata.pop("list", False)
        metadata.pop("nonempty", None)
        why = metadata.pop("why", "")
        help_text = metadata.pop("help", comments.get(f.name, ""))
        record = {"key": key, "type": _type_name(f.type), "default": _default(f),
                  "help": "; ".join(part for part in (help_text, why) if part)}
        record.update({f"{name} (each)" if each else name: value for name, value in metadata.items()})
        yield record


def _value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value) if value == "" else value
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


LABELS = {"check": "accepts", "check (each)": "each accepts", "range (each)": "each in",
          "choices (each)": "each one of"}


def describe_keys(sections: tuple[str, ...]) -> str:
    """The keys of ``sections`` (e.g. ``("data", "train")``) as an aligned, readable block of text."""
    lines = []
    for section in sections:
        lines.append(f"{section}:")
        for record in config_keys(RunConfig):
            if not record["key"].startswith(section + "."):
                continue
            extras = "".join(f"; {LABELS.get(name, name)} {_value(v)}" for name, v in record.items()
                             if name not in ("key", "type", "default", "help"))
            lines.append(f"  {record['key']} ({record['type']}, default {_value(record['default'])}{extras})")
            if record["help"]:
                lines.append(f"      {record['help']}")
    return "\n".join(lines)

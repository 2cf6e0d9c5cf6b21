"""What each config field accepts, declared next to it in the schema, and the one check that reads it.

Every field of :mod:`edlm_dist.config.schema` is declared with one of the helpers below, which store the
rule in ``dataclasses.field(metadata=...)``:

* :func:`number` -- an int or float with a :class:`Range` (NaN and +-Inf are always refused);
* :func:`choice` -- one of a fixed set (:class:`Choices`);
* :func:`text` -- a string passing a named :class:`Check` (a path, a Slurm word, a tokenizer spec, ...);
* :func:`numbers` / :func:`choices` / :func:`texts` -- lists of those;
* :func:`flag` -- a bool (its type is its rule).

:func:`check_fields` walks the whole config (``load_config`` calls it before anything else runs) and
raises one :class:`~edlm_dist.errors.ConfigError` line naming the key, the bad value and the accepted
range or choices. ``edlm <command> --help`` prints the same rules (:mod:`edlm_dist.config.describe`), and
``tests/config/test_fields.py`` proves every field of the schema carries one.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from edlm_dist.errors import ConfigError

RULE_KEYS = ("range", "choices", "check")  # the metadata keys a rule lives under


@dataclass(frozen=True)
class Range:
    """``lo <= v <= hi`` (an open end excludes the bound); ``integer`` refuses floats like 2.5."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"{'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        return f"{'<' if self.hi_open else '<='} {_num(self.hi)}"

    def violation(self, value: float) -> Optional[str]:
        """``must be >= 1`` (the violated bound) or None when ``value`` is inside."""
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return f"must be {'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)):
            return f"must be {'<' if self.hi_open else '<='} {_num(self.hi)}"
        return None


def _num(value: float) -> str:
    if isinstance(value, int) and abs(value) >= 10**6 and str(abs(value)).rstrip("0") == "1":
        return f"{'-' if value < 0 else ''}1e{len(str(abs(value))) - 1}"  # 10**12 -> 1e12
    return str(value) if isinstance(value, int) else f"{value:g}".replace("e+0", "e").replace("e+", "e")


@dataclass(frozen=True)
class Choices:
    options: tuple

    def __str__(self) -> str:
        return " | ".join("null" if o is None else str(o) for o in self.options)


@dataclass(frozen=True)
class Check:
    """A named rule for strings: ``test(value)`` returns None when fine, else what is wrong."""

    name: str
    test: Callable[[Any], Optional[str]] = field(repr=False, compare=False)
    whole_message: bool = False  # the test's answer is the whole error line (it names the key itself)

    def __str__(self) -> str:
        return self.name


def _no_control(value: str) -> Optional[str]:
    if any(ord(c) < 32 for c in value):
        return "holds a control character (newline, tab, NUL ...)"
    return None


def _path(value: str) -> Optional[str]:
    return _no_control(value)


def _pattern(regex: str, allowed: str) -> Callable[[str], Optional[str]]:
    compiled = re.compile(regex)

    def test(value: str) -> Optional[str]:
        bad = sorted({c for c in value if not compiled.fullmatch(c)})
        return None if not bad else f"holds {''.join(bad)!r}; use only {allowed}"

    return test


TOKENIZER_NAMES = ("synthetic", "char", "byte", "gpt2", "text8")


def _tokenizer(value: str) -> Optional[str]:
    if value in TOKENIZER_NAMES or (value.startswith("hf:") and len(value) > 3 and not _no_control(value)):
        return None
    if _no_control(value):
        return _no_control(value)
    if not value:
        return "is empty"
    if "/" in value or Path(value).is_dir():  # a tokenizer folder (its files are checked when it is loaded)
        return None
    return f"is neither a tokenizer name ({', '.join(TOKENIZER_NAMES)}, hf:NAME) nor a folder"


PATH = Check("a path (may be empty)", _path)
LOCATION = Check("a folder, an http(s):// URL or a pipe: command", _path)
NAME = Check("a name without control characters", _no_control)
TOKENIZER = Check("synthetic | char | byte | gpt2 | text8 | hf:NAME | a tokenizer folder", _tokenizer)
SLURM_WORD = Check("a Slurm name: letters, digits and _ . , : + - @ = %",
                   _pattern(r"[A-Za-z0-9_.,:+\-@=%]", "letters, digits and _ . , : + - @ = %"))
SLURM_CONSTRAINT = Check("a Slurm constraint: letters, digits and _ . , : + - @ = % & | ( ) [ ] * !",
                         _pattern(r"[A-Za-z0-9_.,:+\-@=%&|()\[\]*!]", "letters, digits and _ . , : + - & | ( ) [ ] * !"))
ORACLE = Check("exact | ngram | a local model folder | a hub name", lambda v: _no_control(v) or (
    None if v else "is empty"))


# ------------------------------------------------------------------------------------ declarations
def _meta(rule: dict, why: str) -> dict:
    return {**rule, **({"why": why} if why else {})}


def number(default: float, lo: Optional[float] = None, hi: Optional[float] = None, *, lo_open: bool = False,
           hi_open: bool = False, why: str = "") -> Any:
    return field(default=default, metadata=_meta({"range": Range(lo, hi, lo_open, hi_open)}, why))


def choice(default: Any, *options: Any, why: str = "") -> Any:
    return field(default=default, metadata=_meta({"choices": Choices(options)}, why))


def text(default: str, check: Check, *, why: str = "") -> Any:
    return field(default=default, metadata=_meta({"check": check}, why))


def flag(default: bool) -> Any:
    return field(default=default)


def numbers(default: list, lo: Optional[float] = None, hi: Optional[float] = None, *, why: str = "") -> Any:
    return field(default_factory=lambda: list(default), metadata=_meta({"range": Range(lo, hi), "list": True,
                                                                                 "nonempty": True}, why))


def choices(default: list, *options: Any, why: str = "") -> Any:
    return field(default_factory=lambda: list(default),
                 metadata=_meta({"choices": Choices(options), "list": True, "nonempty": True}, why))


def texts(default: list, check: Check, *, why: str = "") -> Any:
    return field(default_factory=lambda: list(default), metadata=_meta({"check": check, "list": True}, why))


def custom(default: Any, check: Check, *, why: str = "") -> Any:
    """A field of its own shape (``sample.window``: a number or a pair), checked by ``check``."""
    return field(default=default, metadata=_meta({"check": check}, why))


# ------------------------------------------------------------------------------------ the check
def _fail(key: str, value: Any, problem: str, why: str) -> ConfigError:
    return ConfigError(f"{key} {problem} (got {_shown(value)}){': ' + why if why else ''}")


def _shown(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)  # a newline shows as \n: the message stays one line
    if isinstance(value, float):
        return repr(value) if not math.isfinite(value) else f"{value:g}"
    return str(value)


def check_value(key: str, value: Any, metadata: dict) -> None:
    """Raise one ConfigError line if ``value`` breaks the rule in ``metadata``."""
    why = metadata.get("why", "")
    if metadata.get("list"):
        if not isinstance(value, (list, tuple)):
            raise _fail(key, value, "must be a list", why)
        if not value and metadata.get("nonempty"):
            wanted = f"at least one of {metadata['choices']}" if "choices" in metadata else "at least one value"
            raise _fail(key, value, f"must hold {wanted}", why)
        item_rule = {k: v for k, v in metadata.items() if k not in ("list", "nonempty")}
        for index, item in enumerate(value):
            check_value(f"{key}[{index}]", item, item_rule)
        return
    if "range" in metadata:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(key, value, "must be a number", why)
        if isinstance(value, float) and not math.isfinite(value):
            raise _fail(key, value, f"must be a finite number in {metadata['range']}", why)
        problem = metadata["range"].violation(value)
        if problem:
            raise _fail(key, value, problem, why)
    elif "choices" in metadata:
        options = metadata["choices"].options
        if value not in options:
            allowed = [o for o in options if o is not None]
            tail = " or null" if None in options else ""
            raise ConfigError(f"{key}={_shown(value)} is not valid; use one of {allowed}{tail}"
                              f"{': ' + why if why else ''}")
    elif "check" in metadata:
        problem = metadata["check"].test(value)
        if problem and metadata["check"].whole_message:
            raise ConfigError(problem)
        if problem:
            raise ConfigError(f"{key}={_shown(value)} {problem}; it must be {metadata['check']}"
                              f"{': ' + why if why else ''}")


def check_fields(node: Any, prefix: str = "") -> None:
    """Check every field of the config dataclass ``node`` (recursively) against its declared rule."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_fields(value, key + ".")
        elif any(k in f.metadata for k in RULE_KEYS):
            check_value(key, value, dict(f.metadata))

"""The one class-name policy, shared by the command line, the Python API and the server (torch-free).

A class list is given as
  * a comma-separated string: ``"cat, sofa, potted plant"``;
  * a JSON list of strings, for names that contain a comma: ``'["cat, kitten", "toilet"]'`` (any string whose
    first non-blank character is ``[`` is read as JSON);
  * a Python sequence of strings (the API);
  * a file, one name per line (``fusionseg segment --classes-file``; blank lines are skipped, commas kept).

Each name has its whitespace collapsed (``"  potted\\tplant "`` -> ``"potted plant"``); case is kept. The list is
refused (``ValueError``, one line) when it is empty, when a name is blank (``"cat,,dog"``), longer than
:data:`MAX_NAME_CHARS` characters or holds a control character, when two names are the same after
:func:`match_key` (case, ``_``/``-`` and spacing ignored), or when there are more than ``limit`` names
(:data:`MAX_CLASSES` by default; the server's ``--max-classes`` is lower).
"""
from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from typing import Sequence

#: Most class names in one call (the API's and CLI's limit; the server's own default is lower).
MAX_CLASSES = 1000
#: Longest class name, in characters (after whitespace is collapsed).
MAX_NAME_CHARS = 100

__all__ = ["MAX_CLASSES", "MAX_NAME_CHARS", "clean_name", "match_key", "split_class_list", "parse_class_names",
           "read_classes_file"]


def clean_name(name: str) -> str:
    """``"  potted\\tplant "`` -> ``"potted plant"``: whitespace collapsed, case kept (the name as shown)."""
    return " ".join(str(name).split())


def match_key(name: str) -> str:
    """The form two names are compared in: lower case, ``_`` and ``-`` as spaces, whitespace collapsed
    (``"Sign_Symbol"`` and ``"sign symbol"`` are the same class)."""
    return " ".join(str(name).replace("_", " ").replace("-", " ").casefold().split())


def split_class_list(spec: str) -> list[str]:
    """A class-list string -> its raw items: a JSON list of strings when it starts with ``[``, else split at commas."""
    s = spec.strip()
    if s.startswith("["):
        try:
            items = json.loads(s)
        except json.JSONDecodeError as e:
            raise ValueError(f"the class list starts with '[' but is not a valid JSON list ({e.msg} at character "
                             f"{e.pos}); write names with commas as [\"cat, kitten\", \"toilet\"]") from None
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise ValueError('a JSON class list must be a list of strings, e.g. ["cat, kitten", "toilet"]')
        return items
    return s.split(",") if s else []


def parse_class_names(spec: str | Sequence[str], limit: int = MAX_CLASSES) -> list[str]:
    """Any accepted class-list form -> the cleaned names, or ``ValueError`` saying what is wrong (see module doc)."""
    if isinstance(spec, str):
        items = split_class_list(spec)
    else:
        items = list(spec)
        if not all(isinstance(x, str) for x in items):
            bad = next(x for x in items if not isinstance(x, str))
            raise ValueError(f"class names must be strings, got {type(bad).__name__} {bad!r:.40}")
    names = [clean_name(n) for n in items]
    if not names or not any(names):
        raise ValueError('the class list is empty; give names like "cat, sofa, potted plant"')
    for i, n in enumerate(names, 1):
        if not n:
            raise ValueError(f"class name {i} of {len(names)} is blank; remove the extra comma or give a name")
        if len(n) > MAX_NAME_CHARS:
            raise ValueError(f"class name {i} is {len(n)} characters long; the limit is {MAX_NAME_CHARS}")
        if any(unicodedata.category(c) == "Cc" for c in n):
            raise ValueError(f"class name {i} ({n[:40]!r}) holds a control character")
    if len(names) > limit:
        raise ValueError(f"{len(names)} class names given; the limit is {limit}")
    seen: dict[str, str] = {}
    for n in names:
        key = match_key(n)
        if key in seen:
            raise ValueError(f"duplicate class name {n!r} (same as {seen[key]!r} ignoring case, spacing, '_' and '-')")
        seen[key] = n
    return names


def read_classes_file(path: str | Path, limit: int = MAX_CLASSES) -> list[str]:
    """A UTF-8 text file, one class name per line (commas are part of the name; blank lines skipped)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"no such classes file: {p}") from None
    except IsADirectoryError:
        raise ValueError(f"the classes file {p} is a folder") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"the classes file {p} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at {e.start})") from None
    except OSError as e:
        raise ValueError(f"cannot read the classes file {p}: {e.strerror or e}") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"the classes file {p} holds no names (one name per line)")
    return parse_class_names(lines, limit=limit)

"""Strict JSON: the one parser for JSON that a peer or an operator hands us.

Python's ``json`` accepts what standard JSON does not, and what another parser reads
differently: a key twice in one object (we and the node, or we and an auditor, could read
different values from the same bytes), ``NaN``/``Infinity``, and bytes in UTF-16/32. This
module refuses all three, and a top level that is not an object where one is required. Its
errors say why in ``reason`` and, for a file, name the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["StrictJSONError", "load", "loads"]


class StrictJSONError(ValueError):
    """JSON refused. ``reason`` says why; ``str()`` also names ``source`` when there is one.

    ``key`` is the repeated key of a duplicate-key refusal; ``lineno``/``colno`` locate a
    syntax error.
    """

    def __init__(
        self,
        reason: str,
        source: str | None = None,
        *,
        key: str | None = None,
        lineno: int | None = None,
        colno: int | None = None,
    ) -> None:
        super().__init__(f"{source}: {reason}" if source else reason)
        self.reason = reason
        self.source = source
        self.key = key
        self.lineno = lineno
        self.colno = colno


def _reject_constant(name: str) -> NoReturn:
    raise StrictJSONError(f"non-standard constant {name}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        keys = [k for k, _ in pairs]
        dup = next(k for k in keys if keys.count(k) > 1)
        raise StrictJSONError(f"duplicate key {dup!r}", key=dup)
    return obj


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_reject_constant)


def loads(data: bytes | str, *, source: str | None = None, want_object: bool = True) -> Any:
    """Parse ``data`` (bytes must be UTF-8); ``source`` names it in errors.

    With ``want_object`` the top level must be an object.
    """
    try:
        # Decode explicitly: json.loads(bytes) would also guess UTF-16/32.
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        obj = _DECODER.decode(text)
    except StrictJSONError as e:
        raise StrictJSONError(e.reason, source, key=e.key) from None
    except UnicodeDecodeError as e:
        raise StrictJSONError(f"not UTF-8 at byte {e.start}", source) from None
    except RecursionError:
        raise StrictJSONError("nesting too deep", source) from None
    except json.JSONDecodeError as e:
        raise StrictJSONError(str(e), source, lineno=e.lineno, colno=e.colno) from None
    except ValueError as e:  # int() digit-count limits
        raise StrictJSONError(str(e), source) from None
    if want_object and not isinstance(obj, dict):
        raise StrictJSONError("the top level must be a JSON object", source)
    return obj


def load(path: Path, *, want_object: bool = True) -> Any:
    """Read and parse the file at ``path``; errors name it. OSError passes through."""
    return loads(path.read_bytes(), source=str(path), want_object=want_object)

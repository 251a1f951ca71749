"""What reward functions receive: a completion's text (a string or TRL's list of messages) and
one sample's value of a dataset column."""

from __future__ import annotations

from typing import Any

__all__ = ["completion_text"]


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or TRL's list of messages."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_text(completion.get("content", ""))
    if isinstance(completion, (list, tuple)):
        msgs = [m for m in completion if isinstance(m, dict)]
        if msgs and len(msgs) == len(completion):
            assistant = [m for m in msgs if m.get("role", "assistant") == "assistant"]
            use = assistant if assistant else msgs
            return "\n".join(_content_text(m.get("content", "")) for m in use)
        return "".join(x if isinstance(x, str) else completion_text(x) for x in completion)
    return str(completion)


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        parts = []
        for p in content:
            if isinstance(p, str):
                parts.append(p)
            elif isinstance(p, dict) and p.get("type", "text") == "text":
                parts.append(str(p.get("text", "")))
        return "".join(parts)
    return str(content)


def _col(column: Any, i: int, n: int, name: str) -> Any:
    """Value of a dataset column for sample ``i`` (``None`` if absent)."""
    if column is None:
        return None
    if isinstance(column, (str, bytes)):
        raise ValueError(f"column {name!r} must hold one value per completion, got a single string")
    try:
        length = len(column)
    except TypeError:
        raise ValueError(f"column {name!r} must be a sequence with one value per completion") from None
    if length != n:
        raise ValueError(f"column {name!r} has {length} values for {n} completions")
    return column[i]

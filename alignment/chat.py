"""Chat-message checks and conversions shared by the SFT and preference data contracts."""

from __future__ import annotations

ROLES = ("system", "user", "assistant")


def message_problems(msgs, field: str) -> list[str]:
    """Problems with a list of chat messages, each naming the field and the turn."""
    if not isinstance(msgs, list) or not msgs:
        return [f"{field}: expected a non-empty list of messages"]
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            out.append(f"{field}[{i}]: expected a message object, got {type(m).__name__}")
            continue
        if m.get("role") not in ROLES:
            out.append(f"{field}[{i}].role: expected one of {', '.join(ROLES)}, got {m.get('role')!r}")
        content = m.get("content")
        if not isinstance(content, str) or not content.strip():
            out.append(f"{field}[{i}].content: empty or not a string")
    return out


def as_messages(value, role: str) -> list[dict]:
    """A string becomes one message with `role`; a list of messages is kept as is."""
    return [{"role": role, "content": value}] if isinstance(value, str) else value

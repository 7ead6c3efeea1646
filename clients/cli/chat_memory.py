"""Which conversation `sinkstream chat` continues: the session id remembered per server (or local model)
in `$XDG_CONFIG_HOME/sinkstream/chat.json` (default `~/.config/sinkstream/chat.json`)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def state_file() -> Path:
    """Where chat sessions are remembered (XDG_CONFIG_HOME respected)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.environ.get("APPDATA") or Path.home() / ".config"
    return Path(base) / "sinkstream" / "chat.json"


def load_state() -> dict:
    try:
        data = json.loads(state_file().read_text())
    except (OSError, ValueError):
        return {"sessions": {}}
    return data if isinstance(data.get("sessions"), dict) else {"sessions": {}}


def remember(server: str, session_id: str, open_turn: bool) -> None:
    """Record this server's conversation; open_turn: the stream ends with the user prefix already."""
    data = load_state()
    data["sessions"][server] = {"session_id": session_id, "open_turn": open_turn}
    path = state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)

"""One W&B mode policy for every dus command that logs: the user's WANDB_MODE if set, else
online when wandb would find a login without prompting (WANDB_API_KEY or a netrc entry
from `wandb login`), else offline, so a run on a machine without a login never stops at
wandb's prompt and never loses its curves (`wandb sync` uploads them later)."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from urllib.parse import urlsplit


def logged_in() -> bool:
    """Whether wandb would find an API key without prompting (env var or netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc or "api.wandb.ai"
    path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def choose_mode() -> str:
    """WANDB_MODE if the user set it, else online when logged in, else offline."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    return "online" if logged_in() else "offline"

"""Whether a W&B API key is configured, read without W&B, Ray or the network: the sweep's logger and
`oelm-ray doctor` (which must run where W&B or Ray is missing) share this one check."""

from __future__ import annotations

import netrc
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_HOST = "https://api.wandb.ai"


def has_key(env: Mapping[str, str] | None = None) -> bool:
    """True when an API key is configured: WANDB_API_KEY (or an identity token file), or the netrc
    entry `wandb login` writes ($NETRC, else ~/.netrc or ~/_netrc) for the W&B host; no network.

    env: the environment to read (default os.environ; its HOME is the home folder)."""
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(env.get("WANDB_BASE_URL") or DEFAULT_HOST).netloc
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    path = env.get("NETRC") or next((p for p in (home / ".netrc", home / "_netrc") if p.exists()), home / ".netrc")
    try:
        creds = netrc.netrc(str(Path(path).expanduser())).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(creds and creds[2])

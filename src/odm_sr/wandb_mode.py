"""Whether a wandb logger runs online: ``$WANDB_MODE`` when set (it wins over ``logger.wandb.offline``), and online
only if the wandb server answers. Without a network ``wandb.init`` waits its init timeout (90 s) and then fails
the run; here a 5 s connection probe decides first, and the run logs offline instead, with a warning."""

from __future__ import annotations

import os
import socket
import warnings
from urllib.parse import urlsplit

DEFAULT_BASE_URL = "https://api.wandb.ai"  # wandb's default; $WANDB_BASE_URL points at another server
PROBE_SECONDS = 5.0


def wants_online(offline_setting: bool) -> bool:
    """Would wandb start online? ``$WANDB_MODE`` (online/run vs offline/dryrun/disabled) when set, else the
    logger's ``offline``."""
    mode = os.environ.get("WANDB_MODE")
    return mode in ("online", "run") if mode else not offline_setting


def unreachable_server(timeout: float = PROBE_SECONDS) -> str | None:
    """None when a TCP connection to the wandb server (``$WANDB_BASE_URL``) opens within ``timeout`` seconds;
    else why not (one line naming the URL)."""
    url = os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL)
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            return None
    except OSError as err:
        return f"{url} is unreachable ({err.strerror or err})"


def offline_fallback(offline_setting: bool) -> bool:
    """The ``offline`` to give Lightning's ``WandbLogger``: True where wandb would run online but its server
    does not answer (warning once: the run is logged offline, to upload later with ``make wandb-sync``)."""
    if not wants_online(offline_setting):
        return offline_setting and not os.environ.get("WANDB_MODE")  # $WANDB_MODE decides when set
    why = unreachable_server()
    if why is None:
        return False
    warnings.warn(f"wandb online: {why}; logging offline instead (upload later with make wandb-sync)",
                  UserWarning, stacklevel=2)
    return True

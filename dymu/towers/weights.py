"""Before downloading named open_clip weights: are they cached, or is their host reachable?

Without this check an offline machine spends about a minute in the hub client's retries and
then prints a message cut from a long multi-line one. Here it is one line within seconds,
saying what to do instead.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from ..errors import DyMUError

_PROBE_SECONDS = 5.0
_PROXIES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def check_weights_reachable(base: str, tag: str) -> None:
    """Raise a one-line :class:`DyMUError` when ``tag`` of open_clip model ``base`` is neither
    cached nor downloadable from here. Local files, unknown tags (open_clip words those) and
    machines behind a proxy (the proxy decides) are left to open_clip."""
    import open_clip

    if os.path.exists(tag):
        return
    cfg = open_clip.get_pretrained_cfg(base, tag)
    if not cfg or "file" in cfg:
        return
    hub = cfg.get("hf_hub", "")
    if not hub or _hub_cached(hub):  # URL-only tags use open_clip's own cache: its call
        return
    if _hub_offline():
        raise DyMUError(
            f"weights {tag!r} for {base} are not in the Hugging Face cache and HF_HUB_OFFLINE "
            f"is set; {_ADVICE}"
        )
    url = urlparse(_hub_endpoint())
    host = url.hostname
    if host is None or any(os.environ.get(v) for v in _PROXIES):
        return
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=_PROBE_SECONDS).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise DyMUError(
            f"cannot download weights {tag!r} for {base}: {host} is unreachable ({reason}) "
            f"and they are not cached; {_ADVICE}"
        ) from None


_ADVICE = (
    "pass a local checkpoint (--pretrained PATH), fill the cache (HF_HOME) on a machine with "
    "network access, or use --pretrained none for random weights"
)


def _hub_cached(hub: str) -> bool:
    """Whether any file open_clip would take from this hub entry is already cached."""
    from huggingface_hub import try_to_load_from_cache

    repo, filename = os.path.split(hub)  # 'org/name/' (default file) or 'org/name/file'
    names = [filename] if filename else []
    names += ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(repo, name), str) for name in names)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT

"""Whether the Hugging Face Hub can be reached at all, asked once per process.

Offline, the Hub client retries every request five times with growing waits (1 + 2 + 4 + 8 +
8 s): about 25 s a file, so ``noln eval gpt2`` on a machine without network took ~55 s to say
so. Where the Hub's host name does not resolve and no proxy is set (a proxy resolves names
itself), no request can reach the Hub: noln then reads only the Hub cache, as
``HF_HUB_OFFLINE=1`` would, so a cached model still loads and an uncached one is an error at
once that says why (``offline_reason``). A name that resolves changes nothing: the Hub client
then decides, retries and all.
"""

from __future__ import annotations

import functools
import socket
import sys
import urllib.request
from urllib.parse import urlparse

from huggingface_hub import constants as hf_constants

# a proxy resolves the Hub's name itself: the local resolver says nothing about reaching it
# (urllib's proxies: the environment's *_proxy variables in any case, or the system's
# settings; the Hub client reads the same)
PROXY_SCHEMES = ("https", "http", "all")
# the resolver's answers that mean no name can be had now (no network, no DNS server)
NO_NAME = {socket.EAI_NONAME, socket.EAI_AGAIN, getattr(socket, "EAI_FAIL", socket.EAI_NONAME),
           getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}

_offline_reason: str | None = None


@functools.cache
def unresolved_host() -> str | None:
    """The Hub's host name (``HF_ENDPOINT``'s) where it does not resolve and no proxy is set;
    None where it resolves, or where that cannot be told."""
    host = urlparse(hf_constants.ENDPOINT).hostname
    if not host:
        return None
    proxies = urllib.request.getproxies()
    if any(proxies.get(scheme) for scheme in PROXY_SCHEMES) and \
            not urllib.request.proxy_bypass(host):
        return None
    try:
        socket.getaddrinfo(host, 443, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        return host if e.errno in NO_NAME else None
    except (OSError, UnicodeError):
        return None
    return None


def offline_unless_reachable() -> None:
    """Before noln asks the Hub for anything: where its name does not resolve, read only the
    Hub cache for the rest of the process (the offline switch of huggingface_hub, which
    transformers reads, and of datasets). A process started from this one asks itself."""
    global _offline_reason
    if _offline_reason is None:
        if hf_constants.HF_HUB_OFFLINE:
            return
        host = unresolved_host()
        if host is None:
            return
        _offline_reason = f"its name {host} does not resolve"
        hf_constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:  # (it may be imported after the switch)
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True


def offline_reason() -> str | None:
    """Why noln switched to the Hub cache (``offline_unless_reachable``), for an error that
    says why a model or dataset is not there; None where it did not."""
    return _offline_reason

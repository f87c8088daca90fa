"""Whether noln may run Python code shipped with a model (config.json's ``auto_map``): only when
the user says so, by ``noln --trust-remote-code`` or ``set_trust_remote_code(True)``. Off by
default, so such a model is refused with the flag to pass (``noln.pretrained``)."""

_TRUST_REMOTE_CODE = False


def set_trust_remote_code(trust: bool) -> None:
    global _TRUST_REMOTE_CODE
    _TRUST_REMOTE_CODE = bool(trust)


def trust_remote_code() -> bool:
    return _TRUST_REMOTE_CODE

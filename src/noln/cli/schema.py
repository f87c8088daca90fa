"""Command-line options generated from the config schema (``noln.config``).

Every setting of ``RemoveConfig`` / ``PretrainConfig`` with a plain type becomes one option of
``noln remove`` / ``noln pretrain``, with the field's description and range as its help, so the
command line cannot drift from the config: adding a field to the schema adds its flag. Nested
settings and pairs (``fixed.gaps.mlp_in``, ``adaptive.tolerance``, ``betas``) are given as
``KEY=VALUE`` arguments, as torchtune does. A command is a plain function taking the settings
as keyword arguments; ``with_settings`` gives typer the generated signature.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Annotated, Any

import annotated_types
import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from noln.config import flag_of, option_type, parse_settings
from noln.errors import NolnError

_BOUNDS = ((annotated_types.Ge, "ge", ">="), (annotated_types.Gt, "gt", ">"),
           (annotated_types.Le, "le", "<="), (annotated_types.Lt, "lt", "<"))


def field_help(field: FieldInfo) -> str:
    """The field's description and range, as ``--help`` shows them."""
    bounds = [f"{sign} {getattr(m, attr)}" for m in field.metadata
              for kind, attr, sign in _BOUNDS if isinstance(m, kind)]
    text = field.description or ""
    return f"{text} [{', '.join(bounds)}]" if bounds else text


def setting_options(cls: type[BaseModel], skip: Iterable[str] = ()) -> list[inspect.Parameter]:
    """One keyword parameter per setting of ``cls`` that has a flag (``noln.config.flag_of``),
    default None (= not given: the preset's or the file's value stands). Booleans get
    ``--x/--no-x``; ``progress`` is the one inverted flag, ``--quiet``."""
    params = []
    for name, field in cls.model_fields.items():
        flag = flag_of(name, cls)
        if name in skip or flag is None:
            continue
        kind = option_type(field.annotation)
        if name == "progress":
            option = typer.Option(flag, help="no progress bar")
        elif kind is bool:
            option = typer.Option(f"{flag}/--no-{flag.removeprefix('--')}",
                                  help=field_help(field))
        else:
            option = typer.Option(flag, help=field_help(field))
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[kind | None, option]))
    return params


def settings_given(cls: type[BaseModel], values: dict[str, Any]) -> dict[str, Any]:
    """The settings given on the command line (None: not given); ``--quiet`` as progress."""
    given = {k: v for k, v in values.items() if k in cls.model_fields and v is not None}
    if "progress" in given:  # the flag is --quiet: given means no progress bar
        given["progress"] = not given["progress"]
    return given


def command_line_settings(cls: type[BaseModel], flags: dict[str, Any],
                          settings: list[str]) -> dict[str, Any]:
    """The settings a command line gives: its flags and its ``KEY=VALUE`` arguments, which may
    not both give one setting."""
    given = settings_given(cls, flags)
    typed = parse_settings(settings, cls)
    both = sorted(set(given) & set(typed))
    if both:
        raise NolnError(f"'{both[0]}' is given as {flag_of(both[0], cls)} and as {both[0]}=...: "
                        "give it once")
    return {**typed, **given}


def with_settings(command: Callable, cls: type[BaseModel], skip: Iterable[str] = ()
                  ) -> Callable:
    """``command`` with its own parameters followed by the generated setting options, as
    typer reads them (``__signature__`` and ``__annotations__``); it receives every value."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values()
           if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params = own + setting_options(cls, skip={*skip, *(p.name for p in own)})

    def wrapper(**values: Any) -> Any:
        return command(**values)

    wrapper.__name__, wrapper.__doc__ = command.__name__, command.__doc__
    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper

"""Command-line options made from dataclass fields, and the fields' values back from parsed arguments.

One flag per field, `batch_size` -> `--batch-size`, with the field's type and default, and its metadata's
`help`, `choices` and `metavar`. By type: int, float, str: one value; bool: a switch (`--busy-poll`) if
it defaults to False, else `on|off` (a switch could not turn it off); list[str]: repeatable; no default:
required. Metadata `testing=True` marks a test knob, listed under TESTING after the user's options.

JobConfig's options are made this way for `train` and `plan` alike, so neither can miss a field or drift
from the other. Two job fields have a form of their own: `model` is `--model NAME --model-options k=v,...`,
`backward_at` is `STAGE:HOST,...|auto`.
"""
from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, fields

from pipeline.config import JobConfig

TESTING = "testing (not for normal use)"


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def backward_at(text: str) -> list[list[int]] | str:
    """--backward-at: "auto", or STAGE:HOST pairs of chain positions -> [[stage, host], ...]."""
    if text == "auto":
        return text
    try:
        return [[int(v) for v in pair.split(":")] for pair in text.split(",") if pair] if text else []
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected STAGE:HOST pairs of chain positions, got {text!r}") from None


def on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text == "on"


def default_of(f):
    return f.default_factory() if f.default_factory is not MISSING else f.default


def with_default(help: str, default) -> str:
    """The help with the default in its command-line form, unless there is nothing to show (or a switch)."""
    help = help.replace("%", "%%")
    if default is False or default in (None, "", [], MISSING):
        return help
    return f"{help} (default: {'on' if default is True else default})"


def add_model(parser, f) -> None:
    name = default_of(f)["name"]
    parser.add_argument("--model", default=name, metavar="NAME", help=with_default(f.metadata["help"], name))
    parser.add_argument("--model-options", default="", metavar="K=V,...",
                        help="the model's options, e.g. depth=4,width=256 (values read as JSON where they parse)")


def model_value(args) -> dict:
    from pipeline.models import parse_spec

    return parse_spec(args.model, args.model_options)


# JobConfig fields whose command-line form is not one value of their type: (add the options, read the value)
JOB_FORMS = {"model": (add_model, model_value)}
def numbers(text: str) -> list[int]:
    """--cut: A or A,B -> [A] or [A, B]."""
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer indices A or A,B, got {text!r}") from None


def names(text: str) -> list[str]:
    """--clients, --helpers: PEER,... -> [peer, ...]."""
    return [v for v in text.split(",") if v]


JOB_TYPES = {"backward_at": backward_at, "cut": numbers, "clients": names, "helpers": names}   # own parsers


def add_options(parser, cls, names=None, forms=None, types=None, **defaults) -> None:
    """Add an option for each field of dataclass `cls` (those in `names`, if given) to `parser` (or group);
    `defaults` replaces a field's default on this parser."""
    hints, testing = typing.get_type_hints(cls), None
    for f in fields(cls):
        if names is not None and f.name not in names:
            continue
        target = parser
        if f.metadata.get("testing"):
            testing = testing or parser.add_argument_group(TESTING)
            target = testing
        if f.name in (forms or {}):
            forms[f.name][0](target, f)
            continue
        target.add_argument(flag(f.name), **argument(f, hints[f.name], defaults.get(f.name, default_of(f)),
                                                     (types or {}).get(f.name)))


def argument(f, kind, default, parse=None) -> dict:
    """add_argument's keywords for field `f` of type `kind`."""
    meta = f.metadata
    kw = {"help": with_default(meta.get("help", ""), default), "default": default}
    kw.update({k: meta[k] for k in ("choices", "metavar") if k in meta})
    if default is MISSING:
        kw.update(required=True, default=None)
    if type(None) in typing.get_args(kind):   # X | None -> X
        kind = next(t for t in typing.get_args(kind) if t is not type(None))
    if parse:
        return {**kw, "type": parse}
    if kind is bool and default is False:
        return {**kw, "action": "store_true"}
    if kind is bool:
        return {**kw, "type": on_off, "metavar": "on|off"}
    if typing.get_origin(kind) is list:
        return {**kw, "action": "append"}
    if kind not in (int, float, str):
        raise TypeError(f"{f.name}: no command-line form for {kind}; give it one in `forms`")
    return {**kw, "type": kind}


def values(args, cls, names=None, forms=None) -> dict:
    """{field: value} of dataclass `cls` from arguments parsed with add_options."""
    return {f.name: forms[f.name][1](args) if f.name in (forms or {}) else getattr(args, f.name)
            for f in fields(cls) if names is None or f.name in names}


def add_job_options(parser, names=None) -> None:
    """The options of JobConfig's fields (those in `names`, if given)."""
    add_options(parser, JobConfig, names, JOB_FORMS, JOB_TYPES)


def job_config(args, names=None) -> JobConfig:
    """The JobConfig of parsed job options (fields not in `names` at their defaults). Raises ConfigError,
    or SpecError for bad --model-options."""
    return JobConfig(**values(args, JobConfig, names, JOB_FORMS))

"""Options declared once, on config dataclasses: type, default, choices, range and help.

    @dataclass
    class VAEConfig:
        latent_dim: int = option(32, "latent dimensions", minimum=1)

The field's annotation gives the type (bool, int, float, str, list[int], list[float], tuple[int, ...], dict,
or any of them | None). `check_options(config)`, called by each config's __post_init__, validates and normalizes
every field against its declaration with one message style; the command line (elbox.cli) is generated from
the same declarations by `add_options`, so names, defaults, choices and help cannot disagree.

Why argparse and not tyro or jsonargparse: both generate nested, prefixed flags from nested dataclasses
(--model.latent-dim), which would rename every existing option, and tyro's errors are multi-line panels; the
argparse options generated here keep the flat names and the one-line errors ("argument --lr: must be > 0, got -1").
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import typing
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

from elbox.core.errors import ElboxError, shown

MISSING = dataclasses.MISSING
MAX_SEED = 2**63 - 1  # seeds, and every whole-number option, fit a signed 64-bit integer
MAX_ITEMS = 1000  # values of a list option, unless its declaration says otherwise


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    choices: Sequence[str] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    max_items: int = MAX_ITEMS,
    aliases: Sequence[str] = (),
    metavar: str | None = None,
    cli: bool = True,
    file: str | None = None,
    used_with: dict[str, str | Sequence[str]] | None = None,
) -> Any:
    """A dataclass field with its command-line declaration. minimum/maximum are inclusive bounds, above/below
    exclusive ones (for numbers, and for each element of a list); max_items: the most values a list takes. aliases:
    extra command-line flags (e.g. an older name). cli=False: a field the command line does not set (e.g.
    data_shape, taken from the data). file: a path the command line checks at once with add_options' `files` of that
    name (e.g. "output": a file elbox may write). used_with: {other field: its value or values} under which the
    option has an effect (e.g. sigma: {"likelihood": "gaussian"}); check_options refuses it away from its default
    otherwise. No default: the option is required."""
    metadata = {
        "help": help,
        "choices": tuple(choices) if choices else None,
        "minimum": minimum,
        "maximum": maximum,
        "above": above,
        "below": below,
        "max_items": max_items,
        "aliases": tuple(aliases),
        "metavar": metavar,
        "cli": cli,
        "file": file,
        "used_with": tuple((k, (v,) if isinstance(v, str) else tuple(v)) for k, v in (used_with or {}).items()),
    }
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One declared field: name, kind ("bool", "int", "float", "str", "dict"), whether it is a list/tuple, whether
    None is allowed, and its declaration."""

    name: str
    kind: str
    sequence: str | None  # None, "list" or "tuple"
    optional: bool
    default: Any
    help: str
    choices: tuple[str, ...] | None
    minimum: float | None
    maximum: float | None
    above: float | None
    below: float | None
    max_items: int
    aliases: tuple[str, ...]
    metavar: str | None
    cli: bool
    file: str | None
    used_with: tuple[tuple[str, tuple[str, ...]], ...]  # (field, its values under which the option has an effect)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def range_text(self) -> str:
        """e.g. "> 0", or with two bounds "a whole number between 1 and 100" or "a number > 0 and <= 10"."""
        if self.kind == "int" and None not in (self.minimum, self.maximum) and self.above is self.below is None:
            return f"a whole number between {_number_text(self.minimum)} and {_number_text(self.maximum)}"
        bounds = [(">=", self.minimum), (">", self.above), ("<=", self.maximum), ("<", self.below)]
        text = " and ".join(f"{sign} {_number_text(bound)}" for sign, bound in bounds if bound is not None)
        return f"a number {text}" if " and " in text else text


def _number_text(value: float) -> str:
    """A bound as written: whole numbers in full (2**63 - 1 is 9223372036854775807), others by :g."""
    return str(value) if isinstance(value, int) else f"{value:g}"


_KINDS = {bool: "bool", int: "int", float: "float", str: "str", dict: "dict"}


def _kind_of(annotation: Any, name: str) -> tuple[str, str | None, bool]:
    optional = False
    args = typing.get_args(annotation)
    if type(None) in args:  # X | None
        optional = True
        (annotation,) = [a for a in args if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        element = typing.get_args(annotation)[0]
        return _KINDS[element], origin.__name__, optional
    if origin is dict or annotation is dict:
        return "dict", None, optional
    if annotation not in _KINDS:
        raise TypeError(f"option {name}: unsupported type {annotation!r}")
    return _KINDS[annotation], None, optional


@cache
def option_specs(config_class: type) -> tuple[OptionSpec, ...]:
    """The declared options of a config dataclass, in field order."""
    hints = typing.get_type_hints(config_class)
    specs = []
    for f in dataclasses.fields(config_class):
        kind, sequence, optional = _kind_of(hints[f.name], f.name)
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        meta = dict(f.metadata) or {
            "help": "",
            "choices": None,
            "minimum": None,
            "maximum": None,
            "above": None,
            "below": None,
            "max_items": MAX_ITEMS,
            "aliases": (),
            "metavar": None,
            "cli": True,
            "file": None,
            "used_with": (),
        }
        specs.append(OptionSpec(f.name, kind, sequence, optional, default, **meta))
    return tuple(specs)


_REPR = reprlib.Repr()  # looks at the first items and levels only: fast and shallow for any input
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 4, 200, 200, 200


def short_repr(value: Any, limit: int = 60) -> str:
    """repr() cut to `limit` characters, so that a message stays one short line even for a huge or deeply nested
    input."""
    try:
        text = _REPR.repr(value)
    except (ValueError, RecursionError):  # an int too long to print, a nesting too deep
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# names users bring from other libraries and papers, and the elbox name each means
SYNONYMS = {
    "gmm": "mixture",
    "mog": "mixture",
    "ppca": "linear",
    "pca": "linear",
    "fa": "linear",
    "factor-analysis": "linear",
    "vdm": "diffusion",
    "ddpm": "diffusion",
    "lvae": "hvae",
    "nvae": "hvae",
    "ladder": "hvae",
    "learning-rate": "lr",
    "learning_rate": "lr",
    "num-epochs": "epochs",
    "n-epochs": "epochs",
    "z-dim": "latent-dim",
    "latent-size": "latent-dim",
    "latent": "latent-dim",
    "batch": "batch-size",
    "bs": "batch-size",
    "k": "iw-samples",
    "num-samples": "n",
    "fmnist": "fashion-mnist",
}


def did_you_mean(word: Any, choices: Sequence[str], quote: bool = True) -> str:
    """ "did you mean 'X'? " with the choice nearest to a mistyped word (a known synonym, else difflib; leading dashes
    of options ignored, "_" read as "-"), or "" when none is near."""
    names = {str(c).lstrip("-"): str(c) for c in choices}
    bare = str(word).lstrip("-").lower()
    synonym = SYNONYMS.get(bare, SYNONYMS.get(bare.replace("_", "-"), bare.replace("_", "-")))
    close = [synonym] if synonym in names else difflib.get_close_matches(str(word).lstrip("-"), list(names), n=1)
    return "" if not close else f"did you mean {names[close[0]]!r}? " if quote else f"did you mean {names[close[0]]}? "


def _check_scalar(spec: OptionSpec, value: Any, what: str, given: str | None = None) -> Any:
    """The value checked against the declaration; ElboxError "WHAT must be ..., got GIVEN" (GIVEN: what the user
    wrote, by default the value's repr)."""
    given = short_repr(value) if given is None else given
    kind = spec.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise ElboxError(f"{what} must be true or false, got {short_repr(value)}")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise ElboxError(f"{what} must be a string, got {short_repr(value)}")
        if spec.choices and value not in spec.choices:
            raise ElboxError(
                f"unknown {what} {short_repr(value)}; {did_you_mean(value, spec.choices)}"
                f"choose one of {', '.join(spec.choices)}"
            )
        return value
    if kind == "dict":
        if not isinstance(value, dict):
            raise ElboxError(f"{what} must be a JSON object, got {short_repr(value)}")
        return value
    number_ok = isinstance(value, int) if kind == "int" else isinstance(value, (int, float))
    if isinstance(value, bool) or not number_ok:
        raise ElboxError(f"{what} must be {'a whole number' if kind == 'int' else 'a number'}, got {short_repr(value)}")
    if kind == "float":
        value = float(value) if isinstance(value, float) or abs(value) < 1e308 else math.inf  # float(10**400) raises
        if not math.isfinite(value):
            raise ElboxError(f"{what} must be finite, got {given}")
    elif abs(value) > MAX_SEED and None in (spec.minimum, spec.maximum):  # a declared range says more
        raise ElboxError(f"{what} must fit a 64-bit integer, got {given}")
    bounds = [
        (spec.minimum, lambda v, b: v >= b),
        (spec.maximum, lambda v, b: v <= b),
        (spec.above, lambda v, b: v > b),
        (spec.below, lambda v, b: v < b),
    ]
    if not all(bound is None or holds(value, bound) for bound, holds in bounds):
        raise ElboxError(f"{what} must be {spec.range_text()}, got {given}")
    return value


def check_value(spec: OptionSpec, value: Any) -> Any:
    """The value checked against the declaration and normalized (lists as lists, tuples as tuples, floats as
    float); ElboxError naming the option otherwise."""
    if value is None and spec.optional:
        return None
    if spec.sequence is None:
        return _check_scalar(spec, value, spec.name)
    if not isinstance(value, (list, tuple)):
        raise ElboxError(f"{spec.name} must be a list, got {short_repr(value)}")
    if len(value) > spec.max_items:
        raise ElboxError(f"{spec.name} takes at most {spec.max_items} values, got {len(value)}")
    items = [_check_scalar(spec, v, f"each of {spec.name}") for v in value]
    return tuple(items) if spec.sequence == "tuple" else items


def check_options(config: Any) -> None:
    """Validate and normalize every declared field of a config dataclass instance, in place."""
    specs = option_specs(type(config))
    for spec in specs:
        setattr(config, spec.name, check_value(spec, getattr(config, spec.name)))
    for spec in specs:
        unused = ignored_by(spec, vars(config))
        if unused and getattr(config, spec.name) != spec.default:
            field, allowed = unused
            raise ElboxError(
                f"{spec.name}={short_repr(getattr(config, spec.name))} applies to {field} {' or '.join(allowed)} only, "
                f"not {getattr(config, field)}; set {field} or drop {spec.name}"
            )


def ignored_by(spec: OptionSpec, values: dict[str, Any]) -> tuple[str, tuple[str, ...]] | None:
    """(field, the values it must have) when `values` set a field of spec's used_with otherwise, so that the option
    has no effect; else None."""
    for field, allowed in spec.used_with:
        if field in values and values[field] not in allowed:
            return field, allowed
    return None


def drop_ignored_options(config_class: type, values: dict[str, Any]) -> dict[str, Any]:
    """The JSON values without the options that the others make ignored (see option's used_with): how configs
    written before the used_with rule, which accepted them silently, load unchanged."""
    specs = {spec.name: spec for spec in option_specs(config_class)}
    full = {name: spec.default for name, spec in specs.items()} | values
    return {k: v for k, v in values.items() if k not in specs or not ignored_by(specs[k], full)}


def config_from_dict(config_class: type, values: Any, what: str | None = None) -> Any:
    """Build a config dataclass from JSON values, rejecting unknown keys with a clear message."""
    what = what or config_class.__name__
    if not isinstance(values, dict):
        raise ElboxError(f"{what} must be a JSON object, got {type(values).__name__}")
    known = [f.name for f in dataclasses.fields(config_class)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), known, n=1)
        names = ", ".join(known)
        hint = (
            f"did you mean {close[0]!r}?"
            if close
            else f"known fields: {names[:150]}{'...' if len(names) > 150 else ''}"
        )
        raise ElboxError(f"unknown {what} fields {short_repr(unknown)}; {hint}")
    try:
        return config_class(**values)
    except (TypeError, ValueError, OverflowError) as e:
        raise ElboxError(f"bad {what}: {e}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


# -- the command line ------------------------------------------------------------------------------------------


def _parse_scalar(spec: OptionSpec) -> Callable[[str], Any]:
    """argparse type of one value of the option: parsed and checked against the declaration, with the message of
    check_options (one message per rule: --lr 0, --lr -1 and --lr=-1e-3 all say "must be > 0", and echo the text)."""
    import argparse

    def parse(text: str) -> Any:
        try:
            value = {"int": int, "float": float}.get(spec.kind, str)(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be {'a whole number' if spec.kind == 'int' else 'a number'}, got {short_repr(text)}"
            ) from None
        try:
            return _check_scalar(spec, value, "value", shown(text, 40))
        except ElboxError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("value ")) from None

    parse.__name__ = spec.kind
    return parse


def add_options(
    parser: Any,
    config_class: type,
    defaults: dict[str, Any] | None = None,
    taken: set[str] | None = None,
    files: dict[str, Callable[[str], Any]] | None = None,
) -> list[OptionSpec]:
    """Add an argparse option (dest = the field name) for every declared command-line field of config_class, with
    its default (or defaults[name]), choices, range check and help; one without a default is required, a list
    without one may be given several times (--method a --method b). Flags already in `taken` are skipped (a field
    of two configs with one flag, e.g. --seed, is set by one option). files: the argparse type of each kind of path
    (a field's `file`). Returns the specs added."""
    import argparse

    taken = taken if taken is not None else set()
    added = []
    for spec in option_specs(config_class):
        flags = [f for f in (spec.flag, *spec.aliases) if f not in taken]
        if not spec.cli or spec.flag in taken:
            continue
        taken.update(flags)
        default = (defaults or {}).get(spec.name, spec.default)
        required = default is MISSING
        shown_default = "" if "(default:" in spec.help or required else f" (default: {_show(default)})"
        help_text = (spec.help + shown_default).replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": spec.name, "help": help_text}
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        if spec.kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(
                type=(files or {})[spec.file] if spec.file else _parse_scalar(spec),
                metavar=spec.metavar or ("{" + ",".join(spec.choices) + "}" if spec.choices else None),
            )
            if spec.sequence is not None:
                kwargs["nargs"] = "+"
                if default is None:
                    kwargs["action"] = "extend"
        parser.add_argument(*flags, **kwargs)
        added.append(spec)
    return added


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) if value else "none"
    return str(value)


def option_values(args: Any, specs: Sequence[OptionSpec]) -> dict[str, Any]:
    """{field name: value} of the parsed options."""
    return {spec.name: getattr(args, spec.name) for spec in specs}

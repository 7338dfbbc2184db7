"""How a setting is declared, checked, parsed and made a flag.

A settings dataclass (`tf_codistill.config.TrainConfig`) declares each
setting as a field made with `setting(default, help, ...)`; `settings_of`
reads them back as `Setting`s (name, type, default, allowed values), and
`check_value`, `parse_value` and `define_absl_flags` work from those. No
TensorFlow or Keras.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable
from typing import Any

from tf_codistill.checks import is_int, is_number

__all__ = [
    "Setting",
    "setting",
    "settings_of",
    "check_value",
    "parse_value",
    "define_absl_flags",
    "check_directory",
]


@dataclasses.dataclass(frozen=True)
class Setting:
    """What a `TrainConfig` field accepts, besides its type and default.

    Attributes:
        help: The flag's help text.
        choices: The allowed values (an enum flag for strings).
        minimum, maximum: Allowed range; `minimum` is exclusive with
            `above_minimum=True`.
        unit: Said after the bound in a range error (e.g. "seconds").
        note: Said after a range or choice error, e.g. what 0 means.
        check: `check(name, value)` raises ValueError for a bad value (a
            check of this setting alone; combinations are `validate`'s).
        name, kind, default, optional: Filled in from the field.
    """

    help: str
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    above_minimum: bool = False
    unit: str = ""
    note: str = ""
    check: Callable[[str, Any], None] | None = None
    name: str = ""
    kind: str = ""  # "int", "float" or "str"
    default: Any = None
    optional: bool = False  # None allowed (no value)


def setting(default, help: str, **kwargs) -> dataclasses.Field:  # noqa: A002 - absl's word
    """A `TrainConfig` field: its default and the rest of its `Setting`."""
    return dataclasses.field(default=default, metadata={"setting": Setting(help=help, **kwargs)})


def settings_of(cls) -> dict[str, Setting]:
    """Every setting of the dataclass `cls` by name, in declaration order."""
    out = {}
    for field in dataclasses.fields(cls):
        kind, _, rest = field.type.partition(" |")
        out[field.name] = dataclasses.replace(
            field.metadata["setting"],
            name=field.name,
            kind=kind,
            default=field.default,
            optional=rest.strip() == "None",
        )
    return out


_TYPES = {
    "int": (is_int, "an integer"),
    "float": (is_number, "a number"),
    "str": (lambda value: isinstance(value, str), "a string"),
}


def _words(values) -> str:
    values = [str(v) for v in values]
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"


def check_value(spec: Setting, value) -> None:
    """Checks one setting's value on its own (type, finiteness, choices, range,
    the setting's own check).

    Raises:
        TypeError: `value` has the wrong type.
        ValueError: a bad value; the message names the flag.
    """
    name = spec.name
    if value is None and spec.optional:
        return
    accepts, what = _TYPES[spec.kind]
    if not accepts(value):
        raise TypeError(f"--{name} must be {what}, got {value!r}.")
    if spec.kind == "float" and not math.isfinite(value):  # nan fails every comparison below
        raise ValueError(f"--{name} must be a finite number, got {value}.")
    note = f" ({spec.note})" if spec.note else ""
    if spec.choices is not None and value not in spec.choices:
        raise ValueError(f"--{name} must be {_words(spec.choices)}{note}; got {value!r}.")
    low, high = spec.minimum, spec.maximum
    too_low = low is not None and (value <= low if spec.above_minimum else value < low)
    if too_low or (high is not None and value > high):
        unit = f" {spec.unit}" if spec.unit else ""
        if high is None:
            bound = f"{'>' if spec.above_minimum else '>='} {low:g}{unit}"
        else:
            bound = f"in {'(' if spec.above_minimum else '['}{low:g}, {high:g}]{unit}"
        raise ValueError(f"--{name} must be {bound}{note}, got {value}.")
    if spec.check is not None:
        spec.check(name, value)


def parse_value(spec: Setting, text: str):
    """The value of setting `spec` written as `text` on a command line.

    Raises:
        ValueError: `text` is not a value of the setting's type.
    """
    try:
        return {"int": int, "float": float, "str": str}[spec.kind](text)
    except ValueError:
        raise ValueError(f"--{spec.name} must be {_TYPES[spec.kind][1]}, got {text!r}.") from None


def define_absl_flags(specs, flag_values) -> None:
    """Defines one absl flag per `Setting` of `specs` on `flag_values`: enums
    for string settings with choices."""
    from absl import flags

    for spec in specs:
        if spec.kind == "str" and spec.choices is not None:
            flags.DEFINE_enum(spec.name, spec.default, list(spec.choices), spec.help, flag_values=flag_values)
        else:
            define = {"int": flags.DEFINE_integer, "float": flags.DEFINE_float, "str": flags.DEFINE_string}
            define[spec.kind](spec.name, spec.default, spec.help, flag_values=flag_values)


def check_directory(flag: str, path: str, must_write: bool = True) -> None:
    """Raises ValueError unless `path` is a directory this process can write
    to, or can create. `must_write=False` accepts an existing read-only
    directory (e.g. prepared datasets)."""
    if not path.strip():
        raise ValueError(f"--{flag} is empty: give a directory.")
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", path) and not path.startswith("file://"):
        return  # gs://, ram://, ...: probed through tf.io.gfile when the run starts
    path = os.path.abspath(os.path.expanduser(path.removeprefix("file://")))
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ValueError(f"--{flag}={path} is an existing file, not a directory; choose another path.")
        if must_write and not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"--{flag}={path} is not writable; choose a directory you can write to.")
        return
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--{flag}={path} cannot be created: {parent} is a file, not a directory.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--{flag}={path} cannot be created: {parent} is not writable.")

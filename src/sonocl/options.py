"""What a user types, checked before any work: numbers of the command line, and YAML configuration text.

Numbers. A count, size, rate or fraction that cannot work (``--size 7``, ``--batch-size 0``, ``--lr nan``) is refused
when the command line is read, in one line naming the option. Commands whose options flow into a typed
configuration (``pretrain``'s `PretrainConfig`, ``evaluate``'s and ``study``'s `EvalConfig`, ``segment``'s
`SegmentConfig`) check them there with `number_rule`, since a ``--config`` file or ``--set`` reaches them too; the
others give argparse a ``type=`` of this module (`integer`, `positive`, `non_negative`, `finite`), whose refusal is
argparse's ``sonocl X: error: argument --OPTION: …`` (exit 2).

YAML. `load_yaml_text` is ``yaml.safe_load`` without aliases: a few hundred bytes of nested aliases (a "billion
laughs") expand to billions of values wherever the result is walked, formatted or copied, and a configuration never
needs one. Every YAML sonocl reads from a user goes through it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import yaml

from sonocl.errors import ConfigError

MIN_IMAGE_SIDE = 8
"""The smallest side of an image sonocl works with: frames under 8 px are not an ultrasound image
(`sonocl.data.preprocess.MIN_SOURCE_SIDE`, which refuses such sources, is the same floor)."""


# ------------------------------------------------------------------------------------------- numbers


def field_default(record: type, name: str) -> Any:
    """The default of field ``name`` of the dataclass ``record`` (its factory's value where it has one): the default
    of the command-line option of that name, written once in the record."""
    found = next(field for field in dataclasses.fields(record) if field.name == name)
    return found.default_factory() if found.default_factory is not dataclasses.MISSING else found.default


def number_rule(
    value: Any, *, above: float | None = None, at_least: float | None = None, below: float | None = None
) -> str | None:
    """What ``value`` breaks of: finite, ``> above``, ``≥ at_least``, ``< below`` (None: nothing)."""
    bounds = [f"> {above:g}" if above is not None else "", f"≥ {at_least:g}" if at_least is not None else "",
              f"< {below:g}" if below is not None else ""]  # fmt: skip
    rule = " and ".join(bound for bound in bounds if bound)
    wanted = f"must be {rule} and finite" if rule else "must be finite"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return wanted
    if (above is not None and not value > above) or (at_least is not None and not value >= at_least):
        return wanted
    if below is not None and not value < below:
        return wanted
    return None


def integer(minimum: int, why: str = "") -> Callable[[str], int]:
    """An argparse ``type``: an integer ``≥ minimum``; ``why`` says what a smaller one would break."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be ≥ {minimum}{f' ({why})' if why else ''}, not {value}")
        return value

    parse.__name__ = f"integer ≥ {minimum}"  # argparse names the type in its messages
    return parse


def _number(text: str, problem: Callable[[float], str | None]) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    wrong = problem(value)
    if wrong:
        raise argparse.ArgumentTypeError(f"{wrong}, not {text}")
    return value


def positive(text: str) -> float:
    """An argparse ``type``: a finite number > 0 (a rate, a standard deviation)."""
    return _number(text, lambda value: number_rule(value, above=0))


def non_negative(text: str) -> float:
    """An argparse ``type``: a finite number ≥ 0 (a rate where 0 means all)."""
    return _number(text, lambda value: number_rule(value, at_least=0))


def finite(text: str) -> float:
    """An argparse ``type``: a finite number (a normalisation mean)."""
    return _number(text, number_rule)


# ---------------------------------------------------------------------------------------------- YAML


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses an alias (``*name``) as soon as it reads one, before it is resolved."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None,
                None,
                f"an alias (*{event.anchor}) at line {event.start_mark.line + 1}: a configuration is read without "
                "aliases, which can expand a few bytes into billions of values; write each value out",
            )
        return super().compose_node(parent, index)


def load_yaml_text(text: str, source: str) -> Any:
    """``yaml.safe_load(text)`` refusing aliases; a problem is a one-line `ConfigError` naming ``source``."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader
    except yaml.YAMLError as error:
        if isinstance(error, yaml.MarkedYAMLError) and error.problem and error.problem.startswith("an alias"):
            raise ConfigError(f"{source}: {error.problem}") from None
        raise ConfigError(f"{source}: not valid YAML ({' '.join(str(error).split())})") from None

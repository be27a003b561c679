"""Reward functions: rules scored next to (or instead of) the reward model, and the weighted mix.

    rlhf serve reward --model rm/ \
        --reward-function fmt='builtin:regex:<answer>.+</answer>' \
        --reward-function long=builtin:length:words:200 \
        --reward-function mine=my_package.rewards:is_polite \
        --reward-mix rm=1.0,fmt=0.5,long=-0.01

A function is any Python callable (prompt: str, response: str) -> float, named NAME=SPEC:

    module:function              imported at start (the module must be importable where the server runs)
    builtin:length[:UNIT[:FREE]] the response's length in UNIT (chars, the default, or words); with FREE,
                                 only what exceeds FREE counts: max(0, length - FREE). A negative weight
                                 in the mix makes it a length penalty.
    builtin:regex:PATTERN        1.0 when the whole response matches PATTERN, else 0.0: a format reward.
                                 Everything after "regex:" is the pattern, in RE2 syntax with "." matching
                                 newlines too (see below).

Regular expressions are RE2's (google-re2): matched in time linear in the text, whatever the pattern,
so no response the policy writes can make a match take seconds (Python's backtracking `re` takes 6 s
for (a+)+b on 27 a's, doubling with each one more). RE2 has no backreferences (\1, (?P=name)),
lookahead or lookbehind ((?=, (?!, (?<=, (?<!), atomic groups or possessive quantifiers, and
repetition counts stop at 1000; such a pattern is refused at start with a ConfigError naming it.

The built-ins run in the server, in a thread: linear in a text of at most --max-text-bytes. A
module:function is the user's code and runs in worker processes under a time limit
(services.reward.workers).

The mix gives every component a weight ("rm" is the reward model); without --reward-mix every
weight is 1. Score = sum(weight * value). No torch and no gRPC here.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import numbers
import re
from typing import Callable, Sequence

import re2

from services.common.errors import InvalidArgument

RM = "rm"
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
BUILTIN = "builtin:"


class ConfigError(ValueError):
    """A --reward-function or --reward-mix the server cannot start with."""


@dataclasses.dataclass
class RewardFunction:
    name: str
    source: str  # the SPEC as given: "module:function" or "builtin:..."
    fn: Callable[[str, str], float]

    @property
    def builtin(self) -> bool:
        """Ours and linear in the text: runs in the server. Anything else runs in a worker process."""
        return self.source.startswith(BUILTIN)

    def __call__(self, prompt: str, response: str, pair: str) -> float:
        """fn(prompt, response) as a finite float; anything else fails the call, naming the pair and the function."""
        try:
            value = self.fn(prompt, response)
            ok = isinstance(value, numbers.Real) and math.isfinite(value)
            number = float(value) if ok else math.nan
        except BaseException as exc:  # noqa: BLE001 - the user's code: SystemExit and KeyboardInterrupt too
            text = _short(exc)
            raise InvalidArgument(f"reward function {self.name} ({self.source}) failed on {pair}: "
                                  f"{type(exc).__name__}{': ' + text if text else ''}") from None
        if not ok:
            raise InvalidArgument(f"reward function {self.name} ({self.source}) returned {_short(value)} for "
                                  f"{pair}; it must return a finite number")
        return number


def _short(x, limit: int = 200) -> str:
    """A value or an exception's text as it goes into an error message: at most `limit` characters
    (a function's exception may carry the whole response)."""
    try:
        text = repr(x) if not isinstance(x, BaseException) else str(x)
    except BaseException:  # noqa: BLE001 - the user's __repr__ / __str__
        return f"<{type(x).__name__} whose text cannot be shown>"
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _length(unit: str, free: int) -> Callable[[str, str], float]:
    count = len if unit == "chars" else (lambda text: len(text.split()))

    def length(prompt: str, response: str) -> float:
        return float(max(0, count(response) - free))

    return length


def _regex(pattern) -> Callable[[str, str], float]:
    def regex(prompt: str, response: str) -> float:
        # As UTF-8 bytes: RE2's own text; a str costs a pass mapping byte offsets back to characters.
        return 1.0 if pattern.fullmatch(response.encode("utf-8", "surrogatepass")) else 0.0

    return regex


def compile_re2(spec: str, pattern: str):
    """`pattern` compiled by RE2 with "." matching newlines; ConfigError saying why RE2 refuses it."""
    options = re2.Options()
    options.dot_nl = True
    options.never_capture = True  # only whether it matches counts
    options.log_errors = False  # the ConfigError says it; RE2 would also print it to stderr
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
    try:
        re.compile(pattern)
        python = ("; Python's re accepts it, RE2 does not: backreferences, lookahead/lookbehind, atomic groups "
                  "and possessive quantifiers need backtracking, which takes exponential time on some texts")
    except re.error:
        python = ""
    raise ConfigError(f"{spec}: not a valid RE2 regular expression ({reason}){python}. builtin:regex takes RE2 "
                      f"syntax (https://github.com/google/re2/wiki/Syntax), matched in linear time")


def _builtin(spec: str) -> Callable[[str, str], float]:
    kind, _, rest = spec[len(BUILTIN):].partition(":")
    if kind == "length":
        unit, _, free = rest.partition(":")
        unit = unit or "chars"
        if unit not in ("chars", "words"):
            raise ConfigError(f"{spec}: the unit of builtin:length is chars or words, got {unit!r}")
        if free and not free.isdigit():
            raise ConfigError(f"{spec}: FREE in builtin:length:UNIT:FREE must be a whole number >= 0, got {free!r}")
        return _length(unit, int(free or 0))
    if kind == "regex":
        if not rest:
            raise ConfigError(f"{spec}: builtin:regex needs a pattern (builtin:regex:PATTERN)")
        return _regex(compile_re2(spec, rest))
    raise ConfigError(f"{spec}: unknown built-in {kind!r}; the built-ins are builtin:length and builtin:regex")


def _imported(spec: str) -> Callable[[str, str], float]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{spec}: a function is module:function (or builtin:length, builtin:regex:PATTERN)")
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - ImportError, or the module itself failing at import
        raise ConfigError(f"{spec}: cannot import {module_name}: {type(exc).__name__}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{spec}: {module_name} has no attribute {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{spec}: {attr} is a {type(obj).__name__}, not a callable (prompt, response) -> float")
    return obj


def load_function(arg: str) -> RewardFunction:
    """A RewardFunction from one --reward-function NAME=SPEC; ConfigError says what is wrong."""
    name, sep, spec = arg.partition("=")
    if not sep or not spec:
        raise ConfigError(f"--reward-function {arg!r}: expected NAME=SPEC, e.g. fmt=builtin:regex:.*")
    if not NAME.fullmatch(name) or name == RM:
        raise ConfigError(f"--reward-function {arg!r}: the name must match {NAME.pattern} and not be {RM!r} "
                          f"(the reward model)")
    fn = _builtin(spec) if spec.startswith(BUILTIN) else _imported(spec)
    return RewardFunction(name, spec, fn)


def load_functions(args: Sequence[str]) -> list[RewardFunction]:
    functions = [load_function(a) for a in args]
    names = [f.name for f in functions]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"--reward-function names must be unique; given more than once: {', '.join(duplicates)}")
    return functions


def parse_mix(spec: str | None, components: Sequence[str]) -> dict[str, float]:
    """{component: weight} from "rm=1.0,len=-0.01"; every component needs a weight, every weight a
    component. Without a spec every component weighs 1."""
    if spec is None:
        return dict.fromkeys(components, 1.0)
    weights: dict[str, float] = {}
    for item in spec.split(","):
        name, sep, value = item.strip().partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not sep or not math.isfinite(weight):
            raise ConfigError(f"--reward-mix {spec!r}: {item.strip()!r} is not NAME=WEIGHT with a finite number")
        if name in weights:
            raise ConfigError(f"--reward-mix {spec!r}: {name} is given twice")
        weights[name] = weight
    unknown = [n for n in weights if n not in components]
    if unknown:
        raise ConfigError(f"--reward-mix {spec!r}: no component named {', '.join(unknown)}; the components are "
                          f"{', '.join(components)} ({RM} is the reward model, served with --model)")
    missing = [n for n in components if n not in weights]
    if missing:
        raise ConfigError(f"--reward-mix {spec!r} gives no weight to {', '.join(missing)} "
                          f"(write {missing[0]}=0 to report a component without counting it)")
    return {n: weights[n] for n in components}

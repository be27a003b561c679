"""Reward functions and the mix: the spec syntax, the built-ins' values (regular expressions in RE2,
linear time), loading errors, bad returns and exceptions of every kind."""
from __future__ import annotations

import math
import sys
import time
import types

import pytest

from services.common.errors import InvalidArgument
from services.reward.rules import ConfigError, RewardFunction, load_function, load_functions, parse_mix


@pytest.fixture()
def user_module(monkeypatch):
    """An importable module with the kinds of objects a spec can name."""
    m = types.ModuleType("my_rewards")
    m.polite = lambda prompt, response: 1.0 if "please" in response else 0.0
    m.boom = lambda prompt, response: 1 / 0
    m.nan = lambda prompt, response: math.nan
    m.text = lambda prompt, response: "high"
    m.not_callable = 3
    m.Grader = type("Grader", (), {"score": staticmethod(lambda prompt, response: len(prompt))})
    monkeypatch.setitem(sys.modules, "my_rewards", m)
    return m


def test_builtin_length_counts_chars_or_words_beyond_a_free_allowance():
    assert load_function("n=builtin:length").fn("p", "héllo wörld") == 11.0
    assert load_function("n=builtin:length:chars").fn("p", "abc") == 3.0
    assert load_function("n=builtin:length:words").fn("p", "  three short\nwords ") == 3.0
    over = load_function("n=builtin:length:words:2").fn
    assert (over("p", "one"), over("p", "one two"), over("p", "one two three four")) == (0.0, 0.0, 2.0)


def test_builtin_regex_is_a_whole_response_match_across_lines():
    fmt = load_function("fmt=builtin:regex:<think>.*</think>\\s*<answer>\\d+</answer>").fn
    assert fmt("p", "<think>a\nb</think>\n<answer>42</answer>") == 1.0
    assert fmt("p", "<think>a</think><answer>42</answer> and more") == 0.0  # fullmatch, not search
    assert fmt("p", "<answer>42</answer>") == 0.0
    # everything after "regex:" is the pattern, colons and commas included
    assert load_function("x=builtin:regex:a:b,c=d").fn("p", "a:b,c=d") == 1.0


def test_imported_functions_and_dotted_attributes(user_module):
    assert load_function("p=my_rewards:polite").fn("q", "yes please") == 1.0
    f = load_function("g=my_rewards:Grader.score")
    assert (f.name, f.source, f.fn("four", "")) == ("g", "my_rewards:Grader.score", 4)


@pytest.mark.parametrize("arg, words", [
    ("noequals", ["NAME=SPEC"]),
    ("x=", ["NAME=SPEC"]),
    ("rm=builtin:length", ["'rm'"]),
    ("1bad=builtin:length", ["must match"]),
    ("x=builtin:length:bytes", ["chars or words", "'bytes'"]),
    ("x=builtin:length:words:-3", ["whole number"]),
    ("x=builtin:regex:", ["needs a pattern"]),
    ("x=builtin:regex:(unclosed", ["not a valid RE2 regular expression", "missing )"]),
    ("x=builtin:sqrt", ["unknown built-in", "'sqrt'"]),
    ("x=no_such_module_here:f", ["cannot import no_such_module_here", "ModuleNotFoundError"]),
    ("x=my_rewards:missing", ["has no attribute missing"]),
    ("x=my_rewards:not_callable", ["not a callable", "int"]),
    ("x=my_rewards", ["module:function"]),
])
def test_bad_specs_are_config_errors_naming_the_problem(user_module, arg, words):
    with pytest.raises(ConfigError) as e:
        load_function(arg)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_a_module_that_fails_at_import_is_a_config_error(tmp_path, monkeypatch):
    (tmp_path / "broken_rewards.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="cannot import broken_rewards: RuntimeError: no GPU here"):
        load_function("x=broken_rewards:f")


def test_duplicate_names_are_refused():
    with pytest.raises(ConfigError, match="given more than once: a"):
        load_functions(["a=builtin:length", "b=builtin:length", "a=builtin:regex:x"])


def test_calls_name_the_pair_and_the_function_on_failure(user_module):
    assert load_function("p=my_rewards:polite")("q", "please", "pairs[0]") == 1.0
    assert load_function("g=my_rewards:Grader.score")("abc", "", "pairs[0]") == 3.0  # ints become floats
    for spec, words in [("b=my_rewards:boom", ["b (my_rewards:boom) failed on pairs[7]", "ZeroDivisionError"]),
                        ("n=my_rewards:nan", ["n (my_rewards:nan) returned nan for pairs[7]", "finite number"]),
                        ("t=my_rewards:text", ["returned 'high' for pairs[7]"])]:
        with pytest.raises(InvalidArgument) as e:
            load_function(spec)("q", "r", "pairs[7]")
        for w in words:
            assert w in str(e.value), (w, str(e.value))


def test_mix_defaults_to_weight_one_and_needs_every_component():
    assert parse_mix(None, ["rm", "fmt"]) == {"rm": 1.0, "fmt": 1.0}
    assert parse_mix(" rm=1.5, fmt=-0.01 ", ["rm", "fmt"]) == {"rm": 1.5, "fmt": -0.01}
    assert parse_mix("fmt=0,rm=2", ["rm", "fmt"]) == {"rm": 2.0, "fmt": 0.0}  # in component order
    for spec, words in [("rm=1", ["no weight to fmt", "fmt=0"]), ("rm=1,fmt=1,len=2", ["no component named len"]),
                        ("rm=1,fmt=x", ["'fmt=x'"]), ("rm=1,fmt=inf", ["finite"]), ("rm=1,rm=2,fmt=1", ["twice"]),
                        ("rm", ["NAME=WEIGHT"])]:
        with pytest.raises(ConfigError) as e:
            parse_mix(spec, ["rm", "fmt"])
        for w in words:
            assert w in str(e.value), (w, str(e.value))


# ---- issue 21.2: regular expressions in linear time (RE2) ---------------------------------------

def test_builtin_regex_takes_linear_time_on_what_backtracks_exponentially():
    """(a+)+b against a's and a '!': Python's re took 6 s for 27 a's (health silent meanwhile),
    twice as long for each one more. RE2 answers at once, for 28 a's or 60,000."""
    fmt = load_function("x=builtin:regex:(a+)+b").fn
    for n in (28, 60_000):
        start = time.perf_counter()
        assert fmt("p", "a" * n + "!") == 0.0
        assert time.perf_counter() - start < 2.0, n  # Python's re: ~12 s for 28 on this machine
    assert fmt("p", "aaab") == 1.0


@pytest.mark.parametrize("pattern, words", [
    ("(a)\\1", ["invalid escape sequence: \\1", "Python's re accepts it", "backreferences"]),
    ("(?P<x>a)(?P=x)", ["invalid perl operator", "Python's re accepts it"]),
    ("(?=a)a", ["invalid perl operator: (?=", "lookahead/lookbehind"]),
    ("(?<!a)b", ["invalid perl operator: (?<!"]),
    ("a{1001}", ["invalid repetition size"]),
])
def test_regex_outside_re2_is_refused_at_start_saying_why(pattern, words):
    with pytest.raises(ConfigError) as e:
        load_function(f"x=builtin:regex:{pattern}")
    for w in words + ["not a valid RE2 regular expression", "RE2 syntax"]:
        assert w in str(e.value), (w, str(e.value))


def test_re2_keeps_what_the_built_in_promised():
    """Named groups, classes, flags, Unicode, and "." across lines (what DOTALL gave)."""
    assert load_function("x=builtin:regex:(?P<think>.*)</t>\\s*\\d+").fn("p", "a\nb</t>\n42") == 1.0
    assert load_function("x=builtin:regex:(?i)[[:alpha:]é]+").fn("p", "HÉllo") == 1.0
    assert load_function("x=builtin:regex:\\p{Greek}+").fn("p", "αβγ") == 1.0


# ---- issue 21.4: every BaseException of user code is the function's failure ----------------------

@pytest.mark.parametrize("exc, shown", [(SystemExit(3), "SystemExit: 3"), (KeyboardInterrupt(), "KeyboardInterrupt"),
                                        (GeneratorExit(), "GeneratorExit")])
def test_a_base_exception_from_a_function_is_invalid_argument_naming_it(exc, shown):
    def raises(prompt, response):
        raise exc

    f = RewardFunction("bad", "mod:bad", raises)
    with pytest.raises(InvalidArgument) as e:
        f("p", "r", "pairs[2]")
    assert str(e.value) == f"reward function bad (mod:bad) failed on pairs[2]: {shown}"


def test_an_exception_whose_text_fails_is_still_reported():
    class Nasty(Exception):
        def __str__(self):
            raise RuntimeError("no text")

    def raises(prompt, response):
        raise Nasty()

    with pytest.raises(InvalidArgument, match="failed on pairs\\[0\\]: Nasty: <Nasty whose text cannot be shown>"):
        RewardFunction("n", "mod:n", raises)("p", "r", "pairs[0]")

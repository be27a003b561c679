"""Reward functions the unit tests serve, by spec (rule_functions:NAME): the server runs them in
worker processes, which import them from here."""
from __future__ import annotations

import os
import re
import time
import zlib


def words(prompt: str, response: str) -> float:
    return float(len(response.split()))


def picky(prompt: str, response: str) -> float:
    if "boom" in response:
        raise ValueError("cannot grade this")
    return 1.0 if response.endswith(".") else 0.0


def seen(prompt: str, response: str) -> float:
    """What the function was given, as a number: crc32 of prompt NUL response."""
    return float(zlib.crc32(f"{prompt}\0{response}".encode()))


def slow(prompt: str, response: str) -> float:
    """Sleeps 30 s on a response that says "slow"."""
    if "slow" in response:
        time.sleep(30)
    return 1.0


def exits(prompt: str, response: str) -> float:
    raise SystemExit(3)


def interrupted(prompt: str, response: str) -> float:
    raise KeyboardInterrupt


def dies(prompt: str, response: str) -> float:
    """Ends its process on a response that says "die", as a crash or the OOM killer would."""
    if "die" in response:
        os._exit(7)
    return 0.0


def huge(prompt: str, response: str) -> float:
    return 1e308


def large(prompt: str, response: str) -> float:
    return 3e38  # finite as a float32, but not ten times over, nor twice


def backtracks(prompt: str, response: str) -> float:
    """Python's backtracking re: exponential in the a's before the '!' (holds the GIL meanwhile)."""
    return 1.0 if re.fullmatch(r"(a+)+b", response) else 0.0

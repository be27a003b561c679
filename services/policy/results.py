"""What Generate returns, as plain dataclasses: the engine builds them, the client reads
them back from the proto. No dependencies, so the client stays grpc + protobuf only."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Completion:
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str  # "length" | "stop" | "eos" | "abort"
    weight_version: int
    stop_string: str = ""


@dataclasses.dataclass
class PromptResult:
    prompt_token_ids: list[int]
    completions: list[Completion]
    prompt_logprobs: list[float] = dataclasses.field(default_factory=list)  # of tokens 1.., when asked for

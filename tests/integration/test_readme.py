"""What README.md tells another system to run works as written: the Python snippet against a live
reward server (with a token), the grpcurl request body as the contract parses it, and the
commands it lists exist."""
from __future__ import annotations

import pathlib
import re
import shlex

from google.protobuf import json_format

from rlhf.v1 import reward_pb2
from services.cli import build_parser
from services.demo.launch import ChildServer, free_port, rlhf_command

README = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
SECTION = README[README.index("## Calling the reward service"):README.index("## Layout")]


def test_the_python_snippet_scores_against_a_live_server(tiny_reward_dir, tmp_path):
    code = re.search(r"```python\n(.*?)```", SECTION, re.S).group(1)
    port = free_port()
    token = "readme-token"
    argv = rlhf_command("serve", "reward", "--model", str(tiny_reward_dir), "--host", "127.0.0.1", "--port",
                        str(port), "--metrics-port", "0")
    from services.common.config import ClientConfig
    with ChildServer(argv, port=port, service="rlhf.v1.RewardService", env={"RLHF_AUTH_TOKEN": token},
                     log_path=tmp_path / "reward.log", client_config=ClientConfig(auth_token=token)) as server:
        code = code.replace("rlhf-reward.rlhf.svc:50052", server.address)
        printed = []
        namespace = {"TOKEN": token, "print": printed.append}
        exec(compile(code, "README.md", "exec"), namespace)
    assert len(namespace["scores"]) == 1 and isinstance(namespace["scores"][0], float)
    assert len(printed) == 1 and 0.0 <= printed[0] <= 1.0


def test_the_grpcurl_body_is_a_score_request():
    body = re.search(r"-d '(\{.*?\})'", SECTION).group(1)
    request = json_format.Parse(body, reward_pb2.ScoreRequest())
    assert request.pairs[0].prompt.text == "2+2?" and request.pairs[0].response.text == "4"


def readme_commands(text: str) -> list[str]:
    """Every `rlhf ...` command line of the text's code blocks (indented or fenced), its
    backslash-continued lines joined."""
    text = re.sub(r"\\\n\s*", " ", text)
    return [line.strip().removeprefix("$ ") for line in text.splitlines()
            if line.startswith(("    ", "\t", "$ ", "rlhf ")) and line.strip().removeprefix("$ ").startswith("rlhf ")]


def unknown_flags(line: str, parser) -> list[str]:
    """The flags of a README command line (optional [..] parts included) that its subcommand does
    not declare; the subcommand path is the words before the first flag."""
    import argparse

    words = shlex.split(line.replace("[", " ").replace("]", " "), comments=True)[1:]
    command = parser
    while True:
        subparsers = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
        if not subparsers or not words or words[0] not in subparsers[0].choices:
            break
        command, words = subparsers[0].choices[words[0]], words[1:]
    assert command is not parser, f"no subcommand in {line!r}"
    return [w for w in words if w.startswith("--") and w.split("=", 1)[0] not in command._option_string_actions]


def test_the_listed_commands_and_their_flags_exist():
    """Every README command line names a real subcommand, every flag it shows (optional ones too)
    is one that subcommand declares, and the line without its optional parts parses."""
    parser = build_parser()
    lines = readme_commands(README)
    assert len(lines) >= 9, lines
    for line in lines:
        assert not unknown_flags(line, parser), (line, unknown_flags(line, parser))
        # Optional parts [..] left out, the first of alternatives a|b taken.
        words = [w.split("|")[0] for w in shlex.split(re.sub(r"\[[^\]]*\]", "", line), comments=True)[1:]]
        args = parser.parse_known_args(words)[0]  # placeholders like DIR are values, not flags
        assert args.command == words[0], line


def test_a_wrong_flag_in_the_readme_would_be_caught():
    """The control: a misspelt flag, required or optional, is seen; a right one is not."""
    parser = build_parser()
    assert unknown_flags("rlhf train ppo --config x [--resmue]", parser) == ["--resmue"]
    assert unknown_flags("rlhf serve reward [--reward-mix=rm=1] --htp-port 8080", parser) == ["--htp-port"]
    assert unknown_flags("rlhf serve policy --model DIR --port 1 [--max-text-bytes N]", parser) == []

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


def test_the_listed_commands_parse():
    block = README[README.index("## Commands"):README.index("### Your data")]
    parser = build_parser()
    for line in block.splitlines():
        line = line.strip()
        if not line.startswith("rlhf "):
            continue
        # Optional parts [..] left out, the first of alternatives a|b taken.
        words = [w.split("|")[0] for w in shlex.split(re.sub(r"\[[^\]]*\]", "", line))[1:]]
        args = parser.parse_known_args(words)[0]  # placeholders like DIR are values, not flags
        assert args.command == words[0], line

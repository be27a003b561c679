"""The `rlhf` command as users type it: --version, --log-level after the subcommand, a config file
for the servers (`--config` + `--set`, the command line winning), and its errors."""
from __future__ import annotations

import subprocess

import yaml

from services.demo.launch import ChildServer, free_port, rlhf_command
from services.reward.client import RewardClient


def rlhf(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(rlhf_command(*map(str, args)), capture_output=True, text=True, timeout=300, **kwargs)


def test_version_and_log_level_after_the_subcommand(tmp_path):
    assert rlhf("--version").stdout.startswith("rlhf ")
    result = rlhf("data", "demo", "--out", tmp_path / "d", "--num-sft", 4, "--num-prefs", 4, "--num-prompts", 4,
                  "--log-level", "debug")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "d" / "sft.jsonl").exists()


def test_serve_reward_takes_a_config_file_and_set_and_the_command_line_wins(tmp_path):
    config = tmp_path / "reward.yaml"
    config.write_text(yaml.safe_dump({"reward_function": ["length=builtin:length:words", "fmt=builtin:regex:.*plan.*"],
                                      "max_pairs": 8, "max-text-bytes": 1000}))
    port = free_port()
    argv = rlhf_command("serve", "reward", "--config", str(config), "--set", "max_pairs=16", "--host", "127.0.0.1",
                        "--port", str(port), "--metrics-port", "0", "--max-text-bytes", "2000")
    with ChildServer(argv, port=port, service="rlhf.v1.RewardService", log_path=tmp_path / "reward.log") as server:
        with RewardClient(server.address) as client:
            info = client.model_info()
            assert info.max_pairs == 16 and info.max_text_bytes == 2000  # --set over the file, the flag over both
            assert [c.name for c in info.components] == ["length", "fmt"]
            assert client.scores([("q", "a plan in five words")]) == [5.0 + 1.0]  # 5 words, and it matches


def test_a_bad_server_config_exits_2_naming_the_key(tmp_path):
    config = tmp_path / "reward.yaml"
    config.write_text(yaml.safe_dump({"max_pairs": 8, "bogus_key": 1}))
    result = rlhf("serve", "reward", "--config", config, "--reward-function", "n=builtin:length")
    assert result.returncode == 2 and "--bogus-key" in result.stderr, result.stderr
    config.write_text("- a list, not a mapping\n")
    result = rlhf("serve", "reward", "--config", config)
    assert result.returncode == 2 and "it must hold a mapping of flags" in result.stderr
    result = rlhf("serve", "reward", "--set", "max_pairs=many", "--reward-function", "n=builtin:length")
    assert result.returncode == 2 and "--max-pairs" in result.stderr and "many" in result.stderr, result.stderr


def test_nproc_checks_the_config_before_starting_ranks(tmp_path):
    result = rlhf("train", "rm", "--nproc", 2, "--model", "m", "--data", "d", "--out", tmp_path, "--set", "epochs=0")
    assert result.returncode == 2 and "epochs: Input should be greater than 0" in result.stderr, result.stderr
    assert "torch.distributed" not in result.stderr  # no rank was started


LEVELS = [f"{a}: &{a} [{', '.join([f'*{p}' if p else '0'] * 9)}]" for p, a in zip([None, *"abcdefg"], "abcdefgh")]
BOMB = "\n".join(LEVELS) + "\nrollout: {n: *h}\n"  # 9^8 values: 43 million
BOMB_FLOW = "{" + ", ".join(LEVELS) + ", n: *h}"


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    """Before: `train ppo --config bomb.yaml` took 9.5 s and 1.3 GB, then wrote the expanded value
    (254 MB) to stderr. Refused now on the node graph, before anything is built."""
    config = tmp_path / "bomb.yaml"
    config.write_text(BOMB)
    for args in (("train", "ppo", "--config", config, "--print-config"), ("serve", "reward", "--config", config),
                 ("train", "ppo", "--set", f"rollout={BOMB_FLOW}", "--print-config")):
        result = rlhf(*args)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "expands to more than 100000 values" in result.stderr and len(result.stderr) < 2000, result.stderr[-2000:]


def test_an_error_echoes_at_most_a_few_hundred_characters_of_the_input(tmp_path):
    result = rlhf("train", "ppo", "--set", f"rollout.n={'x' * 100_000}", "--print-config")
    assert result.returncode == 2 and "rollout.n" in result.stderr and len(result.stderr) < 2000, result.stderr[-2000:]

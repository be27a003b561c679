"""`rlhf serve policy` flags: ours in the `rlhf` parser (no vLLM import), every vLLM engine
argument through vLLM's own parser (services.policy.options). No engine is started."""
from __future__ import annotations

import subprocess
import sys

import pytest

from services.cli import build_parser

pytestmark = pytest.mark.vllm  # imports vLLM's argument definitions


def test_unknown_flags_are_kept_for_vllm_in_order():
    args = build_parser().parse_args(["serve", "policy", "--dtype", "bfloat16", "--model", "m", "--port", "5",
                                      "--max-model-len=128", "--no-enable-prefix-caching", "--seed", "-1",
                                      "--max-text-bytes", "10"])
    assert (args.model, args.port, args.max_text_bytes) == ("m", 5, 10)
    assert args.engine_argv == ["--dtype", "bfloat16", "--max-model-len=128", "--no-enable-prefix-caching",
                                "--seed", "-1"]
    with pytest.raises(SystemExit):  # the other commands still refuse what they do not know
        build_parser().parse_args(["serve", "reward", "--model", "m", "--max-model-len", "1"])


def test_help_does_not_import_vllm_and_points_to_its_flags():
    code = ("import sys, contextlib, io; from services.cli import main\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n"
            "    try: main(['serve', 'policy', '--help'])\n"
            "    except SystemExit: pass\n"
            "assert 'vllm' not in sys.modules and 'torch' not in sys.modules\n"
            "print(out.getvalue())")
    text = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--help-vllm" in text and "--max-num-batched-tokens" in text and "--max-text-bytes" in text
    listed = subprocess.run([sys.executable, "-m", "services.cli", "serve", "policy", "--help-vllm"],
                            capture_output=True, text=True, check=True).stdout
    assert "--max-num-batched-tokens" in listed and "--quantization" in listed


def test_engine_args_from_vllms_parser(tmp_path):
    from services.policy.options import engine_args

    m = str(tmp_path)  # a local model directory (vLLM resolves anything else on the hub)
    a = engine_args(["--max-num-batched-tokens", "1024", "--no-enable-prefix-caching", "--dtype", "bfloat16"], m)
    assert (a.model, a.max_num_batched_tokens, a.enable_prefix_caching, a.dtype) == (m, 1024, False, "bfloat16")
    d = engine_args([], m)
    assert (d.gpu_memory_utilization, d.max_num_seqs, d.seed) == (0.85, 256, 0)  # our defaults kept
    assert engine_args(["--max_num_seqs", "8"], m).max_num_seqs == 8  # vLLM takes either spelling


@pytest.mark.parametrize("argv,words", [
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--max-num-batched-tokens", "many"], "max-num-batched-tokens"),
    (["--worker-extension-cls", "my.Loader"], "--worker-extension-cls is set by rlhf serve policy itself"),
])
def test_bad_engine_flags_exit_2(argv, words, capsys):
    from services.policy.options import engine_args

    with pytest.raises(SystemExit) as e:
        engine_args(argv, "/m")
    assert e.value.code == 2 and words in capsys.readouterr().err


def test_a_bad_vllm_flag_stops_the_server_before_it_loads(tmp_path):
    """Exit 2 (a bad configuration: no restart helps) with vLLM's message, before any model
    is read: the model directory here does not even exist."""
    run = subprocess.run([sys.executable, "-m", "services.cli", "serve", "policy", "--model", str(tmp_path / "none"),
                          "--port", "0", "--metrics-port", "0", "--max-num-batched-tokenz", "8"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "--max-num-batched-tokenz" in run.stderr, run.stderr[-2000:]


def test_is_serve_policy_flag():
    from services.cli import is_serve_policy_flag

    for flag in ("--model", "--max-text-bytes", "--push-idle-timeout-s", "--drain-linger-s", "--port=1",
                 "--max-num-batched-tokens", "--enable-prefix-caching", "--no-enable-prefix-caching",
                 "--served-model-name=x", "--max_num_seqs", "--quantization"):
        assert is_serve_policy_flag(flag), flag
    for flag in ("--metric-port", "--metrics", "--worker-extension-cls", "--max-push", "--nope"):
        assert not is_serve_policy_flag(flag), flag

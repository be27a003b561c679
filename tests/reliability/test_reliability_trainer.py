"""The trainer against an unlucky operator: control RPCs cancelled halfway, many checkpoint
requests at once, a replica that goes down while the run is paused, a replica at the highest
weight version there is. Real servers on loopback (vLLM CPU, the reward service, `rlhf train ppo`)."""
from __future__ import annotations

import concurrent.futures as cf
import subprocess
import time

import grpc
import pytest
import yaml

from rlhf.v1 import trainer_pb2, trainer_pb2_grpc
from services.common.channel import create_channel
from services.common.config import ClientConfig
from services.demo.launch import ChildServer, free_port, rlhf_command
from services.policy.client import PolicyClient

from reliability_common import TRAINER, policy_server, record, reward_server, server_env

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
TOKEN = "reliability-trainer-token"
AUTH = ClientConfig(auth_token=TOKEN)
ENV = {"RLHF_AUTH_TOKEN": TOKEN}


@pytest.fixture(scope="module")
def stack(tiny_policy_dir, tiny_reward_dir, reliability_logs, tmp_path_factory):
    from services.demo.data import write_demo_data
    data = write_demo_data(tmp_path_factory.mktemp("data"), seed=0, num_sft=8, num_prefs=8, num_prompts=64)
    servers = [reward_server(tiny_reward_dir, reliability_logs, env=ENV, client_config=AUTH),
               policy_server(tiny_policy_dir, reliability_logs, env=ENV, client_config=AUTH),
               policy_server(tiny_policy_dir, reliability_logs, env=ENV, client_config=AUTH)]
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready()
        yield dict(reward=servers[0], replicas=servers[1:], prompts=data["prompts"], policy_dir=tiny_policy_dir,
                   reward_dir=tiny_reward_dir, logs=reliability_logs)
    finally:
        for s in servers:
            s.terminate()


def trainer(stack, root, replicas, steps: int = 10_000) -> ChildServer:
    config = root / "ppo.yaml"
    config.write_text(yaml.safe_dump(dict(
        policy_addresses=[r.address for r in replicas], reward_address=stack["reward"].address,
        sft_model=str(stack["policy_dir"]), reward_model=str(stack["reward_dir"]), prompts=str(stack["prompts"]),
        out=str(root / "run"), steps=steps, seed=0, checkpoint_every=0, rollout=dict(batch_size=4, max_tokens=8),
        ppo=dict(epochs=1, minibatch_size=4, lr=1e-5), services=dict(dependency_deadline_s=120, retry_max_s=2.0))))
    port = free_port()
    return ChildServer(rlhf_command("train", "ppo", "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
                                    "--metrics-port", "0", "--grace-seconds", "5"),
                       port=port, service=TRAINER, env=server_env(**ENV), log_path=root / "trainer.log",
                       client_config=AUTH)


def wait_until(predicate, timeout: float, proc: ChildServer, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := predicate()):
            return value
        assert proc.alive(), f"trainer exited while waiting for {what}:\n{proc.log_tail()}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_cancelled_and_concurrent_checkpoint_calls_neither_kill_the_run_nor_write_twice(stack, tmp_path, request):
    """Before: SaveCheckpoint(timeout=0.5) cancelled the future the loop completed later, and the
    run died with InvalidStateError; 537 calls wrote 537 checkpoints of 9 steps."""
    with trainer(stack, tmp_path, stack["replicas"][:1], steps=6) as proc:
        stub = trainer_pb2_grpc.TrainerServiceStub(create_channel(proc.address, AUTH))
        status = lambda: stub.GetStatus(trainer_pb2.GetStatusRequest(), timeout=30)  # noqa: E731
        wait_until(lambda: status().step >= 1, 300, proc, "the first step")
        codes = []
        for timeout in (0.05, 0.2, 0.5):  # callers that give up before the step ends
            try:
                stub.SaveCheckpoint(trainer_pb2.SaveCheckpointRequest(), timeout=timeout)
                codes.append("OK")
            except grpc.RpcError as e:
                codes.append(e.code().name)
        future = stub.SaveCheckpoint.future(trainer_pb2.SaveCheckpointRequest(), timeout=60)
        future.cancel()
        # Many callers while paused: one checkpoint serves them all.
        stub.Pause(trainer_pb2.PauseRequest(), timeout=30)
        paused = wait_until(lambda: (s := status()).phase == trainer_pb2.PHASE_PAUSED and s, 120, proc, "the pause")
        with cf.ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(lambda _: stub.SaveCheckpoint(trainer_pb2.SaveCheckpointRequest(), timeout=120),
                                    range(40)))
        assert {r.step for r in replies} == {paused.step} and len({r.path for r in replies}) == 1
        stub.Resume(trainer_pb2.ResumeRequest(), timeout=30)
        code = proc.proc.wait(timeout=600)
        log = (tmp_path / "trainer.log").read_text()
    assert code == 0, log[-3000:]
    assert "InvalidStateError" not in log and "Traceback" not in log
    written = log.count("INFO services.trainer.checkpoint: checkpoint ")
    steps_saved = {line.rsplit("step-", 1)[1] for line in log.splitlines() if "trainer.checkpoint: checkpoint " in line}
    assert written == len(steps_saved), (written, steps_saved)  # no step written twice
    record(request, "trainer: SaveCheckpoint cancelled or timed out, 40 concurrent while paused",
           cases=f"{len(codes) + 1} abandoned calls ({', '.join(codes)}, cancel), 40 concurrent",
           result=f"pass: run finished (exit 0); {written} checkpoint(s) written for {len(steps_saved)} step(s)")


def test_get_status_shows_a_replica_that_went_down_while_paused(stack, tmp_path, request):
    """Before: a replica that was down kept showing as available and in sync until the next step."""
    doomed = policy_server(stack["policy_dir"], stack["logs"], env=ENV, client_config=AUTH).start().wait_ready()
    try:
        with trainer(stack, tmp_path, [stack["replicas"][0], doomed]) as proc:
            stub = trainer_pb2_grpc.TrainerServiceStub(create_channel(proc.address, AUTH))
            status = lambda: stub.GetStatus(trainer_pb2.GetStatusRequest(), timeout=30)  # noqa: E731
            wait_until(lambda: status().step >= 1, 300, proc, "the first step")
            stub.Pause(trainer_pb2.PauseRequest(), timeout=30)
            wait_until(lambda: status().phase == trainer_pb2.PHASE_PAUSED, 120, proc, "the pause")
            assert status().replicas_in_sync == 2
            doomed.kill()
            killed = time.monotonic()
            seen = wait_until(lambda: next((r for r in status().replicas if r.address == doomed.address
                                            and not r.available), None), 30, proc, "the replica shown down")
            took = time.monotonic() - killed
            assert not seen.in_sync and status().replicas_in_sync == 1
    finally:
        doomed.kill()
    record(request, "trainer: GetStatus of a replica killed while the run is paused",
           cases="1 replica of 2 killed with -9", result=f"pass: shown unavailable after {took:.1f} s")


def test_a_replica_at_the_highest_version_is_refused_with_a_clear_error(stack, tmp_path, request):
    """Before: a replica at version 2^64-1 made the trainer fail with ValueError and GetStatus
    answer UNKNOWN. The contract now bounds versions to 2^63-1; the trainer says what to do."""
    import torch
    from safetensors.torch import load_file

    top = policy_server(stack["policy_dir"], stack["logs"], env=ENV, client_config=AUTH).start().wait_ready()
    try:
        weights = {k: v.to(torch.float32) for k, v in load_file(stack["policy_dir"] / "model.safetensors").items()}
        with PolicyClient(top.address, AUTH, timeout=120) as client:
            assert client.push_weights(weights, version=2**63 - 1).version == 2**63 - 1
        proc = trainer(stack, tmp_path, [top], steps=2).start()
        code = proc.proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        raise AssertionError("the trainer did not stop") from None
    finally:
        top.kill()
    log = (tmp_path / "trainer.log").read_text()
    assert code == 2, log[-2000:]
    assert "the highest there is" in log and "Traceback" not in log
    record(request, "trainer: a replica at weight version 2^63-1", cases="1 run",
           result="pass: exit 2 before training, naming the replica's version and what to do")

"""PPO against live services: two policy replicas, a replica killed with -9 mid-run, the
trainer killed and resumed, and TrainerService control. Real servers, real vLLM (CPU)."""
from __future__ import annotations

import pathlib
import signal
import time

import grpc
import pytest

from rlhf.v1 import trainer_pb2, trainer_pb2_grpc
from services.common.channel import create_channel
from services.common.config import ClientConfig
from services.demo.launch import free_port
from services.policy.client import PolicyClient

from ppo_harness import (AUTH, policy_server, read_metrics, requests_served, reward_server, start_trainer,
                         wait_for, write_config)

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
STEPS = 8


def test_two_replicas_survive_kill_9_and_trainer_service_controls_the_run(stack, tmp_path):
    out = tmp_path / "run"
    proc, port = start_trainer(write_config(tmp_path / "ppo.yaml", stack, out, steps=STEPS), tmp_path / "trainer.log")
    a, b = stack["replicas"]
    try:
        trainer = trainer_pb2_grpc.TrainerServiceStub(create_channel(f"127.0.0.1:{port}", AUTH))
        wait_for(lambda: len(read_metrics(out)) >= 2, 300, proc, "two PPO steps")
        # Generation goes to both replicas.
        assert requests_served(a) > 0 and requests_served(b) > 0
        # Control needs the token; with it, Pause holds the run and Resume lets it go on.
        anonymous = trainer_pb2_grpc.TrainerServiceStub(create_channel(f"127.0.0.1:{port}", ClientConfig()))
        with pytest.raises(grpc.RpcError) as err:
            anonymous.Pause(trainer_pb2.PauseRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert trainer.Pause(trainer_pb2.PauseRequest(), timeout=10).paused
        paused_at = wait_for(lambda: (s := trainer.GetStatus(trainer_pb2.GetStatusRequest(), timeout=10)).phase
                             == trainer_pb2.PHASE_PAUSED and s, 120, proc, "the pause")
        saved = trainer.SaveCheckpoint(trainer_pb2.SaveCheckpointRequest(), timeout=120)
        assert saved.step == paused_at.step and pathlib.Path(saved.path, "state.pt").exists()
        time.sleep(2)
        assert len(read_metrics(out)) == paused_at.step  # nothing moves while paused

        # kill -9 one replica, let the run go on with the other, then bring it back empty.
        b.kill()
        trainer.Resume(trainer_pb2.ResumeRequest(), timeout=10)
        step_at_kill = len(read_metrics(out))
        wait_for(lambda: len(read_metrics(out)) >= step_at_kill + 1, 300, proc, "a step without replica b")
        # Hold the run while b restarts: vLLM takes longer to start than the remaining steps take
        # on a fast machine, and the run must still have steps left to resync b and use it.
        trainer.Pause(trainer_pb2.PauseRequest(), timeout=10)
        held = wait_for(lambda: (s := trainer.GetStatus(trainer_pb2.GetStatusRequest(), timeout=10)).phase
                        == trainer_pb2.PHASE_PAUSED and s, 120, proc, "the second pause")
        assert held.step < STEPS
        restarted = policy_server(stack["policy_dir"], stack["logs"], port=int(b.address.rsplit(":", 1)[1]))
        stack["replicas"][1] = restarted
        restarted.start().wait_ready()
        watched = trainer.WatchMetrics(trainer_pb2.WatchMetricsRequest(include_history=True), timeout=600)
        trainer.Resume(trainer_pb2.ResumeRequest(), timeout=10)
        steps_seen = [m.step for m in watched]  # the stream ends when the run finishes
        assert proc.wait(timeout=600) == 0, (tmp_path / "trainer.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()

    history = read_metrics(out)
    assert [m["step"] for m in history] == list(range(1, STEPS + 1)) and steps_seen == list(range(1, STEPS + 1))
    # Every step trained only on completions of the version it had pushed; nothing off-version.
    for m in history:
        assert m["trained_versions"] == [m["weight_version"]], m
        assert m["pushed_version"] == m["weight_version"] + 1
    assert history[-1]["replica_resyncs"] >= 1  # the restarted replica got the weights before use
    assert requests_served(restarted) > 0
    final = history[-1]["pushed_version"]
    for replica in (a, restarted):
        with PolicyClient(replica.address, AUTH) as client:
            assert client.model_info().weight_version == final
    assert (out / "reward.png").exists() and (out / "kl.png").exists()


def test_trainer_killed_and_resumed_continues_at_the_saved_step(stack, tmp_path):
    from services.trainer.state import Prompts
    out = tmp_path / "run"
    config = write_config(tmp_path / "ppo.yaml", stack, out, steps=6, checkpoint_every=2)
    proc, _ = start_trainer(config, tmp_path / "trainer.log")
    try:
        wait_for(lambda: (out / "checkpoints" / "LATEST").exists() and len(read_metrics(out)) >= 3, 300, proc,
                 "a checkpoint")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved_step = int((out / "checkpoints" / "LATEST").read_text().split("-")[1])
    before = read_metrics(out)
    proc, _ = start_trainer(config, tmp_path / "trainer.log", "--resume")
    assert proc.wait(timeout=600) == 0, (tmp_path / "trainer.log").read_text()[-3000:]
    after = read_metrics(out)[len(before):]
    assert [m["step"] for m in after] == list(range(saved_step + 1, 7))
    assert "resumed from" in (tmp_path / "trainer.log").read_text()
    # The data position was restored: every step saw the prompts an uninterrupted run sees.
    prompts = Prompts(str(stack["prompts"]), seed=0)
    import hashlib
    expected = {s: hashlib.sha256("\n".join(prompts.next(16)).encode()).hexdigest()[:16] for s in range(1, 7)}
    for m in before + after:
        assert m["prompts_sha"] == expected[m["step"]], m["step"]
    # Versions only go up across the restart: the resumed trainer continues above what replicas serve.
    assert after[0]["weight_version"] > max(m["pushed_version"] for m in before)


def test_reward_outage_delays_the_run_shows_in_get_status_and_one_past_the_deadline_stops_it(stack, tmp_path):
    """one_step_off: the next rollout scores in a background thread while the main thread waits in
    another phase; GetStatus must still say that the run waits for the reward service, and since
    when (it said GENERATING for a whole outage before)."""
    port = free_port()  # a reward service of its own: the other tests keep theirs
    reward = reward_server(stack["reward_dir"], tmp_path / "reward.log", port).start()
    reward.wait_ready()
    out, log = tmp_path / "run", tmp_path / "trainer.log"
    deadline_s = 30  # longer than the short outage takes, restart included, on a busy 2-core machine
    config = write_config(tmp_path / "ppo.yaml", {**stack, "reward": reward}, out, steps=200, deadline_s=deadline_s,
                          **ONE_STEP_OFF)
    proc, trainer_port = start_trainer(config, log)
    trainer = trainer_pb2_grpc.TrainerServiceStub(create_channel(f"127.0.0.1:{trainer_port}", AUTH))
    status = lambda: trainer.GetStatus(trainer_pb2.GetStatusRequest(), timeout=10)  # noqa: E731
    try:
        wait_for(lambda: len(read_metrics(out)) >= 2, 300, proc, "two PPO steps")
        # A short outage: the step waits (backoff with jitter), the run goes on afterwards.
        reward.kill()
        killed = time.time()
        waiting = wait_for(lambda: (s := status()).phase == trainer_pb2.PHASE_WAITING and s, 60, proc, "WAITING")
        assert waiting.waiting_for == "reward service" and "waiting for reward service since" in waiting.message
        assert killed - 1 <= waiting.waiting_since.ToSeconds() + waiting.waiting_since.nanos / 1e9 <= time.time()
        # The replacement starts now (it loads for seconds, answering UNAVAILABLE meanwhile): the
        # outage must stay well inside the deadline on a busy machine.
        reward = reward_server(stack["reward_dir"], tmp_path / "reward.log", port).start()
        stalled_at = len(read_metrics(out))
        time.sleep(1.5)
        assert len(read_metrics(out)) == stalled_at and status().phase == trainer_pb2.PHASE_WAITING  # held up
        reward.wait_ready()
        wait_for(lambda: len(read_metrics(out)) >= stalled_at + 2, 300, proc, "steps after the reward service came back")
        after = status()
        assert after.phase != trainer_pb2.PHASE_WAITING and not after.waiting_for and not after.HasField("waiting_since")
        assert "reward service: UNAVAILABLE" in log.read_text() and "; retrying (failing for" in log.read_text()
        # An outage past the deadline: the run stops with a checkpoint and says how to go on.
        reward.kill()
        killed = time.monotonic()
        code = proc.wait(timeout=deadline_s + 120)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
        reward.terminate()
    text = log.read_text()
    assert code != 0 and deadline_s <= took < deadline_s + 120, (code, took, text[-2000:])
    stopped = text[text.index("PPO stopped at step"):]
    step = int(stopped.split()[4].rstrip(":"))
    assert "reward service failing for" in stopped and "Resume with --resume" in stopped, stopped[:300]
    assert (out / "checkpoints" / "LATEST").read_text().strip() == f"step-{step:06d}"
    assert [m["step"] for m in read_metrics(out)] == list(range(1, step + 1))


ONE_STEP_OFF = dict(rollout=dict(mode="one_step_off"), services=dict(max_staleness=1))


def test_one_step_off_trains_on_completions_one_version_old_even_with_a_slow_replica(stack, tmp_path):
    """The next step's rollout runs while a step trains and pushes; a replica that generates one
    sequence at a time (--max-num-seqs 1) drags its share out, and still no completion older than
    services.max_staleness = 1 is trained on; the run ends with every replica at the final weights."""
    slow = policy_server(stack["policy_dir"], stack["logs"], extra=("--max-num-seqs", "1")).start().wait_ready()
    out = tmp_path / "run"
    try:
        config = write_config(tmp_path / "ppo.yaml", {**stack, "replicas": [*stack["replicas"], slow]}, out,
                              steps=6, **ONE_STEP_OFF)
        proc, _ = start_trainer(config, tmp_path / "trainer.log")
        assert proc.wait(timeout=900) == 0, (tmp_path / "trainer.log").read_text()[-3000:]
        history = read_metrics(out)
        assert [m["step"] for m in history] == list(range(1, 7))
        assert history[0]["staleness"] == {"0": history[0]["completions"]}  # the first rollout is the only sync one
        for m in history[1:]:
            assert m["staleness"] == {"1": m["completions"]}, m
            assert m["trained_versions"] == [m["pushed_version"] - 2], m
            assert m["rollout_hidden"] > 0
        with PolicyClient(slow.address, AUTH) as client:
            assert client.model_info().weight_version == history[-1]["pushed_version"]
    finally:
        slow.terminate()


def test_one_step_off_stopped_and_resumed_neither_repeats_nor_skips_a_prompt_batch(stack, tmp_path):
    """SIGTERM finishes the step and checkpoints with the next rollout in flight; that rollout's
    prompts are drawn again after the resume."""
    import hashlib

    from services.trainer.state import Prompts
    out, log = tmp_path / "run", tmp_path / "trainer.log"
    config = write_config(tmp_path / "ppo.yaml", stack, out, steps=6, checkpoint_every=0, **ONE_STEP_OFF)
    proc, _ = start_trainer(config, log)
    try:
        wait_for(lambda: len(read_metrics(out)) >= 2, 600, proc, "two steps")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped_at = len(read_metrics(out))
    assert (out / "checkpoints" / "LATEST").read_text().strip() == f"step-{stopped_at:06d}"
    proc, _ = start_trainer(config, log, "--resume")
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    history = read_metrics(out)
    assert [m["step"] for m in history] == list(range(1, 7))
    prompts = Prompts(str(stack["prompts"]), seed=0)
    expected = [hashlib.sha256("\n".join(prompts.next(16)).encode()).hexdigest()[:16] for _ in range(6)]
    assert [m["prompts_sha"] for m in history] == expected


def test_what_the_services_refuse_is_said_before_the_first_step(stack, tmp_path):
    """`rollout.n=100000` passed every check until the first Generate; now the trainer compares the
    config with each replica's and the reward service's limits (GetModelInfo) and exits 2."""
    out, log = tmp_path / "run", tmp_path / "trainer.log"
    config = write_config(tmp_path / "ppo.yaml", stack, out, steps=2, rollout=dict(n=100000, max_tokens=600),
                          ppo=dict(advantage="grpo"))
    proc, _ = start_trainer(config, log)
    assert proc.wait(timeout=300) == 2, log.read_text()[-3000:]
    text = log.read_text()
    for replica in stack["replicas"]:
        assert f"rollout.n is 100000, above policy replica {replica.address}'s limit of 64" in text, text[-3000:]
    assert "rollout.max_tokens 600 (+ EOS) is more than the reward model's max length" in text, text[-3000:]
    assert "pairs per Score call" not in text  # the trainer cuts its Score calls to the service's --max-pairs
    assert not read_metrics(out)

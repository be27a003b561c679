"""TrainerService: status and control of the running PPO job, over gRPC (served by rank 0)."""
from __future__ import annotations

import asyncio

from google.protobuf import timestamp_pb2

from rlhf.v1 import trainer_pb2, trainer_pb2_grpc
from services.trainer.control import Control, Phase, ReplicaStatus, Status
from services.trainer.metrics import StepMetrics

# Built at import: a phase without its proto enum value fails here, not in a call.
PHASES = {phase: trainer_pb2.Phase.Value(f"PHASE_{phase.name}") for phase in Phase}

# StepMetrics fields without a field of their own in the message: they go to `extra`.
EXTRA = ("pushed_version", "score_mean", "kl_loss", "logprob_gap", "completions", "completions_dropped", "completions_empty",
         "completions_trimmed", "generated_tokens", "missing_eos_share", "response_length", "replica_resyncs",
         "is_weight_mean", "is_weight_max", "is_capped_share", "rollout_seconds", "rollout_hidden",
         "completions_rescored", "completions_dropped_reward_version")


def step_metrics(m: StepMetrics) -> trainer_pb2.StepMetrics:
    return trainer_pb2.StepMetrics(
        step=m.step, weight_version=m.weight_version, reward_mean=m.reward_mean, kl=m.kl, entropy=m.entropy,
        clip_fraction=m.clip_fraction, approx_kl=m.approx_kl, policy_loss=m.policy_loss, value_loss=m.value_loss,
        beta=m.beta, tokens_per_second=m.tokens_per_second, phase_seconds=m.phase_seconds,
        extra={**{key: float(getattr(m, key)) for key in EXTRA},
               **{f"reward_{name}": value for name, value in m.reward_components.items()},
               **{f"reward_scored_by_{version}": float(n) for version, n in m.reward_versions.items()},
               **{f"push_{name}": value for name, value in m.push.items()}},
        time=_timestamp(m.time), reward_model_version=m.reward_version)


def replica_status(r: ReplicaStatus) -> trainer_pb2.ReplicaStatus:
    return trainer_pb2.ReplicaStatus(address=r.address, instance_id=r.instance_id, weight_version=r.weight_version,
                                     in_sync=r.in_sync, available=r.available)


def canary_verdict(v) -> trainer_pb2.CanaryVerdict:
    return trainer_pb2.CanaryVerdict(
        version=v.version, replica=v.replica, passed=v.passed, kl=v.kl, score_before=v.score_before,
        score_after=v.score_after, message=v.message,
        time=timestamp_pb2.Timestamp(seconds=int(v.time), nanos=int(v.time % 1 * 1e9)))


def trainer_status(s: Status) -> trainer_pb2.TrainerStatus:
    return trainer_pb2.TrainerStatus(
        phase=PHASES[s.phase], step=s.step, total_steps=s.total_steps, weight_version=s.weight_version,
        replicas=[replica_status(r) for r in s.replicas], replicas_in_sync=sum(r.in_sync for r in s.replicas),
        last_metrics=step_metrics(s.last) if s.last else None, paused=s.paused, message=s.message,
        waiting_for=s.waiting.dependency if s.waiting else "",
        waiting_since=_timestamp(s.waiting.since) if s.waiting else None,
        reward_model_version=s.last.reward_version if s.last else "",
        canary=canary_verdict(s.canary) if s.canary else None)


def _timestamp(t: float) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=int(t), nanos=int(t % 1 * 1e9))


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    service_name = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name

    def __init__(self, control: Control):
        self.control = control

    def add_to_server(self, server) -> None:
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(self, server)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def GetStatus(self, request, context):
        return trainer_status(self.control.snapshot())

    async def Pause(self, request, context):
        self.control.pause()
        return trainer_status(self.control.snapshot())

    async def Resume(self, request, context):
        self.control.resume()
        return trainer_status(self.control.snapshot())

    async def SaveCheckpoint(self, request, context):
        # Shielded: a caller that gives up (deadline, cancel) must not cancel the request the loop
        # answers later; it is answered for the callers still waiting, and skipped for this one.
        checkpoint = await asyncio.shield(asyncio.wrap_future(self.control.request_checkpoint()))
        return trainer_pb2.SaveCheckpointResponse(path=str(checkpoint.path), step=checkpoint.step)

    async def WatchMetrics(self, request, context):
        queue = self.control.watch(request.include_history)
        try:
            while (m := await queue.get()) is not None:
                yield step_metrics(m)
        finally:
            self.control.unwatch(queue)

"""TrainerService: status and control of the running PPO job, over gRPC."""
from __future__ import annotations

import asyncio

from google.protobuf import timestamp_pb2

from rlhf.v1 import trainer_pb2, trainer_pb2_grpc
from services.trainer.control import Control

PHASES = {name: trainer_pb2.Phase.Value(f"PHASE_{name}") for name in
          ("STARTING", "SYNCING", "GENERATING", "SCORING", "REFERENCE", "TRAINING", "PUSHING", "PAUSED",
           "CHECKPOINTING", "FINISHED", "FAILED", "WAITING")}
NAMED = ("reward_mean", "kl", "entropy", "clip_fraction", "approx_kl", "policy_loss", "value_loss", "beta",
         "tokens_per_second")


def step_metrics(m: dict) -> trainer_pb2.StepMetrics:
    msg = trainer_pb2.StepMetrics(step=m["step"], weight_version=m["weight_version"],
                                  phase_seconds=m.get("phase_seconds", {}),
                                  time=timestamp_pb2.Timestamp(seconds=int(m["time"]),
                                                               nanos=int(m["time"] % 1 * 1e9)))
    for key in NAMED:
        setattr(msg, key, float(m.get(key, 0.0)))
    msg.extra.update({k: float(v) for k, v in m.items()
                      if k not in NAMED and isinstance(v, (int, float)) and k not in ("step", "weight_version", "time")})
    return msg


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

    def _status(self) -> trainer_pb2.TrainerStatus:
        s = self.control.snapshot()
        replicas = [trainer_pb2.ReplicaStatus(**r) for r in s["replicas"]]
        return trainer_pb2.TrainerStatus(
            phase=PHASES.get(s["phase"], trainer_pb2.PHASE_UNSPECIFIED), step=s["step"],
            total_steps=s["total_steps"], weight_version=s["weight_version"], replicas=replicas,
            replicas_in_sync=sum(r.in_sync for r in replicas),
            last_metrics=step_metrics(s["last"]) if s["last"] else None, paused=s["paused"], message=s["message"])

    async def GetStatus(self, request, context):
        return self._status()

    async def Pause(self, request, context):
        self.control.pause()
        return self._status()

    async def Resume(self, request, context):
        self.control.resume()
        return self._status()

    async def SaveCheckpoint(self, request, context):
        path, step = await asyncio.wrap_future(self.control.request_checkpoint())
        return trainer_pb2.SaveCheckpointResponse(path=str(path), step=step)

    async def WatchMetrics(self, request, context):
        queue = self.control.watch(request.include_history)
        try:
            while (m := await queue.get()) is not None:
                yield step_metrics(m)
        finally:
            self.control.unwatch(queue)

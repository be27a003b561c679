"""The policy service's own Prometheus metrics (vLLM's `vllm:*` series sit next to them
on the same port; RPC counts are the runtime's grpc_server_*)."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

GENERATED_TOKENS = Counter("rlhf_policy_generated_tokens_total", "Tokens generated")
PROMPT_TOKENS = Counter("rlhf_policy_prompt_tokens_total", "Prompt tokens processed")
TTFT = Histogram("rlhf_policy_time_to_first_token_seconds", "Time from request to its first generated token",
                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
WEIGHT_VERSION = Gauge("rlhf_policy_weight_version", "Version of the served weights (0 = as loaded)")
UPDATE_SECONDS = Histogram("rlhf_policy_weight_update_seconds", "UpdateWeights from header to applied",
                           buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
UPDATE_BYTES = Counter("rlhf_policy_weight_update_bytes_total", "Bytes of weights applied")
UPDATES = Counter("rlhf_policy_weight_updates_total", "UpdateWeights outcomes", ["result"])
STAGE_SECONDS = Histogram("rlhf_policy_weight_stage_seconds", "A received push made ready to apply: a delta decoded, "
                          "the image digest checked", buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
CHANGED_ELEMENTS = Counter("rlhf_policy_weight_changed_elements_total", "Weight elements whose bits applied pushes "
                           "changed")
RELAYED_BYTES = Counter("rlhf_policy_weight_relayed_bytes_total", "Push bytes this replica passed on to others")
RELAYS = Counter("rlhf_policy_weight_relays_total", "Replicas this replica passed a push on to, by outcome "
                 "(ok, refused: the replica answered with an error; unreachable: routed around)", ["result"])

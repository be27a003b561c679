"""The reward service's Prometheus series, all in one place (the gRPC ones come from the runtime's
interceptor: grpc_server_started_total and friends count requests by method)."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.reward.batcher import BatchStats

_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_VALUES = (-10, -5, -3, -2, -1, -0.5, -0.25, 0, 0.25, 0.5, 1, 2, 3, 5, 10)

SAMPLES = Counter("rlhf_reward_samples_total", "Pairs scored.")
BATCH_SIZE = Histogram("rlhf_reward_batch_size", "Pairs per forward pass.",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
BATCH_TOKENS = Histogram("rlhf_reward_batch_tokens", "Padded tokens per forward pass (rows x longest row).",
                         buckets=(64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072))
QUEUE_SECONDS = Histogram("rlhf_reward_queue_seconds", "Time a pair waited for its forward pass.", buckets=_SECONDS)
INFERENCE_SECONDS = Histogram("rlhf_reward_inference_seconds", "Time of one forward pass.", buckets=_SECONDS[1:])
SCORE = Histogram("rlhf_reward_score", "Raw scores returned: the mix of the components (its distribution drifts "
                  "when the policy games the reward).", buckets=_VALUES)
COMPONENT = Histogram("rlhf_reward_component_value", "Unweighted value of each reward component (rm raw).",
                      ["component"], buckets=_VALUES)
QUEUE_DEPTH = Gauge("rlhf_reward_queue_depth", "Pairs waiting for a forward pass.")

MODEL_INFO = Gauge("rlhf_reward_model_info", "1 for the reward model being served (0 for those it replaced); "
                   "model_version is what every ScoreResult carries.", ["model_version", "weights_version", "model_name"])
MODEL_LOADED = Gauge("rlhf_reward_model_loaded_timestamp_seconds", "Unix time the served reward model was loaded.")
MODEL_LOADS = Counter("rlhf_reward_model_loads_total", "LoadModel calls by result: swapped, unchanged (those weights "
                      "were served already), refused (does not fit, bad path) or failed (could not load).", ["result"])
MODEL_LOAD_SECONDS = Histogram("rlhf_reward_model_load_seconds", "Time to load and check a new reward model version.",
                               buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
FUNCTION_FAILURES = Counter("rlhf_reward_function_failures_total", "Reward function calls that failed their request, "
                            "by function and reason (error, timeout, crash).", ["function", "reason"])
FUNCTION_WORKER_STARTS = Counter("rlhf_reward_function_worker_restarts_total", "Reward function workers started in "
                                 "place of one that was stopped at the time limit or died.")

HTTP_REQUESTS = Counter("rlhf_reward_http_requests_total", "HTTP requests on the OpenRLHF port, by path and status.",
                        ["path", "code"])
HTTP_SECONDS = Histogram("rlhf_reward_http_request_seconds", "Time to answer an HTTP request on the OpenRLHF port.",
                         ["path"], buckets=_SECONDS + (30, 60))
HTTP_IN_FLIGHT = Gauge("rlhf_reward_http_requests_in_flight", "HTTP requests being answered (--http-max-concurrency).")


def observe_batch(stats: BatchStats) -> None:
    BATCH_SIZE.observe(stats.size)
    BATCH_TOKENS.observe(stats.padded_tokens)
    INFERENCE_SECONDS.observe(stats.inference_seconds)
    for q in stats.queue_seconds:
        QUEUE_SECONDS.observe(q)

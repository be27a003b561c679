"""RLHF as three gRPC services: policy (vLLM), reward, trainer."""

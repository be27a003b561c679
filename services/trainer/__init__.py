"""Trainer service: PPO math, SFT, the PPO loop and its gRPC server."""

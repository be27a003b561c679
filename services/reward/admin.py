"""`rlhf reward load-model PATH --reward ADDRESS`: serve a new reward model version on every replica.

LoadModel swaps the model of the one server it reaches. Behind a Kubernetes Service there are
several: with a `dns:///name:port` address (a headless Service) every replica the name resolves to
gets the call, one after another, and each line says what it serves now. Exit 0 only when every
replica answered OK. The client's flags (--client-auth-token-file, TLS) as for `train ppo`; the
token is the server's admin token when it has one. Base install only: grpc, no torch.
"""
from __future__ import annotations

import argparse
import socket
import sys

import grpc

from services.common.config import ClientConfig
from services.reward.client import RewardClient


def replicas(address: str) -> list[str]:
    """host:port for every replica behind `address`: the A/AAAA records of a dns:///name:port
    address, or the address itself."""
    if not address.startswith("dns:"):
        return [address]
    host, _, port = address.split("/")[-1].rpartition(":")
    try:
        ips = sorted({info[4][0] for info in socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)})
    except (socket.gaierror, ValueError) as exc:
        raise SystemExit(f"rlhf reward load-model: cannot resolve {address}: {exc}") from None
    return [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in ips]


def main(args: argparse.Namespace) -> int:
    config = ClientConfig.from_args(args)
    failed = 0
    for target in replicas(args.reward_address):
        with RewardClient(target, config, timeout=args.timeout) as client:
            try:
                r = client.load_model(args.path, expected_weights_version=args.expected_weights_version or "",
                                      if_version=args.if_version or "")
            except grpc.RpcError as e:
                failed += 1
                print(f"{target}: {e.code().name}: {e.details()}", file=sys.stderr)
                continue
        what = "now serves" if r.changed else "already served"
        print(f"{target}: {what} {r.model_version} (weights {r.weights_version}, from {r.model_path}; before: "
              f"{r.previous_version}; {r.load_seconds:.1f} s)")
    return 1 if failed else 0

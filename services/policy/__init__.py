"""PolicyService: generation on vLLM with versioned weight pushes.

engine (vLLM lifecycle, no gRPC) | worker (runs inside vLLM's worker process) | limits (pure
request checks) | weights (push session: staging, checks, commit) | wire (chunk codec,
dtype/digest tables, segments and relay trees) | results | metrics | options (vLLM's flags) |
server (transport only) | relay (a push passed on to other replicas) | client.
Importing this package imports neither vLLM nor torch.
"""

"""PolicyService: generation on vLLM with versioned weight pushes.

engine (vLLM, no gRPC) | weights (staging and checks) | server (proto <-> engine) | client.
Importing this package imports neither vLLM nor torch.
"""

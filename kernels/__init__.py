"""Fused kernels (installed as dllm_rl.kernels)."""

"""Compute kernels. Importing this package never imports triton: GPU kernels load on first use."""

from expertyard.kernels.fused_moe import fused_moe, fused_moe_reference, fused_moe_torch

__all__ = ["fused_moe", "fused_moe_reference", "fused_moe_torch"]

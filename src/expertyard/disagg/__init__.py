"""Disaggregated expert parallelism (MegaScale-Infer) and colocated (wide) expert parallelism on torch.distributed.

Attention ranks hold the non-expert weights and the KV cache of their requests; expert ranks hold a share of
every layer's routed experts. Tokens travel by M2N dispatch and come back by N2M combine, in fixed-capacity
buffers whose counts stay on the device. See docs/disaggregation.md.
"""

from expertyard.disagg.config import DisaggConfig

__all__ = ["DisaggConfig"]

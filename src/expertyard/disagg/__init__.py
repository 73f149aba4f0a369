"""Disaggregated expert parallelism (MegaScale-Infer) and colocated (wide) expert parallelism on torch.distributed.

Attention ranks hold the non-expert weights and the KV cache of their requests; expert ranks hold a share of
every layer's routed experts. Tokens travel by M2N dispatch and come back by N2M combine, in fixed-capacity
buffers whose counts stay on the device. See docs/disaggregation.md.

The runtime API: `launch_local(DisaggConfig, ModelSource, EngineConfig, device_type, dtype, job)` starts every
rank on this host and returns rank 0's `job(engine)`; under torchrun each process calls `run_rank` (through
`launch.rank_main`). The command-line glue lives in entrypoints/disagg_cmd.py.
"""

from expertyard.disagg.config import DisaggConfig
from expertyard.disagg.launch import launch_local, rank_main
from expertyard.disagg.worker import ModelSource, run_rank

__all__ = ["DisaggConfig", "ModelSource", "launch_local", "rank_main", "run_rank"]

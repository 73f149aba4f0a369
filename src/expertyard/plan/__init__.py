"""Deployment planning for disaggregated expert parallelism (MegaScale-Infer, arXiv 2504.02263, section 4 and
Algorithm 1): a linear performance model of attention nodes, expert nodes and the links between them, and a
search over tensor-parallel sizes, node counts, micro-batches and batch size under the paper's constraints.

profiles.py     hardware profiles: datasheet-derived (built in) or calibrated (JSON)
model_specs.py  the paper's models as shapes, and how `--model/--synthetic` become a ModelConfig
model_costs.py  bytes and FLOPs per layer of a ModelConfig
perf_model.py   T_a, T_e, T_c, iteration latency (TPOT), memory, throughput for one deployment
search.py       Algorithm 1: the best deployments for N GPUs under the constraints and an SLO
fit.py          least-squares lines, and the step and exchange terms solved from measured TPOTs
colocated.py    the colocated (wide expert parallelism) baseline
report.py       plain-text tables

The model is pure arithmetic. Calibration, which runs hardware, lives with the benchmarks:
bench/plan_calibrate.py (the project's own attention step and fused_moe, fitted lines), bench/plan_step.py (the
null deployments behind T_step and T_x), bench/plan_comm.py (NCCL send/recv between two local GPUs).
"""

"""Routed experts computed on the host CPU: thread count, per-expert layouts (full, int8, int4), the store of
every expert's layouts, the worker that computes a layer's CPU share, and the measured cost figures."""

from expertyard.experts.cpu.compute import CpuExpertCompute, WorkItem
from expertyard.experts.cpu.costs import HybridCosts, measure_costs
from expertyard.experts.cpu.store import PRECISIONS, CpuExpertStore, parse_precisions
from expertyard.experts.cpu.threads import physical_cores, set_cpu_threads
from expertyard.experts.cpu.weights import (CpuExpert, FullCpuExpert, Int4CpuExpert, Int8CpuExpert,
                                            quantize_for_cpu)

__all__ = ["PRECISIONS", "CpuExpert", "CpuExpertCompute", "CpuExpertStore", "FullCpuExpert", "HybridCosts",
           "Int4CpuExpert", "Int8CpuExpert", "WorkItem", "measure_costs", "parse_precisions", "physical_cores",
           "quantize_for_cpu", "set_cpu_threads"]

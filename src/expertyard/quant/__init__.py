"""Low-precision expert copies: group-wise quantization, packed experts, their FFN kernels, the file format
(writing the files from a checkpoint: loader/quantize.py)."""

from expertyard.quant.ffn import expert_ffn_quantized_reference, fused_moe_quantized, fused_moe_quantized_torch
from expertyard.quant.groupwise import QuantizedMatrix, dequantize, pack_codes, quantize, unpack_codes
from expertyard.quant.packed_expert import ExpertLayout, dequantize_expert, expert_views, new_pool, pack_expert

__all__ = ["ExpertLayout", "QuantizedMatrix", "dequantize", "dequantize_expert", "expert_ffn_quantized_reference",
           "expert_views", "fused_moe_quantized", "fused_moe_quantized_torch", "new_pool", "pack_codes",
           "pack_expert", "quantize", "unpack_codes"]

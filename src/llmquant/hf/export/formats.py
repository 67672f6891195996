"""Per-linear tensors and ``quantization_config`` of the three weight-only integer formats.

All start from unsigned codes q ∈ [0, 2^b − 1] (rows = output channels), scales and unsigned zeros per
(row, group), w = (q − z)·s, and ``g_idx`` (group of each input column).

- compressed-tensors ``pack-quantized`` (what llm-compressor writes; transformers and vLLM load it):
  ``weight_packed`` int32 [out, in·b/32] from the package's own ``pack_to_int32`` (signed q − 2^(b−1),
  dense little-endian bit order along the input), ``weight_scale`` [out, groups] in the model dtype,
  ``weight_zero_point`` (asymmetric only) packed along the output dim, ``weight_shape`` int64 [2]; no
  act-order "group" (compressed-tensors 0.20 removed it: "static" reorders without a g_idx).
- GPTQ v1 (AutoGPTQ ``QuantLinear.pack``): ``qweight`` int32 [in·b/32, out] packed along the input,
  ``qzeros`` int32 [groups, out·b/32] holding z − 1 (v1's off-by-one), ``scales`` fp16 [groups, out],
  ``g_idx`` int32 [in].
- AWQ GEMM (AutoAWQ ``WQLinear_GEMM.from_linear``): 4-bit asymmetric only, ``qweight`` int32 [in, out/8]
  packed along the output in the interleaved order AWQ_ORDER, ``qzeros`` int32 [groups, out/8] (z as is),
  ``scales`` fp16 [groups, out]; no g_idx.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import LlmquantError

FORMATS = ("compressed-tensors", "gptq", "awq")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # awq/utils/packing_utils.py


class ExportFormatError(LlmquantError):
    """A quantization the chosen checkpoint format cannot hold."""


@dataclass
class QLinear:
    name: str  # module path, e.g. model.layers.0.self_attn.q_proj
    codes: np.ndarray  # (out, in) int32, unsigned
    scales: np.ndarray  # (out, groups) float32 (exactly representable in the format's scale dtype)
    zeros: np.ndarray  # (out, groups) int32, unsigned
    g_idx: np.ndarray  # (in,) int32
    bias: np.ndarray | None = None


def check_format(fmt: str, bits: int, sym: bool, act_order: str) -> None:
    if fmt not in FORMATS:
        raise ExportFormatError(f"unknown format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    if fmt == "awq" and (bits != 4 or sym or act_order == "group"):
        raise ExportFormatError("the AWQ GEMM format holds only 4-bit asymmetric weights without g_idx (use --asym --bits 4, or --format compressed-tensors)")
    if fmt == "compressed-tensors" and act_order == "group":
        # compressed-tensors 0.20 refuses actorder="group" (removed after its deprecation in favour of "static")
        raise ExportFormatError("compressed-tensors no longer reads act-order 'group' (g_idx); use --act-order static, or --format gptq for desc_act")
    if fmt == "gptq" and bits not in (2, 4, 8):
        raise ExportFormatError(f"GPTQ v1 export packs 2, 4 or 8 bits here, not {bits} (use --format compressed-tensors)")
    if not 2 <= bits <= 8:
        raise ExportFormatError(f"--bits {bits}: expected 2 to 8")


def scale_dtype(fmt: str, model_dtype: str):
    """The dtype scales are stored in (numpy dtype, or "bfloat16")."""
    if fmt in ("gptq", "awq"):
        return np.float16
    return {"float16": np.float16, "bfloat16": "bfloat16"}.get(model_dtype, np.float32)


def _torch_dtype(model_dtype: str):
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(model_dtype, torch.float32)


def _pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack along axis 0: row i of the result holds rows i·(32/b) … of ``values``, lowest bits first."""
    per = 32 // bits
    v = values.astype(np.uint64).reshape(values.shape[0] // per, per, *values.shape[1:])
    out = np.zeros((v.shape[0], *values.shape[1:]), np.uint64)
    for j in range(per):
        out |= v[:, j] << np.uint64(bits * j)
    return out.astype(np.uint32).view(np.int32)


def _pack_awq(values: np.ndarray) -> np.ndarray:
    """(rows, cols) 4-bit values -> (rows, cols/8) int32 in AWQ's interleaved nibble order."""
    rows, cols = values.shape
    v = values.astype(np.uint64).reshape(rows, cols // 8, 8)
    out = np.zeros((rows, cols // 8), np.uint64)
    for i, src in enumerate(AWQ_ORDER):
        out |= v[:, :, src] << np.uint64(4 * i)
    return out.astype(np.uint32).view(np.int32)


def pack(fmt: str, q: QLinear, bits: int, sym: bool, act_order: str, model_dtype: str) -> dict:
    """The checkpoint tensors (torch) of one quantized linear."""
    import torch

    p = q.name
    out_f, in_f = q.codes.shape
    if fmt == "compressed-tensors":
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

        off = 1 << (bits - 1)
        t = {
            f"{p}.weight_packed": pack_to_int32(torch.from_numpy((q.codes - off).astype(np.int8)), bits, packed_dim=1),
            f"{p}.weight_scale": torch.from_numpy(q.scales).to(_torch_dtype(model_dtype)),
            f"{p}.weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
        }
        if not sym:
            t[f"{p}.weight_zero_point"] = pack_to_int32(torch.from_numpy((q.zeros - off).astype(np.int8)), bits, packed_dim=0)
    elif fmt == "gptq":
        if in_f * bits % 32 or out_f * bits % 32:
            raise ExportFormatError(f"{p}: GPTQ v1 packing needs in and out features ({in_f}, {out_f}) that are multiples of {32 // bits}")
        t = {
            f"{p}.qweight": torch.from_numpy(_pack_rows(q.codes.T, bits)),
            f"{p}.qzeros": torch.from_numpy(_pack_rows((q.zeros - 1) & ((1 << bits) - 1), bits).T.copy()),
            f"{p}.scales": torch.from_numpy(q.scales.T.astype(np.float16).copy()),
            f"{p}.g_idx": torch.from_numpy(q.g_idx.astype(np.int32)),
        }
    else:
        if out_f % 8:
            raise ExportFormatError(f"{p}: AWQ GEMM needs out features divisible by 8, not {out_f}")
        t = {
            f"{p}.qweight": torch.from_numpy(_pack_awq(q.codes.T)),
            f"{p}.qzeros": torch.from_numpy(_pack_awq(q.zeros.T)),
            f"{p}.scales": torch.from_numpy(q.scales.T.astype(np.float16).copy()),
        }
    if q.bias is not None:
        bias = torch.from_numpy(q.bias.astype(np.float32))
        t[f"{p}.bias"] = bias.to(torch.float16) if fmt in ("gptq", "awq") else bias.to(_torch_dtype(model_dtype))
    return t


def quantization_config(fmt: str, *, bits: int, group_size: int, sym: bool, act_order: str, damp: float, method: str,
                        ignore: list[str]) -> tuple[dict, dict]:
    """(config.json's ``quantization_config``, extra files {name: JSON})."""
    if fmt == "compressed-tensors":
        import compressed_tensors
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

        args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group" if group_size else "channel",
                                group_size=group_size or None,
                                actorder="static" if act_order == "static" else None)
        scheme = QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")
        cfg = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized", quantization_status="compressed",
                                 ignore=ignore).to_dict()
        cfg["version"] = compressed_tensors.__version__
        return cfg, {}
    if fmt == "gptq":
        cfg = {"quant_method": "gptq", "bits": bits, "group_size": group_size or -1, "desc_act": act_order == "group",
               "sym": sym, "damp_percent": damp, "static_groups": False, "true_sequential": False,
               "checkpoint_format": "gptq", "lm_head": False, "model_name_or_path": None, "model_file_base_name": None,
               "quantizer": [f"llmquant:{method}"]}
        return cfg, {"quantize_config.json": {k: v for k, v in cfg.items() if k != "quant_method"}}
    cfg = {"quant_method": "awq", "bits": bits, "group_size": group_size, "zero_point": True, "version": "gemm",
           "modules_to_not_convert": ignore or None}
    return cfg, {}

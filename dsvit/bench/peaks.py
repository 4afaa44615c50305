"""Device peaks for model FLOPs utilisation, by exact device name, and the heading line of a table."""
from __future__ import annotations

import torch

# Dense bf16 tensor-core peaks in TFLOP/s by the exact name torch.cuda.get_device_name (= nvidia-smi)
# reports: NVIDIA's datasheet figures, halved where the sheet quotes them with 2:4 sparsity. Matched
# exactly, never by substring: "NVIDIA H100 PCIe" is not an H100 SXM ("NVIDIA H100 80GB HBM3").
PEAK_BF16_TFLOPS = {
    "NVIDIA B200": 2250.0,
    "NVIDIA H200": 989.0,                  # SXM
    "NVIDIA H200 NVL": 835.0,
    "NVIDIA GH200 480GB": 989.0,
    "NVIDIA H100 80GB HBM3": 989.0,        # SXM5
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA L40S": 362.0,
    "NVIDIA L40": 181.0,
    "NVIDIA A40": 150.0,
    "NVIDIA A10": 125.0,
    "NVIDIA L4": 121.0,
}


def peak_for(name: str) -> float | None:
    """The dense bf16 peak of a device by its exact name (surrounding spaces ignored), or None."""
    return PEAK_BF16_TFLOPS.get(name.strip())


def device_info(device, dtype: str, peak_tflops: float | None) -> tuple[str, float | None]:
    """(the line heading each table, the peak in TFLOP/s for MFU or None). On CPU there is no MFU."""
    import sys
    import timm
    versions = f"torch {torch.__version__}, timm {timm.__version__}, {dtype}"
    if device.type != "cuda":
        return f"cpu ({torch.get_num_threads()} threads), {versions}", None
    name = torch.cuda.get_device_name(device)
    if peak_tflops is not None:
        source = f"peak {peak_tflops:g} TFLOP/s from --peak-tflops"
    elif dtype != "bf16":
        source = "no MFU: the peak table is for bf16; pass --peak-tflops for the device's fp32/TF32 peak"
    elif (peak_tflops := peak_for(name)) is not None:
        source = f"peak {peak_tflops:g} TFLOP/s (dense bf16, table entry '{name}')"
    else:
        source = f"no MFU: '{name}' is not in the peak table; pass --peak-tflops F (its dense bf16 peak)"
        print(f"throughput: {source}", file=sys.stderr)
    return f"{name}, {versions}; {source}", peak_tflops

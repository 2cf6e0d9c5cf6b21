"""Dense bf16 tensor-core peaks by GPU model, for the MFU figure (issue 21, item 13).

One name covers cards with different peaks: an "H100" is 989 TFLOP/s as SXM5, 835 as NVL and 756 as
PCIe. So the table is matched against the full name CUDA reports (``torch.cuda.get_device_name``), most
specific entry first, and the entry used is reported with the figure. An unknown card gives no MFU
rather than a guessed one. Values: NVIDIA datasheets, dense (without the 2:4 sparsity doubling).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

# (substring of the CUDA device name, label, dense bf16 TFLOP/s); first match wins.
PEAK_BF16_TFLOPS: tuple[tuple[str, str, float], ...] = (
    ("H200 NVL", "H200 NVL", 835.0),
    ("H200", "H200 SXM", 989.0),
    ("H100 NVL", "H100 NVL", 835.0),
    ("H100 PCIe", "H100 PCIe", 756.0),
    ("H100", "H100 SXM", 989.0),
    ("H800 PCIe", "H800 PCIe", 756.0),
    ("H800", "H800 SXM", 989.0),
    ("GH200", "GH200", 989.0),
    ("A100", "A100", 312.0),
    ("A800", "A800", 312.0),
    ("L40S", "L40S", 362.0),
    ("L4", "L4", 121.0),
    ("A10", "A10", 125.0),
)


class Peak(NamedTuple):
    label: str
    tflops: float


def peak_for_device_name(name: str) -> Optional[Peak]:
    """The dense bf16 peak of the GPU CUDA calls ``name``; None for a card not in the table."""
    for needle, label, tflops in sorted(PEAK_BF16_TFLOPS, key=lambda row: -len(row[0])):
        if needle in name:
            return Peak(label, tflops)
    return None

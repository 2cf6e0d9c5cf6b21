"""MFU peaks by full device name (issue 21, item 13): PCIe and NVL cards are not SXM cards."""

from __future__ import annotations

import pytest

from edlm_dist.training.peak_flops import Peak, peak_for_device_name


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H100 80GB HBM3", Peak("H100 SXM", 989.0)),
    ("NVIDIA H100 PCIe", Peak("H100 PCIe", 756.0)),
    ("NVIDIA H100 NVL", Peak("H100 NVL", 835.0)),
    ("NVIDIA H200", Peak("H200 SXM", 989.0)),
    ("NVIDIA H200 NVL", Peak("H200 NVL", 835.0)),
    ("NVIDIA GH200 480GB", Peak("GH200", 989.0)),
    ("NVIDIA A100-SXM4-80GB", Peak("A100", 312.0)),
    ("NVIDIA A100 80GB PCIe", Peak("A100", 312.0)),
    ("NVIDIA A10", Peak("A10", 125.0)),
    ("NVIDIA L4", Peak("L4", 121.0)),
    ("NVIDIA L40S", Peak("L40S", 362.0)),
])
def test_peak_is_matched_on_the_full_name(name, expected):
    assert peak_for_device_name(name) == expected


def test_unknown_card_gives_no_peak():
    assert peak_for_device_name("NVIDIA GeForce GTX 1080") is None

"""An apex installed without its compiled CUDA extensions imports fine and fails later: at the first
LayerNorm forward (``fused_layer_norm_cuda`` is imported lazily) or in FusedAdam's constructor. Both
must fall back to torch at construction (issue 21, item 10). The fake apex below behaves as such an
install does: the Python package imports, the extension does not, the constructor raises."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from edlm_dist.config.schema import TrainConfig
from edlm_dist.models import layers
from edlm_dist.parallel.deepspeed_engine import build_optimizer


@pytest.fixture
def apex_without_extensions(monkeypatch):
    calls = []

    def fused_layer_norm(x, shape, eps):  # what apex does: import the extension at the first call
        calls.append("forward")
        import fused_layer_norm_cuda  # noqa: F401 - absent, as in an apex built without --cuda_ext

    class FusedAdam:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("apex.optimizers.FusedAdam requires cuda extensions")

    modules = {"apex": types.ModuleType("apex"), "apex.normalization": types.ModuleType("apex.normalization"),
               "apex.normalization.fused_layer_norm": types.ModuleType("apex.normalization.fused_layer_norm"),
               "apex.optimizers": types.ModuleType("apex.optimizers")}
    modules["apex.normalization.fused_layer_norm"].fused_layer_norm = fused_layer_norm
    modules["apex.optimizers"].FusedAdam = FusedAdam
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "fused_layer_norm_cuda", raising=False)
    return calls


def test_layer_norm_without_apex_extension_uses_torch(apex_without_extensions):
    norm = layers.LayerNorm(8, use_apex=True)
    assert norm._apex is None  # decided at construction, not at the first GPU forward
    x = torch.randn(3, 8)
    torch.testing.assert_close(norm(x), F.layer_norm(x, (8,), eps=1e-5), rtol=0, atol=0)
    assert apex_without_extensions == []


def test_layer_norm_uses_apex_when_its_extension_imports(apex_without_extensions, monkeypatch):
    monkeypatch.setitem(sys.modules, "fused_layer_norm_cuda", types.ModuleType("fused_layer_norm_cuda"))
    assert layers.LayerNorm(8, use_apex=True)._apex is sys.modules["apex.normalization.fused_layer_norm"].fused_layer_norm


def test_fused_adam_without_extensions_falls_back_to_adamw(apex_without_extensions, caplog):
    params = [torch.nn.Parameter(torch.ones(3))]
    optimizer = build_optimizer(params, TrainConfig(), use_apex=True, device=torch.device("cuda", 0))
    assert type(optimizer) is torch.optim.AdamW
    assert "apex FusedAdam is not usable (apex.optimizers.FusedAdam requires cuda extensions)" in caplog.text

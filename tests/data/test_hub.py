"""Offline first: a hub name is looked up in the local cache before the network, and never on the network
under HF_HUB_OFFLINE=1 (the Gen PPL oracle included)."""

from __future__ import annotations

import pytest

from edlm_dist.data.hub import from_pretrained_offline_first
from edlm_dist.errors import DataError


class Loader:
    """Stands in for an Auto class: the cache holds ``cached``; the network answers every other name."""

    calls: list = []

    @classmethod
    def from_pretrained(cls, name, local_files_only=False, **kwargs):
        cls.calls.append((name, local_files_only))
        if local_files_only and name != "cached":
            raise OSError(f"{name} is not in the cache")
        return name


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    Loader.calls = []
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


def test_cache_first_then_network(tmp_path):
    assert from_pretrained_offline_first(Loader, "cached") == "cached"
    assert Loader.calls == [("cached", True)]
    assert from_pretrained_offline_first(Loader, "org/model") == "org/model"
    assert Loader.calls[1:] == [("org/model", True), ("org/model", False)]
    assert from_pretrained_offline_first(Loader, str(tmp_path)) == str(tmp_path)  # a folder: read directly
    assert Loader.calls[-1] == (str(tmp_path), False)


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_variables_forbid_the_network(monkeypatch, variable):
    monkeypatch.setenv(variable, "1")
    with pytest.raises(OSError, match="not in the cache"):
        from_pretrained_offline_first(Loader, "org/model")
    assert Loader.calls == [("org/model", True)]


def test_gen_ppl_oracle_hub_name_fails_at_once_offline(monkeypatch):
    from edlm_dist.evaluation.genppl import HFCausalLMOracle

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="cannot load Gen PPL oracle someone/not-cached-anywhere"):
        HFCausalLMOracle("someone/not-cached-anywhere")

"""Bottleneck adapters' room (Houlsby / Pfeiffer; peft has none): `config` (BottleneckAdapterConfig), `layer`
(BottleneckAdapter, AdapterAfter), `model` (injection, save format, loading)."""
from fastft.integration.methods.adapter.config import BottleneckAdapterConfig
from fastft.integration.methods.adapter.layer import AdapterAfter, BottleneckAdapter
from fastft.integration.methods.adapter.model import (
    BottleneckAdapterModel,
    get_adapter_model,
    is_bottleneck_adapter,
    load_bottleneck_adapter,
)

__all__ = ["AdapterAfter", "BottleneckAdapter", "BottleneckAdapterConfig", "BottleneckAdapterModel",
           "get_adapter_model", "is_bottleneck_adapter", "load_bottleneck_adapter"]

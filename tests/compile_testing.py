"""Shared by the tests of compiled decoding: transformers' automatic compilation made to run on the CPU, with a
backend that records the graphs it is handed."""

from __future__ import annotations

import pytest
import torch
from transformers import CompileConfig


class GraphRecorder:
    """Keeps every graph dynamo hands its `backend`, which runs them as traced. (`CompileConfig` deep-copies its
    backend: a function survives that as itself, an object would not.)"""

    def __init__(self) -> None:
        self.graphs = []

        def backend(graph_module, example_inputs):
            self.graphs.append(graph_module)
            return graph_module.forward

        self.backend = backend


def compile_config(backend) -> CompileConfig:
    """`generate`'s compilation of its decoding step with `backend`, fullgraph (a graph break fails), on any device."""
    config = CompileConfig(backend=backend, fullgraph=True, mode=None)
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told otherwise
    return config


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()

"""FlockParse: keep an Ollama cluster's models on GPU. The core as a plain Python API.

`from flockparse import OllamaLoadBalancer, GPUController` (loaded on first use, so that `gpu_controller`,
which the package's own modules import, can import `flockparse.rules` without a cycle).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.2.0"
__all__ = ["GPUController", "OllamaLoadBalancer", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "OllamaLoadBalancer":
        from flockparse.balancer import OllamaLoadBalancer

        return OllamaLoadBalancer
    if name == "GPUController":
        from gpu_controller import GPUController

        return GPUController
    raise AttributeError(f"module 'flockparse' has no attribute {name!r}")

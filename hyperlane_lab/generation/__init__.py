"""Generation: sampling, stop strings, the token loop, and the in-process pipeline."""

from typing import Any

from hyperlane_lab.generation.driver import GenerationResult, GenerationTimings, TextGenerator
from hyperlane_lab.generation.sampling import Sampler, filter_logits

__all__ = [
    "GenerationResult",
    "GenerationTimings",
    "InProcessPipeline",
    "Sampler",
    "TextGenerator",
    "filter_logits",
]


def __getattr__(name: str) -> Any:  # the pipeline pulls in model loading; import it on first use
    if name == "InProcessPipeline":
        from hyperlane_lab.generation.pipeline import InProcessPipeline

        return InProcessPipeline
    raise AttributeError(name)

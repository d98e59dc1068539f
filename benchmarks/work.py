"""The unit of work every figure runs: one llama.cpp completion, the same on every path.

Corral receives it as a ``generate`` step's input; the baselines make the identical call on
a ``llama_cpp.Llama`` loaded with the same parameters as Corral's worker runtime
(``workers.runtime.LlamaCppRuntime``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class GenCall:
    """One completion: prompt and sampling, as a step input and as llama.cpp arguments."""

    prompt: str = "The first step says"
    max_tokens: int = 16
    temperature: float = 0.0
    seed: int = 1
    ignore_eos: bool = False
    # Corral's GenerateInput defaults, passed explicitly so both paths sample alike.
    top_p: float = 0.95
    top_k: int = 40
    repeat_penalty: float = 1.0

    def step_input(self) -> dict[str, Any]:
        """The ``input`` of a Corral ``generate`` step."""
        return {
            "prompt": self.prompt,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "seed": self.seed,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repeat_penalty": self.repeat_penalty,
            "ignore_eos": self.ignore_eos,
        }

    def step(self, step_id: str, model: str, **extra: Any) -> dict[str, Any]:
        """A whole ``generate`` step of a workflow spec."""
        return {
            "id": step_id,
            "kind": "generate",
            "model": model,
            "input": self.step_input(),
            **extra,
        }

    def llama_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``Llama.create_completion`` (besides the prompt)."""
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repeat_penalty": self.repeat_penalty,
            "seed": self.seed,
            "stop": [],
        }

    def as_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, **self.llama_kwargs(), "ignore_eos": self.ignore_eos}


def load_llama(path: Path, n_ctx: int, n_gpu_layers: int = 0, *, plain: bool = False) -> Any:
    """A model loaded exactly as Corral's worker loads a chat model, in the same class.

    The baselines make the same call as Corral's runtime (its ``llama_cpp.Llama`` subclass,
    whose detokenization is incremental), so the figures measure Corral's plumbing, not that
    difference; ``plain`` gives ``llama_cpp.Llama`` as shipped (``benchmarks.runtime_cost``).
    """
    from llama_cpp import Llama

    from workers.runtime import llama_class

    return (Llama if plain else llama_class())(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=min(512, n_ctx),
        n_ubatch=min(512, n_ctx),
        embedding=False,
        n_gpu_layers=n_gpu_layers,
        seed=0,
        verbose=False,
    )


def no_eos(llm: Any) -> Any:
    """A logits processor that never lets the model end (``ignore_eos``), as Corral's."""
    import numpy as np
    from llama_cpp import LogitsProcessorList

    eos = int(llm.token_eos())

    def process(_ids: Any, scores: Any) -> Any:
        scores[eos] = -np.inf
        return scores

    return LogitsProcessorList([process])


def complete(llm: Any, call: GenCall) -> dict[str, Any]:
    """Make ``call`` on a loaded model; returns llama-cpp-python's completion dict."""
    kwargs = call.llama_kwargs()
    if call.ignore_eos:
        kwargs["logits_processor"] = no_eos(llm)
    out: dict[str, Any] = llm.create_completion(call.prompt, **kwargs)
    return out

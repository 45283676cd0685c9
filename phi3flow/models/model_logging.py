"""What both log steps hand `log_model` alike: the example request and the pinned requirements.

Each model's own options are in its module (transformers_model.py, onnx_model.py); these are the
parts that must be the same for both, so that the two logged models answer the same example and
pin their runtime the same way.
"""

from __future__ import annotations

import importlib.metadata

CHAT_EXAMPLE = {
    "messages": [{"role": "user", "content": "What is the capital of Spain?"}],
    # Small, so MLflow's check of the example at log time stays cheap on the full model.
    "max_tokens": 8,
}


def pinned_requirements(distributions: tuple[str, ...]) -> list[str]:
    """`dist==version` for each distribution, at the version installed here (that logged it)."""
    pins = []
    for dist in distributions:
        version = importlib.metadata.version(dist).split("+")[0]  # torch 2.13.0+cpu -> 2.13.0
        pins.append(f"{dist}=={version}")
    return pins

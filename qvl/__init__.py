"""qvl: Qwen2-VL inference — library, offline engine, OpenAI-compatible server and CLI.

Public API (imported lazily so `import qvl` stays cheap and `qvl tokens` needs no model):
  LLM, EngineConfig, SamplingParams, StructuredOutputsParams, process_image, process_video, smart_resize, VisionInput
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "qvl.llm",
    "EngineConfig": "qvl.config",
    "SamplingParams": "qvl.sampling_params",
    "StructuredOutputsParams": "qvl.sampling_params",
    "process_image": "qvl.multimodal.image",
    "process_video": "qvl.multimodal.video",
    "smart_resize": "qvl.multimodal.image",
    "VisionInput": "qvl.multimodal.image",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qvl' has no attribute {name!r}")

"""From an EngineConfig to what an LLMEngine is built from: device, dtype, weights, tokenizer, workers.

  load_engine_parts(cfg)             -> EngineParts: torch threads set first (cfg.threads), the chat
      template file read before any weight (a missing file fails fast), the checkpoint resolved (a hub id is
      downloaded), with tensor_parallel_size > 1 the model checked for sharding and the worker ranks started
      (qvl.engine.executor) before rank 0 loads its own shard, the weights on the device in the dtype, the
      tokenizer with its chat template, generation_config.json's defaults. A failure after the workers
      started shuts them down. Device and dtype strings: qvl.build.resolve_device / resolve_dtype.

Knows nothing about scheduling or steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qvl.config import EngineConfig
from qvl.multimodal.prompt import read_chat_template


@dataclass
class EngineParts:
    model: object
    config: object
    processor: object
    generation_config: dict
    model_path: str
    executor: object | None          # qvl.engine.executor.TPExecutor when tensor_parallel_size > 1


def load_engine_parts(cfg: EngineConfig) -> EngineParts:
    from qvl.build import load_model, resolve_device, resolve_dtype, resolve_model_path
    from qvl.multimodal.prompt import PromptProcessor
    from qvl.sampling_params import load_generation_config

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    template = read_chat_template(cfg.chat_template)     # a missing file fails before the weights load
    device = resolve_device(cfg.device)
    path = resolve_model_path(cfg.model_path)
    executor, tp = None, {}
    if cfg.tensor_parallel_size > 1:        # refuse an unshardable model before starting any process
        from qvl.engine.executor import TPExecutor, check_tensor_parallel

        check_tensor_parallel(path, cfg)
        executor = TPExecutor.launch(cfg, device)
        device, tp = executor.device, {"tp": executor.tp_info}
    try:
        net, config = load_model(path, dtype=resolve_dtype(cfg.dtype, device), device=device,
                                 quantization=cfg.quantization, **tp)
        processor = PromptProcessor.from_pretrained(path, config, chat_template=template)
        return EngineParts(net, config, processor, load_generation_config(path), str(path), executor)
    except BaseException:
        if executor is not None:
            executor.shutdown()
        raise

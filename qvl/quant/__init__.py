"""Weight-only quantization: which checkpoints and on-the-fly methods qvl runs, and how.

  spec.py      QuantSpec and `resolve(quantization_config, requested)`: the checkpoint's
               `quantization_config` (config.json) and/or EngineConfig.quantization -> one QuantSpec or
               None; every unsupported method or setting is refused here with a one-line ValueError.
  formats.py   the packed checkpoint formats (GPTQ v1/v2, AWQ gemm) -> integer weights, zeros, scales.
  onthefly.py  float weights -> symmetric int8 (per output channel) / int4 (per group of 128).
  transform.py the structural transform: the family's quantizable nn.Linears -> QuantLinear modules
               (qvl.layers.linear) that load their own tensors by name.

The numerics (float32 path = F.linear(x, dequantized W) exactly) live in qvl.layers.linear.
Knows nothing about the engine or files; qvl.build drives it.
"""
from qvl.quant.spec import METHODS, QuantSpec, resolve  # noqa: F401

__all__ = ["METHODS", "QuantSpec", "resolve"]

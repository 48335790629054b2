"""Tensor parallelism over torch.distributed: the text decoder split across ranks (GPUs or processes).

  shard.py   TPInfo, check_shardable, shard_model: the transform that turns a built (meta) model into
             rank r's shard, and which parts only rank 0 holds
  linear.py  row-parallel linears (float and quantized) and the all-reduce
  slices.py  which slice of each stored tensor a rank reads (float, GPTQ, AWQ), read memory-mapped
Process groups, workers and the executor that drives the ranks live beside these (group.py, worker.py,
qvl.engine.executor); qvl.build.load_model(..., tp=TPInfo) loads a shard.
"""

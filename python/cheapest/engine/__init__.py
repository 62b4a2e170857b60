"""Runtime: load a model directory (cheapest.model_layout), schedule, batch, sample.

  types        the Engine protocol the HTTP layer programs against, and its value types
  loader       the directory's config and tokenizer; ONNX Runtime sessions on the best provider
  runner       one session and its KV cache, run as batch rows
  batching     continuous batching in one scheduler thread
  sampling     next-token choice
  chat         the model's chat template, rendered in a sandbox
  onnx_engine  `load_engine`: the Engine built from all of the above

Nothing here imports the converter; the two share only cheapest.model_layout.
"""

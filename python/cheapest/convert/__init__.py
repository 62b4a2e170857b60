"""Offline: GGUF files -> model directories (cheapest.model_layout), and `cheapest model pull / convert`.

  gguf_reader      hyper-parameters, tokenizer data and raw tensors of a GGUF
  quant_blocks     GGUF blocks -> dense or MatMulNBits weights, without re-quantizing
  graph_builder    a deterministic ONNX graph builder and the graphs' shared inputs and outputs
  graph_fused      the served graph (ONNX Runtime contrib operators)
  graph_reference  the fp32 reference graph (plain ONNX operators)
  tokenizer_build  tokenizer.json / tokenizer_config.json from the GGUF's vocabulary
  converter        writes the directory atomically, with its manifest
  pull, commands   model supply and the CLI

Nothing here is imported by the engine; the two share only cheapest.model_layout.
"""

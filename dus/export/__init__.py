"""GGUF export: the end of the pipeline, where llama.cpp and the tools built on it start.

families (llama.cpp's view of each family, as data) -> hparams (config as GGUF keys) ->
vocab (tokenizer as GGUF vocabulary) -> tensors (the streamed tensor plan) -> run (the
atomic writer); ollama writes an optional Modelfile beside the GGUF.
"""

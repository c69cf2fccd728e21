"""Checkpoint converters: Hugging Face safetensors or llama.cpp GGUF -> edgemoe model directory
(docs/format.md, docs/gguf.md).

- `hf`: opening a checkpoint and mapping its tensors through the architecture files' layouts.
- `gguf`, `gguf_vocab`: the same for a GGUF file, and its tokenizer rebuilt from the metadata.
- `convert`: `convert(src, dst, bits=16|8|4, ...)`, the whole conversion.

They build on the format layer (edgemoe.format: safetensors, manifest, quantized layouts)
and the architecture files (edgemoe.models); `edgemoe convert` is edgemoe.cli.convert.
"""

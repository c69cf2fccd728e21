"""Checkpoint converters: Hugging Face safetensors -> edgemoe model directory (docs/format.md).

- `hf`: opening a checkpoint and mapping its tensors through the architecture files' layouts.
- `convert`: `convert(src, dst, bits=16|8|4, ...)`, the whole conversion.

They build on the format layer (edgemoe.format: safetensors, manifest, quantized layouts)
and the architecture files (edgemoe.models); `edgemoe convert` is edgemoe.cli.convert.
"""

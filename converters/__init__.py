"""Checkpoint converters: Hugging Face safetensors -> edgemoe model directory (FORMAT.md).

- `safetensors_io`: torch-free safetensors reader (`read_safetensors`, `SafetensorsFile`) and writer.
- `hf`: opening a checkpoint and the per-architecture name tables.
- `convert`: `convert(src, dst, bits=16|8|4, ...)`, the whole conversion.
- `cli`: `edgemoe convert SRC -o DST`.
"""

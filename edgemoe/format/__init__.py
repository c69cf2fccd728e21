"""The model directory's on-disk contract (docs/format.md): manifest.json, the quantized-matrix
and expert-blob layouts, safetensors reading and writing, and the routing profile files.
Plain numpy; nothing here runs a model."""

"""Benchmarks: expert-loading modes side by side (modes), the comparison with llama.cpp on
the same weights and memory limits (llama_cpp, llama_cpp_worker), and the bench models
(synth). `edgemoe bench` is edgemoe.cli.bench."""

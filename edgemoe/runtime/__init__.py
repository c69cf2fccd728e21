"""The engine that loads and runs a converted model directory: `Model` and `load` (engine),
`StreamOptions` (options), the tokenizer, sampling, routing traces, the live prefetcher
and readable statistics."""

"""Offline work on a model: routing traces' statistics and predictor fitting (routing,
predictors), per-expert importance and bitwidth allocation (importance, allocate), cache
simulation (simulate), perplexity (evaluate), and the shipped default model (default_model)."""

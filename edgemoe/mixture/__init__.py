"""A mixture of edge models: several whole specialist models, a gate that weighs them per
request, and a selection of the specialists to enable under latency and energy budgets."""

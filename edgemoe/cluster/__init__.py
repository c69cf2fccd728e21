"""Several devices for one model: which experts live on which device (placement). The Ray
runtime that carries the hidden states builds on it; nothing here imports ray."""

"""Several devices for one model: placement of experts across devices (placement), and
settings for one device from what it has free (settings). The Ray runtime that carries the
hidden states builds on these; nothing here imports ray."""

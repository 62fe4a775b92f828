"""Using a model without training it: KV-cache generation and layer-major evaluation (loss, perplexity)."""

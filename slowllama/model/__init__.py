"""What the network computes: the architecture description (ModelArgs), its modules with Meta's names, LoRA adapters."""

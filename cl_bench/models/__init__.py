"""Models: loading local LLaVA folders, prompts and batches, LoRA, stage deltas, encoders."""

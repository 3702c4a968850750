"""MR-LoRA: isolated expert LoRAs per task, chosen per sample by an MLLM router LoRA."""

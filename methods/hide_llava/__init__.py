"""HiDe-LLaVA: top-layer LoRA experts routed by anchors, the other layers fused."""

"""SAME: stabilised MoE-LoRA (spectral router updates, curvature-scaled experts, adaptive expert
freezing) with a CLIP-anchor routing prior at inference."""

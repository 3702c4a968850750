"""ModalPrompt: per-task prompts chosen by dual-modality (image + text) prototype similarity."""

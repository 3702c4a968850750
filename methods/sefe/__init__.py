"""SEFE: answer-style-diversified data and RegLoRA (``reglora``: RegLoRA alone)."""

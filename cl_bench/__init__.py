"""cl-bench: continual instruction tuning benchmark harness for multimodal LLMs."""

__version__ = "0.1.0"

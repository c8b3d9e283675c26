"""evomerge: find the best merge of LLM checkpoints automatically."""

__version__ = "0.1.0"

"""minigpts: turn a general causal LM plus a domain corpus into a smaller, faster domain model."""

__version__ = "0.1.0"

"""minigpts: turn a general causal LM plus a domain corpus into a smaller, faster domain model.

The Python API mirrors the command line::

    import minigpts
    loaded = minigpts.load_model("smollm2-135m")
    corpus = minigpts.load_corpus("law.*.jsonl")
    stats = minigpts.analyze(loaded.model, windows)            # per-unit activation statistics
    plan = minigpts.plan(loaded.model, stats, mlp_ratio=0.5)   # which units survive
    minigpts.prune(loaded.model, plan)                         # physical surgery, in place
    minigpts.evaluate(loaded.model, loaded.tokenizer, corpus.split("test"), model_name="pruned")
    model, tokenizer = minigpts.load("out-dir")                # any directory minigpts saved
"""

from __future__ import annotations

__version__ = "0.1.0"

_API = {
    "analyze": ("minigpts.analysis", "analyze"),
    "plan": ("minigpts.plan", "make_plan"),
    "prune": ("minigpts.surgery", "apply_plan"),
    "evaluate": ("minigpts.evaluation", "evaluate"),
    "load": ("minigpts.export", "load"),
    "save": ("minigpts.export", "save_model"),
    "load_model": ("minigpts.models", "load_model"),
    "load_corpus": ("minigpts.data", "load_corpus"),
    "finetune": ("minigpts.recovery", "finetune"),
    "evaluate_mcq": ("minigpts.mcq", "evaluate_mcq"),
    "trim_tokenizer": ("minigpts.vocab", "trim_tokenizer"),
    "select_vocab": ("minigpts.vocab", "select_vocab"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    """Import lazily so `import minigpts` (and the CLI's --help) stays fast."""
    if name in _API:
        import importlib

        module, attr = _API[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'minigpts' has no attribute {name!r}")

"""Save a pruned model as a Hugging Face directory any tool can load, and load it back.

Uniform widths load with plain `AutoModelForCausalLM.from_pretrained(DIR)`. Widths that differ per
layer are described by transformers' `per_layer_config`, which its modeling classes do not read yet:
such a directory also carries `modeling_minigpts.py` (torch + transformers only) and an `auto_map`,
so `from_pretrained(DIR, trust_remote_code=True)` loads it. The directory is written next to its
destination and renamed into place at the end, so a crash never leaves half a model under DIR.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

import minigpts
from minigpts.arch import get_adapter
from minigpts.errors import UserError
from minigpts.evaluation import count_parameters
from minigpts.plan import PruningPlan
from minigpts.surgery import layer_widths

MODELING_FILE = "modeling_minigpts.py"
METADATA_FILE = "minigpts.json"

_MODELING_TEMPLATE = '''"""Builds a minigpts-pruned {model_type} model whose widths transformers' own class cannot express.

Written by minigpts {version}. Every decoder layer is rebuilt from its own config,
`config.per_layer_config[i]`. Imports only torch and transformers; once transformers builds layers from
per_layer_config itself, plain `from_pretrained(DIR)` will do and this file will not be needed.
"""

from transformers.models.{module}.modeling_{module} import {causal_lm}, {decoder_layer}


{builder}

class {class_name}({causal_lm}):
    def __init__(self, config):
        # The parent builds everything but the decoder layers; each layer is built from its own config.
        num_layers = config.num_hidden_layers
        config.num_hidden_layers = 0
        try:
            super().__init__(config)
        finally:
            config.num_hidden_layers = num_layers
        for index, layer_config in enumerate(config.per_layer_config):
            layer = build_layer(layer_config, index)
            for module in layer.modules():
                if hasattr(module, "config"):
                    module.config = config  # run-time settings (attention implementation) follow the model
            self.{layers_path}.append(layer)
'''


def needs_remote_code(model: nn.Module) -> bool:
    """True when plain from_pretrained cannot rebuild this model: per-layer widths or family limits."""
    config = model.config
    return config.is_heterogeneous or get_adapter(model).needs_remote_code(config)


def modeling_source(model: nn.Module) -> tuple[str, str]:
    """(class name, source of modeling_minigpts.py) for this model's family."""
    adapter = get_adapter(model)
    module, causal_lm, decoder_layer = adapter.modeling_names(model.config)
    class_name = f"Minigpts{causal_lm}"
    source = _MODELING_TEMPLATE.format(
        model_type=model.config.model_type,
        version=minigpts.__version__,
        module=module,
        causal_lm=causal_lm,
        decoder_layer=decoder_layer,
        builder=adapter.remote_layer_builder.format(decoder_layer=decoder_layer).strip() + "\n",
        class_name=class_name,
        layers_path=f"{adapter.body_path}.{adapter.layers_path}",
    )
    return class_name, source


def save_model(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    plan: PruningPlan | None = None,
    metadata: dict[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Write `model` (+ tokenizer, plan, metadata, model card) as a Hugging Face directory at out_dir.

    metadata is free-form JSON (stats provenance, base model name...); `metadata["metrics"]`, if given
    as {model label: {metric: value}} (e.g. {"base": {...}, "pruned": {...}}), becomes a table in the
    card, and `metadata["base_model"]` / `metadata["params_before"]` are shown there too.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a directory: pick another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise UserError(f"--out {out_dir} is not empty: pass --force to replace it or pick another --out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        _write(model, tokenizer, staging, plan, metadata or {})
        _move_into_place(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir


def _write(model: nn.Module, tokenizer: Any, path: Path, plan: PruningPlan | None, metadata: dict) -> None:
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    remote = needs_remote_code(model)
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    (path / MODELING_FILE).unlink(missing_ok=True)  # a model loaded with remote code re-saves it
    config.pop("auto_map", None)
    if remote:
        class_name, source = modeling_source(model)
        (path / MODELING_FILE).write_text(source)
        config["auto_map"] = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{class_name}"}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    layout = "per-layer" if model.config.is_heterogeneous else "uniform"
    info = {
        "minigpts_version": minigpts.__version__,
        "layout": layout,
        "trust_remote_code": remote,
        "parameters": count_parameters(model)[0],
        "plan": plan.to_dict() if plan is not None else None,
        "metadata": metadata,
    }
    (path / METADATA_FILE).write_text(json.dumps(info, indent=1, default=str) + "\n")
    (path / "README.md").write_text(model_card(model, plan, metadata, remote))


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename the finished directory to out_dir; an old out_dir is renamed away first, then deleted."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        out_dir.rename(old)
    try:
        staging.rename(out_dir)
    except OSError:
        if old is not None:
            old.rename(out_dir)
        raise
    if old is not None:
        shutil.rmtree(old)


def _range_text(values: list[int]) -> str:
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}–{high}"


def model_card(model: nn.Module, plan: PruningPlan | None, metadata: dict, remote: bool) -> str:
    """A README.md: what was pruned, how big it is now, the metrics given, how to load it."""
    adapter = get_adapter(model)
    widths = layer_widths(model)
    base = metadata.get("base_model") or (plan.settings.get("model") if plan else None)
    params_after = count_parameters(model)[0]
    params_before = metadata.get("params_before") or (plan.summary.get("params_before") if plan else None)
    lines = [
        "---",
        "library_name: transformers",
        "tags: [minigpts, pruned, contextual-pruning]",
        "---",
        "",
        "# Pruned with minigpts",
        "",
        (f"Pruned from `{base}` " if base else "Pruned ")
        + f"by minigpts {minigpts.__version__}: contextual pruning (Mini-GPTs, arXiv 2312.12682) with the "
        "units physically removed, so the weights are smaller, not masked.",
        "",
        "| | value |",
        "|---|---|",
        f"| family | {adapter.family} ({model.config.model_type}) |",
    ]
    if plan is not None:
        lines.append(f"| criterion | {plan.criterion} |")
        lines.append(f"| layout | {plan.layout} |")
    if params_before:
        lines.append(f"| parameters before | {int(params_before):,} |")
    lines.append(f"| parameters after | {params_after:,} |")
    if params_before:
        lines.append(f"| relative size | {params_after / int(params_before):.1%} |")
    lines.append(f"| decoder layers | {len(widths)} |")
    lines.append(f"| hidden size | {adapter.hidden_size(model)} |")
    lines.append(f"| MLP width per layer | {_range_text([w[adapter.mlp_width_field] for w in widths])} |")
    lines.append(f"| attention heads per layer | {_range_text([w[adapter.heads_field] for w in widths])} |")
    if adapter.kv_heads_field is not None:
        lines.append(f"| KV heads per layer | {_range_text([w[adapter.kv_heads_field] for w in widths])} |")
    metrics = metadata.get("metrics")
    if metrics:
        labels = list(metrics)
        names = list(dict.fromkeys(name for label in labels for name in metrics[label]))
        lines += ["", "## Metrics", "", "| metric | " + " | ".join(labels) + " |"]
        lines.append("|---|" + "---|" * len(labels))
        for name in names:
            cells = [_cell(metrics[label].get(name)) for label in labels]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    remote_arg = ", trust_remote_code=True" if remote else ""
    lines += [
        "",
        "## Load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("path/to/this/dir"{remote_arg})',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/dir")',
        "```",
        "",
        'or `model, tokenizer = minigpts.load("path/to/this/dir")`.',
    ]
    if remote:
        lines += [
            "",
            f"transformers' own `{model.config.architectures[0]}` cannot build these widths (layers of "
            "different widths, recorded in `per_layer_config`, or attention narrower than the family's code "
            f"assumes); `{MODELING_FILE}` (torch + transformers only) does, hence `trust_remote_code`.",
        ]
    lines += ["", f"The pruning plan and provenance are in `{METADATA_FILE}`.", ""]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer) from a directory written by save_model, uniform or per-layer; eval mode.

    The tokenizer is None when the directory has none.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UserError(f"{path} is not a saved model directory (no config.json): pass the --out of `prune`")
    remote = "auto_map" in json.loads(config_path.read_text())
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=remote, dtype=dtype)
    model.to(device).eval()
    has_tokenizer = any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(path) if has_tokenizer else None
    return model, tokenizer

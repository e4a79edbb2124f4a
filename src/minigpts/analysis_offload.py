"""Layer-by-layer analysis for models larger than memory (sequential onloading, as llm-compressor does).

``analyze_offloaded(model_dir, windows, ...)`` gives the statistics of ``minigpts.analysis.analyze``
without ever holding the whole model: the model is built on the meta device (accelerate's
``init_empty_weights``), then

1. the modules of the body outside the decoder layers (embedding, learned positions, ...) are read
   from the safetensors file(s) and the model's own ``body.forward`` runs over every calibration
   batch with its decoder layers replaced by stand-ins that record what each layer is called with:
   the hidden states entering the first layer (kept on the CPU, one tensor per batch) and, per
   layer, the other arguments (causal or sliding-window mask, rotary ``position_embeddings`` from
   the model's own ``rotary_emb``, ``position_ids``: whatever that family's forward prepares);
   those modules are then freed;
2. each decoder layer in turn is read (only its tensors, with ``safe_open``), every batch's hidden
   states go through it with the recorded arguments, and it is freed again.

The statistics are recorded by ``analyze``'s own hooks (``analyze(..., run_body=...)``), so they are
those of the in-memory pass: bit-identical activations (same batches, same kernels), the same
float64 sums. With ``moments=True``, as soon as a layer has seen every batch its (width)² float64
second-moment sums are reduced across processes, their means written as float32 (as the statistics
file stores them) to a per-layer file in a temporary directory (under ``work_dir``) and freed: the
result's ``mlp_gram`` / ``attn_gram`` read each layer from its file when indexed (the directory
lives as long as they do), and ``ActivationStats.save`` copies them into the statistics file one at
a time. Peak memory ≈ the largest of (the embedding, one decoder layer) + the calibration hidden
states + the per-unit vectors + one layer's second moments.

The gradient pass (``fisher_tokens``) is also run layer by layer: the forward stores each layer's
input hidden states of the gradient windows in a temporary directory, the loss gradient at the last
layer's output comes from the model's own final norm, LM head and loss, then the layers are read
again in reverse order and each one's gradient is back-propagated from its recomputed output.
The Taylor (``taylor_tokens``) and layer-removal (``depth_tokens``) passes need the whole model and
are refused with the option that turns them off.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from minigpts.errors import UserError
from minigpts.options import CommandOptions, flag_of

if TYPE_CHECKING:
    from minigpts.analysis import ActivationStats

# families whose body forward calls every decoder layer as ``hidden = layer(hidden, ...)`` with
# arguments that depend only on the batch's shape (checked against the in-memory pass in the tests)
SEQUENTIAL_FAMILIES = ("llama", "phi", "opt", "phi3", "gemma", "gpt_neox", "stablelm", "gpt2")

FLAG = flag_of(CommandOptions, "offload")


class _Stop(Exception):
    """Raised by the last stand-in layer: nothing after the decoder layers is needed."""


class _StandIn(nn.Module):
    """Takes a decoder layer's place in the body's forward and records how it is called."""

    def __init__(self, layer: nn.Module, index: int, record):
        super().__init__()
        object.__setattr__(self, "_layer", layer)  # not a submodule: its hooks must not run
        object.__setattr__(self, "_record", record)
        self.index = index

    def __getattr__(self, name: str) -> Any:  # attributes the body reads (attention_type, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        return self._record(self.index, hidden, rest, kwargs)


class _Checkpoint:
    """Where each tensor of a safetensors checkpoint (one file or an index of shards) lives."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (directory / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise UserError(
                f"{FLAG}: {directory} has no model.safetensors (nor model.safetensors.index.json); "
                "layer-by-layer work reads safetensors only"
            )
        self.where: dict[str, Path] = {}
        for name in files:
            with safe_open(str(directory / name), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118
                    self.where[key] = directory / name

        self.renamed: dict[str, str] = {}  # the model's name -> the checkpoint's key, where they differ

    def rename_as(self, model: nn.Module) -> None:
        """Apply the key renamings transformers' loading applies for this model (GPT-NeoX's embed_out -> lm_head)."""
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightRenaming, rename_source_key

            transforms = get_model_conversion_mapping(model)
        except ImportError:  # an older transformers: checkpoints use the modules' own names
            return
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
        if not renamings and not converters:
            return
        meta = model.state_dict()
        for key in self.where:
            name, converter = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
            if converter is not None:
                raise UserError(
                    f"{FLAG}: this checkpoint's tensors are converted when loaded ({key!r}); layer-by-layer "
                    "analysis reads them as stored: analyse this model without --offload"
                )
            if name != key:
                self.renamed[name] = key

    def saved_name(self, name: str) -> str:
        """The key ``save_pretrained`` writes for the model's tensor ``name``: the checkpoint's own name
        where loading renames it (GPT-NeoX's embed_out), else ``name`` (with the base-model prefix)."""
        return self.renamed.get(name, name)

    def key(self, name: str, base_prefix: str) -> str | None:
        """The checkpoint's key of the model's tensor ``name`` (base-model checkpoints lack the prefix)."""
        if name in self.renamed:
            return self.renamed[name]
        if name in self.where:
            return name
        if base_prefix and name.startswith(base_prefix + "."):
            stripped = name[len(base_prefix) + 1 :]
            if stripped in self.where:
                return stripped
        return None

    def read(
        self, keys: list[str], dtype: torch.dtype, rows: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Only these tensors (floating ones in ``dtype``), read in blocks of at most READ_BYTES.

        ``rows``: of these keys, only these rows (``_Blocks.rows``).

        safetensors maps the file: every page read stays in this process's resident memory until
        the file is closed, so the file is reopened after each block; a tensor larger than a block
        is read by rows into its (already converted) destination. Memory: the tensors + one block.
        """
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.where[key], []).append(key)
        tensors = {}
        for path, names in by_file.items():
            with _Blocks(path) as blocks:
                for key in names:
                    if rows and key in rows:
                        tensors[key] = blocks.rows(key, rows[key], dtype)
                    else:
                        tensors[key] = blocks.tensor(key, dtype)
        return tensors


READ_BYTES = 32 * 2**20  # per opening of a safetensors file (its mapped pages are resident until closed)


class _Blocks:
    """A safetensors file opened anew after every READ_BYTES read from it."""

    def __init__(self, path: Path):
        self.path, self.opened, self.handle, self.read = path, None, None, 0

    def __enter__(self) -> _Blocks:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.opened is not None:
            self.opened.__exit__(None, None, None)
        self.opened = self.handle = None
        self.read = 0

    def get(self, nbytes: int):
        from safetensors import safe_open

        if self.handle is not None and self.read + nbytes > READ_BYTES and self.read > 0:
            self.close()
        if self.handle is None:
            self.opened = safe_open(str(self.path), framework="pt", device="cpu")
            self.handle = self.opened.__enter__()
        self.read += nbytes
        return self.handle

    def tensor(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        handle = self.get(0)
        view = handle.get_slice(key)
        stored = view.get_dtype()
        if stored not in _FLOATS or _FLOATS[stored] == dtype:
            # no conversion: a zero-copy view of the mapped file, whose pages become resident only
            # as they are used (the embedding: only the rows of the calibration tokens)
            return handle.get_tensor(key)
        shape = list(view.get_shape())
        size = _DTYPE_BYTES.get(stored, 8)
        nbytes = size * (int(torch.Size(shape).numel()) if shape else 1)
        if nbytes <= READ_BYTES or len(shape) == 0:
            tensor = self.get(nbytes).get_tensor(key)
            return tensor.to(dtype) if tensor.is_floating_point() else tensor
        row_bytes = nbytes // shape[0]
        rows = max(1, READ_BYTES // row_bytes)
        out = None
        for start in range(0, shape[0], rows):
            stop = min(shape[0], start + rows)
            part = self.get((stop - start) * row_bytes).get_slice(key)[start:stop]
            if out is None:
                out = torch.empty(shape, dtype=dtype if part.is_floating_point() else part.dtype)
            out[start:stop].copy_(part)
            del part
        return out

    def rows(self, key: str, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The tensor with only rows ``indices`` read; the others are left unwritten (not resident)."""
        view = self.get(0).get_slice(key)
        shape = list(view.get_shape())
        stored = view.get_dtype()
        out = torch.empty(shape, dtype=dtype if stored in _FLOATS else _INTS.get(stored, torch.int64))
        row_bytes = _DTYPE_BYTES.get(stored, 8) * (
            int(torch.Size(shape[1:]).numel()) if len(shape) > 1 else 1
        )
        indices = torch.unique(indices.flatten()).tolist()
        start = 0
        while start < len(indices):  # runs of consecutive rows
            stop = start + 1
            while stop < len(indices) and indices[stop] == indices[stop - 1] + 1:
                stop += 1
            first, last = indices[start], indices[stop - 1] + 1
            # a page fault maps the file's pages around it too (fault-around, 64 KiB): count those
            part = self.get(max((last - first) * row_bytes, 2**16)).get_slice(key)[first:last]
            out[first:last].copy_(part)
            del part
            start = stop
        return out


_INTS = {"I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8}
_INTS |= {"BOOL": torch.bool}
_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_FLOATS |= {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2}
_DTYPE_BYTES |= {"U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class _Onloader:
    """Moves modules of a meta-device model to real weights read from the checkpoint, and back."""

    def __init__(self, model: nn.Module, checkpoint: _Checkpoint, dtype: torch.dtype, device: torch.device):
        self.model, self.checkpoint, self.dtype, self.device = model, checkpoint, dtype, device
        self.names = {id(m): n for n, m in model.named_modules()}
        self.base_prefix = getattr(model, "base_model_prefix", "") or ""

    def load(
        self,
        module: nn.Module,
        skip: tuple[nn.Module, ...] = (),
        rows: tuple[nn.Parameter, torch.Tensor] | None = None,
    ) -> None:
        """Read every parameter (and stored buffer) of ``module`` except those inside ``skip``.

        ``rows`` (a parameter, row indices): of that one, only these rows (the embedding's rows of
        the calibration tokens; its other rows are left unwritten, so never resident).
        """
        skipped = {id(p) for s in skip for p in list(s.parameters()) + list(s.buffers())}
        prefix = self.names[id(module)]
        wanted: dict[str, tuple[nn.Module, str, bool]] = {}
        for owner in module.modules():
            owner_name = self.names[id(owner)]
            for attr, tensor in list(owner._parameters.items()) + list(owner._buffers.items()):
                if tensor is None or id(tensor) in skipped:
                    continue
                full = f"{owner_name}.{attr}" if owner_name else attr
                is_param = attr in owner._parameters
                key = self.checkpoint.key(full, self.base_prefix)
                if key is None:
                    if is_param or tensor.is_meta:
                        raise UserError(
                            f"{FLAG}: the checkpoint has no tensor for {full!r} (of {prefix or 'the model'}); "
                            "analyse this model without --offload"
                        )
                    continue  # a buffer computed at construction (rotary tables): already real
                wanted[key] = (owner, attr, is_param)
        partial = {}
        if rows is not None:
            partial = {k: rows[1] for k, (o, a, _) in wanted.items() if o._parameters.get(a) is rows[0]}
        for key, tensor in self.checkpoint.read(list(wanted), self.dtype, partial).items():
            owner, attr, is_param = wanted[key]
            tensor = tensor.to(self.device)
            if is_param:
                owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
            else:
                owner._buffers[attr] = tensor

    def rename(self, module: nn.Module) -> None:
        """Record the names of ``module``'s submodules again, after surgery replaced some of them
        (StableLM's per-head norms: a new ModuleList of the kept heads' norms)."""
        self.names |= {id(m): n for n, m in module.named_modules(prefix=self.names[id(module)])}

    def free(self, module: nn.Module, skip: tuple[nn.Module, ...] = ()) -> None:
        """Back to the meta device (the weights' memory is released), except the modules in ``skip``.

        Buffers the checkpoint does not hold (rotary tables made at construction) stay.
        """
        skipped = {id(p) for s in skip for p in list(s.parameters()) + list(s.buffers())}
        for owner in module.modules():
            owner_name = self.names[id(owner)]
            for store in (owner._parameters, owner._buffers):
                for attr, tensor in list(store.items()):
                    if tensor is None or id(tensor) in skipped or tensor.is_meta:
                        continue
                    full = f"{owner_name}.{attr}" if owner_name else attr
                    if store is owner._buffers and self.checkpoint.key(full, self.base_prefix) is None:
                        continue
                    meta = torch.empty_like(tensor, device="meta")
                    store[attr] = (
                        nn.Parameter(meta, requires_grad=False) if store is owner._parameters else meta
                    )


def _model_dir(model: str | Path) -> Path:
    from minigpts.models import ALIASES, _resolve_source

    spec = str(model)
    _, path, _ = _resolve_source(spec, FLAG)
    if path is None or not path.is_dir():
        raise UserError(
            f"{FLAG}: {spec!r} is not a local model directory; layer-by-layer work reads the "
            f"safetensors files of a directory (download it first), a GGUF file or an alias ({', '.join(ALIASES)})"
        )
    return path


def build_skeleton(
    model: str | Path, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> tuple[nn.Module, _Checkpoint]:
    """The model on the meta device (buffers such as rotary tables real) and its checkpoint's index."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from minigpts.arch import get_adapter
    from minigpts.models import _check_causal, remote_code_decision

    path = _model_dir(model)
    trust = remote_code_decision(path, trust_remote_code, f"{FLAG} {model}")
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust)
    _check_causal(config, str(model))
    try:
        adapter = get_adapter(config)
    except UserError as error:
        raise UserError(f"{FLAG}: {error}") from None
    if adapter.family not in SEQUENTIAL_FAMILIES:
        raise UserError(
            f"{FLAG}: layer-by-layer work does not support the {adapter.family} family (model type "
            f"{config.model_type!r}) yet; supported: {', '.join(SEQUENTIAL_FAMILIES)}; run without {FLAG}"
        )
    checkpoint = _Checkpoint(path)
    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust)
    skeleton.config._name_or_path = str(path)  # as from_pretrained records it
    checkpoint.rename_as(skeleton)
    for parameter in skeleton.parameters():
        parameter.requires_grad_(False)
    return skeleton.eval(), checkpoint


def analyze_offloaded(
    model: str | Path,
    windows: torch.LongTensor,
    *,
    batch_size: int = 4,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
    moments: bool = False,
    fisher_tokens: int = 0,
    taylor_tokens: int = 0,
    depth_tokens: int = 0,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    work_dir: str | Path | None = None,
) -> ActivationStats:
    """``analyze`` of the model in directory (or alias / GGUF) ``model``, one decoder layer in memory at a time.

    Same options and result as ``minigpts.analysis.analyze`` on the loaded model (see the module
    docstring); ``taylor_tokens`` and ``depth_tokens`` must be 0. ``device``: where each layer runs
    (the hidden states stay on the CPU); ``dtype``: as ``load_model``'s (default float32 on the CPU,
    bfloat16 on a GPU). ``work_dir``: where temporary directories keep each layer's inputs for the
    gradient pass and its second moments (default: the system's temporary directory).
    """
    from minigpts.analysis import analyze
    from minigpts.models import resolve_device, resolve_dtype

    if taylor_tokens > 0:
        raise UserError(
            f"{FLAG}: the Taylor gradient pass needs the whole model in memory; use --taylor-tokens 0 "
            "(another --criterion than taylor) or analyse without --offload"
        )
    if depth_tokens > 0:
        raise UserError(
            f"{FLAG}: the layer-removal loss passes need the whole model in memory; use --depth-tokens 0 "
            "(--layer-criterion bi) or analyse without --offload"
        )
    torch_device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, torch_device)
    skeleton, checkpoint = build_skeleton(model, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    onloader = _Onloader(skeleton, checkpoint, torch_dtype, torch_device)
    runner = _LayerByLayer(skeleton, onloader, torch_device)
    options = dict(
        batch_size=batch_size, progress=progress, moments=moments, run_body=runner, work_dir=work_dir
    )
    metadata = {"device": str(torch_device), "offload": True} | (metadata or {})
    stats = analyze(skeleton, windows, metadata=metadata, **options)
    if fisher_tokens > 0:
        n_windows, seq_len = stats.metadata["windows"], stats.metadata["seq_len"]
        count = max(1, min(n_windows, -(-fisher_tokens // seq_len)))
        with tempfile.TemporaryDirectory(prefix="minigpts-offload-", dir=work_dir) as scratch:
            mlp_fisher, attn_fisher = _gradient_moments(
                skeleton, onloader, windows[:count].long(), Path(scratch), progress=progress
            )
        stats.mlp_fisher, stats.attn_fisher, stats.fisher_tokens = mlp_fisher, attn_fisher, count * seq_len
    return stats


class _LayerByLayer:
    """``run_body`` for ``analyze``: the body's pass over every batch, one decoder layer at a time."""

    def __init__(self, model: nn.Module, onloader: _Onloader, device: torch.device):
        from minigpts.arch import get_adapter

        self.model, self.onloader, self.device = model, onloader, device
        self.adapter = get_adapter(model)

    def inputs(self, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
        """Each batch's hidden states entering the first layer (CPU) and, per batch shape, each layer's other arguments."""
        if not batches:  # a process without windows (data parallel) still takes part in every reduce
            return [], {}
        adapter, model = self.adapter, self.model
        body, layer_list = adapter.body(model), adapter.layer_list(model)
        layers = list(layer_list)
        calls: dict[tuple, list] = {}
        first: list[torch.Tensor] = []

        def record(index, hidden, args, kwargs):
            if index == 0:
                first.append(hidden.detach().to("cpu", copy=True))
            if shape not in calls or len(calls[shape]) <= index:
                calls.setdefault(shape, []).append((args, kwargs))
            if index == len(layers) - 1:
                raise _Stop
            return hidden

        # only the embedding rows of the calibration tokens: the others are never looked up
        embedding = adapter.embedding(model).weight
        used = torch.unique(torch.cat([batch.flatten() for batch in batches]))
        self.onloader.load(body, skip=(layer_list,), rows=(embedding, used))
        try:
            for i, layer in enumerate(layers):
                layer_list[i] = _StandIn(layer, i, record)
            for batch in batches:
                shape = tuple(batch.shape)
                try:
                    body(input_ids=batch.to(self.device), use_cache=False)
                except _Stop:
                    pass
                else:
                    raise UserError(
                        f"{FLAG}: the model's forward did not call its decoder layers as expected"
                    )
        finally:
            for i, layer in enumerate(layers):
                layer_list[i] = layer
            self.onloader.free(body, skip=(layer_list,))
            _release_free_memory()
        return first, calls

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, call: tuple) -> torch.Tensor:
        args, kwargs = call
        out = layer(hidden.to(self.device), *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def __call__(self, local: torch.Tensor, batch_size: int, bar, layer_done=None) -> None:
        """Every batch through layer 0, then through layer 1, ...; ``layer_done(i)`` after layer i (its
        second moments are then spilled to disk: ``analyze``)."""
        layers = self.adapter.layers(self.model)
        batches = [local[start : start + batch_size] for start in range(0, len(local), batch_size)]
        # a process without windows still reports every layer done: the per-layer reduce is collective
        hidden, calls = self.inputs(batches)
        for i, layer in enumerate(layers):
            self.onloader.load(layer)
            try:
                for b, batch in enumerate(batches):
                    out = self.run_layer(layer, hidden[b], calls[tuple(batch.shape)][i])
                    hidden[b] = out.to("cpu")
                    bar.update(batch.numel() / len(layers))
            finally:
                self.onloader.free(layer)
                _release_free_memory()
            if layer_done is not None:
                layer_done(i)
                _release_free_memory()


def _release_free_memory() -> None:
    """Hand the allocator's free memory back to the system (glibc's malloc_trim; elsewhere a no-op).

    Each layer's activations are freed in a different order than allocated; without this, glibc's
    heaps fragment and the resident memory creeps up layer after layer (measured: +12 MB a layer
    of SmolLM2, or none, from run to run).
    """
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


def _gradient_moments(
    model: nn.Module, onloader: _Onloader, windows: torch.LongTensor, scratch: Path, *, progress: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``minigpts.analysis.gradient_moments``, one layer in memory at a time (see the module docstring).

    One window per pass, as there; each layer's inputs of every window go to ``scratch`` (the float64
    sums over windows are added in the same order).
    """
    from tqdm.auto import tqdm

    from minigpts import distributed

    runner = _LayerByLayer(model, onloader, onloader.device)
    adapter = runner.adapter
    layers = adapter.layers(model)
    hidden_size = adapter.out_features(adapter.mlp_out(layers[0]))
    sums_device = onloader.device if onloader.device.type in ("cpu", "cuda") else torch.device("cpu")
    sums = {
        kind: [torch.zeros(hidden_size, dtype=torch.float64, device=sums_device) for _ in layers]
        for kind in ("mlp", "attn")
    }
    local = distributed.shard(windows)
    batches = [local[i : i + 1] for i in range(len(local))]
    bar = tqdm(total=local.numel() * 2, unit="tok", unit_scale=True, desc="gradients", disable=not progress)
    try:
        if batches:  # a process without windows only joins the reduce
            _backward_layers(runner, onloader, layers, batches, scratch, sums, bar)
        distributed.reduce(sums["mlp"] + sums["attn"])
    finally:
        bar.close()
    n = windows.numel()
    return [(s / n).cpu() for s in sums["mlp"]], [(s / n).cpu() for s in sums["attn"]]


def _backward_layers(runner, onloader, layers, batches, scratch: Path, sums: dict, bar) -> None:
    """Forward to disk, then backward one layer at a time, adding each layer's squared output gradients."""
    adapter, model = runner.adapter, runner.model
    n_tokens = sum(batch.numel() for batch in batches)
    hidden, calls = _forward_to_disk(runner, onloader, layers, batches, scratch, bar, n_tokens)
    # the loss gradient at the last layer's output, from the model's own final norm, head and loss
    grads = _output_gradients(model, onloader, batches, hidden)
    del hidden
    # backward, layer by layer in reverse order
    for i in reversed(range(len(layers))):
        layer = layers[i]
        inputs = torch.load(scratch / f"input-{i}.pt")
        (scratch / f"input-{i}.pt").unlink()
        onloader.load(layer)
        handles = [
            adapter.mlp_out(layer).register_forward_hook(_capture(sums["mlp"][i])),
            adapter.attn_out(layer).register_forward_hook(_capture(sums["attn"][i])),
        ]
        try:
            for b, batch in enumerate(batches):
                h = inputs[b].to(onloader.device).clone().requires_grad_(True)
                out = runner.run_layer(layer, h, calls[tuple(batch.shape)][i])
                out.backward(grads[b].to(out.device))
                grads[b] = h.grad.detach().to("cpu")
        finally:
            for handle in handles:
                handle.remove()
            onloader.free(layer)
            _release_free_memory()
        bar.update(n_tokens / len(layers))


def _forward_to_disk(runner, onloader, layers, batches, scratch: Path, bar, n_tokens: int):
    """Forward, layer by layer, keeping every layer's inputs on disk: (last layer's outputs, calls)."""
    with torch.no_grad():  # not inference_mode: the recorded arguments are used again with gradients
        hidden, calls = runner.inputs(batches)
        for i, layer in enumerate(layers):
            torch.save(hidden, scratch / f"input-{i}.pt")
            onloader.load(layer)
            try:
                hidden = [
                    runner.run_layer(layer, h, calls[tuple(b.shape)][i]).to("cpu")
                    for b, h in zip(batches, hidden, strict=True)
                ]
            finally:
                onloader.free(layer)
                _release_free_memory()
            bar.update(n_tokens / len(layers))
    return hidden, calls


def _capture(store: torch.Tensor):
    def forward_hook(module, args, output):
        def accumulate(grad):
            store.add_(
                grad.detach().to(torch.float64).pow(2).reshape(-1, grad.shape[-1]).sum(0).to(store.device)
            )

        output.register_hook(accumulate)

    return forward_hook


def _output_gradients(
    model: nn.Module, onloader: _Onloader, batches: list[torch.Tensor], outputs: list[torch.Tensor]
) -> list[torch.Tensor]:
    """∂(summed next-token loss)/∂(last layer's output) per window, through the model's own tail.

    The model's forward runs with every decoder layer a stand-in: the last one returns the stored
    output (taking gradients), so what follows it (final norm, LM head, soft-capping, the loss) is
    the model's own code.
    """
    from minigpts.arch import get_adapter

    adapter = get_adapter(model)
    body, layer_list = adapter.body(model), adapter.layer_list(model)
    layers = list(layer_list)
    head = model.get_output_embeddings()
    grads = []
    current: dict[str, torch.Tensor] = {}

    def record(index, hidden, args, kwargs):
        return current["out"] if index == len(layers) - 1 else hidden

    onloader.load(body, skip=(layer_list,))
    load_head(model, onloader)
    try:
        for i, layer in enumerate(layers):
            layer_list[i] = _StandIn(layer, i, record)
        for batch, out in zip(batches, outputs, strict=True):
            current["out"] = out.to(onloader.device).clone().requires_grad_(True)
            ids = batch.to(onloader.device)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            (loss * (ids.numel() - 1)).backward()
            grads.append(current["out"].grad.detach().to("cpu"))
    finally:
        for i, layer in enumerate(layers):
            layer_list[i] = layer
        onloader.free(body, skip=(layer_list,))
        if head is not None:
            onloader.free(head)
    return grads


def load_head(model: nn.Module, onloader: _Onloader) -> None:
    """Read the LM head (after the body): a head tied to the embedding, which the checkpoint does not
    store, is given the embedding's (already read) weight instead."""
    from minigpts.arch import get_adapter

    head = model.get_output_embeddings()
    if head is None:
        return
    tied = onloader.checkpoint.key(onloader.names[id(head)] + ".weight", onloader.base_prefix) is None
    if tied and getattr(model.config, "tie_word_embeddings", False):
        head.weight = get_adapter(model).embedding(model).weight
    else:
        onloader.load(head)

"""Pruning a model larger than memory: ``prune --offload`` plans, refits, cuts and saves layer by layer.

The model is the meta-device skeleton of ``analysis_offload.build_skeleton``; nothing holds it whole:

- the plan (``plan_offloaded``) is ``pipeline.build_plan`` on the skeleton: shapes, config and the
  statistics; the criteria that read weights (``wanda``, ``weight``, ``flap``, ``refit``) and the
  error allocation read each decoder layer's inside ``criteria.layer_weights``, which on the
  skeleton reads that layer from the checkpoint and frees it afterwards (one layer at a time);
- each kept decoder layer in turn is read from the safetensors file(s), refit (``reconstruct.
  refit_layer``, its second moments read from the statistics file for that layer only), cut
  (``surgery.prune_layer``), appended to the output shards and freed;
- with ``--sequential`` (``calibration`` windows), the hidden states of the calibration windows
  entering layer 0 come first (the embedding rows onloaded, as ``analysis_offload`` does); then
  each layer's refit is ``reconstruct.sequential_layer``, the in-memory ``--sequential``'s own step:
  its statistics re-measured on those hidden states, its kept units re-chosen (written back into
  the plan, so minigpts.json holds them), refit; the hidden states then go through it for the next;
- then the modules outside the decoder layers (embedding, final norm, LM head): the vocabulary cut
  (``vocab.slice_model_vocab``) and the last shard;
- config.json, tokenizer, minigpts.json, model card and modeling file are ``export``'s own.

The output is what ``prune`` without ``--offload`` writes (the same tensors, bit for bit, and the same
config and minigpts.json), as shards of at most ``max_shard_bytes`` (``model.safetensors`` when one
suffices). Refused with a one-line error, naming the flag: hidden-channel pruning (every layer reads
and writes the residual stream), depth pruning (``--drop-layers`` / ``--layer-ratio``) and
``--vocab-keep-expected`` without counts measured by the analysis. Peak memory ≈ one decoder layer +
one shard being filled + the embedding and LM head at the end + the statistics without their second
moments + one layer's second moments (+ with ``--sequential``, the calibration hidden states).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from minigpts.analysis_offload import FLAG, _Checkpoint, _Onloader, _release_free_memory
from minigpts.criteria import LAYER_WEIGHTS_READER
from minigpts.errors import UserError
from minigpts.options import PlanOptions, flag_of
from minigpts.reconstruct import DEFAULT_RIDGE

if TYPE_CHECKING:
    from minigpts.analysis import ActivationStats
    from minigpts.data import Corpus
    from minigpts.plan import PruningPlan

DEFAULT_SHARD_BYTES = 2 * 10**9


def pruning_skeleton(
    model: str | Path, dtype: torch.dtype, *, trust_remote_code: bool = False
) -> tuple[nn.Module, _Checkpoint]:
    """``build_skeleton`` as ``from_pretrained`` would leave it: tied weights tied, the generation config read."""
    from transformers import GenerationConfig

    from minigpts.analysis_offload import build_skeleton

    skeleton, checkpoint = build_skeleton(model, dtype=dtype, trust_remote_code=trust_remote_code)
    skeleton.tie_weights()
    directory = Path(skeleton.config._name_or_path)
    if (directory / "generation_config.json").is_file():
        skeleton.generation_config = GenerationConfig.from_pretrained(directory)
    return skeleton, checkpoint


# --- the plan -------------------------------------------------------------------------------------


def check_offload_options(options: PlanOptions, stats: ActivationStats | None) -> None:
    """A one-line UserError for each plan option that needs the whole model (see the module docstring)."""

    def flag(name: str) -> str:
        return flag_of(PlanOptions, name)

    for name in ("hidden_ratio", "drop_layers", "layer_ratio"):
        if getattr(options, name) is not None:
            raise UserError(f"{flag(name)}: {FLAG} does not prune {_WHAT[name]} yet; prune without {FLAG}")
    if options.target_params is not None and "hidden" in options.target_groups:
        raise UserError(
            f"{flag('target_groups')} hidden: {FLAG} does not prune hidden channels yet; use "
            f"{flag('target_groups')} mlp,heads or prune without {FLAG}"
        )
    if options.vocab_keep_expected and (stats is None or stats.expected_counts is None):
        raise UserError(
            f"{flag('vocab_keep_expected')} runs the whole model over the domain text: drop it with {FLAG}"
        )


_WHAT = {"hidden_ratio": "hidden channels", "drop_layers": "layers", "layer_ratio": "layers"}


def plan_offloaded(
    model: str | Path,
    tokenizer: Any,
    stats: ActivationStats | None,
    options: PlanOptions,
    *,
    corpus: Corpus | None = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> PruningPlan:
    """``pipeline.build_plan`` on the meta-device skeleton of ``model`` (a directory, GGUF file or alias)."""
    from minigpts.pipeline import build_plan

    check_offload_options(options, stats)
    skeleton, checkpoint = pruning_skeleton(model, dtype, trust_remote_code=trust_remote_code)
    if stats is not None:
        stats.check_model(skeleton)
    onloader = _Onloader(skeleton, checkpoint, dtype, torch.device("cpu"))
    setattr(skeleton, LAYER_WEIGHTS_READER, lambda layer: _layer_read(onloader, layer))
    try:
        plan = build_plan(skeleton, tokenizer, stats, options, corpus=corpus)
    except NotImplementedError as error:  # a criterion registered elsewhere that reads weights outside
        raise UserError(  # `criteria.layer_weights`: they are not there
            f"{flag_of(PlanOptions, 'criterion')} {options.resolved_criterion()} reads weights outside "
            f"`minigpts.criteria.layer_weights` ({error}), which {FLAG} needs: use another criterion or "
            f"prune without {FLAG}"
        ) from None
    if plan.hidden_keep is not None and len(plan.hidden_keep) < plan.summary.get("hidden_before", 0):
        raise UserError(
            f"{flag_of(PlanOptions, 'linear_threshold')} also prunes hidden channels, which {FLAG} does "
            f"not do yet: size the heads with {flag_of(PlanOptions, 'head_ratio')}, or prune without {FLAG}"
        )
    return plan


@contextlib.contextmanager
def _layer_read(onloader: _Onloader, layer: nn.Module):
    """One decoder layer's weights, read from the checkpoint for the planner and freed after it."""
    onloader.load(layer)
    try:
        yield layer
    finally:
        onloader.free(layer)
        _release_free_memory()


def load_stats(path: str | Path) -> ActivationStats:
    """The statistics with each layer's second moments read from the file only when the refit asks."""
    from minigpts.analysis import ActivationStats

    return ActivationStats.load(path, lazy_moments=True)


# --- surgery and save -----------------------------------------------------------------------------


class ShardWriter:
    """Tensors into safetensors shards of at most ``max_bytes`` each (a larger tensor: a shard of its
    own), named as ``save_pretrained`` names them once the last one is written (``finish``)."""

    def __init__(self, directory: Path, max_bytes: int = DEFAULT_SHARD_BYTES):
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []  # the tensor names of each shard written
        self.total_size = self.total_parameters = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            size = tensor.numel() * tensor.element_size()
            if self.pending and self.pending_bytes + size > self.max_bytes:
                self.flush()
            self.pending[name] = tensor.detach().contiguous()
            self.pending_bytes += size
            self.total_size += size
            self.total_parameters += tensor.numel()

    def _temporary(self, index: int) -> Path:
        return self.directory / f".shard-{index:05d}.safetensors"  # save_pretrained leaves these alone

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        save_file(self.pending, self._temporary(len(self.shards)), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0
        _release_free_memory()

    def finish(self) -> None:
        """The last shard, the final names and, for several shards, model.safetensors.index.json."""
        self.flush()
        if len(self.shards) == 1:
            self._temporary(0).rename(self.directory / "model.safetensors")
            return
        weight_map = {}
        for index, names in enumerate(self.shards):
            final = f"model-{index + 1:05d}-of-{len(self.shards):05d}.safetensors"
            self._temporary(index).rename(self.directory / final)
            weight_map |= dict.fromkeys(names, final)
        metadata = {"total_parameters": self.total_parameters, "total_size": self.total_size}
        index_text = json.dumps(
            {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}, indent=2
        )
        (self.directory / "model.safetensors.index.json").write_text(index_text + "\n")


def _saved_tensors(module: nn.Module, prefix: str, onloader: _Onloader) -> dict:
    """``module``'s real tensors that the checkpoint stores, under the names ``save_pretrained`` writes
    (a tied weight once)."""
    checkpoint, tensors, written = onloader.checkpoint, {}, set()
    for name, tensor in module.state_dict(prefix=prefix, keep_vars=True).items():
        if tensor.is_meta or id(tensor) in written or checkpoint.key(name, onloader.base_prefix) is None:
            continue
        written.add(id(tensor))
        tensors[checkpoint.saved_name(name)] = tensor.data
    return tensors


def prune_offloaded(
    model: str | Path,
    plan: PruningPlan,
    stats: ActivationStats | None,
    out_dir: str | Path,
    *,
    tokenizer: Any,
    reconstruct: str = "lstsq",
    ridge: float = DEFAULT_RIDGE,
    calibration: torch.LongTensor | None = None,
    metadata: dict[str, Any] | None = None,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> Path:
    """``prune``'s refit, surgery, vocabulary cut and ``save_model`` of ``model`` (directory, GGUF file or
    alias) into ``out_dir``, one decoder layer in memory at a time (see the module docstring).

    ``plan`` indexes ``model`` (``plan_offloaded`` makes one); ``stats`` are needed for ``reconstruct=
    "lstsq"`` (``load_stats`` keeps their second moments in the file); ``calibration``: the windows of
    ``--sequential`` (its kept units are then re-chosen into ``plan``). Returns ``out_dir``.
    """
    from minigpts.export import staged_directory, write_companions

    skeleton, checkpoint = pruning_skeleton(model, dtype, trust_remote_code=trust_remote_code)
    onloader = _Onloader(skeleton, checkpoint, dtype, torch.device("cpu"))
    refit = _check_refit(skeleton, plan, stats, reconstruct, sequential=calibration is not None)
    with staged_directory(out_dir, force) as staging:
        writer = ShardWriter(staging, max_shard_bytes)
        step = _refit_step(skeleton, onloader, plan, stats, ridge, calibration) if refit else None
        done = _stream_layers(skeleton, onloader, plan, step, writer, progress)
        if refit:
            plan.summary["reconstructed"] = done
        tokenizer = _stream_outside_layers(skeleton, onloader, plan, tokenizer, writer)
        skeleton.save_pretrained(staging, state_dict={})  # config.json and generation_config.json only
        write_companions(skeleton, tokenizer, staging, plan, metadata or {})
        writer.finish()
    return Path(out_dir)


def _check_refit(
    skeleton: nn.Module, plan: PruningPlan, stats, reconstruct: str, *, sequential: bool
) -> bool:
    """Whether to refit (as ``pipeline.apply_full_plan`` decides), recorded in the plan's settings."""
    from minigpts.reconstruct import RECONSTRUCT_METHODS, check_moments

    if reconstruct not in RECONSTRUCT_METHODS:
        raise UserError(f"--reconstruct {reconstruct}: use one of {', '.join(RECONSTRUCT_METHODS)}")
    refit = reconstruct == "lstsq" and plan.criterion != "none"
    if refit:
        if stats is None:
            raise UserError("--reconstruct lstsq needs the statistics of the model (pass --stats)")
        if not sequential:  # the sequential refit measures its own second moments
            check_moments(stats)
        stats.check_model(skeleton)
    plan.settings["reconstruct"] = reconstruct
    plan.settings["sequential"] = sequential and reconstruct == "lstsq"
    return refit


def _refit_step(skeleton, onloader, plan, stats, ridge: float, calibration):
    """(original index, onloaded layer) -> the kinds refit: from the statistics' second moments, or
    ``--sequential``'s step on the calibration hidden states (``_Sequential``)."""
    from minigpts.arch import get_adapter
    from minigpts.reconstruct import layer_moments, refit_layer

    if calibration is not None:
        return _Sequential(skeleton, onloader, plan, stats, calibration, ridge)
    adapter = get_adapter(skeleton)

    def one_shot(old: int, layer: nn.Module) -> list[str]:
        return refit_layer(adapter, layer, plan.layers[old], layer_moments(stats, old), ridge=ridge)

    return one_shot


class _Sequential:
    """``--sequential`` one layer at a time: the calibration hidden states entering the next layer,
    computed from the embedding rows (``analysis_offload``'s pass) and pushed through each layer once
    ``reconstruct.sequential_layer`` has re-chosen and refit it, with the unpruned model's hidden states
    alongside (what the refit aims at). Memory: those two sets of hidden states."""

    def __init__(self, skeleton, onloader: _Onloader, plan, stats, windows: torch.LongTensor, ridge: float):
        from minigpts.analysis_offload import _LayerByLayer
        from minigpts.reconstruct import SEQUENTIAL_BATCH_SIZE as size
        from minigpts.reconstruct import residual_target

        self.model, self.plan, self.stats, self.ridge = skeleton, plan, stats, ridge
        batches = [windows[start : start + size] for start in range(0, len(windows), size)]
        with torch.inference_mode():
            self.hidden, calls = _LayerByLayer(skeleton, onloader, onloader.device).inputs(batches)
        self.calls = [calls[tuple(batch.shape)] for batch in batches]  # per batch: per layer (args, kwargs)
        # the unpruned model's hidden states, which each refit targets (``sequential_reconstruct``)
        self.dense = list(self.hidden) if residual_target(skeleton, "residual") else None

    def __call__(self, old: int, layer: nn.Module) -> list[str]:
        from minigpts.reconstruct import sequential_layer

        calls = [per_layer[old] for per_layer in self.calls]
        kinds, self.hidden, self.dense = sequential_layer(
            self.model, self.plan, self.stats, old, self.hidden, calls, ridge=self.ridge, dense=self.dense
        )
        return kinds


def _stream_layers(skeleton, onloader, plan, refit_step, writer: ShardWriter, progress) -> dict:
    """Each kept decoder layer: read, refit (``refit_step``), cut, written, freed; the refit counts."""
    from tqdm.auto import tqdm

    from minigpts.arch import get_adapter
    from minigpts.surgery import _head_keep, prune_layer, start_plan, sync_config

    adapter = get_adapter(skeleton)
    hidden_keep, kept = start_plan(skeleton, plan)  # validated on the shapes before anything is read
    if len(hidden_keep) < adapter.hidden_size(skeleton) or len(kept) < len(plan.layers):
        raise UserError(f"{FLAG}: this plan prunes hidden channels or layers, which {FLAG} does not do yet")
    done = {"mlp": 0, "attention": 0}
    for old, layer, layer_plan, heads in tqdm(kept, unit="layer", desc="prune", disable=not progress):
        onloader.load(layer)
        try:
            if refit_step is not None:
                for kind in refit_step(old, layer):
                    done[kind] += 1
                heads = _head_keep(adapter, layer, layer_plan, old)  # --sequential may re-choose them
            prune_layer(adapter, layer, layer_plan, heads)
            onloader.rename(layer)
            writer.add(_saved_tensors(layer, onloader.names[id(layer)] + ".", onloader))
        finally:
            onloader.free(layer)
            _release_free_memory()
    sync_config(skeleton)
    return done


def _stream_outside_layers(skeleton, onloader: _Onloader, plan, tokenizer, writer: ShardWriter):
    """The embedding, final norm, LM head (...): read, the vocabulary cut, written; the tokenizer to save."""
    from minigpts.analysis_offload import load_head
    from minigpts.arch import get_adapter

    adapter = get_adapter(skeleton)
    layer_list = adapter.layer_list(skeleton)
    onloader.load(adapter.body(skeleton), skip=(layer_list,))
    load_head(skeleton, onloader)
    layer_ids = {id(t) for t in list(layer_list.parameters()) + list(layer_list.buffers())}
    missing = [n for n, p in skeleton.named_parameters() if p.is_meta and id(p) not in layer_ids]
    if missing:
        raise UserError(
            f"{FLAG}: the model has weights outside its body and head ({missing[0]}); prune without {FLAG}"
        )
    if plan.vocab_keep is not None:
        from minigpts.vocab import slice_model_vocab, trim_tokenizer

        slice_model_vocab(skeleton, plan.vocab_keep)
        tokenizer = trim_tokenizer(tokenizer, plan.vocab_keep)
    writer.add(_saved_tensors(skeleton, "", onloader))
    return tokenizer

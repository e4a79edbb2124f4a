"""The real Torch-Pruning beside minigpts: the same MLP channels of SmolLM2, the same widths, one protocol.

    pip install -e '.[bench]'                       # torch-pruning (optional, benchmarks only)
    nice -n 15 python benchmarks/bench_peers.py --data economics [--ratios 0.25 0.5] [--methods ...]
    python benchmarks/bench_peers.py --tiny         # self-check on a tiny random Llama (seconds)

Every row removes the same share of MLP intermediate channels in every layer (uniform; attention,
hidden width and vocabulary untouched) and is scored before any recovery, on bench_quality.py's
protocol: the calibration split's first --calib-tokens tokens (windows of 1024), bits/byte on the
test text that the base's first --eval-tokens tokens cover.

- Torch-Pruning (VainF/Torch-Pruning, PyPI ``torch-pruning``), configured as its LLM example
  (examples/LLMs/prune_llm.py): ``tp.pruner.BasePruner`` traced on a short token input, local
  pruning (``global_pruning=False``), ``round_to=4``, ``output_transform=lambda x: x.logits``,
  ``ignored_layers`` — here every Linear and Embedding but the MLP input projections, so that the
  only prunable groups are the MLP channels (gate/up rows + down column); the config's
  ``intermediate_size`` is updated afterwards as the example does. Importances:
  ``tp-magnitude``: ``GroupMagnitudeImportance(p=2, group_reduction="mean")`` (the example's);
  ``tp-taylor``: ``GroupTaylorImportance()``, gradients of the mean next-token loss over the first
  --taylor-tokens of the calibration windows (the same windows and loss as minigpts' ``taylor``);
  ``tp-activation``: ``ActivationImportance()`` fed every calibration window (its hook keeps only the
  last forward's sums, so they are added up over the windows here: the same as one big batch).
  ``<tp method>+refit``: the channels Torch-Pruning chose, then minigpts' closed-form refit of
  down_proj (``apply_full_plan(reconstruct="lstsq")``), to separate choosing from refitting.
- minigpts: ``make_plan(criterion=C, mlp_ratio=R)`` then ``apply_full_plan(reconstruct="none")``
  (sliced, C) or ``"lstsq"`` (C+refit), for C in l1, wanda, flap, taylor.
- ``--mixed F`` adds the mixed cut: minigpts' criteria choose MLP channels *and* attention heads
  (``make_plan(criterion=C, target_params=F)``, the default ``per-layer`` layout and error allocation; the
  row ``wanda+refit uniform`` the same share in every layer) until F of the parameters remain. At
  F = 0.704 the parameter count equals the 50 % MLP rows' (94.70M of SmolLM2's 134.52M, −30 %), so
  the mixed rows compare with every 50 % row — Torch-Pruning's included — at the same size. Depth at
  that size: ``depth`` drops only decoder layers (ShortGPT's Block Influence, as many as come closest
  to F), ``wanda+refit drop=4`` drops 4 and cuts widths for the rest; ``--decode-tokens N`` adds the
  greedy decode speed of the base and of each mixed row (batch 1, the best of ``--decode-repeats``),
  as a ratio to the base measured in the same run.

Checks on every Torch-Pruning model: its MLP widths and parameter count equal minigpts' at the same
ratio; it runs; minigpts' surgery of the channels it chose gives the same logits; it saves with
``save_pretrained`` and reloads with ``from_pretrained`` to the same logits. Rows are appended to
--json as they finish; ``--resume`` skips the rows already there.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quality import data_spec  # noqa: E402

from minigpts.analysis import ActivationStats, taylor_importance  # noqa: E402
from minigpts.data import load_corpus  # noqa: E402
from minigpts.evaluation import decode_speed, evaluate  # noqa: E402
from minigpts.pipeline import AnalysisOptions, apply_full_plan, calibration_windows, run_analysis  # noqa: E402
from minigpts.plan import make_plan  # noqa: E402

OURS = ("l1", "wanda", "flap", "taylor")
TP_METHODS = ("tp-magnitude", "tp-taylor", "tp-activation")
# default order = priority: if a slow machine stops the run early, the rows that matter most are done
DEFAULT_METHODS = (
    "base",
    "tp-magnitude",
    "l1+refit",
    "wanda+refit",
    "flap+refit",
    "tp-taylor",
    "l1",
    "wanda",
    "flap",
    "tp-magnitude+refit",
    "tp-taylor+refit",
    "taylor",
    "taylor+refit",
    "tp-activation",
    "tp-activation+refit",
)
MIXED_METHODS = (
    "wanda+refit",
    "flap+refit",
    "l1+refit",
    "taylor+refit",
    "wanda",
    "l1",
    "wanda+refit uniform",
    "depth",
    "wanda+refit drop=4",
)
TP_CALLS = {
    "tp-magnitude": 'GroupMagnitudeImportance(p=2, group_reduction="mean")',
    "tp-taylor": "GroupTaylorImportance()",
    "tp-activation": "ActivationImportance()",
}
MLP_INPUTS = ("mlp.gate_proj", "mlp.up_proj")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def n_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def speed(row: dict, base: dict | None) -> str:
    """Decode tokens/s and the ratio to the base's, measured in the same run ("" when not measured)."""
    tps = row.get("decode_tokens_per_second")
    if tps is None:
        return ""
    base_tps = (base or {}).get("decode_tokens_per_second")
    return f"{tps:.1f}" + (f" ({tps / base_tps:.2f}×)" if base_tps else "")


def mlp_width(model: nn.Module) -> int | str:
    """The MLP width, or "mean W" when the layers differ (a per-layer plan)."""
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    return widths[0] if len(set(widths)) == 1 else f"mean {sum(widths) / len(widths):.0f}"


def mlp_layers(model: nn.Module) -> list[nn.Module]:
    """The gated MLPs (gate_proj, up_proj, down_proj) of a Llama-family model, in layer order."""
    layers = [layer.mlp for layer in model.model.layers]
    for mlp in layers:
        if not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj")):
            raise SystemExit("bench_peers.py drives Torch-Pruning on Llama-family MLPs (gate/up/down) only")
    return layers


# --- Torch-Pruning ----------------------------------------------------------------------------------


def mlp_gradients(base: nn.Module, windows: torch.LongTensor) -> dict[str, torch.Tensor]:
    """∂L/∂W of the MLP projections, L the mean next-token loss over ``windows`` (one window per backward,
    as minigpts.analysis.taylor_importance does it), on a copy of ``base``."""
    model = copy.deepcopy(base)
    wanted = {name for name, _ in model.named_parameters() if ".mlp." in name and name.endswith("weight")}
    for name, p in model.named_parameters():
        p.requires_grad_(name in wanted)
        p.grad = None
    targets = windows.shape[0] * (windows.shape[1] - 1)
    for window in windows:
        batch = window.unsqueeze(0)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        (loss * (batch.numel() - 1) / targets).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if name in wanted}


def torch_pruning_prune(
    base: nn.Module,
    method: str,
    ratio: float,
    example: torch.LongTensor,
    windows: torch.LongTensor,
    grads: dict[str, torch.Tensor] | None,
) -> tuple[nn.Module, list[list[int]]]:
    """A copy of ``base`` with ``ratio`` of every MLP's channels removed by Torch-Pruning; (model, kept
    channels per layer, in the original indices)."""
    import torch_pruning as tp

    model = copy.deepcopy(base)
    mlps = mlp_layers(model)
    widths = [mlp.gate_proj.out_features for mlp in mlps]
    layer_of = {id(m): i for i, mlp in enumerate(mlps) for m in (mlp.gate_proj, mlp.up_proj)}
    ignored = [
        module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | nn.Embedding) and not name.endswith(MLP_INPUTS)
    ]
    if method == "tp-magnitude":
        importance = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
    elif method == "tp-taylor":
        importance = tp.importance.GroupTaylorImportance()
        for name, p in model.named_parameters():
            p.grad = grads.get(name)
    elif method == "tp-activation":
        importance = tp.importance.ActivationImportance()
    else:
        raise ValueError(method)
    with warnings.catch_warnings():  # the norms' weights: in the (ignored) hidden-width groups only
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        pruner = tp.pruner.BasePruner(
            model,
            example_inputs=example,
            importance=importance,
            global_pruning=False,
            output_transform=lambda x: x.logits,
            pruning_ratio=ratio,
            ignored_layers=ignored,
            round_to=4,
        )
    if method == "tp-activation":
        totals: dict[nn.Module, torch.Tensor] = {}
        with torch.no_grad(), importance.compute_importance(model):
            for window in windows:
                model(input_ids=window.unsqueeze(0), use_cache=False)
                for module in model.modules():
                    if hasattr(module, "_importance"):
                        totals[module] = totals.get(module, 0) + module._importance
        for module, total in totals.items():
            module._importance = total
    removed: dict[int, set[int]] = {}
    for group in pruner.step(interactive=True):
        root = group[0].dep.target.module
        if id(root) not in layer_of:
            raise RuntimeError(f"Torch-Pruning pruned {root}, not an MLP input projection")
        removed.setdefault(layer_of[id(root)], set()).update(int(i) for i in group[0].idxs)
        group.prune()
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(False)
    kept = [sorted(set(range(w)) - removed.get(i, set())) for i, w in enumerate(widths)]
    for i, mlp in enumerate(mlps):  # as the LLM example: the config follows the new widths
        if mlp.gate_proj.out_features != len(kept[i]) or mlp.down_proj.in_features != len(kept[i]):
            raise RuntimeError(f"layer {i}: the recorded channels do not match the pruned shapes")
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(kept[i])
    if len({len(k) for k in kept}) != 1:
        raise RuntimeError("Torch-Pruning's widths differ between layers")
    model.config.intermediate_size = len(kept[0])
    model.eval()
    return model, kept


# --- checks ---------------------------------------------------------------------------------------


@torch.no_grad()
def logits(model: nn.Module, ids: torch.LongTensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


def save_reload_gap(model: nn.Module, ids: torch.LongTensor) -> float:
    """max |Δ logits| between ``model`` and its save_pretrained → from_pretrained copy."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=next(model.parameters()).dtype).eval()
        return float((logits(reloaded, ids) - logits(model, ids)).abs().max())


def overlap(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of kept channels in common, over all layers."""
    return sum(len(set(x) & set(y)) for x, y in zip(a, b)) / sum(len(x) for x in a)


# --- the benchmark --------------------------------------------------------------------------------


class Bench:
    def __init__(self, base, tokenizer, corpus, stats, windows, args, say=print):
        self.base, self.tokenizer, self.corpus, self.stats, self.args = base, tokenizer, corpus, stats, args
        self.windows = windows
        self.taylor_windows = windows[: max(1, -(-args.taylor_tokens // windows.shape[1]))]
        self.example = windows[0, :16].unsqueeze(0)
        self.texts = corpus.split("test")
        self.say = say
        self._grads = None
        self._taylor_stats = None
        self.kept: dict[tuple[str, float], list[list[int]]] = {}
        self.rows: dict[str, dict] = {}
        self.checks: list[str] = []
        self.common: dict[
            str, dict[str, float]
        ] = {}  # "tp-x 25%" -> {our criterion: share of kept channels in common}
        if args.json and args.resume and Path(args.json).exists():
            done = json.loads(Path(args.json).read_text())
            self.rows, self.checks, self.common = done["rows"], done["checks"], done.get("common", {})

    # statistics and gradients, computed once
    def stats_for(self, criterion: str) -> ActivationStats:
        if criterion != "taylor":
            return self.stats
        if self._taylor_stats is None:
            started = time.perf_counter()
            cache = self.cache_path("taylor", "pt")
            if cache is not None and cache.exists():
                fields = torch.load(cache)
            else:
                mlp, heads, hidden, embed = taylor_importance(self.base, self.taylor_windows, progress=False)
                fields = dict(mlp_taylor=mlp, head_taylor=heads, hidden_taylor=hidden, embed_taylor=embed)
                if cache is not None:
                    torch.save(fields, cache)
            stats = copy.copy(self.stats)
            for key, value in fields.items():
                setattr(stats, key, value)
            stats.taylor_tokens = self.taylor_windows.numel()
            self._taylor_stats = stats
            self.say(f"  minigpts taylor_importance on {self.taylor_windows.numel():,} tokens: "
                     f"{time.perf_counter() - started:.0f} s")  # fmt: skip
        return self._taylor_stats

    def grads(self) -> dict[str, torch.Tensor]:
        if self._grads is None:
            started = time.perf_counter()
            cache = self.cache_path("tp-grads", "pt")
            if cache is not None and cache.exists():
                self._grads = torch.load(cache)
            else:
                self._grads = mlp_gradients(self.base, self.taylor_windows)
                if cache is not None:
                    torch.save(self._grads, cache)
            self.say(f"  MLP gradients for GroupTaylorImportance on {self.taylor_windows.numel():,} tokens: "
                     f"{time.perf_counter() - started:.0f} s")  # fmt: skip
        return self._grads

    def cache_path(self, what: str, ext: str) -> Path | None:
        if self.args.tiny or not self.args.cache:
            return None
        folder = Path(self.args.cache)
        folder.mkdir(parents=True, exist_ok=True)
        return (
            folder
            / f"{what}-{self.args.data_name}-{self.args.calib_tokens}-{self.taylor_windows.numel()}.{ext}"
        )

    # models
    def plan(self, criterion: str, ratio: float):
        return make_plan(self.base, self.stats_for(criterion), criterion=criterion, mlp_ratio=ratio)

    def ours(self, criterion: str, ratio: float, refit: bool) -> nn.Module:
        plan = self.plan(criterion, ratio)
        self.kept[(criterion, ratio)] = [layer.mlp_keep for layer in plan.layers]
        model, _ = apply_full_plan(
            copy.deepcopy(self.base), self.tokenizer, plan, stats=self.stats_for(criterion),
            reconstruct="lstsq" if refit else "none",
        )  # fmt: skip
        return model

    def with_channels(self, kept: list[list[int]], ratio: float, refit: bool) -> nn.Module:
        """minigpts' surgery (and refit) of the given channels, at the widths of minigpts' own plan."""
        plan = self.plan("l1", ratio)
        for layer, channels in zip(plan.layers, kept):
            if len(channels) != len(layer.mlp_keep):
                raise AssertionError(
                    f"widths differ: {len(channels)} (Torch-Pruning) vs {len(layer.mlp_keep)}"
                )
            layer.mlp_keep = list(channels)
        plan.criterion = "torch-pruning"
        model, _ = apply_full_plan(
            copy.deepcopy(self.base),
            self.tokenizer,
            plan,
            stats=self.stats,
            reconstruct="lstsq" if refit else "none",
        )
        return model

    def torch_pruning(self, method: str, ratio: float) -> nn.Module:
        started = time.perf_counter()
        grads = self.grads() if method == "tp-taylor" else None
        model, kept = torch_pruning_prune(self.base, method, ratio, self.example, self.windows, grads)
        self.kept[(method, ratio)] = kept
        # checks: widths/params equal to ours; runs; the same function as our surgery of its channels;
        # save_pretrained → from_pretrained
        ours = self.with_channels(kept, ratio, refit=False)
        same_params = n_params(model) == n_params(ours)
        ids = self.windows[0, :32].unsqueeze(0)
        out = logits(model, ids)
        runs = bool(torch.isfinite(out).all())
        gap = float((out - logits(ours, ids)).abs().max())
        saved = self.args.save_check == "all" or (self.args.save_check == "first" and not self.checks)
        reload_gap = save_reload_gap(model, ids) if saved else 0.0
        line = (
            f"{method} {ratio:.0%}: {len(kept[0])}/{self.base.config.intermediate_size} channels per layer, "
            f"{n_params(model):,} params (minigpts {n_params(ours):,}: {'equal' if same_params else 'DIFFERENT'}), "
            f"runs: {runs}, max |Δ logits| vs minigpts' surgery of its channels {gap:.1e}"
            + (f", after save/reload {reload_gap:.1e}" if saved else "")
            + f" ({time.perf_counter() - started:.0f} s)"
        )
        self.checks.append(line)
        self.say("  check: " + line)
        if not (same_params and runs and gap < 1e-3 and reload_gap < 1e-4):
            raise AssertionError(line)
        self.fill_common()
        return model

    def fill_common(self) -> None:
        """The channels in common between every Torch-Pruning choice and every minigpts criterion's."""
        for (method, ratio), kept in list(self.kept.items()):
            if method not in TP_METHODS:
                continue
            common = self.common.setdefault(f"{method} {ratio:.0%}", {})
            for criterion in OURS:
                if criterion == "taylor" and self._taylor_stats is None:
                    continue  # not computed unless a taylor row asked for it
                if (criterion, ratio) not in self.kept:
                    plan = self.plan(criterion, ratio)
                    self.kept[(criterion, ratio)] = [layer.mlp_keep for layer in plan.layers]
                common[criterion] = overlap(kept, self.kept[(criterion, ratio)])
        self.save()

    def build(self, method: str, ratio: float) -> tuple[nn.Module, str]:
        """(model, what produced it)."""
        refit = method.endswith("+refit")
        name = method.removesuffix("+refit")
        if name in TP_METHODS:
            if not refit:
                return self.torch_pruning(name, ratio), (
                    f"torch_pruning {version('torch-pruning')} BasePruner(round_to=4, local) + {TP_CALLS[name]}"
                )
            if (name, ratio) not in self.kept:
                self.torch_pruning(name, ratio)
            return self.with_channels(self.kept[(name, ratio)], ratio, refit=True), (
                f"{name}'s channels + minigpts apply_full_plan(reconstruct='lstsq')"
            )
        if name not in OURS:
            raise SystemExit(f"unknown method {method!r}: use base, {', '.join(DEFAULT_METHODS[1:])}")
        how = "lstsq" if refit else "none"
        return self.ours(name, ratio, refit), (
            f"minigpts make_plan(criterion='{name}', mlp_ratio={ratio}) + apply_full_plan(reconstruct='{how}')"
        )

    def mixed(self, method: str, target: float) -> tuple[nn.Module, str]:
        """(model, what produced it) for the mixed cut to ``target`` of the parameters. ``method``: ``C`` or
        ``C+refit`` (MLP channels and heads, per-layer), with `` uniform`` (every layer alike) or
        `` drop=N`` (N decoder layers by Block Influence first, widths for the rest); ``depth``: decoder
        layers only, as many as come closest to the target."""
        name, *extras = method.split(" ")
        refit = name.endswith("+refit")
        criterion = name.removesuffix("+refit")
        layout = "uniform" if "uniform" in extras else "per-layer"
        drops = [int(e.removeprefix("drop=")) for e in extras if e.startswith("drop=")]
        if name == "depth":
            criterion, drops = "wanda", [self.layers_for(target)]
        elif criterion not in OURS or set(extras) - {"uniform"} - {f"drop={n}" for n in drops}:
            raise SystemExit(f"unknown mixed method {method!r}: use one of {', '.join(MIXED_METHODS)}")
        widths = (
            {}
            if name == "depth"
            else dict(target_params=target, layout=layout, target_groups=("mlp", "heads"))
        )
        if drops:
            widths |= dict(drop_layers=drops[0], layer_criterion="bi")
        plan = make_plan(self.base, self.stats_for(criterion), criterion=criterion, **widths)
        how = "lstsq" if refit else "none"
        model, _ = apply_full_plan(
            copy.deepcopy(self.base), self.tokenizer, plan, stats=self.stats_for(criterion), reconstruct=how
        )
        call = ", ".join(f"{k}={v!r}" for k, v in widths.items())
        return (
            model,
            f"minigpts make_plan(criterion='{criterion}', {call}) + apply_full_plan(reconstruct='{how}')",
        )

    def layers_for(self, target: float) -> int:
        """How many decoder layers to drop so that the parameters come closest to ``target`` of the base's."""
        total = n_params(self.base)
        per_layer = n_params(self.base.model.layers[0])
        return round((1 - target) * total / per_layer)

    def score(self, label: str, model: nn.Module, produced_by: str, ratio: float | None) -> dict:
        started = time.perf_counter()
        result = evaluate(
            model, self.tokenizer, self.texts, model_name=label, max_tokens=self.args.eval_tokens,
            seq_len=self.args.seq_len, progress=False, budget_tokenizer=self.tokenizer,
        )  # fmt: skip
        row = {
            "ratio": ratio,
            "layers": len(model.model.layers),
            "mlp_width": mlp_width(model),
            "heads": sum(layer.self_attn.o_proj.in_features for layer in model.model.layers)
            // model.config.head_dim,
            "params": n_params(model),
            "weight_bytes": n_bytes(model),
            "bits_per_byte": result.bits_per_byte,
            "eval_tokens": result.eval_tokens,
            "eval_bytes": result.eval_bytes,
            "produced_by": produced_by,
        }
        if self.args.decode_tokens and ratio is None:  # the mixed rows (and the base): decode speed too
            row["decode_tokens_per_second"] = decode_speed(
                model, new_tokens=self.args.decode_tokens, repeats=self.args.decode_repeats
            )
        self.rows[label] = row
        self.say(f"  {label:32s} {row['params'] / 1e6:7.2f}M  {row['bits_per_byte']:.4f} bits/byte  "
                 f"[{produced_by}] ({time.perf_counter() - started:.0f} s eval)")  # fmt: skip
        self.save()
        return row

    def save(self) -> None:
        if self.args.json:
            done = {"rows": self.rows, "checks": self.checks, "common": self.common}
            Path(self.args.json).write_text(json.dumps(done, indent=1))

    def run(self, methods: list[str], ratios: list[float]) -> None:
        for method in methods:
            for ratio in [None] if method == "base" else ratios:
                label = "base" if method == "base" else f"{method} {ratio:.0%}"
                if label in self.rows:
                    continue
                if method == "base":
                    self.score(label, self.base, "the unpruned model", None)
                    continue
                model, produced_by = self.build(method, ratio)
                self.score(label, model, produced_by, ratio)
                del model
        self.fill_common()

    def run_mixed(self, methods: list[str], target: float) -> None:
        base = self.rows.get("base")
        if self.args.decode_tokens and base is not None and "decode_tokens_per_second" not in base:
            base["decode_tokens_per_second"] = decode_speed(  # the baseline of the speed ratios, this run
                self.base, new_tokens=self.args.decode_tokens, repeats=self.args.decode_repeats
            )
            self.save()
        for method in methods:
            label = f"{method} mixed {1 - target:.0%}"
            if label not in self.rows:
                model, produced_by = self.mixed(method, target)
                self.score(label, model, produced_by, None)
                del model

    def table(self) -> str:
        base = self.rows.get("base")
        lines = [
            "| method | layers | MLP width | heads | params | weight bytes | bits/byte | vs base | decode tok/s "
            "(× base) | scored tokens / bytes | produced by |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for label, row in self.rows.items():
            delta = (
                ""
                if base is None or label == "base"
                else f"{row['bits_per_byte'] / base['bits_per_byte'] - 1:+.1%}"
            )
            lines.append(
                f"| {label} | {row.get('layers', '')} | {row['mlp_width']} | {row.get('heads', '')} | "
                f"{row['params'] / 1e6:.2f}M | {row['weight_bytes']:,} | "
                f"{row['bits_per_byte']:.4f} | {delta} | {speed(row, base)} | "
                f"{row['eval_tokens']:,} / {row['eval_bytes']:,} | "
                f"{row['produced_by']} |"
            )
        return "\n".join(lines)

    def overlaps(self) -> str:
        """Share of kept channels that Torch-Pruning's choice has in common with each minigpts criterion's."""
        if not self.common:
            return ""
        ours = [c for c in OURS if any(c in row for row in self.common.values())]
        lines = ["| kept MLP channels in common with minigpts' | " + " | ".join(ours) + " |"]
        lines.append("|---|" + "---:|" * len(ours))
        for label, row in self.common.items():
            lines.append(
                f"| {label} | " + " | ".join(f"{row[c]:.1%}" if c in row else "" for c in ours) + " |"
            )
        return "\n".join(lines)


# --- entry points -----------------------------------------------------------------------------------


def tiny_setup(args):
    """A tiny random Llama (tests/conftest.py) with a byte-level BPE trained on minigpts' sample data."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_tiny_model

    from minigpts.cli import resolve_data_spec

    corpus = load_corpus(resolve_data_spec("sample"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.split("calibration")[:200], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    # a wide initialisation, so that the MLPs matter and the rows differ
    model = make_tiny_model(
        "llama", len(tokenizer), intermediate_size=64, max_position_embeddings=256, initializer_range=0.3
    )
    return model, tokenizer, corpus


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--data", default="economics", help="a corpus of ../shared/datasets or any --data spec"
    )
    parser.add_argument(
        "--ratios", type=float, nargs="+", default=[0.25, 0.5], help="share of MLP channels removed"
    )
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="rows, run in this order")
    parser.add_argument(
        "--mixed",
        type=float,
        default=None,
        metavar="F",
        help="also the mixed cut (MLP channels + heads) to F of the parameters, e.g. 0.704 (= the 50%% rows' size)",
    )
    parser.add_argument(
        "--mixed-methods", nargs="+", default=list(MIXED_METHODS), help="rows of the mixed cut, in this order"
    )
    parser.add_argument(
        "--decode-tokens",
        type=int,
        default=0,
        help="with --mixed: also greedy decode speed of the base and the mixed rows (N new tokens, batch 1)",
    )
    parser.add_argument("--decode-repeats", type=int, default=5, help="decode speed: the best of this many")
    parser.add_argument("--calib-tokens", type=int, default=16_384)
    parser.add_argument("--taylor-tokens", type=int, default=4_096, help="gradient pass of both Taylor rows")
    parser.add_argument("--eval-tokens", type=int, default=8_192)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--cache", default=".bench-cache", help="statistics are kept here between runs")
    parser.add_argument("--json", default=None, help="rows are written here as they finish")
    parser.add_argument("--resume", action="store_true", help="skip the rows already in --json")
    parser.add_argument(
        "--save-check",
        choices=("all", "first", "none"),
        default="all",
        help="save_pretrained → from_pretrained check of every Torch-Pruning model, the first, or none",
    )
    parser.add_argument("--tiny", action="store_true", help="self-check on a tiny random Llama")
    parser.add_argument("--table-only", action="store_true", help="print the table of --json and stop")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.table_only:
        bench = Bench.__new__(Bench)
        done = json.loads(Path(args.json).read_text())
        bench.rows, bench.checks, bench.common = done["rows"], done["checks"], done.get("common", {})
        print(bench.table() + "\n\n" + bench.overlaps() + "\n\nchecks:\n" + "\n".join(bench.checks))
        return done
    torch.manual_seed(0)
    if args.tiny:
        torch.set_num_threads(1)
        args.calib_tokens, args.taylor_tokens, args.eval_tokens, args.seq_len = 1024, 256, 1024, 64
        base, tokenizer, corpus = tiny_setup(args)
        args.data_name = "tiny"
    else:
        from minigpts.models import load_model

        loaded = load_model(args.model, device="cpu")
        base, tokenizer = loaded.model, loaded.tokenizer
        corpus = load_corpus(data_spec(args.data))
        args.data_name = Path(args.data).stem
    base.eval()
    options = AnalysisOptions(calib_tokens=args.calib_tokens, seq_len=args.seq_len)
    cache = (
        None if args.tiny else Path(args.cache) / f"stats-{args.data_name}-{args.calib_tokens}.safetensors"
    )
    if cache is not None and cache.exists():  # bench_quality.py's cache: the same statistics
        stats = ActivationStats.load(cache)
    else:
        stats = run_analysis(base, tokenizer, corpus, options, model_name=args.model, progress=False)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            stats.save(cache)
    if stats.reader_mean is None:  # cached by a version that did not record the residual readers' means:
        # flap reads them for its hidden-channel scores only, which an MLP-only plan never uses
        stats.reader_mean = [[torch.zeros_like(r) for r in layer] for layer in stats.reader_l2sq]
        print(f"note: {cache} has no reader_mean; zeros stand in (flap's unused hidden-channel scores only)")
    windows = calibration_windows(tokenizer, corpus, options)
    bench = Bench(base, tokenizer, corpus, stats, windows, args)
    print(f"{'tiny random Llama' if args.tiny else args.model} ({n_params(base) / 1e6:.2f}M params, MLP width "
          f"{base.config.intermediate_size}), {args.data}: {windows.numel():,} calibration tokens in windows of "
          f"{args.seq_len}, Taylor gradients on the first {bench.taylor_windows.numel():,}, bits/byte on the test "
          f"text of the base's first {args.eval_tokens:,} tokens", flush=True)  # fmt: skip
    bench.run(args.methods, args.ratios)
    if args.mixed is not None:
        bench.run_mixed(args.mixed_methods, args.mixed)
    print("\n" + bench.table())
    print("\n" + bench.overlaps())
    print(f"done in {time.perf_counter() - started:.0f} s")
    if args.tiny:  # the self-check: the same scores through both libraries pick the same channels
        for ratio in args.ratios:
            for peer, ours in (("tp-activation", "l1"), ("tp-taylor", "taylor")):
                common = bench.common.get(f"{peer} {ratio:.0%}", {}).get(ours)
                if common is not None and common < 0.99:
                    raise AssertionError(
                        f"{peer} keeps {common:.1%} of minigpts {ours}'s channels at {ratio:.0%}"
                    )
    return {"rows": bench.rows, "checks": bench.checks, "common": bench.common}


if __name__ == "__main__":
    main()

"""Structured pruning of trained towers on Torch-Pruning's dependency graph: whole attention heads, MLP hidden
channels, the inner channels of ResNet blocks and a stem's width are cut out and their modules rebuilt
smaller, so the pruned model really has fewer parameters and FLOPs (nothing is masked); never a residual
stream or a tower's output width.

For each tower a ``tp.DependencyGraph`` is traced from the example inputs (for a ``DualEncoder``: a function
calling that tower's ``encode_image`` / ``encode_text``, projection included). Our text towers are first
converted, exactly, to ``PrunableEncoderLayer`` s (``compress/prunable_text.py``). Then:

    sites     every attention / MLP / ResNet block is matched to a *site*: a root layer whose channels are the
              structures (heads: ``head_dim`` consecutive channels each) and the producers that must be cut
              with them. Known blocks: our text layers, timm ``Attention`` (fused ``qkv``) and ``Mlp``,
              Hugging Face BERT-style self-attention (``query``, ``key``, ``value``) and layers
              (``intermediate.dense`` -> ``output.dense``), timm / torchvision ``BasicBlock`` and
              ``Bottleneck``. ``stem``: a convolutional tower's first conv -> BN outside its blocks; cut
              only where its group passes the check below with the whole tower as its block (a stem that
              feeds a projection shortcut, as in a narrow ResNet); a stem whose width is a residual stream
              is kept and reported (``kept``), since asking for it is a "where possible".
    checks    the site's full tp group must stay inside its block: its only output-side cuts are the site's
              producers (whole, e.g. all three blocks of a fused qkv) and norms over exactly those channels;
              everything else it touches loses input columns only. A group reaching anything else would
              change a residual stream or a tower's output width, so the block is refused. Any attention /
              MLP / conv block of a requested kind without a valid site raises ``ValueError`` naming it
              (module name and type); nothing is skipped silently.
    scores    tp's group importance over the whole group (``GroupMagnitudeImportance`` p=1 / p=2, or
              ``GroupTaylorImportance`` with ``multivariable=True``: per layer ``|sum(w * grad)|``, the
              first-order change of the loss when the structure is zeroed, from the gradients
              ``accumulate_grads`` leaves on a calibration set), summed over the group's layers; a head's
              score is the sum over its channels.
    selection per_layer: every site keeps ``round((1 - ratio) * n)`` structures, at least one. global: per
              kind, the lowest ``round(ratio * total)`` structures across all sites go, never a site's last
              one; scores are first divided by the number of weights each structure owns, so that sites of
              different shapes compare (dividing by each site's mean score instead would make every site
              lose the same fraction and hide a layer whose weights are uniformly small, which is what a
              global budget is for).
    cutting   ``DG.get_pruning_group(root, fn, indices).prune()``; head-count attributes are then updated.

Why not ``tp.pruner.MetaPruner``: its counts differ (``ceil`` for heads, ``int`` for widths), its global mode
ranks MLP and conv channels in one pool and can remove every head of a layer, and ``ignored_layers`` alone
cannot say "prune this group but never that residual width". The graph, the groups, the importance and the
cutting are tp's; only the choice of how many and which ones is ours.

Worth knowing: tp's magnitude scores add BN gamma (``|gamma|^p``) to a conv channel's score rather than
multiply by it; tp's Taylor score ignores BatchNorm (it tests for the GroupNorm pruning function) and needs
``.grad`` on every weight of a group (missing gradients raise here rather than count as zero); Hugging Face
models keep their ``config.num_attention_heads`` (per-module attributes are updated, the config is shared by
all layers), so re-creating one from its config gives the unpruned shape.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import pairwise

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from autoglm_train.compress import IMPORTANCES, KINDS, SCOPES
from autoglm_train.compress.prunable_text import PrunableEncoderLayer, convert_text_towers

_NORMS = (_BatchNorm, nn.LayerNorm)


@dataclass
class _Site:
    """``size`` structures of ``width`` consecutive channels each, along the ``root_fn`` side of ``root``;
    ``producers`` are the layers whose outputs are the structures (all must be cut, whole); ``block`` is the
    module the whole group must stay inside; ``after(n)`` updates head-count attributes."""

    kind: str
    name: str
    block: nn.Module
    root: nn.Module
    root_fn: Callable
    size: int
    width: int = 1
    producers: tuple[nn.Module, ...] = ()
    after: Callable[[int], None] | None = None
    group: object = field(default=None, repr=False)  # the full tp group, once checked


@dataclass
class _Tower:
    name: str
    modules: list[tuple[str, nn.Module]]  # (full name, module) of everything in the tower
    forward: Callable[[nn.Module, object], object]  # what the graph traces: forward(model, inputs)
    inputs: object


# --------------------------------------------------------------------------------------------------------
# towers and how to run them


def _call(module: nn.Module, inputs: object) -> object:
    if isinstance(inputs, Mapping):
        return module(**inputs)
    if isinstance(inputs, tuple | list):
        return module(*inputs)
    return module(inputs)


def _is_dual(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("image_tower", "text_tower", "encode_image", "encode_text"))


def _towers(model: nn.Module, example_inputs: object) -> list[_Tower]:
    if not _is_dual(model):
        return [_Tower(type(model).__name__, list(model.named_modules()), _call, example_inputs)]
    if not isinstance(example_inputs, Mapping) or not {"image", "text"} <= set(example_inputs):
        raise ValueError(
            "a DualEncoder needs example_inputs={'image': images, 'text': tokens} (one graph per tower)"
        )
    towers = []
    for key, attr, encode in (
        ("image", "image_tower", "encode_image"),
        ("text", "text_tower", "encode_text"),
    ):
        tower = getattr(model, attr)
        # the projection is traced too: were the tower's output width in a group, the projection's input
        # columns would show up in it and the check below would refuse the group
        forward = lambda m, x, encode=encode: getattr(m, encode)(x)
        towers.append(_Tower(attr, list(tower.named_modules(prefix=attr)), forward, example_inputs[key]))
    return towers


def _flat(out: object) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, tuple | list):
        return [t for o in out for t in _flat(o)]
    return []


@contextmanager
def _traceable(model: nn.Module):
    """tp traces through autograd: unlock locked towers (they run under no_grad) and let frozen parameters
    require grad while tracing. tp also switches the model to eval mode and leaves it there: restore."""
    training = {m: m.training for m in model.modules()}
    locked = [m for m in model.modules() if getattr(m, "locked", False)]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    try:
        for m in locked:
            m.locked = False
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for m in locked:
            m.locked = True
        for p in frozen:
            p.requires_grad_(False)
        for m, mode in training.items():
            m.training = mode


# --------------------------------------------------------------------------------------------------------
# sites: which blocks we know how to cut


def _linears(module: nn.Module, *names: str) -> list[nn.Linear] | None:
    found = [getattr(module, n, None) for n in names]
    return found if all(isinstance(f, nn.Linear) for f in found) else None


def _int_attrs(module: nn.Module, *names: str) -> list[int] | None:
    found = [getattr(module, n, None) for n in names]
    return found if all(isinstance(f, int) and f > 0 for f in found) else None


def _attention_site(name: str, module: nn.Module, parent: nn.Module | None) -> _Site | None:
    if isinstance(module, PrunableEncoderLayer):
        return _Site(
            "heads",
            f"{name}.attn",
            module,
            module.q,
            tp.prune_linear_out_channels,
            module.heads,
            module.head_dim,
            (module.q, module.k, module.v),
            lambda n: setattr(module, "heads", n),
        )
    fused, counts = _linears(module, "qkv", "proj"), _int_attrs(module, "num_heads", "head_dim")
    if fused and counts:  # timm Attention: qkv rows are (3, heads, head_dim); rooted at proj's input columns
        qkv, proj = fused
        heads, head_dim = counts
        if qkv.out_features == 3 * heads * head_dim and proj.in_features == heads * head_dim:
            gate = getattr(module, "gate", None)

            def after(n: int) -> None:
                module.num_heads = n
                if hasattr(module, "attn_dim"):
                    module.attn_dim = n * head_dim

            producers = (qkv,) + ((gate,) if isinstance(gate, nn.Linear) else ())
            return _Site(
                "heads", name, module, proj, tp.prune_linear_in_channels, heads, head_dim, producers, after
            )
    separate = _linears(module, "query", "key", "value")
    counts = _int_attrs(module, "num_attention_heads", "attention_head_size")
    if separate and counts and separate[0].out_features == counts[0] * counts[1]:
        heads, head_dim = counts

        def after(n: int) -> None:  # Hugging Face BERT-style: the output projection lives in the parent
            module.num_attention_heads = n
            if hasattr(module, "all_head_size"):
                module.all_head_size = n * head_dim

        block = parent if parent is not None else module
        root = separate[0]
        return _Site(
            "heads", name, block, root, tp.prune_linear_out_channels, heads, head_dim, tuple(separate), after
        )
    return None


def _mlp_site(name: str, module: nn.Module) -> _Site | None:
    if isinstance(module, PrunableEncoderLayer):
        fc1 = module.linear1
        return _Site(
            "mlp", f"{name}.mlp", module, fc1, tp.prune_linear_out_channels, fc1.out_features, 1, (fc1,)
        )
    if _linears(module, "fc1", "fc2"):  # timm Mlp
        fc1 = module.fc1
        return _Site("mlp", name, module, fc1, tp.prune_linear_out_channels, fc1.out_features, 1, (fc1,))
    inner, outer = getattr(module, "intermediate", None), getattr(module, "output", None)
    if isinstance(inner, nn.Module) and isinstance(outer, nn.Module) and _linears(inner, "dense"):
        if _linears(outer, "dense"):  # Hugging Face BERT-style layer: intermediate.dense -> output.dense
            fc1 = inner.dense
            return _Site(
                "mlp", f"{name}.mlp", module, fc1, tp.prune_linear_out_channels, fc1.out_features, 1, (fc1,)
            )
    return None


_RESNET_BLOCKS = ("BasicBlock", "Bottleneck")  # timm's and torchvision's, by class name


def _conv_sites(name: str, block: nn.Module) -> tuple[list[_Site], list[str]]:
    """ResNet blocks: conv1 (and a Bottleneck's conv2) out -> BN -> next conv in. The last conv feeds the
    residual sum and is never a root. An anti-aliasing layer (timm ``aa``) with weights or buffers (a blur
    filter per channel) has its own channel count, which tp cannot see: that path is refused. A stateless
    one (average pooling) does not care about channels and is let through."""
    if type(block).__name__ not in _RESNET_BLOCKS:
        return [], []
    bottleneck = isinstance(getattr(block, "conv3", None), nn.Conv2d)
    pairs = [("conv1", "bn1"), ("conv2", "bn2")] if bottleneck else [("conv1", "bn1")]
    aa = getattr(block, "aa", None)
    blocked = "conv2" if bottleneck else "conv1"
    sites, problems = [], []
    for conv_name, bn_name in pairs:
        conv = getattr(block, conv_name, None)
        if type(conv) is not nn.Conv2d or not isinstance(getattr(block, bn_name, None), nn.BatchNorm2d):
            problems.append(f"{conv_name} -> {bn_name} is not a plain Conv2d -> BatchNorm2d")
        elif conv_name == blocked and aa is not None and _has_state(aa):
            problems.append(
                f"{conv_name}'s channels pass through the anti-aliasing layer {type(aa).__name__}"
            )
        else:
            fn = tp.prune_conv_out_channels
            sites.append(
                _Site("channels", f"{name}.{conv_name}", block, conv, fn, conv.out_channels, 1, (conv,))
            )
    return sites, problems


def _stem_site(tower: _Tower) -> _Site | None:
    """A convolutional tower's stem: its first plain Conv2d outside any residual block, followed by a
    BatchNorm2d over its outputs (timm ResNets' ``conv1`` -> ``bn1``; a deep stem's first conv). Its output
    width is a structure to cut only where the next stage starts with a projection shortcut (a narrow
    ResNet's 64-wide stem before 32-wide blocks); where the stem feeds a residual stream, the group check
    says so and the stem is kept (``prune_model`` reports why)."""
    in_blocks = {id(m) for _, b in tower.modules if type(b).__name__ in _RESNET_BLOCKS for m in b.modules()}
    for (name, conv), (_, norm) in pairwise(tower.modules):
        if type(conv) is not nn.Conv2d or id(conv) in in_blocks:
            continue
        if conv.groups != 1 or not isinstance(norm, nn.BatchNorm2d) or norm.num_features != conv.out_channels:
            return None
        tower_module = tower.modules[0][1]
        return _Site(
            "stem", name, tower_module, conv, tp.prune_conv_out_channels, conv.out_channels, 1, (conv,)
        )
    return None


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _kinds_of(module: nn.Module) -> set[str]:
    """The kinds of block this module looks like, by type and class name: what must have a site."""
    cls = type(module).__name__.lower()
    layers = [m for m in module.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    kinds = set()
    if isinstance(module, nn.MultiheadAttention) or ("attention" in cls and layers):
        kinds.add("heads")
    if any(word in cls for word in ("mlp", "feedforward", "ffn", "intermediate")) and layers:
        kinds.add("mlp")
    convs = sum(isinstance(m, nn.Conv2d) for m in layers)
    if any(word in cls for word in ("block", "bottleneck", "residual")) and convs >= 2:
        kinds.add("channels")
    return kinds


def _find_sites(tower: _Tower, targets: Iterable[str]) -> tuple[list[_Site], list[str]]:
    """Sites of the requested kinds, and one line per block of a requested kind that has none."""
    targets = set(targets)
    by_name = dict(tower.modules)
    sites: list[_Site] = []
    problems: list[str] = []
    for name, module in tower.modules:
        parent = by_name.get(name.rpartition(".")[0]) if "." in name else None
        if "heads" in targets and (site := _attention_site(name, module, parent)):
            sites.append(site)
        if "mlp" in targets and (site := _mlp_site(name, module)):
            sites.append(site)
        if "channels" in targets:
            found, blocked = _conv_sites(name, module)
            sites += found
            problems += [f"{name} ({type(module).__name__}): {why}" for why in blocked]
    if "stem" in targets and (site := _stem_site(tower)):
        sites.append(site)
    for name, module in tower.modules:
        missing = []
        for kind in sorted(_kinds_of(module) & targets):
            related = (s.block for s in sites if s.kind == kind)
            if not any(b is module or _contains(b, module) or _contains(module, b) for b in related):
                missing.append(kind)
        if missing and not any(p.startswith(f"{name} (") for p in problems):
            label = f"{name or '<model>'} ({type(module).__name__})"
            problems.append(f"{label}: no {'/'.join(missing)} structure this pruner knows how to cut")
    return sites, problems


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


# --------------------------------------------------------------------------------------------------------
# checking a site's group: it must stay inside the block


def _check_group(graph: tp.DependencyGraph, site: _Site, group) -> str | None:
    """Why the group would cut more than the site's structures, or None."""
    inside = {id(m) for m in site.block.modules()}
    producers = {id(p): p for p in site.producers}
    cut: set[int] = set()
    channels = site.size * site.width
    for dep, idxs in group:
        module, fn = dep.target.module, dep.handler
        if isinstance(module, nn.Parameter):
            return f"its channels reach the parameter {graph._param_to_name.get(module, '?')}"
        if not isinstance(module, nn.Module) or not list(module.parameters(recurse=False)):
            continue  # tp's stand-ins for reshapes, activations, attention: nothing to cut
        label = f"{graph._module2name.get(module, '?')} ({type(module).__name__})"
        if id(module) not in inside:
            return f"its channels reach {label} outside the block"
        out_side = graph.is_out_channel_pruning_fn(fn)
        if isinstance(module, nn.Linear) or (type(module) is nn.Conv2d and module.groups == 1):
            if out_side:
                if id(module) not in producers:
                    return f"its group also cuts the outputs of {label}"
                whole = module.out_features if isinstance(module, nn.Linear) else module.out_channels
                if len(idxs) != whole:
                    return f"its group cuts only {len(idxs)} of the {whole} outputs of {label}"
                cut.add(id(module))
        elif isinstance(module, _NORMS):
            size = module.num_features if isinstance(module, _BatchNorm) else module.normalized_shape[-1]
            if size != channels:
                return (
                    f"its group cuts {label}, which normalizes {size} features, not the {channels} channels"
                )
        elif isinstance(module, nn.Conv2d) and module.groups != 1:
            return f"its group reaches the grouped convolution {label}"
        else:
            return f"its group reaches {label}, which this pruner does not cut"
    missing = [graph._module2name.get(p, "?") for i, p in producers.items() if i not in cut]
    if missing:
        return f"tp's group does not reach {', '.join(missing)}"
    return None


def _full_group(graph: tp.DependencyGraph, site: _Site):
    return graph.get_pruning_group(site.root, site.root_fn, list(range(site.size * site.width)))


# --------------------------------------------------------------------------------------------------------
# scores


def _importance(importance: str) -> tp.importance.Importance:
    # summed over the group's layers, unnormalized: per-weight normalization for the global scope is ours
    if importance == "taylor":
        return tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None, multivariable=True)
    return tp.importance.GroupMagnitudeImportance(
        p=1 if importance == "l1" else 2, group_reduction="sum", normalizer=None
    )


def _weights_per_structure(site: _Site) -> float:
    """Weights (norm gammas included, biases not: what tp's scores sum over) owned by one structure."""
    total = 0
    for dep, idxs in site.group:
        module, fn = dep.target.module, dep.handler
        if isinstance(module, nn.Linear | nn.Conv2d):
            weight = module.weight
            out_side = fn in (tp.prune_linear_out_channels, tp.prune_conv_out_channels)
            total += len(idxs) * (weight[0].numel() if out_side else weight.numel() // weight.shape[1])
        elif isinstance(module, _NORMS) and getattr(module, "weight", None) is not None:
            total += len(idxs)
    return total / site.size


def _lacks_grads(site: _Site) -> bool:
    """tp's Taylor score reads ``.grad`` of every Linear / Conv / LayerNorm weight in the group and fails
    on a missing one."""
    for dep, _ in site.group:
        weight = getattr(dep.target.module, "weight", None)
        if isinstance(dep.target.module, nn.Linear | nn.Conv2d | nn.LayerNorm) and weight is not None:
            if weight.grad is None:
                return True
    return False


def _scores(site: _Site, scorer: tp.importance.Importance) -> Tensor:
    imp = scorer(site.group)
    if imp is None:
        raise ValueError(f"tp found no weights to score in the group of {site.name}")
    return imp.detach().float().cpu().view(site.size, site.width).sum(1)


# --------------------------------------------------------------------------------------------------------
# selection: how many structures each site keeps, and which


def _keep_count(n: int, ratio: float) -> int:
    return max(1, min(n, round((1 - ratio) * n)))


def _top(scores: Tensor, k: int) -> Tensor:
    """Indices of the k highest scores, ascending; ties keep the earlier structure."""
    return torch.argsort(scores, descending=True, stable=True)[:k].sort().values


def _global_keep(scores: list[Tensor], ratio: float) -> list[Tensor]:
    """Remove the lowest ``round(ratio * total)`` scores across all sites, never a site's last one."""
    flat = torch.cat(scores)
    owner = [(i, j) for i, s in enumerate(scores) for j in range(len(s))]
    left = [len(s) for s in scores]
    removed: list[set[int]] = [set() for _ in scores]
    budget = round(ratio * len(flat))
    for position in torch.argsort(flat, stable=True).tolist():
        if budget == 0:
            break
        site, index = owner[position]
        if left[site] > 1:
            removed[site].add(index)
            left[site] -= 1
            budget -= 1
    return [
        torch.tensor([j for j in range(len(s)) if j not in gone])
        for s, gone in zip(scores, removed, strict=True)
    ]


def _select(sites: list[_Site], scores: list[Tensor], ratio: float, scope: str) -> list[Tensor]:
    """Kept structure indices per site (see "selection" above)."""
    if scope == "per_layer":
        return [_top(s, _keep_count(site.size, ratio)) for site, s in zip(sites, scores, strict=True)]
    keeps: list[Tensor | None] = [None] * len(sites)
    for kind in KINDS:
        members = [i for i, site in enumerate(sites) if site.kind == kind]
        if members:
            normalized = [scores[i] / _weights_per_structure(sites[i]) for i in members]
            for i, keep in zip(members, _global_keep(normalized, ratio), strict=True):
                keeps[i] = keep
    return keeps


# --------------------------------------------------------------------------------------------------------
# public entry point


def _validate(
    ratio: float, importance: str, scope: str, targets: tuple[str, ...], grads_available: bool
) -> None:
    if not isinstance(ratio, numbers.Real) or not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")
    if importance not in IMPORTANCES:
        raise ValueError(f"importance must be one of {IMPORTANCES}, got {importance!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    unknown = [t for t in targets if t not in KINDS]
    if unknown or not targets:
        raise ValueError(f"targets must be a non-empty subset of {KINDS}, got {targets!r}")
    if importance == "taylor" and not grads_available:
        raise ValueError(
            "importance='taylor' needs gradients: run accumulate_grads on a calibration set and pass "
            "grads_available=True"
        )


def _raise_unprunable(tower: str, problems: list[str], cause: Exception | None = None) -> None:
    raise ValueError(
        f"prune: cannot prune {tower}; blocks it cannot cut (restrict targets): " + "; ".join(problems)
    ) from cause


def prune_model(
    model: nn.Module,
    ratio: float,
    example_inputs: object,
    importance: str = "l1",
    scope: str = "per_layer",
    targets: Iterable[str] = KINDS,
    grads_available: bool = False,
) -> dict:
    """Prune ``model`` in place: attention heads, MLP hidden channels and inner ResNet block channels, never
    a residual stream or a tower's output width. ``model``: a ``DualEncoder`` (then
    ``example_inputs={"image": images, "text": tokens}``, one graph per tower), a tower, or a bare timm /
    Hugging Face module (``example_inputs``: a tensor, a tuple of positional or a dict of keyword
    arguments). ``ratio``: the fraction of each kind's structures removed, in [0, 1); ``importance``: l1 |
    l2 | taylor (needs ``accumulate_grads`` first and ``grads_available=True``); ``scope``: per_layer |
    global; ``targets``: any of ``KINDS``.

    Returns ``{"params_before", "params_after", "removed": {kind: n}, "layers": {site: (before, after)},
    "kept": {stem: why}}`` (``kept``: stems left whole because their channels are a residual stream).
    Raises ``ValueError`` when a block of a requested kind cannot be cut (named, with why), before anything
    is cut. Ratio 0 changes no module (text towers are still converted, exactly)."""
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    _validate(ratio, importance, scope, targets, grads_available)
    params_before = count_params(model)
    convert_text_towers(model)
    towers = _towers(model, example_inputs)

    # everything is found and checked before anything is cut: a refused block leaves the model as it was
    plans = []
    kept: dict[str, str] = {}  # stems whose width cannot be cut, and why
    with _traceable(model):
        for tower in towers:
            sites, problems = _find_sites(tower, targets)
            if problems:
                _raise_unprunable(tower.name, problems)
            if not sites:  # nothing of the requested kinds in this tower: no graph needed
                continue
            shapes: list[tuple] = []

            def record(m, x, forward=tower.forward, shapes=shapes):
                out = forward(m, x)
                shapes.extend(tuple(t.shape) for t in _flat(out))
                return out

            try:
                graph = tp.DependencyGraph().build_dependency(
                    model, example_inputs=tower.inputs, forward_fn=record, verbose=False
                )
            except Exception as exc:  # tp raises on module types and ops it cannot trace
                names = [f"{n} ({type(m).__name__})" for n, m in tower.modules if _kinds_of(m) & set(targets)]
                _raise_unprunable(tower.name, [f"tp failed to trace it: {exc!r}"] + names, exc)
            for site in sites:
                if site.root not in graph.module2node:
                    problems.append(f"{site.name}: not reached by the traced forward")
                    continue
                try:
                    site.group = _full_group(graph, site)
                except Exception as exc:
                    problems.append(f"{site.name} ({type(site.block).__name__}): tp raised {exc!r}")
                    continue
                if why := _check_group(graph, site, site.group):
                    if site.kind == "stem":  # a stem feeding a residual stream is kept, and said so
                        kept[site.name] = why
                        continue
                    problems.append(f"{site.name} ({type(site.block).__name__}): {why}")
            if problems:
                _raise_unprunable(tower.name, problems)
            sites = [site for site in sites if site.name not in kept]
            plans.append((tower, graph, sites, shapes))

    all_sites = [site for _, _, sites, _ in plans for site in sites]
    if importance == "taylor":
        missing = [site.name for site in all_sites if _lacks_grads(site)]
        if missing:
            raise ValueError(
                "importance='taylor' but these sites have weights without .grad (run accumulate_grads): "
                + ", ".join(missing)
            )
    scorer = _importance(importance)
    scores = [_scores(site, scorer) for site in all_sites]
    keeps = iter(_select(all_sites, scores, ratio, scope))

    requires_grad = {
        (m, n): p.requires_grad for m in model.modules() for n, p in m.named_parameters(recurse=False)
    }
    removed = dict.fromkeys(KINDS, 0)
    layers = {}
    for tower, graph, sites, shapes in plans:
        changed = False
        for site in sites:
            keep = next(keeps)
            gone = sorted(set(range(site.size)) - set(keep.tolist()))
            removed[site.kind] += len(gone)
            layers[site.name] = (site.size, site.size - len(gone))
            if not gone:
                continue
            channels = [h * site.width + c for h in gone for c in range(site.width)]
            with torch.no_grad():
                graph.get_pruning_group(site.root, site.root_fn, channels).prune()
            if site.after is not None:
                site.after(site.size - len(gone))
            changed = True
        if changed:
            _check_forward(model, tower, shapes)
    # tp rebuilds every cut parameter as a fresh nn.Parameter, which requires grad: keep frozen ones frozen
    for (module, name), flag in requires_grad.items():
        param = module._parameters.get(name)
        if param is not None and param.requires_grad != flag:
            param.requires_grad_(flag)
    return {
        "params_before": params_before,
        "params_after": count_params(model),
        "removed": removed,
        "layers": layers,
        "kept": kept,
    }


def _check_forward(model: nn.Module, tower: _Tower, shapes: list[tuple]) -> None:
    """The pruned tower still runs on the example inputs and gives outputs of the same shapes."""
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            after = [tuple(t.shape) for t in _flat(tower.forward(model, tower.inputs))]
    except Exception as exc:
        raise RuntimeError(f"prune: {tower.name} no longer runs after pruning: {exc!r}") from exc
    finally:
        for m, mode in training.items():
            m.training = mode
    if after != shapes:
        raise RuntimeError(f"prune: {tower.name} output shapes changed from {shapes} to {after}")


def accumulate_grads(
    model: nn.Module, loss_fn: Callable[[nn.Module, object], Tensor], batches: Iterable
) -> float:
    """Zero the gradients, then sum ``loss_fn(model, batch).backward()`` over a calibration set into
    ``.grad`` (for ``importance="taylor"``). Runs in eval mode, restored afterwards: no dropout noise, and
    BatchNorm uses, rather than overwrites, the trained running statistics. Returns the mean loss."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    model.zero_grad(set_to_none=True)
    total, count = 0.0, 0
    try:
        with torch.enable_grad():
            for batch in batches:
                loss = loss_fn(model, batch)
                loss.backward()
                total, count = total + float(loss.detach()), count + 1
    finally:
        for module, training in flags.items():
            module.training = training
    if count == 0:
        raise ValueError("accumulate_grads got no calibration batches")
    return total / count


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

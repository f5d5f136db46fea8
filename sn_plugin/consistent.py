"""Consistent Normalization for a whole model: branch selection, the paper's Algorithm 1,
conversion of a BN model and export of one branch.

Branch 0 belongs to the identity transform (the paper's ``T_1``); inference uses it
unless a known test transform selects another branch ("dynamic inference", e.g. a
model trained at 224/192/128 px evaluated at 128 px with the 128 px branch).
"""
import operator
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .consistent_norm import ConsistentNorm
from .conversion import replace_modules
from .switchable_norm import FrozenSwitchNorm, SwitchNormBase

__all__ = [
    "ConsistentStep", "branch_assignment", "consistent_branch", "consistent_norm_layers", "consistent_train_step",
    "convert_to_cn", "export_branch",
]

Branch = Union[int, Sequence[int], Tensor]  # one branch for the batch, or one per sample
Transform = Optional[Callable[[Tensor], Tensor]]  # None: the identity
CN_SOURCES = (_BatchNorm, nn.GroupNorm, SwitchNormBase)  # what convert_to_cn turns into CN by default


def consistent_norm_layers(model: nn.Module) -> "OrderedDict[str, ConsistentNorm]":
    """Every CN layer of ``model`` by qualified name, in module order."""
    return OrderedDict((name, m) for name, m in model.named_modules() if isinstance(m, ConsistentNorm))


def _layers_or_error(model: nn.Module, what: str) -> "OrderedDict[str, ConsistentNorm]":
    layers = consistent_norm_layers(model)
    if not layers:
        raise ValueError(f"{what}: {type(model).__name__} has no ConsistentNorm layers. Convert the model first "
                         f"(sn_plugin.convert_to_cn) or build it with CN norm layers.")
    return layers


@contextmanager
def consistent_branch(model: nn.Module, branch: Branch) -> Iterator[None]:
    """Select the branch of every CN layer of ``model`` for the ``with`` block (the paper's ``M.assign(k)``).

    ``branch`` is one branch index for every sample, or one index per sample
    (a sequence or 1-D tensor as long as the batch: mixed views, or a branch
    per dataset, see :func:`branch_assignment`). Every layer's previous
    selection is restored when the block ends, also when it raises.
    """
    layers = _layers_or_error(model, "consistent_branch")
    saved = [(layer, layer.active_branch, layer.sample_branches) for layer in layers.values()]
    per_sample = isinstance(branch, Sequence) or (isinstance(branch, Tensor) and branch.dim() > 0)
    try:
        for layer in layers.values():
            if per_sample:
                layer.sample_branches = branch
            else:
                layer.sample_branches = None
                layer.active_branch = operator.index(branch)
        yield
    finally:
        for layer, active, samples in saved:
            layer.active_branch = active
            layer.sample_branches = samples


def branch_assignment(tags: Sequence[str], branch_of: Mapping[str, int]) -> Tensor:
    """One branch index per sample from a tag per sample (e.g. its dataset's name), for
    :func:`consistent_branch`: the paper's Cityscapes + GTA5 setting gives each dataset its branch.

    >>> branch_assignment(["cityscapes", "gta5", "cityscapes"], {"cityscapes": 0, "gta5": 1})
    tensor([0, 1, 0])
    """
    unknown = sorted({tag for tag in tags if tag not in branch_of})
    if unknown:
        raise KeyError(f"branch_assignment: no branch for tag(s) {unknown}; known tags: {sorted(branch_of)}")
    return torch.tensor([branch_of[tag] for tag in tags], dtype=torch.long)


@dataclass
class ConsistentStep:
    """What :func:`consistent_train_step` did: the summed loss and each branch's loss (detached)."""

    loss: Tensor
    branch_losses: List[Tensor]


def consistent_train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: Tensor,
    targets,
    transforms: Sequence[Transform],
    loss_fn: Callable[[object, object], Tensor],
    mode: str = "sequential",
    target_transforms: Optional[Sequence[Optional[Callable]]] = None,
) -> ConsistentStep:
    """One iteration of the paper's Algorithm 1: the loss of every transformed view, each normalized
    by its own branch, summed with weight 1, then one optimizer step.

    A model without CN layers runs the same recipe with shared normalizers: the paper's
    "BN with data augmentation" baseline (``"mixed"``: BN statistics over all views together).

    Args:
        model: a model with CN layers of at least ``len(transforms)`` branches (or none).
        optimizer: stepped once, after the gradients of every view are in.
        inputs: the batch (N, ...).
        targets: passed to ``loss_fn`` (after ``target_transforms[k]`` for view k, if given).
        transforms: ``T_k`` for branch k, each mapping the batch to a batch; None is the
            identity. ``transforms[0]`` defines branch 0, the one inference uses: normally None.
        loss_fn: ``loss_fn(output, targets)`` -> a scalar, the mean over the view's samples.
        mode: ``"sequential"``: one forward and backward per view (views may differ in size,
            e.g. 224/192/128 px). ``"mixed"``: the views (same size) are concatenated into one
            batch and run in one forward; each view's samples are normalized by their own
            branch (BN branches take statistics over that view only), so the losses and
            gradients equal sequential mode's, computed in one pass.
        target_transforms: per view, a function of the targets (e.g. resizing a label map),
            or None to use ``targets`` as they are.

    Returns:
        the summed loss and each branch's loss, detached.
    """
    if mode not in ("sequential", "mixed"):
        raise ValueError(f"consistent_train_step: mode must be 'sequential' or 'mixed', got {mode!r}")
    if not transforms:
        raise ValueError("consistent_train_step: give at least one transform (None for the identity)")
    if target_transforms is not None and len(target_transforms) != len(transforms):
        raise ValueError(f"consistent_train_step: {len(target_transforms)} target_transforms for "
                         f"{len(transforms)} transforms; give one per view (None keeps the targets)")
    layers = consistent_norm_layers(model)
    too_few = sorted({layer.num_branches for layer in layers.values() if layer.num_branches < len(transforms)})
    if too_few:
        raise ValueError(f"consistent_train_step: {len(transforms)} transforms but the model has CN layers with "
                         f"only {too_few} branches; build the CN layers with num_branches={len(transforms)}")
    views = [inputs if t is None else t(inputs) for t in transforms]
    view_targets = [targets if tt is None else tt(targets) for tt in (target_transforms or [None] * len(views))]
    optimizer.zero_grad(set_to_none=True)
    if mode == "sequential":
        losses = []
        for k, (view, view_target) in enumerate(zip(views, view_targets)):
            with _selected(model, k, layers):
                loss = loss_fn(model(view), view_target)
            loss.backward()  # one graph at a time; the gradients add up as those of the summed loss
            losses.append(loss.detach())
    else:
        shapes = {tuple(v.shape) for v in views}
        if len(shapes) > 1:
            raise ValueError(f"consistent_train_step: mode='mixed' concatenates the views into one batch, so they "
                             f"must have one shape; got {sorted(shapes)}. Use mode='sequential' for views of "
                             f"different sizes.")
        sizes = [len(v) for v in views]
        branches = torch.arange(len(views)).repeat_interleave(torch.tensor(sizes))
        with _selected(model, branches, layers):
            outputs = _split_batch(model(torch.cat(views)), sizes)
        per_view = [loss_fn(output, view_target) for output, view_target in zip(outputs, view_targets)]
        torch.stack(per_view).sum().backward()
        losses = [loss.detach() for loss in per_view]
    optimizer.step()
    return ConsistentStep(torch.stack(losses).sum(), losses)


def _selected(model: nn.Module, branch: Branch, layers) -> ContextManager:
    return consistent_branch(model, branch) if layers else nullcontext()


def _split_batch(output, sizes: List[int]) -> list:
    """A model's output on concatenated views, split back into one output per view (tensors,
    and tuples / lists / dicts of them, split along dim 0)."""
    if isinstance(output, Tensor):
        return list(output.split(sizes))
    if isinstance(output, (tuple, list)):
        return [type(output)(parts) for parts in zip(*(_split_batch(o, sizes) for o in output))]
    if isinstance(output, Mapping):
        split = {key: _split_batch(value, sizes) for key, value in output.items()}
        return [{key: parts[k] for key, parts in split.items()} for k in range(len(sizes))]
    raise TypeError(f"consistent_train_step(mode='mixed') splits the model's output into views along dim 0; got "
                    f"a {type(output).__name__}. Return tensors (or tuples/lists/dicts of them), or use "
                    f"mode='sequential'.")


def convert_to_cn(model: nn.Module, num_branches: int,
                  norms: Tuple[type, ...] = CN_SOURCES) -> nn.Module:
    """A copy of ``model`` whose normalization layers are CN layers of ``num_branches`` branches,
    every branch starting as a copy of the layer it replaces.

    As in the paper, every normalization layer is replaced, stem and shortcut too. By default
    ``norms`` covers torch's BatchNorms (SyncBatchNorm included), GroupNorm and SN layers; frozen
    layers (``FrozenSwitchNorm``, torchvision's/detectron2's ``FrozenBatchNorm2d``) are left as they
    are, since they cannot learn anything per branch. Training mode, ``requires_grad``, device and
    dtype carry over; ``model`` is not modified.
    """

    def convert(name, module):
        if isinstance(module, ConsistentNorm):
            return module  # already CN: its branches are not converted again
        if isinstance(module, norms) and not isinstance(module, FrozenSwitchNorm):
            return ConsistentNorm.from_norm(module, num_branches)
        return None

    return replace_modules(model, convert)


def export_branch(model: nn.Module, branch: int = 0) -> nn.Module:
    """A copy of ``model`` in which every CN layer is replaced by its branch ``branch``: a plain
    model (e.g. BN) with that branch's parameters and statistics, for deployment at no extra cost.
    ``model`` is not modified."""
    for name, layer in _layers_or_error(model, "export_branch").items():
        if not 0 <= branch < layer.num_branches:
            raise ValueError(f"export_branch: CN layer {name!r} has {layer.num_branches} branches "
                             f"(0..{layer.num_branches - 1}), asked for branch {branch}")
    return replace_modules(model, lambda name, m: m.branches[branch] if isinstance(m, ConsistentNorm) else None)

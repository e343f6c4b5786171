"""The training loop: optimizer groups and schedule, EMA, one epoch of training (validation: ``mdetr.evaluate``).

Nothing here syncs the host every step: losses are accumulated on the device and read every ``log_every`` steps.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import Tensor, nn

from mdetr import distributed as dist_utils
from mdetr.config import OptimConfig, in_module, module_names, top_modules
from mdetr.models import param_groups

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def make_optimizer(model: nn.Module, cfg: OptimConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW with MDETR's three lr groups, in the reference's order: 0 rest, 1 backbone, 2 text encoder."""
    groups = param_groups(unwrap(model))
    lrs = {"rest": cfg.lr, "backbone": cfg.lr_backbone, "text_encoder": cfg.text_encoder_lr}
    ordered = [{"params": groups[k], "lr": lrs[k], "name": k} for k in ("rest", "backbone", "text_encoder")]
    use_fused = fused and all(p.is_cuda for g in groups.values() for p in g)
    return torch.optim.AdamW(ordered, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=use_fused or None)


def adjust_learning_rate(optimizer: torch.optim.Optimizer, epoch: int, step: int, total_steps: int,
                         cfg: OptimConfig) -> None:
    """MDETR's schedule: main and backbone lr drop by ``lr_gamma`` (0.1) at epoch ``lr_drop`` (or after
    ``lr_drop_step`` optimizer steps, when set; with ``lr_ramp_steps`` the drop is a linear decay over that many
    steps, complete at ``lr_drop_step``); the text encoder warms up linearly over ``warmup_fraction`` of all steps,
    then decays linearly to 0."""
    if cfg.lr_drop_step > 0:
        left = cfg.lr_drop_step - step  # steps until the drop is complete
        if left <= 0:
            gamma = cfg.lr_gamma
        elif left >= cfg.lr_ramp_steps:  # before the ramp (or no ramp): exactly 1
            gamma = 1.0
        else:
            gamma = cfg.lr_gamma + (1.0 - cfg.lr_gamma) * left / cfg.lr_ramp_steps
    else:
        gamma = cfg.lr_gamma ** (epoch // cfg.lr_drop) if cfg.lr_drop > 0 else 1.0
    warmup = round(cfg.warmup_fraction * total_steps)
    if step < warmup:
        text_gamma = step / max(1, warmup)
    else:
        text_gamma = max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    base = {"rest": cfg.lr * gamma, "backbone": cfg.lr_backbone * gamma, "text_encoder": cfg.text_encoder_lr * text_gamma}
    for group in optimizer.param_groups:
        group["lr"] = base[group["name"]]


class ModelEMA:
    """Exponential moving average of a model's parameters (buffers are copied)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Averages the trainable parameters. Frozen ones (a frozen backbone or text encoder: most of the small
        presets' weights) never change, and the copy already holds them: averaging them would only cost time."""
        source = unwrap(model)
        pairs = [(e, p.detach()) for e, p in zip(self.module.parameters(), source.parameters()) if p.requires_grad]
        if pairs:
            torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1.0 - self.decay)
        for b_ema, b in zip(self.module.buffers(), source.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> Dict[str, Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        self.module.load_state_dict(state)


@dataclass
class TrainState:
    epoch: int = 0  # the next epoch to run (or the one to finish, when ``micro`` > 0)
    step: int = 0  # optimizer steps done
    micro: int = 0  # micro-batches of ``epoch`` already trained: > 0 after a stop within the epoch
    epoch_sums: Dict[str, float] = field(default_factory=dict)  # the epoch's loss sums over its ``epoch_count``
    epoch_count: int = 0  # micro-batches so far (kept across a stop within the epoch, for the epoch's mean)
    history: List[Dict[str, float]] = field(default_factory=list)  # one dict per validation


def to_device(batch: Dict[str, object], device: torch.device) -> Dict[str, object]:
    out = {}
    for key, value in batch.items():
        if isinstance(value, Tensor):
            out[key] = value.to(device, non_blocking=True)
        elif key == "answers" and isinstance(value, dict):
            out[key] = {k: v.to(device, non_blocking=True) for k, v in value.items()}
        else:
            out[key] = value
    return out


def autocast(device: torch.device, precision: str):
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_one_epoch(model: nn.Module, criterion, loader: Iterable, optimizer: torch.optim.Optimizer,
                    scaler: Optional[torch.amp.GradScaler], ema: Optional[ModelEMA], state: TrainState,
                    optim_cfg: OptimConfig, total_steps: int, device: torch.device, precision: str,
                    log_every: int, max_steps: int = 0, deadline: Optional[float] = None,
                    on_log: Optional[Callable[[Dict[str, float]], None]] = None,
                    progress=None, on_step: Optional[Callable[[], None]] = None) -> Dict[str, float]:
    """One pass over ``loader`` (whose first ``state.micro`` batches the caller has skipped: ``set_epoch(epoch,
    skip=state.micro)``). Returns the mean of each logged loss over the epoch's batches trained so far (those
    before a stop within the epoch included: ``state.epoch_sums``). On return ``state.micro`` is 0 when the epoch
    is done, or the micro-batches done when ``deadline`` or ``max_steps`` stopped it (always a whole number of
    accumulation windows). A last window of fewer than ``grad_accum`` batches is neither loaded nor trained.
    ``on_step`` runs after every optimizer step (and its logging); it may switch the model to eval mode, training
    resumes in train mode."""
    model.train()
    criterion.train()
    accum = max(1, optim_cfg.grad_accum)
    usable = trained_batches(len(loader), accum)
    done = state.micro
    if state.micro == 0:  # a new epoch (else the one a stop interrupted: its sums so far carry on)
        state.epoch_sums, state.epoch_count = {}, 0
    epoch_sums = state.epoch_sums
    sums: Dict[str, Tensor] = {}
    count = 0
    norms: List[Tensor] = []  # each optimizer step's gradient norm before clipping, since the last log
    clip_groups = gradient_clip_groups(model, module_names(optim_cfg.clip_groups))
    tic = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    # the batches of whole windows only: the next one is not even fetched (its transforms could draw random numbers)
    for micro, batch in enumerate(itertools.islice(loader, max(0, usable - state.micro)), start=state.micro):
        done = micro + 1
        batch = to_device(batch, device)
        last_micro = (micro + 1) % accum == 0
        sync = contextlib.nullcontext()
        if not last_micro and isinstance(model, nn.parallel.DistributedDataParallel):
            sync = model.no_sync()
        with sync:
            with autocast(device, precision):
                outputs = model(batch["images"], batch["mask"], batch["captions"])
            losses = criterion(outputs, batch)  # fp32: the criterion upcasts what the model gives it
            loss = criterion.total(losses)
            (scaler.scale(loss / accum) if scaler else loss / accum).backward()
        for key, value in losses.items():
            sums[key] = sums.get(key, 0) + value.detach()
        sums["loss"] = sums.get("loss", 0) + loss.detach()
        count += 1
        if not last_micro:
            continue
        adjust_learning_rate(optimizer, state.epoch, state.step, total_steps, optim_cfg)
        if scaler:
            scaler.unscale_(optimizer)
        if optim_cfg.clip_max_norm > 0:
            norms.append(torch.linalg.vector_norm(torch.stack([
                torch.nn.utils.clip_grad_norm_(group, optim_cfg.clip_max_norm) for group in clip_groups])))
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model)
        state.step += 1
        if progress is not None:
            progress.update(1)
        if state.step % log_every == 0:
            record = {k: (v / count).item() for k, v in sums.items()}
            # checked where the loss comes to the host anyway; every rank stops when any rank's loss is not finite
            if not_finite_anywhere(record["loss"]):
                where = "" if not math.isfinite(record["loss"]) else " on another rank (this rank's losses follow)"
                raise FloatingPointError(
                    f"non-finite training loss{where} in the {count} steps up to step {state.step} (epoch "
                    f"{state.epoch}): " + ", ".join(f"{k}={v:.4g}" for k, v in record.items())
                    + "; nothing was saved after the last checkpoint (lower optim.lr or use --train.precision=fp32)")
            for k, v in record.items():
                epoch_sums[k] = epoch_sums.get(k, 0.0) + v * count
            state.epoch_count += count
            now = time.perf_counter()
            record.update(step=state.step, epoch=state.epoch, sec_per_step=(now - tic) / (count / accum),
                          lr=optimizer.param_groups[0]["lr"], lr_text=optimizer.param_groups[2]["lr"])
            if norms:  # median and max: a few spikes set the clip factor of their steps only
                norm = torch.stack(norms).float()
                record.update(grad_norm=norm.median().item(), grad_norm_max=norm.max().item())
            tic = now
            sums, count, norms = {}, 0, []
            if progress is not None:
                progress.set_postfix(loss=f"{record['loss']:.3f}")
            if on_log is not None:
                on_log(record)
            if deadline is not None and past_deadline(deadline):
                break
        if max_steps and state.step >= max_steps:
            break
        if on_step is not None:
            on_step()
            model.train()
            criterion.train()
    if count:
        for k, v in sums.items():
            epoch_sums[k] = epoch_sums.get(k, 0.0) + v.item()
        state.epoch_count += count
    state.micro = done if done < usable else 0
    return {k: v / max(state.epoch_count, 1) for k, v in epoch_sums.items()}


def gradient_clip_groups(model: nn.Module, names: Sequence[str]) -> List[List[nn.Parameter]]:
    """The parameter groups whose gradient norms are clipped each on its own (``optim.clip_groups``): one per module
    in ``names``, then all other parameters (MDETR: ``names`` empty, one group). A name that matches no trainable
    parameter is an error."""
    model = unwrap(model)
    wanted = list(names)
    groups: List[List[nn.Parameter]] = [[] for _ in range(len(wanted) + 1)]
    for key, param in model.named_parameters():
        if param.requires_grad:
            index = next((i for i, name in enumerate(wanted) if in_module(key, name)), len(wanted))
            groups[index].append(param)
    for name, group in zip(wanted, groups):
        if not group:
            raise ValueError(f"optim.clip_groups: {name!r} matches no trainable parameter of the model (expected "
                             f"module names such as {top_modules(k for k, _ in model.named_parameters())})")
    return [group for group in groups if group]


def not_finite_anywhere(loss: float) -> bool:
    """Whether ``loss`` is NaN or infinite on any rank (all ranks must stop together, or the others hang)."""
    bad = torch.tensor([0.0 if math.isfinite(loss) else 1.0])
    return bool(dist_utils.all_reduce_sum(bad).item() > 0)


def past_deadline(deadline: float) -> bool:
    """Whether any rank's clock passed ``deadline`` (``time.perf_counter`` seconds): all ranks stop together."""
    late = torch.tensor([float(time.perf_counter() >= deadline)])
    return bool(dist_utils.all_reduce_sum(late).item() > 0)


def trained_batches(num_batches: int, grad_accum: int) -> int:
    """The batches of an epoch that are trained: its whole accumulation windows."""
    accum = max(1, grad_accum)
    return num_batches // accum * accum


def steps_per_epoch(num_batches: int, grad_accum: int) -> int:
    return max(1, math.floor(num_batches / max(1, grad_accum)))

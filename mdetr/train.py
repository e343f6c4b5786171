"""Train MDETR.

    python -m mdetr.train [--preset NAME] [--config FILE] [--fused] [--resume auto|PATH] [--section.field=value ...]
    torchrun --nproc_per_node N -m mdetr.train ...          (DDP: NCCL on GPU, gloo on CPU)

The default preset trains on the embedded "shapes" world, generated on first use under ``data.root``.
Every epoch: a validation (``train.eval_task``: referring-expression precision@k, phrase-grounding Recall@k, or QA
accuracy for the QA presets), an atomic checkpoint, ``metrics.jsonl``, TensorBoard scalars and ``curves.png`` in
``train.output_dir``.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Subset

import detr_kernels
from mdetr import checkpoint as ckpt
from mdetr import config as config_mod
from mdetr import distributed as dist_utils
from mdetr.config import Config
from mdetr.data import build_datasets, build_loader
from mdetr.engine import (ModelEMA, TrainState, make_optimizer, past_deadline, steps_per_epoch, train_one_epoch,
                          trained_batches, unwrap)
from mdetr.evaluate import make_evaluator, refexp_entry_problem, run_evaluators
from mdetr.losses.criterion import build_criterion
from mdetr.models import build_from_config
from mdetr.tracking import RunLog


def choose_backends(fused: bool, device: torch.device) -> Dict[str, str]:
    """The backend of every op: the best available with ``--fused``, the pure-PyTorch reference without."""
    if fused:
        return detr_kernels.describe(device)
    return dict(detr_kernels.REFERENCE_BACKENDS)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(
        prog="python -m mdetr.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config fields (override with --section.field=value):\n" + "\n".join(config_mod.cli_help()))
    parser.add_argument("--preset", default="shapes", choices=sorted(config_mod.PRESETS))
    parser.add_argument("--config", help="YAML or JSON file applied over the preset")
    parser.add_argument("--fused", action="store_true", help="use detr_kernels' fused backends (train.fused=true)")
    parser.add_argument("--resume", help="'auto' (latest in output_dir) or a checkpoint path (train.resume)")
    args, rest = parser.parse_known_args(argv)
    bad = [r for r in rest if not (r.startswith("--") and "=" in r)]
    if bad:
        parser.error(f"unrecognized arguments {bad}: overrides look like --section.field=value")
    cfg = config_mod.resolve(args.preset, args.config, rest)
    if args.fused:
        cfg.train.fused = True
    if args.resume is not None:
        cfg.train.resume = args.resume
    return cfg


def run(cfg: Config, on_log=None) -> Dict[str, object]:
    """Train according to ``cfg``. Returns the final validation metrics and the training state."""
    check_best_metric(cfg)  # first: before data generation, model building or any output; every rank alike
    device, rank, world = dist_utils.init_from_env(cfg.train.device)
    main = rank == 0
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)  # the same initial weights on every rank (and so the same EMA start)
    out_dir = Path(cfg.train.output_dir)
    backends = choose_backends(cfg.train.fused, device)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        config_mod.save(cfg, out_dir / "config.yaml")
        detr_kernels.report(backends, device)

    train_set, val_set = build_datasets(cfg.data, cfg.model.text_encoder, is_main=main)
    check_val_entries(cfg, val_set)
    train_loader = build_loader(train_set, cfg.data.batch_size, shuffle=True, num_workers=cfg.data.num_workers,
                                seed=cfg.train.seed, distributed=world > 1, rank=rank,
                                aspect_groups=cfg.data.aspect_groups)
    val_loader = build_loader(validation_shard(val_set, rank, world), cfg.data.batch_size, shuffle=False,
                              num_workers=cfg.data.num_workers, seed=cfg.train.seed,
                              aspect_groups=cfg.data.aspect_groups)

    model = build_from_config(cfg.model, attention_backend=backends["attention"],
                              qa_no_object_weight=cfg.loss.eos_coef).to(device)
    criterion = build_criterion(cfg.loss, cfg.model.dec_layers, cfg.model.qa_dataset, backends,
                                appearance_head=cfg.model.appearance_head)
    optimizer = make_optimizer(model, cfg.optim, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type) if cfg.train.precision == "fp16" else None
    state = TrainState()

    resume_from = ckpt.find_resume(cfg.train.resume, out_dir)
    best_before: List[float] = []  # a resumed run's best.pth may hold a validation its checkpoint's history lacks
    if resume_from is not None:
        saved = ckpt.load_checkpoint(resume_from, trusted=cfg.train.trusted_checkpoints)
        if "optimizer" not in saved or "rng" not in saved:
            raise ValueError(f"--resume {resume_from}: not a resumable checkpoint (it holds weights only, like "
                             f"best.pth); resume from checkpoint.pth, or start from these weights with train.load")
        best_before = previous_best(out_dir, cfg.train.best_metric)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        micro = saved.get("micro", 0)  # > 0: the run stopped within that epoch, which resumes at the next batch
        if micro and (micro % cfg.optim.grad_accum or micro >= trained_batches(len(train_loader),
                                                                              cfg.optim.grad_accum)):
            raise ValueError(f"--resume {resume_from}: the run stopped {micro} batches into epoch {saved['epoch']}, "
                             f"which does not fit this run's epoch of {len(train_loader)} batches in windows of "
                             f"optim.grad_accum={cfg.optim.grad_accum}: data.batch_size, data.num_train or "
                             f"optim.grad_accum changed; resume with the checkpoint's settings")
        state = TrainState(epoch=saved["epoch"] + (micro == 0), step=saved["step"], micro=micro,
                           history=saved.get("history", []), epoch_sums=saved.get("epoch_sums", {}),
                           epoch_count=saved.get("epoch_count", 0))
        rng = saved["rng"]
        written_by = len(rng) if isinstance(rng, list) else 1
        if written_by != world:
            raise RuntimeError(f"checkpoint {resume_from} was written by {written_by} process(es), this run has "
                               f"{world}: an exact resume needs the same world size")
        ckpt.set_rng_state(rng[rank] if isinstance(rng, list) else rng)
        if main:
            print(f"resumed from {resume_from}: epoch {state.epoch}"
                  + (f" after its first {state.micro} batches" if state.micro else "") + f", step {state.step}")
            changed = config_mod.differences(config_mod.from_dict(saved["config"]), cfg) if "config" in saved else []
            if changed:  # allowed (e.g. more epochs), but the continuation is then not the interrupted run's
                print("the run continues with settings that differ from the checkpoint's: " + "; ".join(changed))
    else:
        if cfg.train.load:
            ckpt.load_weights(model, cfg.train.load, verbose=main, trusted=cfg.train.trusted_checkpoints,
                              skip=config_mod.module_names(cfg.train.load_skip))
        seed_everything(cfg.train.seed + rank)  # per-rank streams for dropout and augmentation
    # built after any resume, so it starts from the loaded weights when the checkpoint holds no EMA
    ema = ModelEMA(model, cfg.optim.ema_decay) if cfg.optim.ema else None
    if cfg.train.cache_features:  # one cache for the model and its EMA copy: the same frozen extractors
        cache = model.backbone[0].enable_feature_cache()
        text_cache = model.transformer.enable_text_cache() if cfg.model.freeze_text_encoder else None
        if ema is not None:
            ema.module.backbone[0].enable_feature_cache(cache)
            if text_cache is not None:
                ema.module.transformer.enable_text_cache(text_cache)
        if main:
            print("train.cache_features: the frozen backbone runs once per distinct image (train and val)"
                  + (", the frozen text encoder once per distinct caption" if text_cache is not None else
                     "; the text encoder trains, so it runs every step")
                  + ", then their outputs are reused")
    if ema is not None and resume_from is not None and saved.get("ema"):
        ema.load_state_dict(saved["ema"])

    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            # without the contrastive loss its two projections get no gradient
            find_unused_parameters=not cfg.loss.use_contrastive_align)

    per_epoch = steps_per_epoch(len(train_loader), cfg.optim.grad_accum)
    total_steps = per_epoch * cfg.optim.epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    log = RunLog(out_dir, enabled=main, resume_step=state.step if resume_from is not None else None)

    def log_train(record: Dict[str, float]) -> None:
        log.log("train", record)
        if on_log is not None:
            on_log(record)

    start = time.perf_counter()
    deadline = start + 60 * cfg.train.time_limit_min if cfg.train.time_limit_min else None
    metrics: Dict[str, float] = {}
    progress = None
    if main:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=min(state.step, total_steps), desc="train", unit="step",
                        dynamic_ncols=True, mininterval=2.0)

    def validate_now(epoch_losses: Optional[Dict[str, float]] = None) -> None:
        """Validates the EMA (or the model) at the current step into ``metrics``, the history, the log and the plot.
        An epoch that ends on a step that was just validated only adds its training loss to that record."""
        nonlocal metrics
        last = state.history[-1] if state.history else None
        train_loss = {"train_loss": epoch_losses["loss"]} if epoch_losses and "loss" in epoch_losses else {}
        if last is not None and (last["epoch"], last["step"]) == (state.epoch, state.step):
            last.update(train_loss)
            return
        eval_model = ema.module if ema is not None else unwrap(model)
        metrics = validate(cfg, eval_model, val_loader, device)
        record = {"epoch": state.epoch, "step": state.step, "minutes": (time.perf_counter() - start) / 60,
                  **train_loss, **metrics}
        earlier = best_before + [r[cfg.train.best_metric] for r in state.history if cfg.train.best_metric in r]
        state.history.append(record)
        if cfg.train.best_metric:  # every rank holds the same (all-reduced) metrics, so every rank raises alike
            require_metric(cfg.train.best_metric, record)
        if main and cfg.train.best_metric:
            keep_best(out_dir, cfg, record, earlier, eval_model, train_set.answer_vocab)
        if main:
            log.log("val", record)
            log.plot()
            if progress is not None:
                progress.write(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}))

    every = cfg.train.eval_every_steps

    def on_step() -> None:
        if every and state.step % every == 0:
            validate_now()

    while state.epoch < cfg.optim.epochs:
        if cfg.train.max_steps and state.step >= cfg.train.max_steps:
            break
        train_loader.set_epoch(state.epoch, skip=state.micro)
        epoch_losses = train_one_epoch(
            model, criterion, train_loader, optimizer, scaler, ema, state, cfg.optim, total_steps, device,
            cfg.train.precision, cfg.train.log_every, cfg.train.max_steps, deadline, on_log=log_train if main else on_log,
            progress=progress, on_step=on_step if every else None)
        if state.micro:  # stopped within the epoch: its mean loss is logged when a resumed run finishes it
            epoch_losses = {}
        if main and "loss" in epoch_losses:  # every epoch's mean training loss, validated at its end or not
            log.log("epoch", {"epoch": state.epoch, "step": state.step, "train_loss": epoch_losses["loss"]})
        # the run ends here when it stopped within the epoch, or at its end by max_steps, the time limit or the last
        # epoch; it always ends with a validation (past_deadline is a collective: every rank calls it here)
        out_of_time = deadline is not None and past_deadline(deadline)
        last = (state.micro > 0 or out_of_time or state.epoch + 1 == cfg.optim.epochs
                or bool(cfg.train.max_steps and state.step >= cfg.train.max_steps))
        if last or (state.epoch + 1) % cfg.train.eval_every == 0:
            validate_now(epoch_losses)
        if main:
            ckpt.save_checkpoint(out_dir, {
                "model": unwrap(model).state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "epoch": state.epoch,
                "micro": state.micro,  # > 0: the epoch stopped after this many batches; resume finishes it
                "epoch_sums": state.epoch_sums,  # its losses so far, for the epoch's mean
                "epoch_count": state.epoch_count,
                "step": state.step,
                "history": state.history,
                "rng": _gather_rng(world),
                "config": cfg.to_dict(),
                "answer_vocab": train_set.answer_vocab,  # QA: what the answer heads' ids mean, for mdetr.predict
            }, state.epoch, keep=cfg.train.keep_checkpoints)
        else:
            _gather_rng(world)
        dist_utils.barrier()
        if out_of_time and main:
            print(f"stopped in epoch {state.epoch} at step {state.step}: train.time_limit_min="
                  f"{cfg.train.time_limit_min} reached")
        if state.micro == 0:
            state.epoch += 1
        if last:
            break
    if progress is not None:
        progress.close()
    if main and cfg.train.cache_features:
        print(f"train.cache_features: {len(cache)} images encoded, their features reused {cache.hits} times"
              + (f"; {len(text_cache)} captions encoded ({text_cache.misses - len(text_cache)} of them again, at a "
                 f"longer padding), reused {text_cache.hits} times" if text_cache is not None else ""))
    log.close()
    return {"metrics": metrics, "state": state, "minutes": (time.perf_counter() - start) / 60}


def validation_shard(val_set, rank: int, world: int):
    """The validation samples of ``rank``: every world-th one. A DistributedSampler would pad the last round with
    repeats, which the evaluators would count twice."""
    return Subset(val_set, range(rank, len(val_set), world)) if world > 1 else val_set


def check_val_entries(cfg: Config, val_set) -> None:
    """Referring-expression validation needs exactly one box per entry, as ``mdetr.evaluate --task refexp`` and the
    reference: precision@k of a caption with several boxes (a question that counts them, a grounding sentence) or
    none would be judged against one of them, or against nothing."""
    problem = refexp_entry_problem(val_set) if cfg.train.eval_task == "refexp" else None
    if problem:
        hint = "'qa'" if cfg.model.qa_dataset is not None else "'grounding'"
        raise ValueError(f"train.eval_task='refexp' needs one box per validation entry, but data.val_ann="
                         f"{cfg.data.val_ann!r} has {problem}; validate it with train.eval_task={hint}")


def check_best_metric(cfg: Config) -> None:
    """``train.best_metric`` must be one of the metrics this run's validation reports (or empty)."""
    name = cfg.train.best_metric
    if not name:
        return
    from mdetr.evaluate import KS

    if cfg.train.eval_task == "grounding":
        known = [f"{kind}_box_recall@{k}" for kind in ("any", "merged") for k in KS]
    else:
        known = [f"precision@{k}" for k in KS] if cfg.train.eval_task == "refexp" else []
        if cfg.model.qa_dataset is not None:
            known += ["qa_accuracy", "qa_type_accuracy", "qa_accuracy_type<t>"]
    qa_type = re.fullmatch(r"qa_accuracy_type\d+", name) is not None and "qa_accuracy_type<t>" in known
    if name not in known and not qa_type:
        raise ValueError(f"train.best_metric must be a validation metric of this run (train.eval_task="
                         f"{cfg.train.eval_task!r}, model.qa_dataset={cfg.model.qa_dataset!r}): one of {known}, "
                         f"got {name!r}")


def previous_best(out_dir, name: str) -> List[float]:
    """The ``name`` value that ``out_dir``'s best.pth was written for, as a one-element list (empty when there is
    no such file or it was kept for another metric)."""
    path = Path(out_dir) / "best.pth"
    if not name or not path.exists():
        return []
    value = ckpt.load_checkpoint(path).get("best", {}).get(name)
    return [] if value is None else [float(value)]


def require_metric(name: str, record: Dict[str, float]) -> None:
    """ValueError when ``train.best_metric`` ``name`` is not in a validation ``record`` (e.g. a QA answer type
    without questions in the val split)."""
    if name not in record:
        raise ValueError(f"train.best_metric={name!r} is not among this validation's metrics: "
                         f"{sorted(k for k in record if k not in ('epoch', 'step', 'minutes', 'train_loss'))}")


def keep_best(out_dir, cfg: Config, record: Dict[str, float], earlier: Sequence[float], eval_model,
              answer_vocab) -> bool:
    """Write ``best.pth`` (atomically) when ``record`` beats every ``earlier`` value of ``train.best_metric``
    (higher is better; a tie is no improvement): the validated weights (as both "model" and "ema", so it loads like
    a training checkpoint, but does not resume), the configuration and the record (whose ``train_loss`` may be
    missing: an epoch's loss joins a record validated at its last step afterwards). Returns whether it did."""
    name = cfg.train.best_metric
    require_metric(name, record)
    if earlier and record[name] <= max(earlier):
        return False
    weights = eval_model.state_dict()
    ckpt.atomic_save({"model": weights, "ema": weights, "config": cfg.to_dict(), "answer_vocab": answer_vocab,
                      "epoch": record["epoch"], "step": record["step"], "best": {name: record[name]},
                      "record": record}, Path(out_dir) / "best.pth")
    return True


def validate(cfg: Config, model: torch.nn.Module, loader, device: torch.device) -> Dict[str, float]:
    """The validation metrics of ``train.eval_task``: "refexp" gives precision@k (and QA accuracy for QA models),
    "grounding" the Flickr30k Recall@k (any-box and merged-box), "qa" QA accuracy alone. One pass; the evaluators
    of ``mdetr.evaluate``."""
    if cfg.train.eval_task in ("grounding", "qa"):
        tasks = [cfg.train.eval_task]
    else:
        tasks = ["refexp"] + (["qa"] if cfg.model.qa_dataset is not None else [])
    evaluators = {task: make_evaluator(task, cfg.model.qa_dataset, phrase_score=cfg.train.phrase_score)
                  for task in tasks}
    return merged_metrics(run_evaluators(model, loader, evaluators, device, cfg.train.precision))


def merged_metrics(evaluators: Dict[str, object]) -> Dict[str, float]:
    """One flat dict of every (synchronized) evaluator's metrics; an evaluator that saw no sample adds none."""
    metrics: Dict[str, float] = {}
    for evaluator in evaluators.values():
        if getattr(evaluator, "count", 1) > 0:
            metrics.update(evaluator.summarize())
    return metrics


def _gather_rng(world: int) -> object:
    """RNG states of every rank (rank 0 receives the list; one process keeps a single state)."""
    state = ckpt.rng_state()
    if world == 1:
        return state
    gathered: List[object] = [None] * world
    torch.distributed.all_gather_object(gathered, state)
    return gathered


def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg = parse_args(argv)
    try:
        result = run(cfg)
    finally:
        dist_utils.shutdown()
    if dist_utils.is_main() and result["metrics"]:
        print("final validation:", json.dumps(result["metrics"]))


if __name__ == "__main__":
    main()

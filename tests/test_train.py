"""Training end to end on tiny settings: the loss falls, resume is exact (also within an epoch), 2-process DDP
(gloo) gives the gradients of one process, and a 2-process run stops and resumes together."""
import json
import math
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detr_kernels import REFERENCE_BACKENDS
from mdetr import config as C
from mdetr.losses.criterion import build_criterion
from mdetr.models import build_from_config
from mdetr.train import run

REFERENCE = REFERENCE_BACKENDS


def tiny_config(root, out_dir, **overrides) -> C.Config:
    items = {
        "data.root": root, "data.num_train": 8, "data.train_ann": "shapes_refexp_train.json",
        "data.transforms": "tiny", "data.num_val": 4, "data.num_test": 4, "data.batch_size": 4,
        "data.num_workers": 0, "model.d_model": 32, "model.nheads": 4, "model.enc_layers": 1, "model.dec_layers": 2,
        "model.dim_feedforward": 64, "model.num_queries": 9, "model.query_grid": 3, "model.freeze_text_encoder": True,
        "optim.epochs": 2, "optim.lr_drop": 10, "optim.lr": 5e-4, "train.output_dir": out_dir, "train.log_every": 1,
        "train.threads": 2, "train.keep_checkpoints": 0,  # the resume test starts from the first epoch's file
        "train.precision": "fp32",  # the preset's bf16 has its own test (test_bf16_run_trains_and_resumes_exactly)
    }
    items.update(overrides)
    return C.resolve("shapes", None, [f"--{k}={v}" for k, v in items.items()])


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("shapes"))


def train_losses(cfg):
    losses = []
    result = run(cfg, on_log=lambda r: losses.append(r["loss"]))
    return losses, result


@pytest.mark.slow
def test_tiny_run_loss_falls_and_writes_artifacts(shapes_root, tmp_path):
    cfg = tiny_config(shapes_root, str(tmp_path / "run"), **{"optim.epochs": 4})
    losses, result = train_losses(cfg)
    assert len(losses) == result["state"].step and result["state"].epoch == 4
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses
    out = tmp_path / "run"
    for name in ("checkpoint.pth", "checkpoint_epoch0003.pth", "config.yaml", "metrics.jsonl", "curves.png"):
        assert (out / name).exists(), name
    assert "precision@1" in result["metrics"]
    assert C.resolve("shapes", str(out / "config.yaml"), []) == cfg


def test_a_run_with_the_appearance_head_trains_its_contrastive_loss(shapes_root, tmp_path):
    cfg = tiny_config(shapes_root, str(tmp_path / "run"), **{"optim.epochs": 1, "model.appearance_head": True,
                                                             "loss.appearance_align": 2.0})
    result = run(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert train and all(math.isfinite(r["loss_appearance_align"]) and "loss_appearance_align_0" in r
                         for r in train)
    assert result["state"].step == len(train)


def test_time_limit_stops_mid_epoch_then_validates_and_saves(shapes_root, tmp_path, capsys):
    cfg = tiny_config(shapes_root, str(tmp_path / "run"), **{"optim.epochs": 3, "train.time_limit_min": 1e-4})
    _, result = train_losses(cfg)
    state = result["state"]
    # stopped after the first step of epoch 0, which a resume finishes (state.micro batches are done)
    assert (state.epoch, state.step, state.micro) == (0, 1, 1)
    assert "train.time_limit_min=0.0001 reached" in capsys.readouterr().out
    assert "precision@1" in result["metrics"] and (tmp_path / "run" / "checkpoint.pth").exists()
    saved = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=False)
    assert (saved["epoch"], saved["micro"], saved["step"], saved["epoch_count"]) == (0, 1, 1, 1)
    assert set(saved["epoch_sums"]) >= {"loss", "loss_bbox"}
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "epoch" not in kinds and "val" in kinds  # the epoch's mean is logged by the run that finishes it


def test_non_finite_loss_stops_training_before_a_checkpoint(shapes_root, tmp_path, monkeypatch):
    from mdetr.losses.criterion import SetCriterion

    total = SetCriterion.total
    monkeypatch.setattr(SetCriterion, "total", lambda self, losses: total(self, losses) * float("nan"))
    cfg = tiny_config(shapes_root, str(tmp_path / "run"))
    with pytest.raises(FloatingPointError, match=r"non-finite training loss in the 1 steps up to step 1 .*loss_bbox"):
        run(cfg)
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


@pytest.mark.slow
def test_resume_reproduces_the_next_steps_exactly(shapes_root, tmp_path, capsys):
    # bit-exact without the feature cache; with it (the shapes presets) see the end of the test
    exact = {"train.cache_features": False}
    full = tiny_config(shapes_root, str(tmp_path / "a"), **exact)
    losses_full, _ = train_losses(full)
    steps_per_epoch = len(losses_full) // 2
    resumed = tiny_config(shapes_root, str(tmp_path / "b"),
                          **{"train.resume": str(tmp_path / "a" / "checkpoint_epoch0000.pth")}, **exact)
    capsys.readouterr()
    losses_resumed, result = train_losses(resumed)
    assert result["state"].step == len(losses_full)
    assert losses_resumed == losses_full[steps_per_epoch:]  # bit-exact on CPU (aspect-ratio grouped batches)
    out = capsys.readouterr().out
    assert "resumed from" in out and "differ from the checkpoint's" not in out
    # stopped by the time limit after the first step of epoch 0, then resumed: the same remaining steps
    run(tiny_config(shapes_root, str(tmp_path / "c"), **{"train.time_limit_min": 1e-4}, **exact))
    capsys.readouterr()
    losses_rest, result = train_losses(tiny_config(shapes_root, str(tmp_path / "c"), **{"train.resume": "auto"}, **exact))
    assert "resumed from" in capsys.readouterr().out
    assert losses_rest == losses_full[1:] and result["state"].step == len(losses_full)

    def epoch_records(run_dir):
        lines = (tmp_path / run_dir / "metrics.jsonl").read_text().splitlines()
        return [(r["epoch"], r["step"], r["train_loss"]) for r in map(json.loads, lines) if r["kind"] == "epoch"]

    assert epoch_records("c") == epoch_records("a")  # one record per epoch, each the whole epoch's mean
    # a mid-epoch checkpoint resumed with other batching is a clear error, not a resume at the wrong batch
    run(tiny_config(shapes_root, str(tmp_path / "d"), **{"train.time_limit_min": 1e-4}, **exact))
    with pytest.raises(ValueError, match=r"the run stopped 1 batches into epoch 0, which does not fit this run's "
                                         r"epoch of \d+ batches in windows of optim.grad_accum=2"):
        run(tiny_config(shapes_root, str(tmp_path / "d"), **{"train.resume": "auto", "optim.grad_accum": 2}, **exact))
    # with the frozen text encoder's cache, a resumed run encodes each caption again, in other batches than the
    # first run did, so its features (and the heads that read them) match to float rounding, not bit for bit
    cached, _ = train_losses(tiny_config(shapes_root, str(tmp_path / "e")))
    resumed, _ = train_losses(tiny_config(shapes_root, str(tmp_path / "f"),
                                          **{"train.resume": str(tmp_path / "e" / "checkpoint_epoch0000.pth")}))
    assert resumed == pytest.approx(cached[steps_per_epoch:], rel=1e-5, abs=0)


@pytest.mark.slow
def test_bf16_run_trains_and_resumes_exactly(shapes_root, tmp_path):
    """The shapes preset's bf16 autocast on the CPU (attention in fp32 inside it): the loss falls, and a run resumed
    from the first epoch's checkpoint continues with the same losses bit for bit."""
    assert C.preset("shapes").train.precision == "bf16"
    bf16 = {"train.precision": "bf16", "train.cache_features": False, "optim.epochs": 3}
    losses, result = train_losses(tiny_config(shapes_root, str(tmp_path / "a"), **bf16))
    assert all(math.isfinite(x) for x in losses) and result["state"].epoch == 3
    assert sum(losses[-2:]) / 2 < 0.9 * sum(losses[:2]) / 2, losses
    per_epoch = len(losses) // 3
    resumed, _ = train_losses(tiny_config(shapes_root, str(tmp_path / "b"), **bf16, **{
        "train.resume": str(tmp_path / "a" / "checkpoint_epoch0000.pth")}))
    assert resumed == losses[per_epoch:]


class _CountingCriterion(torch.nn.Module):
    """A stand-in criterion: the loss is the model's output; counts its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, outputs, batch):
        self.calls += 1
        return {"loss_x": outputs}

    @staticmethod
    def total(losses):
        return losses["loss_x"]


class _Scalar(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, images, mask, captions):
        return (self.w * images).sum()


@pytest.mark.parametrize("accum, max_steps, start, expected", [
    (2, 0, 0, (4, 2, 0)),  # 5 batches, windows of 2: the last, partial window is not trained
    (1, 0, 0, (5, 5, 0)),
    (2, 1, 0, (2, 1, 2)),  # max_steps stops within the epoch: 2 micro-batches done
    (2, 0, 2, (2, 1, 0)),  # resumed after 2 micro-batches: the remaining whole window
])
def test_train_one_epoch_counts_micro_batches(accum, max_steps, start, expected):
    from mdetr.config import OptimConfig
    from mdetr.engine import TrainState, train_one_epoch

    batches = [{"images": torch.full((1,), float(i)), "mask": torch.zeros(1), "captions": ["a"]} for i in range(5)]

    class Loader:
        """The epoch's remaining batches (the caller skipped ``start``); counts those fetched."""

        def __init__(self, items):
            self.items, self.fetched = items, 0

        def __iter__(self):
            for item in self.items:
                self.fetched += 1
                yield item

        def __len__(self):  # the whole epoch's length, whatever the caller skipped
            return 5

    model, criterion = _Scalar(), _CountingCriterion()
    others = [{"params": [torch.nn.Parameter(torch.zeros(()))], "name": name} for name in ("backbone", "text_encoder")]
    optimizer = torch.optim.SGD([{"params": [model.w], "name": "rest"}] + others, lr=0.0)  # make_optimizer's groups
    state = TrainState(micro=start)
    cfg = OptimConfig(grad_accum=accum, clip_max_norm=0.0)
    loader = Loader(batches[start:])
    train_one_epoch(model, criterion, loader, optimizer, None, None, state, cfg, 10,
                    torch.device("cpu"), "fp32", log_every=1, max_steps=max_steps)
    assert (criterion.calls, state.step, state.micro) == expected
    assert loader.fetched == criterion.calls  # the partial window's batch is not even loaded


class _TwoModules(torch.nn.Module):
    """A body and a head whose gradients are 3 and 4 times their inputs' sums: norms 3 * 2 and 4 * 30 here."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(4, 1, bias=False)
        self.head = torch.nn.Linear(900, 1, bias=False)

    def forward(self, images, mask, captions):
        return 3 * self.body(images[:4]).sum() + 4 * self.head(images).sum()


@pytest.mark.parametrize("groups", ["", "head"])
def test_gradient_clipping_per_group_and_the_logged_norm(groups):
    from mdetr.config import OptimConfig
    from mdetr.engine import TrainState, gradient_clip_groups, train_one_epoch

    model, records = _TwoModules(), []
    torch.nn.init.zeros_(model.body.weight), torch.nn.init.zeros_(model.head.weight)
    batch = {"images": torch.ones(900), "mask": torch.zeros(1), "captions": ["a"]}
    others = [{"params": [torch.nn.Parameter(torch.zeros(()))], "name": name} for name in ("backbone", "text_encoder")]
    optimizer = torch.optim.SGD([{"params": list(model.parameters()), "name": "rest"}] + others, lr=1.0)
    train_one_epoch(model, _CountingCriterion(), [batch], optimizer, None, None, TrainState(),
                    OptimConfig(lr=1.0, clip_max_norm=0.5, clip_groups=groups), 10, torch.device("cpu"), "fp32", log_every=1,
                    on_log=records.append)
    assert optimizer.param_groups[0]["lr"] == 1.0
    body, head = model.body.weight.norm().item(), model.head.weight.norm().item()  # SGD at lr 1: the clipped steps
    assert records[0]["grad_norm"] == pytest.approx(math.hypot(3 * 2, 4 * 30), rel=1e-5)  # before clipping
    if groups:  # each group's step has the clip norm
        assert (body, head) == (pytest.approx(0.5, rel=1e-5), pytest.approx(0.5, rel=1e-5))
    else:  # one factor for all: the head's gradient sets it, and the body's step is 20 times smaller than its own
        assert math.hypot(body, head) == pytest.approx(0.5, rel=1e-5) and head / body == pytest.approx(20)
    assert [len(group) for group in gradient_clip_groups(model, [groups] if groups else [])] == ([1, 1] if groups else [2])
    with pytest.raises(ValueError, match="optim.clip_groups: 'heads' matches no trainable parameter"):
        gradient_clip_groups(model, ["head", "heads"])


def _run_worker(rank, world, port, cfg, out_file):
    """One rank of a torchrun-like job: the environment torchrun sets, then ``run``."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from mdetr import distributed as dist_utils

    try:
        result = run(cfg)
        state = result["state"]
        torch.save({"epoch": state.epoch, "step": state.step, "micro": state.micro,
                    "metrics": result["metrics"]}, f"{out_file}.{rank}")
    finally:
        dist_utils.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_run_stops_within_an_epoch_together_and_resumes(shapes_root, tmp_path):
    # torchrun's layout with gloo: a time-limit stop within the first epoch (every rank stops, validates and agrees
    # on the metrics), then a 2-process resume that skips the trained batches of each rank's shard and finishes
    items = {"train.threads": 1}
    cfg = tiny_config(shapes_root, str(tmp_path / "run"), **items, **{"train.time_limit_min": 1e-4})
    out = tmp_path / "state"
    mp.spawn(_run_worker, args=(2, _free_port(), cfg, str(out)), nprocs=2, join=True)
    stopped = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    assert [(s["epoch"], s["step"], s["micro"]) for s in stopped] == [(0, 1, 1)] * 2
    assert stopped[0]["metrics"] == stopped[1]["metrics"] and "precision@1" in stopped[0]["metrics"]
    resumed = tiny_config(shapes_root, str(tmp_path / "run"), **items, **{"train.resume": "auto"})
    mp.spawn(_run_worker, args=(2, _free_port(), resumed, str(out)), nprocs=2, join=True)
    done = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    assert [(s["epoch"], s["micro"]) for s in done] == [(2, 0)] * 2 and done[0]["step"] == done[1]["step"] > 1


def test_a_run_ends_with_a_validation_when_max_steps_stops_it(shapes_root, tmp_path):
    cfg = tiny_config(shapes_root, str(tmp_path / "run"), **{"optim.epochs": 3, "train.eval_every": 3,
                                                             "train.max_steps": 1})
    _, result = train_losses(cfg)
    assert result["state"].step == 1 and [r["step"] for r in result["state"].history] == [1]
    assert "precision@1" in result["metrics"]


def _fake_batch():
    g = torch.Generator().manual_seed(0)
    captions = ["a red circle", "a blue square", "a green circle", "a pink square"]
    images = torch.randn(4, 3, 64, 96, generator=g)
    mask = torch.zeros(4, 64, 96, dtype=torch.bool)
    boxes = torch.rand(4, 2, 4, generator=g) * 0.4 + 0.3
    positive_map = torch.zeros(4, 2, 256, dtype=torch.bool)
    positive_map[:, 0, 2:4] = True
    positive_map[:, 1, 3] = True
    num_targets = torch.tensor([2, 1, 2, 1])
    return {"images": images, "mask": mask, "captions": captions, "boxes": boxes, "positive_map": positive_map,
            "num_targets": num_targets}


def _grads(model_cfg, loss_cfg, batch, ddp: bool):
    torch.manual_seed(0)
    model = build_from_config(model_cfg).eval()  # no dropout anywhere (the text encoder has its own)
    criterion = build_criterion(loss_cfg, model_cfg.dec_layers, None, REFERENCE)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model)
    outputs = model(batch["images"], batch["mask"], batch["captions"])
    criterion.total(criterion(outputs, batch)).backward()
    inner = model.module if ddp else model
    return {n: p.grad.clone() for n, p in inner.named_parameters() if p.grad is not None}


def _ddp_worker(rank, world, init_file, out_file, model_cfg, loss_cfg):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    batch = _fake_batch()
    part = {k: (v[rank * 2:(rank + 1) * 2]) for k, v in batch.items()}
    grads = _grads(model_cfg, loss_cfg, part, ddp=True)
    if rank == 0:
        torch.save(grads, out_file)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    cfg = tiny_config(str(tmp_path), str(tmp_path), **{"model.dropout": 0.0, "model.freeze_text_encoder": False})
    from mdetr.pretrained import load_tokenizer

    lengths = {len(ids) for ids in load_tokenizer(cfg.model.text_encoder)(_fake_batch()["captions"])["input_ids"]}
    assert len(lengths) == 1, "the test needs captions of one token length (the contrastive quirk sees padding)"
    single = _grads(cfg.model, cfg.loss, _fake_batch(), ddp=False)
    out_file = tmp_path / "ddp_grads.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(out_file), cfg.model, cfg.loss), nprocs=2, join=True)
    ddp = torch.load(out_file)
    assert set(ddp) == set(single)
    for name, grad in single.items():
        torch.testing.assert_close(ddp[name], grad, rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_validation_metrics_come_from_counts():
    from mdetr.evaluation.qa import QAEvaluator
    from mdetr.evaluation.refexp import RefExpEvaluator
    from mdetr.train import merged_metrics

    qa = QAEvaluator("clevr")
    qa.update_correct(torch.tensor([True, False, True]), torch.tensor([True, True, False]), torch.tensor([0, 0, 2]))
    metrics = merged_metrics({"refexp": RefExpEvaluator(), "qa": qa})
    assert metrics == pytest.approx({"qa_accuracy": 2 / 3, "qa_type_accuracy": 2 / 3, "qa_accuracy_type0": 0.5,
                                     "qa_accuracy_type2": 1.0})
    refexp = RefExpEvaluator(ks=(1,))
    refexp.update(torch.tensor([[[0.0, 0, 1, 1]], [[2.0, 2, 3, 3]]]), torch.ones(2, 1), torch.tensor([[0.0, 0, 1, 1]] * 2))
    assert merged_metrics({"refexp": refexp, "qa": QAEvaluator("clevr")}) == {"precision@1": 0.5}


def test_ema_averages_trainable_parameters_and_copies_buffers():
    from mdetr.engine import ModelEMA
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    model[1].weight.requires_grad_(False)  # frozen: never changes, so the copy is not averaged
    ema = ModelEMA(model, decay=0.75)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(4.0)
        model[1].running_mean.fill_(2.0)
    ema.update(model)
    after = ema.state_dict()
    assert torch.allclose(after["0.weight"], before["0.weight"] + 0.25 * 4.0)
    assert torch.equal(after["0.bias"], before["0.bias"])  # unchanged source: the average stays
    assert torch.equal(after["1.running_mean"], torch.full((3,), 2.0))  # buffers are copied
    assert torch.equal(after["1.weight"], before["1.weight"])
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_lr_schedule_drops_at_the_epoch_or_the_step():
    from mdetr.engine import adjust_learning_rate
    optimizer = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))], "name": name}
                                   for name in ("rest", "backbone", "text_encoder")])
    cfg = C.OptimConfig(lr=1e-3, lr_backbone=1e-4, text_encoder_lr=5e-5, lr_drop=2, warmup_fraction=0.1)

    def lrs(epoch, step):
        adjust_learning_rate(optimizer, epoch, step, 100, cfg)
        return [round(group["lr"], 12) for group in optimizer.param_groups]

    assert lrs(0, 5) == [1e-3, 1e-4, 2.5e-5]  # text encoder: half-way through its 10-step warm-up
    assert lrs(1, 60) == [1e-3, 1e-4, round(5e-5 * 40 / 90, 12)]
    assert lrs(2, 60)[:2] == [1e-4, 1e-5]  # epoch 2: the 10x drop
    cfg.lr_drop_step = 50  # the step wins over the epoch
    assert lrs(5, 49)[:2] == [1e-3, 1e-4]
    assert lrs(0, 50)[:2] == [1e-4, 1e-5]
    cfg.lr_gamma = 0.25  # another factor
    assert lrs(0, 50)[:2] == [2.5e-4, 2.5e-5] and lrs(0, 49)[:2] == [1e-3, 1e-4]
    cfg.lr_ramp_steps = 20  # the drop spread linearly over steps 30..50
    assert lrs(0, 30)[:2] == [1e-3, 1e-4] and lrs(0, 10)[:2] == [1e-3, 1e-4]
    assert lrs(0, 40)[:2] == [round(1e-3 * 0.625, 12), round(1e-4 * 0.625, 12)]  # half-way: (1 + 0.25) / 2
    assert lrs(0, 49)[0] == round(1e-3 * (0.25 + 0.75 / 20), 12)
    assert lrs(0, 50)[:2] == [2.5e-4, 2.5e-5] and lrs(9, 900)[:2] == [2.5e-4, 2.5e-5]
    with pytest.raises(ValueError, match=r"optim.lr_ramp_steps must be 0 or in 1..optim.lr_drop_step=0"):
        C.resolve("shapes", None, ["--optim.lr_drop_step=0", "--optim.lr_ramp_steps=10"])
    with pytest.raises(ValueError, match=r"optim.lr_ramp_steps must be 0 or in 1..optim.lr_drop_step=5"):
        C.resolve("shapes", None, ["--optim.lr_drop_step=5", "--optim.lr_ramp_steps=6"])
    with pytest.raises(ValueError, match="optim.lr_drop_step must be >= 0"):
        C.resolve("shapes", None, ["--optim.lr_drop_step=-1"])
    for bad in ("0", "1.5"):
        with pytest.raises(ValueError, match=r"optim.lr_gamma must be in \(0, 1\]"):
            C.resolve("shapes", None, [f"--optim.lr_gamma={bad}"])


def test_step_interval_validates_within_epochs_once_per_step(shapes_root, tmp_path):
    # validations at steps 2, 4, ...; an epoch that ends on such a step reuses its record, one that does not adds one
    cfg = tiny_config(shapes_root, str(tmp_path / "run"), **{"train.eval_every_steps": 2, "optim.epochs": 2,
                                                             "train.best_metric": "precision@1"})
    _, result = train_losses(cfg)
    per_epoch = result["state"].step // 2
    expected = sorted({(e, s) for e in range(2) for s in range(e * per_epoch + 1, (e + 1) * per_epoch + 1)
                       if s % 2 == 0 or s == (e + 1) * per_epoch})
    history = result["state"].history
    assert [(r["epoch"], r["step"]) for r in history] == expected and len(expected) >= 3
    assert "precision@1" in history[0]
    assert ["train_loss" in r for r in history] == [s == (e + 1) * per_epoch for e, s in expected]
    assert result["metrics"]["precision@1"] == history[-1]["precision@1"]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "val" for r in lines) == len(expected)
    epochs = [r for r in lines if r["kind"] == "epoch"]  # every epoch's training loss, also where it was deduped
    assert [(r["epoch"], r["step"]) for r in epochs] == [(e, (e + 1) * per_epoch) for e in range(2)]
    assert [r["train_loss"] for r in epochs] == [r["train_loss"] for r in history if "train_loss" in r]
    # train.best_metric: best.pth holds the first validation with the highest value (an epoch's training loss can
    # join its record after best.pth was written)
    best = torch.load(tmp_path / "run" / "best.pth", weights_only=False)
    values = [r["precision@1"] for r in history]
    first_best = {k: v for k, v in history[values.index(max(values))].items() if k != "train_loss"}
    assert {k: v for k, v in best["record"].items() if k != "train_loss"} == first_best
    assert best["best"] == {"precision@1": max(values)} and best["step"] == first_best["step"]


def test_keep_best_writes_only_improvements_that_load_like_checkpoints(shapes_root, tmp_path):
    from mdetr.checkpoint import load_model
    from mdetr.train import keep_best, previous_best

    cfg = tiny_config(shapes_root, str(tmp_path), **{"train.best_metric": "precision@1"})
    model = build_from_config(cfg.model, attention_backend="reference")
    record = {"epoch": 0, "step": 4, "minutes": 0.1, "precision@1": 0.5}
    assert keep_best(tmp_path, cfg, record, [], model, None)
    assert not keep_best(tmp_path, cfg, {**record, "step": 8}, [0.5], model, None)  # a tie is no improvement
    assert torch.load(tmp_path / "best.pth", weights_only=False)["step"] == 4
    with torch.no_grad():
        model.bbox_embed.layers[0].bias.add_(1.0)  # later, different weights
    assert keep_best(tmp_path, cfg, {**record, "step": 12, "precision@1": 0.75}, [0.5], model, None)
    loaded, loaded_cfg = load_model(tmp_path / "best.pth")
    assert loaded_cfg == cfg
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(ValueError, match=r"train.best_metric='recall@1' is not among this validation's metrics: "
                                         r"\['precision@1'\]"):
        keep_best(tmp_path, tiny_config(shapes_root, str(tmp_path), **{"train.best_metric": "recall@1"}),
                  record, [], model, None)
    # what a resumed run compares with: the value best.pth was kept for, of the same metric only
    assert previous_best(tmp_path, "precision@1") == [0.75]
    assert previous_best(tmp_path, "precision@5") == [] and previous_best(tmp_path / "none", "precision@1") == []
    # best.pth holds weights only: resuming from it is a clear error
    with pytest.raises(ValueError, match=r"not a resumable checkpoint \(it holds weights only, like best.pth\)"):
        run(tiny_config(shapes_root, str(tmp_path / "again"), **{"train.resume": str(tmp_path / "best.pth")}))


def test_best_metric_must_be_a_metric_of_the_run(shapes_root, tmp_path):
    from mdetr.train import check_best_metric

    def cfg(**items):
        return tiny_config(shapes_root, str(tmp_path), **items)

    check_best_metric(cfg())  # off
    check_best_metric(cfg(**{"train.best_metric": "precision@10"}))
    check_best_metric(cfg(**{"train.best_metric": "merged_box_recall@5", "train.eval_task": "grounding"}))
    check_best_metric(cfg(**{"train.best_metric": "qa_accuracy_type2", "model.qa_dataset": "clevr"}))
    with pytest.raises(ValueError, match=r"train.best_metric must be a validation metric of this run \(train.eval_task"
                                         r"='grounding', model.qa_dataset=None\): one of \['any_box_recall@1'.*"
                                         r"got 'precision@1'"):
        check_best_metric(cfg(**{"train.best_metric": "precision@1", "train.eval_task": "grounding"}))
    with pytest.raises(ValueError, match="got 'qa_accuracy'"):
        check_best_metric(cfg(**{"train.best_metric": "qa_accuracy"}))
    with pytest.raises(ValueError, match="got 'qa_accuracy_typeX'"):
        check_best_metric(cfg(**{"train.best_metric": "qa_accuracy_typeX", "model.qa_dataset": "clevr"}))
    with pytest.raises(ValueError, match="got 'minutes'"):  # a record's field, not a metric
        run(cfg(**{"train.best_metric": "minutes"}))
    qa = {"model.qa_dataset": "clevr", "train.eval_task": "qa"}
    check_best_metric(cfg(**qa, **{"train.best_metric": "qa_accuracy"}))
    with pytest.raises(ValueError, match=r"\(train.eval_task='qa', model.qa_dataset='clevr'\): one of \['qa_accuracy'"):
        check_best_metric(cfg(**qa, **{"train.best_metric": "precision@1"}))  # QA validation alone has no P@k


def test_validation_shards_cover_each_sample_once():
    from mdetr.train import validation_shard

    samples = list(range(7))
    assert validation_shard(samples, 0, 1) is samples
    shards = [list(validation_shard(samples, rank, 3)) for rank in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]  # no padding repeats: 7 samples, 7 evaluations


def test_qa_validation_reports_qa_metrics_only(shapes_root, tmp_path):
    # a question's boxes (none, or every object it counts) are no referring expression: its precision@k was noise
    common = {"data.train_ann": "shapes_qa_train.json", "data.val_ann": "shapes_qa_val.json",
              "model.qa_dataset": "clevr", "optim.epochs": 1}
    with pytest.raises(ValueError, match=r"model.qa_dataset=None"):
        tiny_config(shapes_root, str(tmp_path / "no_heads"), **{"train.eval_task": "qa"})
    with pytest.raises(ValueError, match=r"train.eval_task='refexp' needs one box per validation entry, but "
                                         r"data.val_ann='shapes_qa_val.json' has (\d+) entries with several "
                                         r".*validate it with train.eval_task='qa'") as error:
        run(tiny_config(shapes_root, str(tmp_path / "refexp"), **common))  # generates the world, then stops
    val = json.loads((Path(shapes_root) / "annotations" / "shapes_qa_val.json").read_text())
    several = [i for i, n in Counter(a["image_id"] for a in val["annotations"]).items() if n > 1]
    assert f"has {len(several)} entries with several" in str(error.value) and several
    result = run(tiny_config(shapes_root, str(tmp_path / "qa"), **common, **{"train.eval_task": "qa"}))
    assert "qa_accuracy" in result["metrics"] and not any(k.startswith("precision@") for k in result["metrics"])
    assert C.preset("clevr").train.eval_task == C.preset("gqa").train.eval_task == "qa"


def test_negative_step_interval_is_rejected():
    with pytest.raises(ValueError, match="train.eval_every_steps must be >= 0"):
        C.resolve("shapes", None, ["--train.eval_every_steps=-1"])


@pytest.mark.parametrize("override, message", [
    ("train.max_steps=-1", r"train.max_steps must be >= 0 \(0 = no limit\), got -1"),
    ("train.time_limit_min=-2", r"train.time_limit_min must be >= 0 \(0 = no limit\), got -2"),
    ("optim.ema_decay=1.5", r"optim.ema_decay must be in \[0, 1\], got 1.5"),
    ("optim.warmup_fraction=-0.1", r"optim.warmup_fraction must be in \[0, 1\], got -0.1"),
])
def test_out_of_range_run_settings_are_rejected(override, message):
    with pytest.raises(ValueError, match=message):
        C.resolve("shapes", None, [f"--{override}"])

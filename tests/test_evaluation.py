"""Evaluators on hand-built cases with known answers (referring expressions, phrase grounding, QA, COCO AP), their
sums over two processes, the phrase targets of the dataset, and ``python -m mdetr.evaluate`` on tiny checkpoints."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mdetr import config as C
from mdetr.data import ensure_shapes_dataset
from mdetr.data.annotations import phrase_box_map
from mdetr.data.synthetic import ANSWER_VOCAB
from mdetr.evaluation.coco import METRICS, CocoEvaluator
from mdetr.evaluation.grounding import PhraseGroundingEvaluator, merge_boxes
from mdetr.evaluation.qa import QAEvaluator
from mdetr.evaluation.refexp import RefExpEvaluator

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

REPO = Path(__file__).resolve().parents[1]
GT = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
FAR = [50.0, 50.0, 60.0, 60.0]


# ---------------------------------------------------------------------------------------------------------------
# referring expressions

@pytest.mark.parametrize("box, hit_giou, hit_iou", [
    ([0.0, 0.0, 10.0, 5.0], 1.0, 1.0),  # IoU 0.5 = GIoU (the enclosing box is the GT)
    ([1.8, 1.8, 11.8, 11.8], 0.0, 1.0),  # IoU 0.507, GIoU 0.460: only the plain IoU rule hits
    ([5.0, 0.0, 15.0, 10.0], 0.0, 0.0),  # IoU 1/3
])
def test_refexp_iou_type(box, hit_giou, hit_iou):
    for iou_type, expect in (("giou", hit_giou), ("iou", hit_iou)):
        ev = RefExpEvaluator(ks=(1,), iou_type=iou_type)
        ev.update(torch.tensor([[box]]), torch.ones(1, 1), GT)
        assert ev.summarize() == {"precision@1": expect}
        assert RefExpEvaluator(use_giou=iou_type == "giou").iou_type == iou_type  # the older spelling


def test_refexp_precision_at_k_ranks_by_score():
    good = [0.0, 0.0, 10.0, 9.0]
    preds = torch.tensor([[FAR, FAR, good], [good, FAR, FAR]])  # the right box ranked 2nd, then 1st
    ev = RefExpEvaluator(ks=(1, 2, 5))
    ev.update(preds, torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.1, 0.0]]), GT.expand(2, 4))
    ev.synchronize()  # one process: the counts stay
    assert ev.summarize() == {"precision@1": 0.5, "precision@2": 1.0, "precision@5": 1.0}
    with pytest.raises(ValueError, match="iou_type must be one of"):
        RefExpEvaluator(iou_type="diou")


# ---------------------------------------------------------------------------------------------------------------
# phrase grounding

LEFT, RIGHT = [0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0]  # "two circles": two GT boxes, union [0, 0, 30, 10]


@pytest.mark.parametrize("predicted, any_box, merged_box", [
    (LEFT, 1.0, 0.0),  # one of the circles exactly: IoU 1/3 with the union
    ([0.0, 0.0, 30.0, 10.0], 0.0, 1.0),  # the union: IoU 1/3 with each circle
    ([1.0, 0.0, 29.0, 10.0], 0.0, 1.0),
])
def test_any_box_versus_merged_box(predicted, any_box, merged_box):
    ev = PhraseGroundingEvaluator(ks=(1,))
    ev.update(torch.tensor([[predicted, FAR]]), torch.tensor([LEFT, RIGHT]), torch.tensor([[True, True]]))
    assert ev.summarize() == {"any_box_recall@1": any_box, "merged_box_recall@1": merged_box}


def test_grounding_recall_at_k_and_phrases_without_boxes():
    # phrase 0 (box 0) found at rank 2; phrase 1 (box 1) at rank 1; phrase 2 has no box and is left out
    gt = torch.tensor([LEFT, RIGHT])
    ranked = torch.tensor([[FAR, LEFT, FAR], [RIGHT, FAR, FAR], [LEFT, RIGHT, FAR]])
    membership = torch.tensor([[True, False], [False, True], [False, False]])
    ev = PhraseGroundingEvaluator(ks=(1, 2, 10))
    ev.update(ranked, gt, membership)
    ev.update(torch.zeros(0, 3, 4), torch.zeros(0, 4), torch.zeros(0, 0, dtype=torch.bool))  # a sentence, no phrase
    assert (ev.count, ev.skipped) == (2, 1)
    assert ev.summarize() == {"any_box_recall@1": 0.5, "any_box_recall@2": 1.0, "any_box_recall@10": 1.0,
                              "merged_box_recall@1": 0.5, "merged_box_recall@2": 1.0, "merged_box_recall@10": 1.0}
    with pytest.raises(ValueError, match="phrase_box_map"):
        ev.update(ranked, gt, membership[:2])


def test_merge_boxes_encloses_each_group():
    boxes = torch.tensor([LEFT, RIGHT, [5.0, 5.0, 8.0, 40.0]])
    membership = torch.tensor([[True, True, False], [False, False, True], [True, False, True]])
    assert merge_boxes(boxes, membership).tolist() == [[0, 0, 30, 10], [5, 5, 8, 40], [0, 0, 10, 40]]


def test_phrase_box_map_from_overlapping_spans():
    phrases = [[[0, 9]], [[14, 20], [30, 35]]]  # phrase 1 has two spans
    boxes = [[[0, 9]], [[31, 33]], [[10, 14]], [[0, 3], [15, 16]]]  # box 2 touches phrase 1 at [14, ...): no
    assert phrase_box_map(phrases, boxes).tolist() == [[True, False, False, True], [False, True, False, True]]
    assert phrase_box_map(phrases, []).shape == (2, 0)


def test_grounding_scores_phrases_by_their_best_token():
    """Through rank_boxes_per_phrase: phrase A = tokens {1, 2}, phrase B = token {4}; query 0 puts its mass on
    token 2, query 1 on token 4, query 2 on no-object. A ranks query 0 first, B query 1."""
    from mdetr.models import rank_boxes_per_phrase  # imported here: the two-process test's workers skip the models

    logits = torch.full((1, 3, 256), -10.0)
    logits[0, 0, 2], logits[0, 1, 4], logits[0, 2, 255] = 5.0, 5.0, 5.0
    boxes_cxcywh = torch.tensor([[[0.05, 0.05, 0.1, 0.1], [0.25, 0.05, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2]]])
    masks = torch.zeros(2, 256, dtype=torch.bool)
    masks[0, 1:3], masks[1, 4] = True, True
    ranked = rank_boxes_per_phrase({"pred_logits": logits, "pred_boxes": boxes_cxcywh}, torch.tensor([[100, 100]]),
                                   [masks])[0]
    ev = PhraseGroundingEvaluator(ks=(1,))
    ev.update(torch.stack(ranked), torch.tensor([LEFT, RIGHT]), torch.eye(2, dtype=torch.bool))
    assert ev.summarize()["any_box_recall@1"] == 1.0


@pytest.mark.parametrize("rule, recall", [("max", 0.5), ("sum", 1.0)])
def test_grounding_phrase_score_rule(rule, recall):
    """Phrase A ("two blue squares") = tokens {1, 2, 3}, phrase B ("a red square") = tokens {5, 6}. Query 0, on A's
    object, spreads its mass over A's tokens (0.3 each); query 1, on B's object, puts 0.45 on A's last token (the
    shared noun) and 0.45 on B's. The max ranks query 1 first for A (0.45 > 0.3), the sum query 0 (0.9 > 0.45)."""
    from mdetr.models import rank_boxes_per_phrase

    probs = torch.full((1, 2, 256), 1e-6)
    probs[0, 0, 1:4] = 0.3
    probs[0, 1, 3], probs[0, 1, 6] = 0.45, 0.45
    boxes_cxcywh = torch.tensor([[[0.05, 0.05, 0.1, 0.1], [0.25, 0.05, 0.1, 0.1]]])
    masks = torch.zeros(2, 256, dtype=torch.bool)
    masks[0, 1:4], masks[1, 5:7] = True, True
    ranked = rank_boxes_per_phrase({"pred_logits": probs.log(), "pred_boxes": boxes_cxcywh},
                                   torch.tensor([[100, 100]]), [masks], rule)[0]
    ev = PhraseGroundingEvaluator(ks=(1, 2), phrase_score=rule)
    ev.update(torch.stack(ranked), torch.tensor([LEFT, RIGHT]), torch.eye(2, dtype=torch.bool))
    assert ev.summarize()["any_box_recall@1"] == recall
    assert ev.summarize()["any_box_recall@2"] == 1.0
    with pytest.raises(ValueError, match=r"phrase_score must be one of \('max', 'sum'\), got 'mean'"):
        PhraseGroundingEvaluator(phrase_score="mean")


# ---------------------------------------------------------------------------------------------------------------
# question answering

def clevr_outputs(types, binary, attr, count):
    """CLEVR-head logits that predict the given types and answers."""
    one_hot = torch.nn.functional.one_hot
    return {"pred_answer_type": one_hot(torch.tensor(types), 3).float(),
            "pred_answer_binary": torch.tensor(binary, dtype=torch.float) * 2 - 1,
            "pred_answer_attr": one_hot(torch.tensor(attr), 15).float(),
            "pred_answer_reg": one_hot(torch.tensor(count), 20).float()}


def test_qa_accuracy_per_answer_type():
    # types 0 binary, 1 attribute, 2 count; -100 where a head does not apply
    answers = {"answer_type": torch.tensor([0, 0, 1, 1, 2, 2]),
               "answer_binary": torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
               "answer_attr": torch.tensor([-100, -100, 3, 4, -100, -100]),
               "answer_reg": torch.tensor([-100, -100, -100, -100, 2, 5])}
    # right, wrong binary answer, right, wrong attribute, right, count question given a binary answer (type wrong)
    outputs = clevr_outputs(types=[0, 0, 1, 1, 2, 0], binary=[1, 1, 0, 0, 0, 1], attr=[0, 0, 3, 5, 0, 0],
                            count=[0, 0, 0, 0, 2, 5])
    ev = QAEvaluator("clevr")
    ev.update(outputs, answers)
    ev.synchronize()
    assert ev.summarize() == pytest.approx({"qa_accuracy": 3 / 6, "qa_type_accuracy": 5 / 6, "qa_accuracy_type0": 0.5,
                                            "qa_accuracy_type1": 0.5, "qa_accuracy_type2": 0.5})
    per_type = ev.per_type()
    assert list(per_type) == ["binary", "attribute", "count", "all"]
    assert per_type["count"] == pytest.approx({"questions": 2, "accuracy": 0.5, "type_accuracy": 0.5})
    assert per_type["all"]["questions"] == 6
    # samples without a question (answer_type -100, e.g. grounding sentences in a mixed file) are not scored
    mixed = {k: torch.cat([v, torch.full_like(v[:1], -100 if k != "answer_binary" else 0)]) for k, v in answers.items()}
    more = {k: torch.cat([v, v[:1]]) for k, v in outputs.items()}
    ev = QAEvaluator("clevr")
    ev.update(more, mixed)
    assert ev.summarize()["qa_accuracy"] == pytest.approx(3 / 6) and ev.per_type()["all"]["questions"] == 6


def test_qa_gqa_types_and_bad_inputs():
    ev = QAEvaluator("gqa")
    ev.update_correct(torch.tensor([True, False]), torch.tensor([True, True]), torch.tensor([2, 4]))
    assert list(ev.per_type()) == ["obj", "attr", "rel", "global", "cat", "all"]
    assert ev.per_type()["obj"] == {"questions": 0, "accuracy": None, "type_accuracy": None}
    assert ev.summarize() == {"qa_accuracy": 0.5, "qa_type_accuracy": 1.0, "qa_accuracy_type2": 1.0,
                              "qa_accuracy_type4": 0.0}
    assert QAEvaluator("clevr").summarize() == {}
    with pytest.raises(ValueError, match="answer_type values must be in"):
        ev.update_correct(torch.tensor([True]), torch.tensor([True]), torch.tensor([5]))
    with pytest.raises(ValueError, match="qa_dataset must be one of"):
        QAEvaluator("vqa")


# ---------------------------------------------------------------------------------------------------------------
# COCO AP

def coco_case(dets):
    """Two 100x100 images, one 50x50 GT box each (medium); dets: per image a list of (box xyxy, score)."""
    ev = CocoEvaluator()
    results = [{"boxes": torch.tensor([b for b, _ in d]).reshape(-1, 4), "scores": torch.tensor([s for _, s in d])}
               for d in dets]
    gt = [torch.tensor([[10.0, 10.0, 60.0, 60.0]]), torch.tensor([[20.0, 20.0, 70.0, 70.0]])]
    ev.update([7, 9], torch.tensor([[100, 100], [100, 100]]), results, gt)
    return ev.summarize()


def test_coco_perfect_predictions():
    metrics = coco_case([[([10.0, 10.0, 60.0, 60.0], 0.9)], [([20.0, 20.0, 70.0, 70.0], 0.8), (FAR, 0.1)]])
    assert list(metrics) == list(METRICS)
    expected = {m: 1.0 for m in METRICS} | {"APs": -1.0, "APl": -1.0, "ARs": -1.0, "ARl": -1.0}  # only medium GT
    assert metrics == pytest.approx(expected)


def test_coco_known_partial_cases():
    # a hit ranked above a miss: precision 1 up to recall 0.5, then nothing -> 51 of 101 recall points
    metrics = coco_case([[([10.0, 10.0, 60.0, 60.0], 0.9)], [([80.0, 80.0, 99.0, 99.0], 0.8)]])
    assert metrics["AP"] == pytest.approx(51 / 101) and metrics["AP50"] == pytest.approx(51 / 101)
    assert metrics["AR@100"] == pytest.approx(0.5)
    # IoU 0.67 on both images: a hit at the thresholds 0.50, 0.55, 0.60, 0.65 only (4 of 10)
    metrics = coco_case([[([10.0, 10.0, 60.0, 43.5], 0.9)], [([20.0, 20.0, 70.0, 53.5], 0.9)]])
    assert (metrics["AP"], metrics["AP50"], metrics["AP75"]) == pytest.approx((0.4, 1.0, 0.0))


def test_coco_bad_inputs(monkeypatch):
    ev = CocoEvaluator()
    assert ev.summarize() == {}
    one = [{"boxes": torch.zeros(1, 4), "scores": torch.ones(1)}]
    ev.update([3], torch.tensor([[10, 10]]), one, [torch.zeros(0, 4)])
    with pytest.raises(ValueError, match="image id 3 was already evaluated"):
        ev.update([3], torch.tensor([[10, 10]]), one, [torch.zeros(0, 4)])
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)  # importing it now raises ImportError
    with pytest.raises(ImportError, match="pip install pycocotools"):
        ev.summarize()


# ---------------------------------------------------------------------------------------------------------------
# two processes: the synchronized counts are those of one process that saw everything

def _feed(rank_slice, evaluators):
    refexp, grounding, qa, coco = evaluators
    preds = torch.tensor([[[0.0, 0, 10, 10]], [[50.0, 50, 60, 60]], [[0.0, 0, 10, 9]]])
    for i in rank_slice:
        refexp.update(preds[i:i + 1], torch.ones(1, 1), GT)
        grounding.update(preds[i:i + 1], GT, torch.ones(1, 1, dtype=torch.bool))
        qa.update_correct(torch.tensor([i != 1]), torch.tensor([True]), torch.tensor([i % 3]))
        coco.update([i], torch.tensor([[100, 100]]), [{"boxes": preds[i], "scores": torch.ones(1)}], [GT])
    for ev in evaluators:
        ev.synchronize()
    return [ev.summarize() for ev in evaluators]


def _make_evaluators():
    return RefExpEvaluator(ks=(1,)), PhraseGroundingEvaluator(ks=(1,)), QAEvaluator("clevr"), CocoEvaluator()


def _sync_worker(rank, world, init_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    summaries = _feed(range(rank, 3, world), _make_evaluators())  # rank 0: samples 0 and 2, rank 1: sample 1
    if rank == 1:
        torch.save(summaries, out_file)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_sum_to_one(tmp_path):
    single = _feed(range(3), _make_evaluators())
    assert single[0] == {"precision@1": 2 / 3}
    out_file = tmp_path / "summaries.pt"
    mp.spawn(_sync_worker, args=(2, str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    assert torch.load(out_file) == single


# ---------------------------------------------------------------------------------------------------------------
# python -m mdetr.evaluate on tiny checkpoints (untrained heads: the numbers are not the point, the plumbing is)

def tiny_checkpoint(path: Path, root: str, **overrides) -> str:
    """A checkpoint as mdetr.train writes it (model, ema, config) for a tiny untrained model on a tiny world."""
    from mdetr.models import build_from_config

    items = {"data.root": root, "data.transforms": "tiny", "data.num_train": 2, "data.num_val": 2, "data.num_test": 3,
             "data.num_workers": 0, "data.batch_size": 2, "model.pretrained_backbone": False, "model.d_model": 32,
             "model.nheads": 4, "model.enc_layers": 1, "model.dec_layers": 1, "model.dim_feedforward": 64,
             "model.num_queries": 9, "model.query_grid": 3, **overrides}
    cfg = C.resolve("shapes", None, [f"--{k}={v}" for k, v in items.items()])
    torch.manual_seed(0)
    model = build_from_config(cfg.model)
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "config": cfg.to_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluate")
    root = str(folder / "shapes")
    ensure_shapes_dataset(root, num_train=2, num_val=2, num_test=3, seed=0)  # the sizes tiny_checkpoint sets
    return {"folder": folder, "root": root, "detector": tiny_checkpoint(folder / "detector.pth", root),
            "clevr": tiny_checkpoint(folder / "clevr.pth", root, **{"model.qa_dataset": "clevr"})}


@pytest.mark.slow
def test_cli_grounding_end_to_end(checkpoints):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "mdetr.evaluate", "--checkpoint", checkpoints["detector"], "--task",
                           "grounding", "--threads", "1"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "any-box" in proc.stdout and "merged-box" in proc.stdout
    report = json.loads((checkpoints["folder"] / "eval_grounding_test.json").read_text())
    assert report["annotation_file"].endswith("shapes_grounding_test.json") and report["samples"] == 3
    assert report["counts"]["phrases"] > 0
    assert report["phrase_score"] == "max" and "phrase score: max over the phrase's tokens" in proc.stdout
    assert set(report["metrics"]) == {f"{p}_recall@{k}" for p in ("any_box", "merged_box") for k in (1, 5, 10)}
    for value in report["metrics"].values():
        assert 0.0 <= value <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("task, ckpt, keys", [
    ("refexp", "detector", {"precision@1", "precision@5", "precision@10"}),
    ("coco", "detector", set(METRICS)),
    ("qa", "clevr", {"qa_accuracy", "qa_type_accuracy"}),
])
def test_cli_tasks(checkpoints, tmp_path, capsys, task, ckpt, keys):
    from mdetr.evaluate import main

    out = tmp_path / "report.json"
    main(["--checkpoint", checkpoints[ckpt], "--task", task, "--out", str(out), "--weights", "model"])
    report = json.loads(out.read_text())
    assert keys <= set(report["metrics"]) and report["task"] == task and report["weights"] == "model"
    if task == "refexp":
        assert report["counts"]["expressions_without_box"] == 0 and report["counts"]["expressions"] == report["samples"]
    assert f"wrote {out}" in capsys.readouterr().out


class Oracle(torch.nn.Module):
    """Predicts each sample's ground truth, samples taken in order: query t = box t with the soft tokens of its
    positive map, the other queries no-object (score ~0) on a box off every object."""

    def __init__(self, samples, num_queries: int = 9):
        super().__init__()
        self.outputs = []
        for _, target in samples:
            logits = torch.full((num_queries, 256), -20.0)
            logits[:, 255] = 20.0
            boxes = torch.tensor([0.01, 0.01, 0.01, 0.01]).repeat(num_queries, 1)
            num_boxes = len(target["boxes"])
            logits[:num_boxes] = torch.where(target["positive_map"], 10.0, -20.0)
            boxes[:num_boxes] = target["boxes"]
            self.outputs.append((logits, boxes))

    def forward(self, images, mask, captions):
        batch, self.outputs = self.outputs[:len(captions)], self.outputs[len(captions):]
        return {"pred_logits": torch.stack([b[0] for b in batch]), "pred_boxes": torch.stack([b[1] for b in batch])}


@pytest.mark.parametrize("task, expected", [
    ("refexp", {"precision@1": 1.0}),
    ("grounding", {"any_box_recall@1": 1.0}),
    ("coco", {"AP": 1.0, "AP50": 1.0, "AR@100": 1.0}),
])
def test_oracle_predictions_score_perfectly(checkpoints, task, expected):
    """The whole path (dataset targets, original-image pixels, ranking, the evaluators) on perfect predictions; the
    COCO ground truth must be the annotation file's boxes."""
    from mdetr.data import build_loader
    from mdetr.evaluate import load_dataset, make_evaluator, run_evaluator, select_samples

    cfg = C.from_dict(torch.load(checkpoints["detector"], weights_only=False)["config"])
    dataset = load_dataset(cfg, task, "test")
    samples = torch.utils.data.Subset(dataset, select_samples(dataset, task, None))
    loader = build_loader(samples, batch_size=2, shuffle=False, num_workers=0, seed=0)
    evaluator = run_evaluator(Oracle(samples), loader, task, make_evaluator(task), torch.device("cpu"))
    metrics = evaluator.summarize()
    assert {k: metrics[k] for k in expected} == pytest.approx(expected)
    if task == "coco":
        data = json.loads(Path(dataset.ann_file).read_text())
        for ann in data["annotations"]:
            x, y, w, h = ann["bbox"]
            boxes = evaluator.images[ann["image_id"]][1]
            assert any(torch.allclose(b, torch.tensor([x, y, x + w, y + h]), atol=1e-3) for b in boxes)


@pytest.mark.slow
def test_phrase_targets_of_the_dataset(checkpoints):
    """positive_map_eval and phrase_box_map agree with the shapes world's own phrase ids."""
    from mdetr.evaluate import load_dataset

    cfg = C.from_dict(torch.load(checkpoints["detector"], weights_only=False)["config"])
    dataset = load_dataset(cfg, "grounding", "test")
    for index in range(len(dataset)):
        _, target = dataset[index]
        num_phrases = len(target["tokens_positive_eval"])
        assert target["positive_map_eval"].shape == (num_phrases, 256) and target["positive_map_eval"].any(1).all()
        expected = torch.nn.functional.one_hot(target["phrase_ids"], num_phrases).T.bool()
        assert torch.equal(target["phrase_box_map"], expected)


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "missing.pth", "--task", "refexp"], "--checkpoint 'missing.pth': no such file"),
    (["--task", "detection"], "argument --task: invalid choice"),
    (["--task", "grounding", "--ann", "{root}/annotations/shapes_refexp_test.json"], "no entry with 'tokens_positive_eval'"),
    (["--task", "refexp", "--ann", "{root}/annotations/shapes_grounding_test.json"], "several boxes"),
    (["--task", "refexp", "--ann", "{root}/annotations/shapes_qa_test.json"], "entries without a box (e.g."),
    (["--task", "qa"], "the checkpoint's model has no QA heads"),
    (["--task", "grounding", "--phrase-score", "mean"], "argument --phrase-score: invalid choice: 'mean'"),
    (["--task", "refexp", "--ann", "nowhere.json"], "--ann 'nowhere.json': no such annotation file"),
])
def test_cli_bad_inputs_name_the_argument(checkpoints, capsys, args, message):
    from mdetr.evaluate import main

    args = [a.format(root=checkpoints["root"]) for a in args]
    if "--checkpoint" not in args:
        args = ["--checkpoint", checkpoints["detector"], *args]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_phrase_score_rule_from_the_checkpoint_or_the_argument(checkpoints, tmp_path):
    """The checkpoint config's train.phrase_score ranks by default; the argument overrides it; a bad value is named."""
    from mdetr.evaluate import evaluate_checkpoint

    summed = tiny_checkpoint(tmp_path / "summed.pth", checkpoints["root"], **{"train.phrase_score": "sum"})
    for checkpoint, argument, rule in ((summed, None, "sum"), (summed, "max", "max"),
                                       (checkpoints["detector"], "sum", "sum")):
        result = evaluate_checkpoint(checkpoint, "grounding", weights="model", num_workers=0, phrase_score=argument)
        assert result["phrase_score"] == rule and result["tables"][0].startswith(f"phrase score: {rule} over")
    with pytest.raises(ValueError, match=r"--phrase-score must be one of \['max', 'sum'\], got 'mean'"):
        evaluate_checkpoint(summed, "grounding", phrase_score="mean")


def test_refexp_counts_an_entry_whose_box_lies_outside_its_image(checkpoints, tmp_path):
    from mdetr.evaluate import evaluate_checkpoint

    data = json.loads((Path(checkpoints["root"]) / "annotations" / "shapes_refexp_test.json").read_text())
    entry = data["images"][0]
    moved = next(a for a in data["annotations"] if a["image_id"] == entry["id"])
    moved["bbox"] = [entry["width"] + 10, 0, 20, 20]  # clipped to nothing, then dropped: the entry has no box
    ann = tmp_path / "refexp_one_box_outside.json"
    ann.write_text(json.dumps(data))
    result = evaluate_checkpoint(checkpoints["detector"], "refexp", ann=str(ann), weights="model")
    assert result["counts"]["expressions_without_box"] == 1  # scored as a miss, as the reference does
    assert result["counts"]["expressions"] == result["samples"] == len(data["images"])
    evaluator = RefExpEvaluator(ks=(1,))
    evaluator.update(torch.tensor([[[0.0, 0, 10, 10]]]), torch.ones(1, 1), torch.tensor([[0.0, 0, 10, 10]]))
    evaluator.add_misses(1)
    assert evaluator.summarize() == {"precision@1": 0.5} and evaluator.without_box == 1
    assert result["split"] is None and result["annotation_file"] == str(ann.resolve())  # a named file, no split


def test_qa_evaluation_reads_answers_in_the_vocabulary_of_training(checkpoints, tmp_path, monkeypatch):
    # a CLEVR-style file without info.answer_vocab would otherwise number its own (sorted) attribute answers
    import mdetr.evaluate as E

    data = json.loads((Path(checkpoints["root"]) / "annotations" / "shapes_qa_test.json").read_text())
    del data["info"]["answer_vocab"]
    ann = tmp_path / "qa_without_vocab.json"
    ann.write_text(json.dumps(data))
    seen = {}
    real = E.run_evaluator

    def spy(model, loader, *args, **kwargs):
        seen["vocab"] = loader.dataset.dataset.answer_vocab
        return real(model, loader, *args, **kwargs)

    monkeypatch.setattr(E, "run_evaluator", spy)
    saved = torch.load(checkpoints["clevr"], weights_only=False)
    trained = list(reversed(ANSWER_VOCAB))  # what a training run saved: the ids its heads learned
    checkpoint = tmp_path / "clevr_with_vocab.pth"
    torch.save(dict(saved, answer_vocab=trained), checkpoint)
    E.evaluate_checkpoint(str(checkpoint), "qa", ann=str(ann), weights="model")
    assert seen["vocab"] == trained


def test_ema_asked_of_a_run_without_ema_reports_the_live_weights(checkpoints, tmp_path):
    from mdetr.checkpoint import load_model

    saved = torch.load(checkpoints["detector"], weights_only=False)
    no_ema = tmp_path / "no_ema.pth"
    torch.save(dict(saved, ema=None), no_ema)
    assert load_model(checkpoints["detector"], weights="ema")[0].loaded_weights == "ema"
    assert load_model(no_ema, weights="ema")[0].loaded_weights == "model"

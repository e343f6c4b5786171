"""Evaluate a training checkpoint on one task and write the tables as JSON.

CLI::

    python -m mdetr.evaluate --checkpoint runs/shapes/checkpoint.pth --task grounding [--split test]
        [--ann FILE] [--image-dir DIR] [--weights ema|model] [--batch-size N] [--device auto|cpu|cuda]
        [--phrase-score max|sum] [--out FILE]

prints a compact table and writes ``--out`` (default: next to the checkpoint, ``eval_<task>_<split>.json``, or
``eval_<task>_<ann file stem>.json`` with ``--ann``).

Tasks (the evaluators live in ``mdetr.evaluation``):

========= ==================================================== =====================================================
task      metrics                                              samples used
========= ==================================================== =====================================================
refexp    precision@1/5/10, GIoU >= 0.5 (``--iou-type iou``:   entries with a box; an entry with several boxes is an
          plain IoU), RefCOCO/+/g as the reference             error (a referring expression has one referent)
grounding Recall@1/5/10, any-box and merged-box (Flickr30k     entries with ``tokens_positive_eval`` (phrases)
          Entities)
qa        accuracy overall and per answer type (CLEVR heads:   entries with an ``answer``; the model needs QA heads
          binary / attribute / count; GQA heads: obj / attr /  of the file's kind
          rel / global / cat)
coco      class-agnostic COCO AP, AP50, AP75, APs/m/l,         every entry: an image with its caption; ground truth
          AR@1/10/100 (pycocotools)                            = the boxes the caption refers to
========= ==================================================== =====================================================

Annotation file: ``--ann FILE`` (a released MDETR file, e.g. ``final_flickr_separateGT_test.json``; images under
``--image-dir`` or the checkpoint config's ``data.image_dir``). Otherwise from the checkpoint's ``data`` section: for
the shapes world ``shapes_<kind>_<split>.json`` with kind refexp, grounding, qa, and grounding again for coco (a
grounding sentence names every object of its image, so its boxes are all of the image's: class-agnostic detection
over every box); for ``data.dataset=mdetr`` the split's file as training's validation finds it (``data.val_ann``,
``_val`` -> ``_test`` for the test split). Images always go through the eval transforms.

Under ``torchrun`` every rank evaluates every world-th sample (no padding, so no sample counts twice) and the
evaluators sum or gather over ranks; rank 0 prints and writes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import Subset

from mdetr import distributed as dist_utils
from mdetr.checkpoint import load_model
from mdetr.data import ModulatedDetection, build_dataset, build_loader, make_transforms
from mdetr.engine import autocast, to_device
from mdetr.evaluation.coco import METRICS as COCO_METRICS, CocoEvaluator
from mdetr.evaluation.grounding import PHRASE_SCORES, PROTOCOLS, PhraseGroundingEvaluator
from mdetr.evaluation.qa import QAEvaluator
from mdetr.evaluation.refexp import OVERLAPS, RefExpEvaluator
from mdetr.models import PostProcess, rank_boxes_per_phrase
from mdetr.models.postprocess import scale_boxes
from mdetr.predict import find_answer_vocab
from mdetr.pretrained import load_tokenizer

TASKS = ("refexp", "grounding", "qa", "coco")
SHAPES_FILES = {"refexp": "refexp", "grounding": "grounding", "qa": "qa", "coco": "grounding"}
KS = (1, 5, 10)
OVERLAP_NAMES = {"giou": "GIoU", "iou": "IoU"}


# ---------------------------------------------------------------------------------------------------------------
# data

def load_dataset(cfg, task: str, split: str, ann: Optional[str] = None,
                 image_dir: Optional[str] = None, answer_vocab=None) -> ModulatedDetection:
    """The annotation file ``task`` reads (see the module docstring), with the eval transforms; ``answer_vocab``:
    the QA model's (``mdetr.predict.find_answer_vocab``), so that answer ids mean what they meant in training."""
    data_cfg = dataclasses.replace(cfg.data, image_dir=image_dir) if image_dir else cfg.data
    if image_dir and not Path(image_dir).is_dir():
        raise ValueError(f"--image-dir {image_dir!r}: no such folder")
    if ann is not None:
        path = Path(ann).resolve()
        if not path.is_file():
            raise ValueError(f"--ann {ann!r}: no such annotation file")
        ann_file, generate = str(path), False
    else:
        shapes = data_cfg.dataset == "shapes"
        ann_file, generate = (f"shapes_{SHAPES_FILES[task]}_{split}.json" if shapes else None), shapes
    tokenizer = load_tokenizer(cfg.model.text_encoder)
    rank0 = dist_utils.is_main()
    if generate and not rank0:
        dist_utils.barrier()  # rank 0 generates the shapes world first, when it is missing
    dataset = build_dataset(data_cfg, split, tokenizer, ann_file, generate=generate and rank0,
                            answer_vocab=answer_vocab, memo_images=False)  # one pass: a memo would only hold memory
    if generate and rank0:
        dist_utils.barrier()
    dataset.transforms = make_transforms("eval", data_cfg.transforms)  # --split train: no augmentation
    return dataset


def refexp_entry_problem(dataset: ModulatedDetection) -> Optional[str]:
    """Why ``dataset`` cannot be scored as referring expressions, or None: each entry needs exactly one box in the
    file, as the reference asserts (one whose box the transforms clip away still counts, as a miss)."""
    boxes = dataset.boxes_per_entry()
    problems = []
    for what, wrong in (("with several boxes", lambda n: n > 1), ("without a box", lambda n: n == 0)):
        ids = [e["id"] for e, n in zip(dataset.entries, boxes) if wrong(n)]
        if ids:
            problems.append(f"{len(ids)} entries {what} (e.g. entry id {ids[0]})")
    return " and ".join(problems) or None


def select_samples(dataset: ModulatedDetection, task: str, qa_dataset: Optional[str]) -> List[int]:
    """Indices of the entries ``task`` evaluates; ValueError when the file (or the model) cannot serve it."""
    where = f"--task {task}: annotation file {str(dataset.ann_file)!r}"
    entries = dataset.entries
    if task == "refexp":
        problem = refexp_entry_problem(dataset)
        if problem:
            raise ValueError(f"{where} has {problem}; a referring expression has one referent (use --task "
                             f"grounding or coco)")
        chosen = list(range(len(entries)))
        missing = "no entry"
    elif task == "grounding":
        chosen = [i for i, e in enumerate(entries) if "tokens_positive_eval" in e]
        missing = "no entry with 'tokens_positive_eval' (the phrases to ground, as Flickr30k Entities files have)"
    elif task == "qa":
        if qa_dataset is None:
            raise ValueError("--task qa: the checkpoint's model has no QA heads (model.qa_dataset is None)")
        if dataset.qa is not None and dataset.qa != qa_dataset:
            raise ValueError(f"{where} holds {dataset.qa} questions but the model has {qa_dataset} QA heads")
        chosen = [i for i, e in enumerate(entries) if "answer" in e]
        missing = "no entry with an 'answer' (questions)"
    elif task == "coco":
        chosen = list(range(len(entries))) if any(dataset.boxes_per_entry()) else []
        missing = "no annotated box"
    else:
        raise ValueError(f"--task must be one of {TASKS}, got {task!r}")
    if not chosen:
        raise ValueError(f"{where} has {missing}")
    return chosen


# ---------------------------------------------------------------------------------------------------------------
# per-batch updates: (evaluator, outputs, batch) with batch on the model's device, targets on the CPU

def _original_sizes(batch: Dict[str, Any], device: torch.device) -> Tensor:
    """[B, 2] (h, w) of the image files: boxes are scored in their pixels, as the reference does."""
    return torch.stack([t["orig_size"] for t in batch["targets"]]).to(device)


def _gt_boxes(batch: Dict[str, Any]) -> List[Tensor]:
    """Per sample [T, 4] absolute xyxy boxes in the image file's pixels."""
    return [scale_boxes(t["boxes"][None], t["orig_size"][None])[0] for t in batch["targets"]]


def _update_refexp(evaluator: RefExpEvaluator, outputs: Dict[str, Tensor], batch: Dict[str, Any]) -> None:
    has_box = batch["num_targets"] > 0  # an entry whose box was clipped away to nothing has none: a miss
    misses = int((~has_box).sum())  # the batch's one host sync here
    evaluator.add_misses(misses)
    if misses == len(has_box):
        return
    results = PostProcess()(outputs, _original_sizes(batch, has_box.device))
    pred = torch.stack([r["boxes"] for r in results])[has_box]  # [B', Q, 4]
    scores = torch.stack([r["scores"] for r in results])[has_box]  # [B', Q]
    gt = torch.stack([boxes[0] for boxes in _gt_boxes(batch) if len(boxes)])  # [B', 4]
    evaluator.update(pred, scores, gt.to(pred.device))


def _update_grounding(evaluator: PhraseGroundingEvaluator, outputs: Dict[str, Tensor], batch: Dict[str, Any]) -> None:
    device = outputs["pred_logits"].device
    masks = [t["positive_map_eval"].to(device) for t in batch["targets"]]
    ranked = rank_boxes_per_phrase(outputs, _original_sizes(batch, device), masks, evaluator.phrase_score)
    num_queries = outputs["pred_boxes"].shape[1]
    for phrases, gt, target in zip(ranked, _gt_boxes(batch), batch["targets"]):
        boxes = torch.stack(phrases) if phrases else torch.zeros(0, num_queries, 4, device=device)  # [P, Q, 4]
        evaluator.update(boxes, gt.to(device), target["phrase_box_map"])


def _update_qa(evaluator: QAEvaluator, outputs: Dict[str, Tensor], batch: Dict[str, Any]) -> None:
    if "answers" in batch:  # a QA model validated on a file without questions has nothing to score
        evaluator.update(outputs, batch["answers"])


def _update_coco(evaluator: CocoEvaluator, outputs: Dict[str, Tensor], batch: Dict[str, Any]) -> None:
    sizes = _original_sizes(batch, outputs["pred_boxes"].device)
    results = PostProcess()(outputs, sizes)
    evaluator.update([t["image_id"] for t in batch["targets"]], sizes, results, _gt_boxes(batch))


UPDATES: Dict[str, Callable[[Any, Dict[str, Tensor], Dict[str, Any]], None]] = {
    "refexp": _update_refexp, "grounding": _update_grounding, "qa": _update_qa, "coco": _update_coco}


def make_evaluator(task: str, qa_dataset: Optional[str] = None, iou_type: str = "giou", phrase_score: str = "max"):
    if task == "refexp":
        return RefExpEvaluator(KS, iou_type=iou_type)
    if task == "grounding":
        return PhraseGroundingEvaluator(KS, phrase_score=phrase_score)
    if task == "qa":
        return QAEvaluator(qa_dataset)
    if task == "coco":
        return CocoEvaluator()
    raise ValueError(f"--task must be one of {TASKS}, got {task!r}")


@torch.no_grad()
def run_evaluators(model: torch.nn.Module, loader, evaluators: Mapping[str, Any], device: torch.device,
                   precision: str = "fp32") -> Mapping[str, Any]:
    """Feed every batch of ``loader`` through ``model`` once, into each evaluator (task name -> evaluator), then
    synchronize them over ranks. Returns ``evaluators``."""
    model.eval()
    for batch in loader:
        batch = to_device(batch, device)
        with autocast(device, precision):
            outputs = model(batch["images"], batch["mask"], batch["captions"])
        for task, evaluator in evaluators.items():
            UPDATES[task](evaluator, outputs, batch)
    for evaluator in evaluators.values():
        evaluator.synchronize()
    return evaluators


def run_evaluator(model: torch.nn.Module, loader, task: str, evaluator, device: torch.device,
                  precision: str = "fp32"):
    """``run_evaluators`` with one task; returns its evaluator."""
    return run_evaluators(model, loader, {task: evaluator}, device, precision)[task]


# ---------------------------------------------------------------------------------------------------------------
# report

def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned first column, right-aligned others; floats with 4 decimals, None as "-"."""
    cells = [[f"{v:.4f}" if isinstance(v, float) else "-" if v is None else str(v) for v in row]
             for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in cells)


def report(task: str, evaluator) -> Dict[str, Any]:
    """{metrics: flat name -> value, counts: name -> int, tables: [text tables]} (plus per_type for qa)."""
    metrics = evaluator.summarize()
    if task == "refexp":
        counts = {"expressions": evaluator.count, "expressions_without_box": evaluator.without_box}
        rows = [[f"{OVERLAP_NAMES[evaluator.iou_type]} >= {evaluator.threshold}",
                 *[metrics[f"precision@{k}"] for k in evaluator.ks]]]
        return {"metrics": metrics, "counts": counts, "iou_type": evaluator.iou_type,
                "tables": [format_table(["hit rule", *[f"P@{k}" for k in evaluator.ks]], rows)]}
    if task == "grounding":
        counts = {"phrases": evaluator.count, "phrases_without_box": evaluator.skipped}
        rows = [[p.replace("_", "-"), *[metrics[f"{p}_recall@{k}"] for k in evaluator.ks]] for p in PROTOCOLS]
        rule = PHRASE_SCORES[evaluator.phrase_score]
        return {"metrics": metrics, "counts": counts, "phrase_score": evaluator.phrase_score,
                "tables": [f"phrase score: {rule}\n"
                           + format_table(["protocol", *[f"R@{k}" for k in evaluator.ks]], rows)]}
    if task == "qa":
        per_type = evaluator.per_type()
        rows = [[name, r["questions"], r["accuracy"], r["type_accuracy"]] for name, r in per_type.items()]
        return {"metrics": metrics, "counts": {"questions": per_type["all"]["questions"]}, "per_type": per_type,
                "tables": [format_table(["answer type", "questions", "accuracy", "type acc."], rows)]}
    counts = {"images": len(evaluator.images), "boxes": sum(len(v[1]) for v in evaluator.images.values())}
    half = len(COCO_METRICS) // 2
    tables = [format_table(names, [[metrics[n] for n in names]])
              for names in (COCO_METRICS[:half], COCO_METRICS[half:])]
    return {"metrics": metrics, "counts": counts, "tables": tables}


def evaluate_checkpoint(checkpoint: str, task: str, split: str = "test", ann: Optional[str] = None,
                        image_dir: Optional[str] = None, weights: str = "ema", batch_size: Optional[int] = None,
                        num_workers: Optional[int] = None, device: str = "auto", precision: str = "fp32",
                        iou_type: str = "giou", trusted: bool = False, phrase_score: Optional[str] = None
                        ) -> Dict[str, Any]:
    """Load ``checkpoint`` (``mdetr.checkpoint.load_model``), evaluate ``task`` on the split's file, return the
    report: task, split (None with ``ann``: the file is named, not derived from a split), annotation_file,
    checkpoint, weights, and ``report``'s metrics / counts / tables."""
    if task not in TASKS:
        raise ValueError(f"--task must be one of {TASKS}, got {task!r}")
    if iou_type not in OVERLAPS:
        raise ValueError(f"--iou-type must be one of {sorted(OVERLAPS)}, got {iou_type!r}")
    if phrase_score is not None and phrase_score not in PHRASE_SCORES:
        raise ValueError(f"--phrase-score must be one of {sorted(PHRASE_SCORES)}, got {phrase_score!r}")
    if not Path(checkpoint).is_file():
        raise ValueError(f"--checkpoint {checkpoint!r}: no such file")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch.cuda.is_available() is False on this machine")
    torch_device, rank, world = dist_utils.init_from_env(device)
    model, cfg = load_model(checkpoint, torch_device, weights, trusted=trusted)
    answer_vocab = None
    if task == "qa" and model.qa_dataset is not None:
        answer_vocab, _ = find_answer_vocab(checkpoint, cfg, trusted)  # the vocabulary training used
    dataset = load_dataset(cfg, task, split, ann, image_dir, answer_vocab)
    indices = select_samples(dataset, task, model.qa_dataset)
    loader = build_loader(Subset(dataset, indices[rank::world]), batch_size or cfg.data.batch_size, shuffle=False,
                          num_workers=cfg.data.num_workers if num_workers is None else num_workers, seed=0)
    evaluator = make_evaluator(task, model.qa_dataset, iou_type, phrase_score or cfg.train.phrase_score)
    evaluator = run_evaluator(model, loader, task, evaluator, torch_device, precision)
    result = report(task, evaluator)
    return {"task": task, "split": None if ann else split, "annotation_file": str(dataset.ann_file),
            "checkpoint": str(checkpoint), "weights": model.loaded_weights, "samples": len(indices), **result}


def default_out(checkpoint: str, task: str, split: str, ann: Optional[str]) -> Path:
    return Path(checkpoint).parent / f"eval_{task}_{Path(ann).stem if ann else split}.json"


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mdetr.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a training checkpoint of python -m mdetr.train")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--ann", help="an MDETR annotation file to read instead of the config's")
    parser.add_argument("--image-dir", help="the folder the annotation file's file_names are relative to")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema", help="EMA (default) or live weights")
    parser.add_argument("--batch-size", type=int, help="images per batch (default: the config's data.batch_size)")
    parser.add_argument("--num-workers", type=int, help="DataLoader workers (default: the config's)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast dtype")
    parser.add_argument("--iou-type", choices=sorted(OVERLAPS), default="giou",
                        help="refexp: the overlap of the hit rule (giou: the reference's)")
    parser.add_argument("--phrase-score", choices=sorted(PHRASE_SCORES),
                        help="grounding: rank a phrase's boxes by the max (MDETR) or the sum of their probabilities "
                        "on its tokens (default: the checkpoint config's train.phrase_score)")
    parser.add_argument("--out", help="the JSON file to write (default: next to the checkpoint, "
                        "eval_<task>_<split>.json; with --ann eval_<task>_<ann file stem>.json)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--trusted", action="store_true", help="unpickle any Python object in the checkpoint "
                        "(only for files you trust; by default tensors and plain data only)")
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        result = evaluate_checkpoint(args.checkpoint, args.task, args.split, args.ann, args.image_dir, args.weights,
                                     args.batch_size, args.num_workers, args.device, args.precision, args.iou_type,
                                     args.trusted, args.phrase_score)
        main_rank = dist_utils.is_main()
    except (ValueError, RuntimeError, ImportError, OSError) as err:  # bad arguments, an unreadable checkpoint, no
        # pycocotools, a text encoder that is not on this machine
        parser.error(str(err))
    finally:
        dist_utils.shutdown()
    if not main_rank:
        return
    out = Path(args.out) if args.out else default_out(args.checkpoint, args.task, args.split, args.ann)
    print(f"{args.task} on {result['annotation_file']} ({result['samples']} samples, {result['weights']} weights): "
          + ", ".join(f"{k} {v}" for k, v in result["counts"].items()))
    print("\n\n".join(result["tables"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({k: v for k, v in result.items() if k != "tables"}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

import pytest
import torch

from mdetr.evaluation.refexp import RefExpEvaluator


def test_precision_at_k_hand_built():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    good, bad = [0.0, 0.0, 10.0, 9.0], [50.0, 50.0, 60.0, 60.0]
    # image 0: best-scored box is right; image 1: the right box is ranked 2nd
    preds = torch.tensor([[good, bad, bad], [bad, good, bad]])
    scores = torch.tensor([[0.9, 0.5, 0.1], [0.9, 0.8, 0.1]])
    ev = RefExpEvaluator(ks=(1, 2, 3))
    ev.update(preds, scores, gt)
    assert ev.summarize() == {"precision@1": 0.5, "precision@2": 1.0, "precision@3": 1.0}


@pytest.mark.parametrize("box, hit_giou, hit_iou", [
    ([0.0, 0.0, 10.0, 5.0], 1.0, 1.0),  # IoU 0.5 = GIoU (the enclosing box is the GT)
    ([1.8, 1.8, 11.8, 11.8], 0.0, 1.0),  # IoU 0.507 but GIoU 0.460: the reference's GIoU rule misses it
    ([5.0, 0.0, 15.0, 10.0], 0.0, 0.0),  # IoU 1/3
])
def test_giou_versus_iou_threshold(box, hit_giou, hit_iou):
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    for giou, expect in ((True, hit_giou), (False, hit_iou)):
        ev = RefExpEvaluator(ks=(1,), use_giou=giou)
        ev.update(torch.tensor([[box]]), torch.ones(1, 1), gt)
        assert ev.summarize()["precision@1"] == expect


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="gt_boxes"):
        RefExpEvaluator().update(torch.zeros(2, 3, 4), torch.zeros(2, 3), torch.zeros(3, 4))

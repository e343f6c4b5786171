"""Data loading: positive maps, the annotation reader and its errors, transforms, collate, loaders, box ops."""
import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

from mdetr.boxes import (box_cxcywh_to_xyxy, box_iou, box_xywh_to_xyxy, box_xyxy_to_cxcywh,
                         elementwise_generalized_box_iou, generalized_box_iou)
from mdetr.config import DataConfig, preset as config_preset
from mdetr.data import ModulatedDetection, build_dataset, build_loader, collate_fn, create_positive_map
from mdetr.data.sampler import GroupedBatchSampler, aspect_ratios, quantile_groups
from mdetr.data.synthetic import COLORS, generate_shapes_dataset
from mdetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD, RandomCropKeepingBoxes, make_transforms
from mdetr.pretrained import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_data")
    generate_shapes_dataset(root, num_train=16, num_val=8, num_test=2, seed=5)
    return root


def to_pixels(image: torch.Tensor) -> np.ndarray:
    """Normalized [3, H, W] -> uint8-range [H, W, 3] floats."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((image * std + mean) * 255).permute(1, 2, 0).numpy()


# ---------------------------------------------------------------------------------------------------------------
# positive maps

def reference_positive_map(tokenized, tokens_positive, max_tokens=256):
    """MDETR's algorithm, loop by loop, as the spec: char_to_token with begin+1/+2 and end-2/-3 fallbacks."""
    def lookup(c):
        try:
            return tokenized.char_to_token(c) if c >= 0 else None
        except Exception:
            return None

    out = torch.zeros(len(tokens_positive), max_tokens)
    for j, spans in enumerate(tokens_positive):
        for begin, end in spans:
            first = lookup(begin)
            if first is None:
                first = lookup(begin + 1)
                if first is None:
                    first = lookup(begin + 2)
            last = lookup(end - 1)
            if last is None:
                last = lookup(end - 2)
                if last is None:
                    last = lookup(end - 3)
            if first is not None and last is not None:
                out[j, first: last + 1] = 1
    return out.bool()


def test_positive_map_fallbacks(tokenizer):
    caption = "a  big red  ball"  # [CLS]=0 a=1 big=2 red=3 ball=4 [SEP]=5
    tokenized = tokenizer(caption)
    spans = [
        [[3, 6]],  # "big": no fallback
        [[2, 6]],  # starts on a space: begin+1
        [[1, 6]],  # starts on two spaces: begin+2
        [[7, 11]],  # "red ": ends on a space: end-2
        [[7, 12]],  # "red  ": ends on two spaces: end-3
        [[0, 1], [12, 16]],  # two spans: "a" and "ball"
        [[3, 16]],  # several tokens
    ]
    expected = [{2}, {2}, {2}, {3}, {3}, {1, 4}, {2, 3, 4}]
    pm = create_positive_map(tokenized, spans)
    assert pm.dtype == torch.bool and pm.shape == (len(spans), 256)
    assert [set(row.nonzero()[:, 0].tolist()) for row in pm] == expected
    assert torch.equal(pm, reference_positive_map(tokenized, spans))


def test_positive_map_is_binary_and_skips_tokenless_spans(tokenizer):
    tokenized = tokenizer("a    b")
    pm = create_positive_map(tokenized, [[[1, 5]], [[0, 6]], []], max_tokens=16)
    assert pm.shape == (3, 16)
    assert not pm[0].any() and not pm[2].any()  # only spaces / no spans: empty rows
    assert pm[1].tolist()[:4] == [False, True, True, False]  # binary, not row-normalized
    assert create_positive_map(tokenized, []).shape == (0, 256)


def test_positive_map_matches_reference_on_random_spans(tokenizer):
    rng = random.Random(0)
    words = ["red", "circle", "squares", "left", "of", "the", "unbelievably", "x", ",", "tiny-ish", "caf\u00e9"]
    for _ in range(60):
        caption = "".join(rng.choice(words) + " " * rng.randint(0, 3) for _ in range(rng.randint(1, 12)))
        tokenized = tokenizer(caption)
        spans = []
        for _ in range(rng.randint(0, 5)):
            box = []
            for _ in range(rng.randint(1, 2)):
                b = rng.randrange(len(caption))
                box.append([b, rng.randint(b + 1, len(caption))])
            spans.append(box)
        assert torch.equal(create_positive_map(tokenized, spans), reference_positive_map(tokenized, spans)), caption


# ---------------------------------------------------------------------------------------------------------------
# the annotation reader

def write_case(tmp_path: Path, entries, annotations) -> Path:
    Image.new("RGB", (100, 80), (10, 200, 10)).save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"this is not a png")
    images = [{"file_name": "ok.png", "height": 80, "width": 100, **e} for e in entries]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": []}))
    return path


def ann(image_id, bbox, spans, **kw):
    return {"id": 100 * image_id + len(str(bbox)), "image_id": image_id, "bbox": bbox, "area": 1, "iscrowd": 0,
            "category_id": 1, "tokens_positive": spans, **kw}


def test_reader_clips_drops_and_handles_empty(tmp_path, tokenizer):
    entries = [{"id": 1, "caption": "a box and a far box and a crowd"}, {"id": 2, "caption": "nothing here"}]
    anns = [ann(1, [90, 70, 30, 30], [[2, 5]]), ann(1, [120, 10, 10, 10], [[12, 19]]),
            ann(1, [0, 0, 10, 10], [[26, 31]], iscrowd=1)]
    ds = ModulatedDetection(tmp_path, write_case(tmp_path, entries, anns), tokenizer)
    image, t = ds[0]
    assert image.shape == (3, 80, 100)
    assert t["boxes"].shape == (1, 4) and t["tokens_positive"] == [[[2, 5]]]  # far box and crowd dropped
    assert torch.allclose(t["boxes"], box_xyxy_to_cxcywh(torch.tensor([[0.9, 70 / 80, 1.0, 1.0]])))  # clipped
    assert t["positive_map"][0].nonzero()[:, 0].tolist() == [2]
    assert t["orig_size"].tolist() == [80, 100] and t["size"].tolist() == [80, 100]
    _, empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["positive_map"].shape == (0, 256)
    assert empty["positive_map"].dtype == torch.bool and empty["tokens_positive"] == []


@pytest.mark.parametrize("case, message", [
    ("missing", r"entry id 1 .*missing\.png.*cannot read image file"),
    ("corrupt", r"entry id 1 .*cannot read image file .*corrupt\.png"),
    ("long", r"entry id 1 .*caption has \d+ tokens, more than the 255 token slots"),
    ("span", r"entry id 1 .*span \[0, 999\] outside the caption \(expected 0 <= begin < end <= 9\)"),
])
def test_reader_errors(tmp_path, tokenizer, case, message):
    entry = {"id": 1, "caption": "a red box"}
    anns = [ann(1, [1, 1, 5, 5], [[2, 9]])]
    if case in ("missing", "corrupt"):
        entry["file_name"] = f"{case}.png"
    elif case == "long":
        entry["caption"] = "word " * 300
    else:
        anns = [ann(1, [1, 1, 5, 5], [[0, 999]])]
    path = write_case(tmp_path, [entry], anns)
    if "file_name" in entry:  # write_case sets ok.png first; the entry's own name wins
        data = json.loads(path.read_text())
        data["images"][0]["file_name"] = entry["file_name"]
        path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        ModulatedDetection(tmp_path, path, tokenizer)[0]


def test_reader_on_shapes_files(world, tokenizer):
    ds = ModulatedDetection(world / "images", world / "annotations" / "shapes_grounding_val.json", tokenizer,
                            make_transforms("val", "shapes"))
    for i in range(4):
        image, t = ds[i]
        assert image.dtype == torch.float32 and min(t["size"].tolist()) == 224 or max(t["size"].tolist()) == 320
        assert list(image.shape[1:]) == t["size"].tolist()
        assert t["boxes"].dtype == torch.float32 and ((t["boxes"] >= 0) & (t["boxes"] <= 1)).all()
        assert t["positive_map"].shape == (len(t["boxes"]), 256) and t["phrase_ids"].shape == (len(t["boxes"]),)
        assert "tokens_positive_eval" in t and isinstance(t["sentence_id"], int)
        ids = tokenizer(t["caption"])["input_ids"]
        for row, spans in zip(t["positive_map"], t["tokens_positive"]):
            words = tokenizer.convert_ids_to_tokens([ids[j] for j in row.nonzero()[:, 0].tolist()])
            assert " ".join(words).replace(" ##", "") == " ".join(t["caption"][b:e].lower() for b, e in spans)


def test_qa_targets(world, tokenizer):
    ds = ModulatedDetection(world / "images", world / "annotations" / "shapes_qa_train.json", tokenizer)
    vocab = ds.answer_vocab
    for i in range(len(ds)):
        answer = ds.entries[i]["answer"]
        _, t = ds[i]
        kind = t["answer_type"].item()
        assert t["answer"] == answer and t["answer_binary"].dtype == torch.float32
        if answer in ("yes", "no"):
            assert kind == 0 and t["answer_binary"].item() == (answer == "yes")
        elif answer.isdigit():
            assert kind == 2 and t["answer_reg"].item() == int(answer) and t["answer_attr"].item() == -100
        else:
            assert kind == 1 and vocab[t["answer_attr"].item()] == answer and t["answer_reg"].item() == -100


def test_gqa_needs_vocab(tmp_path, tokenizer):
    entries = [{"id": 1, "caption": "what is it?", "answer": "cat", "question_type": "obj", "questionId": "q1"}]
    path = write_case(tmp_path, entries, [])
    with pytest.raises(ValueError, match="GQA questions need answer_vocab"):
        ModulatedDetection(tmp_path, path, tokenizer)
    vocab = {f"answer_{h}": {"unknown": 0, "cat": 1} for h in ("obj", "attr", "rel", "global", "cat")}
    _, t = ModulatedDetection(tmp_path, path, tokenizer, answer_vocab=vocab)[0]
    assert t["answer_type"].item() == 0 and t["answer_obj"].item() == 1 and t["answer_attr"].item() == -100


def test_reader_reads_several_files_as_one(tmp_path, tokenizer):
    # a QA file and a grounding file read together (a mixed fine-tune): entries in file order, each keeping its
    # boxes; the sentence without a question carries -100 answers, which the QA losses and accuracy skip
    Image.new("RGB", (100, 80), (10, 200, 10)).save(tmp_path / "ok.png")
    image = {"file_name": "ok.png", "height": 80, "width": 100}

    def write(name, entries, annotations):
        path = tmp_path / name
        path.write_text(json.dumps({"images": [{**image, **e} for e in entries], "annotations": annotations}))
        return path

    qa = write("qa.json", [{"id": 1, "caption": "what color is the box?", "answer": "red"},
                           {"id": 2, "caption": "how many boxes?", "answer": "2"}], [ann(1, [1, 1, 5, 5], [[19, 22]])])
    grounding = write("grounding.json", [{"id": 3, "caption": "a red box and a blue box"}],
                      [ann(3, [1, 1, 5, 5], [[0, 9]]), ann(3, [50, 20, 9, 9], [[14, 24]])])
    ds = ModulatedDetection(tmp_path, [qa, grounding], tokenizer)
    assert len(ds) == 3 and [e["id"] for e in ds.entries] == [1, 2, 3] and ds.qa == "clevr"
    assert ds.answer_vocab == ["red"] and str(ds.ann_file) == f"{qa}+{grounding}"
    targets = [ds[i][1] for i in range(3)]
    assert [len(t["boxes"]) for t in targets] == [1, 0, 2]
    assert targets[0]["answer_type"].item() == 1 and targets[1]["answer_reg"].item() == 2
    assert "answer" not in targets[2]
    assert {k: v.item() for k, v in targets[2].items() if k.startswith("answer_")} == {
        "answer_type": -100, "answer_attr": -100, "answer_reg": -100, "answer_binary": 0.0}
    batch = collate_fn([ds[2], ds[0]])
    assert batch["answers"]["answer_type"].tolist() == [-100, 1]
    # the QA file's info (its answer vocabulary) holds wherever the file comes in the list
    data = json.loads(qa.read_text())
    qa.write_text(json.dumps({**data, "info": {"task": "qa", "answer_vocab": ["red", "blue"]}}))
    grounding_first = ModulatedDetection(tmp_path, [grounding, qa], tokenizer)
    assert grounding_first.answer_vocab == ["red", "blue"] and grounding_first.info["task"] == "qa"
    assert [e["id"] for e in grounding_first.entries] == [3, 1, 2]
    # one file is the same dataset as before
    alone = ModulatedDetection(tmp_path, grounding, tokenizer)
    assert alone.ann_file == grounding and alone.qa is None and "answer_type" not in alone[0][1]
    with pytest.raises(ValueError, match=r"entry id 3 of '.*qa_again.json' is also an entry of '.*grounding.json'"):
        ModulatedDetection(tmp_path, [grounding, write("qa_again.json", [{"id": 3, "caption": "a box?"}], [])],
                           tokenizer)
    with pytest.raises(ValueError, match=r"annotation file '.*nope.json' does not exist"):
        ModulatedDetection(tmp_path, [qa, tmp_path / "nope.json"], tokenizer)
    with pytest.raises(ValueError, match="at least one annotation file"):
        ModulatedDetection(tmp_path, [], tokenizer)
    # repeats: the files in order, then the files named more than once again, in rounds
    other = write("other.json", [{"id": 4, "caption": "a box"}], [ann(4, [1, 1, 5, 5], [[0, 5]])])
    repeated = ModulatedDetection(tmp_path, [qa, grounding, other], tokenizer, repeats=[3, 1, 2])
    assert [e["id"] for e in repeated.entries] == [1, 2, 3, 4, 1, 2, 4, 1, 2]
    assert repeated[6][1]["boxes"].tolist() == repeated[3][1]["boxes"].tolist() and len(repeated[7][1]["boxes"]) == 1
    for bad in ([1], [1, 0], [2, 1.5]):
        with pytest.raises(ValueError, match="repeats must give each of the 2 annotation files an integer >= 1"):
            ModulatedDetection(tmp_path, [qa, grounding], tokenizer, repeats=bad)


def test_config_names_several_annotation_files():
    from mdetr.data import _ann_paths

    cfg = DataConfig(train_ann="shapes_qa_train.json, shapes_grounding_train.json", val_ann="a_val.json,b_val.json")
    root = Path(cfg.root) / "annotations"
    assert _ann_paths(cfg, "train", None) == [(root / "shapes_qa_train.json", 1),
                                               (root / "shapes_grounding_train.json", 1)]
    assert _ann_paths(cfg, "test", None) == [(root / "a_test.json", 1), (root / "b_test.json", 1)]
    assert _ann_paths(cfg, "test", "/x/mine.json") == [(Path("/x/mine.json"), 1)]  # named: not derived
    cfg.train_ann = "shapes_qa_train.json,"
    with pytest.raises(ValueError, match="annotation files: expected file names joined by ','"):
        _ann_paths(cfg, "train", None)
    cfg.train_ann = "a.json*2, b.json ,/x/c.json * 3"  # a repeat count after '*'
    assert _ann_paths(cfg, "train", None) == [(root / "a.json", 2), (root / "b.json", 1), (Path("/x/c.json"), 3)]
    for bad in ("a.json*0", "a.json*", "a.json*1.5", "*2", "a.json*x"):
        cfg.train_ann = bad
        with pytest.raises(ValueError, match=r"a repeat count is '\*N' after the name, N an integer >= 1"):
            _ann_paths(cfg, "train", None)
    with pytest.raises(ValueError, match="only training files repeat .* split 'val'"):
        _ann_paths(cfg, "val", "a_val.json*2")


# ---------------------------------------------------------------------------------------------------------------
# transforms

def painted_image():
    rng = np.random.default_rng(0)
    pixels = rng.integers(100, 140, size=(170, 200, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    boxes = [(10, 20, 60, 70), (120, 30, 190, 60), (70, 100, 110, 160), (150, 120, 170, 140)]
    colors = [(230, 20, 20), (20, 20, 230), (20, 200, 20), (240, 220, 0)]
    draw = ImageDraw.Draw(image)
    for b, c in zip(boxes, colors):
        draw.rectangle([b[0], b[1], b[2] - 1, b[3] - 1], fill=c)
    return image, torch.tensor(boxes, dtype=torch.float32), colors


@pytest.mark.parametrize("split, preset", [("train", "shapes"), ("val", "shapes"), ("train", "mdetr")])
def test_transforms_keep_boxes_on_objects(split, preset):
    image, boxes, colors = painted_image()
    transform = make_transforms(split, preset)
    for seed in range(12):
        torch.manual_seed(seed)
        out, t = transform(image, {"boxes": boxes.clone()})
        h, w = t["size"].tolist()
        assert out.shape == (3, h, w) and t["boxes"].shape == (4, 4)
        pixels = to_pixels(out)
        xyxy = box_cxcywh_to_xyxy(t["boxes"]) * torch.tensor([w, h, w, h])
        for (x0, y0, x1, y1), color in zip(xyxy.tolist(), colors):
            for fx, fy in ((0.5, 0.5), (0.2, 0.2), (0.8, 0.8), (0.2, 0.8)):
                px = pixels[int(y0 + fy * (y1 - y0)), int(x0 + fx * (x1 - x0))]
                assert np.abs(px - color).max() < 30, (seed, color, px)
            outside = pixels[int((y0 + y1) / 2), max(0, int(x0) - 3)]
            assert x0 < 3 or np.abs(outside - color).max() > 60
    if split == "val":
        assert min(h, w) == PRESET_EVAL[preset] or max(h, w) == PRESET_MAX[preset]


PRESET_EVAL = {"shapes": 224, "mdetr": 800}
PRESET_MAX = {"shapes": 320, "mdetr": 1333}


def test_test_split_file_comes_from_the_val_file_name():
    from mdetr.data import _ann_paths

    cfg = DataConfig(dataset="mdetr", root="/data/my_val", val_ann="refs_val/final_refcocog_val.json")
    # the name only
    assert _ann_paths(cfg, "test", None) == [(Path("/data/my_val/refs_val/final_refcocog_test.json"), 1)]
    cfg = DataConfig(dataset="mdetr", root="/data", val_ann="finetune_gqa_testdev_balanced.json")
    with pytest.raises(ValueError, match=r"split 'test': no test file to derive from data.val_ann="
                                         r"'finetune_gqa_testdev_balanced.json'.*--ann FILE"):
        _ann_paths(cfg, "test", None)


@pytest.mark.parametrize("preset", ["shapes", "mdetr"])
def test_eval_transform_draws_no_random_numbers(preset):
    # a validation within an epoch must leave the training's RNG stream (dropout masks) as it was
    image, boxes, _ = painted_image()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    make_transforms("val", preset)(image, {"boxes": boxes.clone()})
    assert torch.equal(torch.get_rng_state(), before)


def test_crop_keeps_every_box_whole():
    image, boxes, _ = painted_image()
    crop = RandomCropKeepingBoxes(60, 150)
    sizes = set()
    for seed in range(40):
        torch.manual_seed(seed)
        out, t = crop(image, {"boxes": boxes.clone()})
        sizes.add(out.size)
        assert torch.allclose(t["boxes"][:, 2:] - t["boxes"][:, :2], boxes[:, 2:] - boxes[:, :2])
        assert (t["boxes"][:, 2] <= out.width).all() and (t["boxes"][:, 3] <= out.height).all()
    torch.manual_seed(0)
    out, t = crop(image, {"boxes": torch.zeros(0, 4)})
    assert 60 <= out.width <= 150 and t["boxes"].shape == (0, 4)


def test_shapes_samples_centre_pixel_has_object_colour(world, tokenizer):
    data = json.loads((world / "annotations" / "shapes_pretrain_train.json").read_text())
    scenes = {s["original_img_id"]: s for s in
              json.loads((world / "annotations" / "shapes_scenes_train.json").read_text())["scenes"]}
    ds = ModulatedDetection(world / "images", world / "annotations" / "shapes_pretrain_train.json", tokenizer,
                            make_transforms("train", "shapes"))
    torch.manual_seed(0)
    for i, entry in enumerate(data["images"]):
        image, t = ds[i]
        anns = [a for a in data["annotations"] if a["image_id"] == entry["id"]]
        objects = scenes[entry["original_img_id"]]["objects"]
        h, w = t["size"].tolist()
        pixels = to_pixels(image)
        for a, (cx, cy, _, _) in zip(anns, t["boxes"].tolist()):
            (obj,) = [o for o in objects if o["bbox"] == a["bbox"]]
            assert np.abs(pixels[int(cy * h), int(cx * w)] - COLORS[obj["color"]]).max() < 45


def test_unknown_preset_and_split():
    with pytest.raises(ValueError, match="unknown transforms preset 'big'"):
        make_transforms("train", "big")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        make_transforms("dev", "shapes")


# ---------------------------------------------------------------------------------------------------------------
# collate and loaders

def sample(h, w, num_boxes, answer=None):
    t = {"boxes": torch.rand(num_boxes, 4), "positive_map": torch.rand(num_boxes, 256) > 0.5,
         "caption": f"caption {h}x{w}", "image_id": h}
    if answer is not None:
        t.update(answer_type=torch.tensor(answer), answer_binary=torch.tensor(1.0), answer_attr=torch.tensor(-100),
                 answer_reg=torch.tensor(3))
    return torch.randn(3, h, w), t


def test_collate_pads_images_and_targets():
    batch = [sample(5, 7, 2), sample(6, 4, 0), sample(3, 3, 3)]
    out = collate_fn(batch)
    assert out["images"].shape == (3, 3, 6, 7) and out["mask"].shape == (3, 6, 7)
    for i, (image, t) in enumerate(batch):
        h, w = image.shape[1:]
        assert torch.equal(out["images"][i, :, :h, :w], image)
        assert not out["mask"][i, :h, :w].any() and out["mask"][i].sum() == 6 * 7 - h * w
        assert (out["images"][i][:, out["mask"][i]] == 0).all()
        n = len(t["boxes"])
        assert torch.equal(out["boxes"][i, :n], t["boxes"]) and (out["boxes"][i, n:] == 0).all()
        assert torch.equal(out["positive_map"][i, :n], t["positive_map"]) and not out["positive_map"][i, n:].any()
    assert out["boxes"].shape == (3, 3, 4) and out["positive_map"].dtype == torch.bool
    assert out["num_targets"].tolist() == [2, 0, 3] and out["captions"][0] == "caption 5x7"
    assert out["targets"][1] is batch[1][1] and "answers" not in out


def test_collate_without_boxes_and_with_answers():
    out = collate_fn([sample(4, 4, 0, answer=0), sample(4, 5, 0, answer=2)])
    assert out["boxes"].shape == (2, 1, 4) and out["positive_map"].shape == (2, 1, 256)
    assert out["num_targets"].tolist() == [0, 0]
    assert out["answers"]["answer_type"].tolist() == [0, 2]
    assert set(out["answers"]) == {"answer_type", "answer_binary", "answer_attr", "answer_reg"}
    with pytest.raises(ValueError, match="mixes samples with and without answers"):
        collate_fn([sample(4, 4, 0, answer=0), sample(4, 4, 1)])


def test_loader_with_workers_matches_in_process(world, tokenizer):
    ds = ModulatedDetection(world / "images", world / "annotations" / "shapes_refexp_val.json", tokenizer,
                            make_transforms("val", "shapes"))
    parallel = list(build_loader(ds, batch_size=4, shuffle=False, num_workers=2, seed=0))
    serial = list(build_loader(ds, batch_size=4, shuffle=False, num_workers=0, seed=0))
    assert len(parallel) == len(serial) == (len(ds) + 3) // 4
    for a, b in zip(parallel, serial):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["positive_map"], b["positive_map"])
        assert a["captions"] == b["captions"] and a["mask"].any()  # images of varying size pad


def test_loader_shuffle_is_seeded(world, tokenizer):
    ds = ModulatedDetection(world / "images", world / "annotations" / "shapes_refexp_train.json", tokenizer)

    def order(seed, epoch):
        loader = build_loader(ds, batch_size=len(ds), shuffle=True, num_workers=0, seed=seed)
        loader.set_epoch(epoch)
        return [t["image_id"] for t in next(iter(loader))["targets"]]

    assert order(1, 0) == order(1, 0) and order(1, 0) != order(1, 1) and order(1, 0) != order(2, 0)


@pytest.mark.parametrize("groups", [1, 2])
def test_loader_skip_resumes_an_epoch_after_its_first_batches(world, tokenizer, groups):
    ds = ModulatedDetection(world / "images", world / "annotations" / "shapes_refexp_train.json", tokenizer)
    loader = build_loader(ds, batch_size=2, shuffle=True, num_workers=0, seed=5, aspect_groups=groups)

    def ids(epoch, skip=0):
        loader.set_epoch(epoch, skip=skip)
        return [[t["image_id"] for t in b["targets"]] for b in loader]

    full = ids(1)
    assert len(full) == len(loader) >= 3
    assert ids(1, skip=2) == full[2:] and ids(1, skip=len(loader)) == []
    assert ids(1) == full and len(loader) == len(full)  # the skip is per set_epoch; the length stays the epoch's
    with pytest.raises(ValueError, match=rf"skip must be in \[0, {len(loader)}\]"):
        loader.set_epoch(1, skip=len(loader) + 1)


# ---------------------------------------------------------------------------------------------------------------
# aspect-ratio grouping

@pytest.mark.parametrize("n, batch_size, num_groups, drop_last", [(37, 4, 3, False), (37, 4, 3, True),
                                                                  (8, 8, 2, False), (5, 8, 4, False),
                                                                  (64, 5, 1, True)])
def test_grouped_batches_keep_every_index_and_the_batch_count(n, batch_size, num_groups, drop_last):
    rng = random.Random(n * batch_size + num_groups)
    groups = [rng.randrange(num_groups) for _ in range(n)]
    order = list(range(n))
    rng.shuffle(order)
    batches = list(GroupedBatchSampler(order, groups, batch_size, drop_last))
    sampler = GroupedBatchSampler(order, groups, batch_size, drop_last)
    assert len(batches) == len(sampler) == (n // batch_size if drop_last else -(-n // batch_size))
    seen = [i for batch in batches for i in batch]
    assert len(seen) == len(set(seen))
    assert len(seen) == (len(batches) * batch_size if drop_last else n)
    # only the groups' merged leftovers (at most num_groups batches, at the end) are partial or mix groups
    odd = [k for k, batch in enumerate(batches) if len(batch) < batch_size or len({groups[i] for i in batch}) > 1]
    assert all(k >= len(batches) - num_groups for k in odd)
    for batch in batches:
        if len({groups[i] for i in batch}) == 1:  # the sampler's order within a batch
            assert sorted(batch, key=order.index) == batch


def test_grouped_batches_keep_distributed_ranks_in_step():
    groups = [0] * 13 + [1] * 20 + [2] * 8
    counts = []
    for rank in range(3):
        sampler = torch.utils.data.DistributedSampler(range(len(groups)), num_replicas=3, rank=rank, seed=4)
        batches = list(GroupedBatchSampler(sampler, groups, 4))
        counts.append(len(batches))
        assert all(len({groups[i] for i in batch}) == 1 for batch in batches[:-3])  # grouped, leftovers last
    assert counts == [4, 4, 4]  # 14 indices per rank: ceil(14 / 4) batches on every rank, whatever the groups


def test_quantile_groups_split_equal_counts_and_keep_equal_ratios_together():
    ratios = [0.5, 0.7, 0.75, 1.0, 1.0, 1.0, 1.3, 1.5]
    assert quantile_groups(ratios, 4) == [0, 0, 1, 2, 2, 2, 3, 3]
    assert quantile_groups(ratios, 1) == [0] * 8
    assert quantile_groups([1.0] * 5, 3) == [0] * 5
    with pytest.raises(ValueError, match="num_groups must be >= 1"):
        quantile_groups(ratios, 0)


def test_aspect_grouped_loader_pads_less_and_serves_every_sample(tmp_path, tokenizer):
    root = tmp_path / "shapes"
    generate_shapes_dataset(root, num_train=40, num_val=1, num_test=1, seed=3)
    ds = ModulatedDetection(root / "images", root / "annotations" / "shapes_refexp_train.json", tokenizer,
                            make_transforms("val", "shapes"))

    def epoch(groups):
        loader = build_loader(ds, batch_size=8, shuffle=True, num_workers=0, seed=0, aspect_groups=groups)
        loader.set_epoch(1)
        batches = list(loader)
        padding = sum(b["mask"].sum().item() for b in batches) / sum(b["mask"].numel() for b in batches)
        ids = [[t["image_id"] for t in b["targets"]] for b in batches]
        return padding, sorted(i for b in ids for i in b), len(batches), len(loader), ids

    plain, grouped = epoch(1), epoch(4)
    assert grouped[1] == plain[1] == sorted(e["id"] for e in ds.entries)
    # the same shuffle, regrouped: the loader's generator is drawn as without grouping (resume stays exact)
    index = {e["id"]: i for i, e in enumerate(ds.entries)}
    groups = quantile_groups(aspect_ratios(ds), 4)
    regrouped = GroupedBatchSampler([index[i] for b in plain[4] for i in b], groups, 8)
    assert [[index[i] for i in b] for b in grouped[4]] == list(regrouped)
    assert grouped[2] == grouped[3] == plain[2] == plain[3]
    assert grouped[0] < 0.6 * plain[0], (grouped[0], plain[0])
    assert epoch(4) == grouped  # seeded
    with pytest.raises(ValueError, match="aspect_groups must be >= 1"):
        build_loader(ds, batch_size=8, shuffle=True, num_workers=0, seed=0, aspect_groups=0)


def test_grouped_distributed_loader_reshuffles_each_epoch(world, tokenizer, tmp_path):
    ds = ModulatedDetection(world / "images", world / "annotations" / "shapes_refexp_train.json", tokenizer,
                            make_transforms("val", "shapes"))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        loader = build_loader(ds, batch_size=4, shuffle=True, num_workers=0, seed=0, distributed=True,
                              aspect_groups=2)

        def order(epoch):
            loader.set_epoch(epoch)  # reaches the DistributedSampler inside the GroupedBatchSampler
            return [t["image_id"] for b in loader for t in b["targets"]]

        assert order(0) == order(0) != order(1)
    finally:
        dist.destroy_process_group()


def test_aspect_ratios_need_the_image_sizes(world, tokenizer):
    ds = ModulatedDetection(world / "images", world / "annotations" / "shapes_refexp_val.json", tokenizer)
    ratios = aspect_ratios(torch.utils.data.Subset(ds, [2, 0]))
    assert ratios == [ds.entries[i]["height"] / ds.entries[i]["width"] for i in (2, 0)]
    del ds.entries[1]["height"]
    with pytest.raises(ValueError, match=r"'height' and 'width'.*entry id .*data.aspect_groups=1"):
        aspect_ratios(ds)
    with pytest.raises(ValueError, match="data.aspect_groups=1"):
        aspect_ratios(list(range(3)))


def test_build_dataset_from_config(tmp_path, tokenizer):
    cfg = DataConfig(root=str(tmp_path / "shapes"), num_train=3, num_val=2, num_test=2, seed=1)
    train = build_dataset(cfg, "train", tokenizer)
    val = build_dataset(cfg, "val", tokenizer)
    assert train.ann_file.name == "shapes_mixed_train.json" and val.ann_file.name == "shapes_refexp_val.json"
    assert len(train) > 3 and train[0][1]["boxes"].shape[1] == 4
    # the shapes preset's training files: the mixed file's entries, then the referring expressions again
    files = config_preset("shapes").data.train_ann
    repeated = build_dataset(dataclasses.replace(cfg, train_ann=files), "train", tokenizer)
    refexp = json.loads((tmp_path / "shapes" / "annotations" / "shapes_refexp_train.json").read_text())["images"]
    assert [e["id"] for e in repeated.entries] == [e["id"] for e in train.entries] + [e["id"] for e in refexp]
    cfg.dataset = "mdetr"
    cfg.root = str(tmp_path / "shapes" / "annotations")
    cfg.image_dir = str(tmp_path / "shapes" / "images")
    assert len(build_dataset(cfg, "val", tokenizer)) == len(val)


def test_train_without_augmentation_gets_the_eval_transform(tmp_path, tokenizer):
    cfg = DataConfig(root=str(tmp_path / "shapes"), num_train=3, num_val=2, num_test=2, seed=1,
                     transforms="shapes_small", augment=False)
    train = build_dataset(cfg, "train", tokenizer)
    np.random.seed(0), random.seed(0), torch.manual_seed(0)
    first = [train[i][0] for i in range(3)]
    np.random.seed(1), random.seed(1), torch.manual_seed(1)
    assert all(torch.equal(a, train[i][0]) for i, a in enumerate(first))  # deterministic
    assert all(min(image.shape[1:]) == 160 for image in first)  # shapes_small's eval size


def test_normalize_pixels_equals_the_formula_on_every_value():
    from mdetr.data.transforms import normalize_pixels

    values = np.arange(256, dtype=np.uint8)
    pixels = np.stack([*np.meshgrid(values, values[::-1], indexing="ij"), np.roll(values, 7)[:, None].repeat(256, 1)],
                      axis=-1)  # [256, 256, 3]: every value in every channel
    mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
    formula = (pixels.astype(np.float32) * (1 / 255) - mean) * (1 / std)
    assert torch.equal(normalize_pixels(pixels), torch.from_numpy(formula.transpose(2, 0, 1).copy()))
    with pytest.raises(ValueError, match=r"pixels: expected a uint8 array \[H, W, 3\], got float32 \[4, 4\]"):
        normalize_pixels(np.zeros((4, 4), np.float32))


def test_image_memo_gives_the_same_samples_and_reads_each_file_once(world, tokenizer, monkeypatch):
    import mdetr.data.annotations as annotations

    ann = world / "annotations" / "shapes_mixed_val.json"
    plain = ModulatedDetection(world / "images", ann, tokenizer, make_transforms("val", "shapes"))
    memo = ModulatedDetection(world / "images", ann, tokenizer, make_transforms("val", "shapes"), memo_images=True)
    reads = []
    read = annotations.read_rgb_image
    monkeypatch.setattr(annotations, "read_rgb_image", lambda path: reads.append(path) or read(path))
    indices = list(range(len(memo))) * 2
    files = {memo.entries[i]["file_name"] for i in indices}
    assert len(files) < len(set(indices))  # several entries share an image: the memo is hit within the pass
    for i in indices:
        (a, ta), (b, tb) = plain[i], memo[i]
        assert torch.equal(a, b) and ta.keys() == tb.keys()
        for key in ta:
            assert (torch.equal(ta[key], tb[key]) if isinstance(ta[key], torch.Tensor) else ta[key] == tb[key]), key
    assert len(reads) == len(indices) + len(files)  # the plain dataset reads every time, the memo once per file
    assert len(memo.image_memo) == len(files)


def test_image_memo_needs_the_deterministic_transform(world, tokenizer, tmp_path):
    ann = world / "annotations" / "shapes_refexp_val.json"
    ds = ModulatedDetection(world / "images", ann, tokenizer, make_transforms("train", "shapes"), memo_images=True)
    with pytest.raises(ValueError, match="memo_images needs the deterministic eval transform .*got Compose"):
        ds[0]
    from mdetr.config import resolve

    with pytest.raises(ValueError, match=r"data.memo_images .* set data.augment=false \(got data.augment=true\)"):
        resolve("shapes", None, ["--data.augment=true", "--train.cache_features=false"])
    cfg = DataConfig(root=str(world), memo_images=True, augment=False)
    assert build_dataset(cfg, "train", tokenizer, generate=False).image_memo == {}
    assert build_dataset(cfg, "val", tokenizer, generate=False, memo_images=False).image_memo is None


# ---------------------------------------------------------------------------------------------------------------
# box ops

def test_box_ops():
    xyxy = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0], [4.0, 0.0, 5.0, 1.0]])
    assert torch.allclose(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(xyxy)), xyxy)
    assert torch.equal(box_xywh_to_xyxy(torch.tensor([1.0, 2.0, 3.0, 4.0])), torch.tensor([1.0, 2.0, 4.0, 6.0]))
    iou = box_iou(xyxy, xyxy)
    assert torch.allclose(iou.diagonal(), torch.ones(3)) and iou[0, 1] == pytest.approx(1 / 7)
    giou = generalized_box_iou(xyxy, xyxy)
    assert giou[0, 1] == pytest.approx(1 / 7 - 2 / 9)  # enclosing 3x3 = 9, union 7
    assert giou[0, 2] == pytest.approx(0 - (10 - 5) / 10)  # disjoint: enclosing 5x2
    assert torch.allclose(elementwise_generalized_box_iou(xyxy, xyxy.flip(0)), torch.stack([giou[0, 2], giou[1, 1],
                                                                                            giou[2, 0]]))

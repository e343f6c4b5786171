"""The embedded shapes world: determinism, and every caption re-derived independently from the scene files."""
import json
import re
from pathlib import Path

import pytest
import torch

from mdetr.boxes import box_xywh_to_xyxy, generalized_box_iou
from mdetr.data import synthetic
from mdetr.data.synthetic import COLORS, SHAPES, SIZES, ensure_shapes_dataset, generate_shapes_dataset

NUMBERS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8}
SHAPE_WORDS = "|".join(SHAPES)
DESC = (rf"(?:(?P<{{p}}size>{'|'.join(SIZES)}) )?(?:(?P<{{p}}color>{'|'.join(COLORS)}) )?"
        rf"(?P<{{p}}shape>{SHAPE_WORDS}|object)s?")
REFEXP = re.compile("^the " + DESC.format(p="h") + r"(?: (?P<rel>left of|right of|above|below) the "
                    + DESC.format(p="a") + ")?$")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    stats = generate_shapes_dataset(root, num_train=80, num_val=12, num_test=12, seed=3)
    return root, stats


def load(root: Path, task: str, split: str = "train") -> dict:
    return json.loads((root / "annotations" / f"shapes_{task}_{split}.json").read_text())


def scenes(root: Path, split: str = "train"):
    return {s["original_img_id"]: s for s in load(root, "scenes", split)["scenes"]}


def anns_by_entry(data: dict):
    out = {}
    for a in data["annotations"]:
        out.setdefault(a["image_id"], []).append(a)
    return out


def select(objects, groups, prefix):
    """Objects matching the attributes captured by the regex groups with the given prefix."""
    want = {k: groups[prefix + k] for k in ("size", "color", "shape") if groups[prefix + k]}
    if want.get("shape") == "object":
        del want["shape"]
    return [i for i, o in enumerate(objects) if all(o[k] == v for k, v in want.items())]


def centre(obj):
    x, y, w, h = obj["bbox"]
    return x + w / 2, y + h / 2


def satisfies(rel, a, b):
    (ax, ay), (bx, by) = centre(a), centre(b)
    return {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[rel]


def test_files_and_fields(world):
    root, _ = world
    for split in ("train", "val", "test"):
        for task in ("pretrain", "refexp", "grounding", "qa", "mixed"):
            data = load(root, task, split)
            assert data["images"] and data["categories"]
            for e in data["images"]:
                assert {"file_name", "height", "width", "id", "caption", "dataset_name", "sentence_id",
                        "original_img_id", "original_id"} <= set(e)
                assert (root / "images" / e["file_name"]).is_file()
                assert re.fullmatch(rf"{split}/\d{{6}}\.jpg", e["file_name"])
            for a in data["annotations"]:
                assert {"id", "image_id", "bbox", "area", "iscrowd", "category_id", "tokens_positive"} <= set(a)
    mixed = load(root, "mixed")
    ids = [e["id"] for e in mixed["images"]]
    assert len(ids) == len(set(ids))
    assert {e["dataset_name"] for e in mixed["images"]} == {"shapes_pretrain", "shapes_refexp", "shapes_grounding"}


def test_scene_properties(world):
    root, _ = world
    sc = list(scenes(root).values())
    sizes = {(s["width"], s["height"]) for s in sc}
    assert len(sizes) > 10
    assert all(160 <= w <= 256 and 160 <= h <= 256 for w, h in sizes)
    assert all(3 <= len(s["objects"]) <= 8 for s in sc)
    assert min(len(s["objects"]) for s in sc) == 3 and max(len(s["objects"]) for s in sc) >= 7
    seen = {(o["shape"], o["color"], o["size"]) for s in sc for o in s["objects"]}
    assert {o[0] for o in seen} == set(SHAPES) and {o[1] for o in seen} == set(COLORS)
    assert {o[2] for o in seen} == set(SIZES)


def test_spans_match_boxes_of_the_scene(world):
    root, _ = world
    sc = scenes(root)
    for task in ("pretrain", "grounding", "refexp", "qa"):
        data = load(root, task)
        anns = anns_by_entry(data)
        for e in data["images"]:
            boxes = [o["bbox"] for o in sc[e["original_img_id"]]["objects"]]
            for a in anns.get(e["id"], []):
                assert a["bbox"] in boxes
                for b, end in a["tokens_positive"]:
                    assert 0 <= b < end <= len(e["caption"])
                    assert e["caption"][b] != " " and e["caption"][end - 1] != " "


def check_refexp(entry, objects, anns):
    """Parses a referring expression and checks, from the scene alone, that it singles out its annotated object
    (through the relation where it has one, which must then be needed) and that the span is the head phrase.
    Returns (the referent's index, whether the expression is relational)."""
    m = REFEXP.match(entry["caption"])
    assert m, entry["caption"]
    candidates = select(objects, m.groupdict(), "h")
    if m["rel"]:
        anchors = select(objects, m.groupdict(), "a")
        assert len(anchors) == 1, entry["caption"]
        assert len(candidates) >= 2  # the relation is needed
        candidates = [i for i in candidates if satisfies(m["rel"], objects[i], objects[anchors[0]])]
    assert len(candidates) == 1, entry["caption"]
    (ann,) = anns
    assert ann["bbox"] == objects[candidates[0]]["bbox"]
    # the span covers the head phrase ("small red circle")
    (b, end), = ann["tokens_positive"]
    assert entry["caption"][b:end] == m.group(0)[4:].split(f" {m['rel']} ")[0]
    return candidates[0], bool(m["rel"])


def test_refexp_unique_referent_independently(world):
    root, stats = world
    spatial, distractor, chance = 0, 0, []
    for split in ("train", "val", "test"):
        data, sc = load(root, "refexp", split), scenes(root, split)
        anns = anns_by_entry(data)
        for e in data["images"]:
            objects = sc[e["original_img_id"]]["objects"]
            referent, relational = check_refexp(e, objects, anns[e["id"]])
            spatial += relational
            ref = objects[referent]
            distractor += any(o is not ref and (o["color"] == ref["color"] or o["shape"] == ref["shape"])
                              for o in objects)
            boxes = box_xywh_to_xyxy(torch.tensor([o["bbox"] for o in objects]))
            giou = generalized_box_iou(boxes, boxes[referent][None])[:, 0]
            chance.append(float((giou >= 0.5).float().mean()))
        assert data["info"]["chance_precision_at_1"] == pytest.approx(stats[split]["chance_precision_at_1"])
    total = len(chance)
    assert spatial / total >= 0.30
    assert distractor / total >= 0.6
    assert sum(chance) / total <= 0.35
    assert sum(chance) / total == pytest.approx(
        sum(s["chance_precision_at_1"] * s["refexp"] for s in stats.values()) / total)


def test_refexp_subsets_split_the_file_by_kind(world):
    root, _ = world
    for split in ("train", "val", "test"):
        data, sc = load(root, "refexp", split), scenes(root, split)
        anns = anns_by_entry(data)
        kinds = {e["id"]: check_refexp(e, sc[e["original_img_id"]]["objects"], anns[e["id"]])[1]
                 for e in data["images"]}  # relational or not, parsed independently of the generator
        subsets = {kind: json.loads((root / "annotations" / f"shapes_refexp_{split}_{kind}.json").read_text())
                   for kind in ("attribute", "relational")}
        for kind, subset in subsets.items():
            assert subset["info"]["subset"] == kind and subset["info"]["task"] == "refexp"
            assert subset["images"] == [e for e in data["images"] if kinds[e["id"]] == (kind == "relational")]
            ids = {e["id"] for e in subset["images"]}
            assert subset["annotations"] == [a for a in data["annotations"] if a["image_id"] in ids]
        assert subsets["attribute"]["images"] and subsets["relational"]["images"]


def test_grounding_phrases(world):
    root, _ = world
    data, sc = load(root, "grounding"), scenes(root)
    anns = anns_by_entry(data)
    multi = 0
    for e in data["images"]:
        objects = sc[e["original_img_id"]]["objects"]
        boxes_of = {}
        for a in anns[e["id"]]:
            boxes_of.setdefault(a["phrase_ids"], []).append(a["bbox"])
            assert a["tokens_positive"] == e["tokens_positive_eval"][a["phrase_ids"]]
        assert sum(len(v) for v in boxes_of.values()) == len(objects)  # the phrases partition the objects
        for pid, ((b, end),) in enumerate(e["tokens_positive_eval"]):
            words = e["caption"][b:end].split(" ", 1)
            count = NUMBERS.get(words[0], 1)
            m = re.fullmatch(DESC.format(p=""), words[1])
            expected = [objects[i]["bbox"] for i in select(objects, m.groupdict(), "")]
            assert sorted(boxes_of[pid]) == sorted(expected) and len(expected) == count
            multi += count > 1
    assert multi > 0


def test_qa_answers_recounted(world):
    root, _ = world
    data, sc = load(root, "qa"), scenes(root)
    assert data["info"]["answer_vocab"] == list(SIZES) + list(COLORS) + list(SHAPES)
    families = set()
    desc = DESC.format(p="")
    for e in data["images"]:
        objects = sc[e["original_img_id"]]["objects"]
        q, answer = e["caption"], e["answer"]
        if m := re.fullmatch(rf"Is there an? {desc}\?", q):
            assert answer == ("yes" if select(objects, m.groupdict(), "") else "no") and e["answer_type"] == "binary"
            families.add("exists")
        elif m := re.fullmatch(rf"How many {desc} are there\?", q):
            assert answer == str(len(select(objects, m.groupdict(), ""))) and e["answer_type"] == "count"
            families.add("count")
        else:
            m = re.fullmatch(rf"What (?P<q>size|color|shape) is the {desc}\?", q)
            assert m, q
            (i,) = select(objects, m.groupdict(), "")
            assert answer == objects[i][m["q"]] and e["answer_type"] == "attribute"
            families.add("query_" + m["q"])
    assert families == {"exists", "count", "query_color", "query_shape", "query_size"}
    answers = [e["answer"] for e in data["images"]]
    assert 0.25 < answers.count("yes") / max(1, answers.count("yes") + answers.count("no")) < 0.75


def test_deterministic_in_seed(tmp_path):
    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    generate_shapes_dataset(tmp_path / "a", 6, 2, 2, seed=1)
    generate_shapes_dataset(tmp_path / "b", 6, 2, 2, seed=1)
    generate_shapes_dataset(tmp_path / "c", 6, 2, 2, seed=2)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_ensure_generates_once_and_on_change(tmp_path):
    root = tmp_path / "world"
    ensure_shapes_dataset(root, num_train=4, num_val=2, num_test=2, seed=0)
    stamp = root / synthetic.STAMP
    first = stamp.stat().st_mtime_ns
    ensure_shapes_dataset(root, num_train=4, num_val=2, num_test=2, seed=0)
    assert stamp.stat().st_mtime_ns == first
    ensure_shapes_dataset(root, num_train=5, num_val=2, num_test=2, seed=0)
    assert json.loads(stamp.read_text())["params"]["num_train"] == 5
    assert len(list((root / "images" / "train").iterdir())) == 5
    assert not list(tmp_path.glob("world.tmp*"))
    (root / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"not a shapes dataset \(\['notes.txt'\]\)"):
        ensure_shapes_dataset(root, num_train=6, num_val=2, num_test=2, seed=0)


def test_cli_prints_chance_and_stamps(tmp_path, capsys):
    root = tmp_path / "world"
    synthetic.main(["--out", str(root), "--num-train", "5", "--num-val", "3", "--num-test", "3", "--seed", "4"])
    out = capsys.readouterr().out
    assert "chance precision@1" in out and (root / "annotations" / "shapes_mixed_val.json").is_file()
    stamp = (root / synthetic.STAMP).stat().st_mtime_ns
    ensure_shapes_dataset(root, num_train=5, num_val=3, num_test=3, seed=4)  # what training calls: no regeneration
    assert (root / synthetic.STAMP).stat().st_mtime_ns == stamp


def test_contrast_captions_hand_checked():
    from mdetr.data.synthetic import Obj, contrast_captions, describe

    objects = [Obj("circle", "red", "small", (0, 0, 20, 20)), Obj("square", "blue", "large", (40, 30, 80, 70)),
               Obj("circle", "red", "small", (100, 40, 120, 60)), Obj("star", "green", "small", (50, 0, 70, 20))]
    head, anchor = describe(objects[0], ("color", "shape")), describe(objects[1], ("color", "shape"))
    pairs = contrast_captions(objects, 0, head, "left of", 1, anchor)
    assert [(text, annots[0][0]) for text, annots, _ in pairs] == [("the red circle right of the blue square", 2)]
    (text, [(_, [(b, e)], _)], extras), = pairs
    assert text[b:e] == "red circle" and extras == {"referent": 2}
    # a rival in the same column as the anchor has no "right of"; below the square, "below" singles it out
    objects[2] = Obj("circle", "red", "small", (50, 80, 70, 100))
    assert [t for t, _, _ in contrast_captions(objects, 0, head, "left of", 1, anchor)] == [
        "the red circle below the blue square"]
    objects[2] = Obj("circle", "red", "small", (2, 1, 22, 21))  # beside the referent: nothing tells them apart
    assert contrast_captions(objects, 0, head, "left of", 1, anchor) == []


def test_contrast_pairs_add_checked_train_expressions_only(tmp_path):
    plain_root, pairs_root = tmp_path / "plain", tmp_path / "pairs"
    plain = generate_shapes_dataset(plain_root, num_train=40, num_val=6, num_test=6, seed=5)
    pairs = generate_shapes_dataset(pairs_root, num_train=40, num_val=6, num_test=6, seed=5, contrast_pairs=True)
    for split in ("val", "test"):  # untouched
        for task in ("refexp", "mixed"):
            assert load(plain_root, task, split) == load(pairs_root, task, split)
    assert pairs["train"]["refexp"] > plain["train"]["refexp"]
    assert pairs["train"]["spatial_fraction"] > plain["train"]["spatial_fraction"]
    before, after = load(plain_root, "refexp"), load(pairs_root, "refexp")
    sc, anns = scenes(pairs_root), anns_by_entry(after)
    captions = {}
    for e in after["images"]:
        check_refexp(e, sc[e["original_img_id"]]["objects"], anns[e["id"]])
        captions.setdefault(e["original_img_id"], []).append(e["caption"])
    for e in before["images"]:  # every plain expression is still there
        assert e["caption"] in captions[e["original_img_id"]]
    # each added expression has a partner on its image with the same head and anchor and another relation
    added = [(i, c) for i, cs in captions.items() for c in cs
             if c not in [e["caption"] for e in before["images"] if e["original_img_id"] == i]]
    assert added
    for i, caption in added:
        rel = REFEXP.match(caption)["rel"]
        assert any(REFEXP.match(o)["rel"] not in (None, rel) and o.replace(REFEXP.match(o)["rel"], rel) == caption
                   for o in captions[i]), caption
    mixed = load(pairs_root, "mixed")
    assert sum(e["dataset_name"] == "shapes_refexp" for e in mixed["images"]) == len(after["images"])
    ids = [e["id"] for e in mixed["images"]]
    assert len(set(ids)) == len(ids) and all("relation" not in e for e in after["images"])
    for i, cs in captions.items():  # no expression twice on one image
        assert len(set(cs)) == len(cs), cs
    assert json.loads((pairs_root / "annotations" / "shapes_refexp_train.json").read_text())["info"]["task"] == "refexp"

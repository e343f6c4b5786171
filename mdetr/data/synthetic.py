"""The embedded "shapes" world: a seeded, procedurally generated dataset in MDETR's own annotation format.

Every image shows 3 to 8 solid shapes (5 shapes x 6 colours x 2 sizes) on a noisy, textured background. Objects
may overlap a little, but never over another object's centre region, so every object stays clearly visible (and
the pixel at each box centre has the object's colour). Images vary in size (160..256 px per side), so batches pad.

Four tasks share the images; each writes one image entry per (image, caption), as MDETR does:

- ``pretrain``: a caption naming some groups of objects ("a picture of two red circles and a small star"); every
  box of a named group carries the span of the group's descriptive words ("red circles").
- ``grounding``: a sentence whose phrases partition all objects (Flickr30k-Entities style); each phrase is one
  entry of ``tokens_positive_eval`` and spans its whole noun phrase ("two blue squares"); annotations carry
  ``phrase_ids`` (index into ``tokens_positive_eval``).
- ``refexp``: an expression with exactly one referent, by attributes ("the small red circle") or, in at least 30%
  of expressions, by a spatial relation to a uniquely described anchor ("the red circle left of the blue
  square"). **Span choice**: the referent's ``tokens_positive`` covers its head phrase ("red circle"), not the
  whole expression as in RefCOCO, so the anchor's words are not positives of the referent. Relations compare box
  centres with a margin: "a left of b" holds when cx_a <= cx_b - margin and is clearly false when
  cx_a >= cx_b + margin; an expression is kept only when the referent is clearly in the relation and every other
  object matching the head phrase is clearly not, and the head phrase alone matches several objects (so the
  relation is needed). Most referents have a distractor sharing their colour or shape.
- ``qa``: CLEVR-style questions (exists, count, query colour / shape / size) with MDETR's CLEVR answer types
  (``binary``, ``attribute``, ``count``) and string answers; the attribute vocabulary is in ``info.answer_vocab``.

Layout under ``DIR``: ``images/<split>/NNNNNN.jpg`` (``file_name`` is ``<split>/NNNNNN.jpg``, relative to
``DIR/images``); ``annotations/shapes_<task>_<split>.json``; ``annotations/shapes_mixed_<split>.json`` (pretrain +
refexp + grounding, like MDETR's ``final_mixed``); ``annotations/shapes_refexp_<split>_attribute.json`` and
``..._relational.json`` (the referring expressions that name attributes only, and those that need a spatial
relation: the refexp file split in two, to evaluate each kind with ``python -m mdetr.evaluate --ann``);
``annotations/shapes_scenes_<split>.json`` (the full scene of each image, for tests and analysis; no loader needs
it). JPEG rather than PNG: the noisy backgrounds make PNGs about 6x larger and slower to write.

The refexp files carry ``info.chance_precision_at_1``: the mean over expressions of the fraction of the image's
objects whose box has GIoU >= 0.5 with the referent's box (what picking a random object scores).

CLI: ``python -m mdetr.data.synthetic --out DIR [--num-train N] [--num-val N] [--num-test N] [--seed S]``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw

from mdetr.boxes import generalized_box_iou

GENERATOR_VERSION = 2  # 2: the refexp files' attribute / relational subsets
SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 225),
    "yellow": (240, 215, 20), "purple": (150, 40, 190), "orange": (250, 130, 10),
}
SIZES = ("small", "large")
SIZE_RANGE = {"small": (18, 26), "large": (38, 50)}  # box extent in pixels
ANSWER_VOCAB = list(SIZES) + list(COLORS) + list(SHAPES)  # attribute answers (13 <= CLEVR's 15 slots)
TASKS = ("pretrain", "refexp", "grounding", "qa")
MIXED_TASKS = ("pretrain", "refexp", "grounding")
SPLITS = ("train", "val", "test")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
IMAGE_SIDE = (160, 256)
NUM_OBJECTS = (3, 8)
RELATION_MARGIN = 8.0  # pixels between box centres for a spatial relation to hold (or clearly not hold)
RELATIONS = ("left of", "right of", "above", "below")
ENTRIES_PER_IMAGE = 16  # image-entry ids are image_index * 16 + slot, unique across all tasks
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
DEFAULT_SIZES = {"num_train": 4000, "num_val": 300, "num_test": 300}
ATTRS = ("size", "color", "shape")


@dataclass
class Obj:
    shape: str
    color: str
    size: str
    box: Tuple[float, float, float, float]  # xyxy pixels

    @property
    def centre(self) -> Tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

    def attr(self, name: str) -> str:
        return getattr(self, name)

    def xywh(self) -> List[float]:
        x0, y0, x1, y1 = self.box
        return [x0, y0, x1 - x0, y1 - y0]


Desc = Tuple[Tuple[str, str], ...]  # ((attribute, value), ...) in ATTRS order


def describe(obj: Obj, attrs: Sequence[str]) -> Desc:
    return tuple((a, obj.attr(a)) for a in ATTRS if a in attrs)


def matches(obj: Obj, desc: Desc) -> bool:
    return all(obj.attr(a) == v for a, v in desc)


def noun_phrase(desc: Desc, plural: bool = False) -> str:
    """"small red circle", "red objects", ... (shape is the head noun, "object" when absent)."""
    values = dict(desc)
    noun = values.get("shape", "object")
    words = [values[a] for a in ("size", "color") if a in values] + [noun + ("s" if plural else "")]
    return " ".join(words)


def relation_holds(rel: str, a: Obj, b: Obj, margin: float = RELATION_MARGIN) -> Optional[bool]:
    """True when ``a rel b`` clearly holds, False when it clearly does not, None in the ambiguous band."""
    (ax, ay), (bx, by) = a.centre, b.centre
    delta = {"left of": bx - ax, "right of": ax - bx, "above": by - ay, "below": ay - by}[rel]
    if delta >= margin:
        return True
    if delta <= -margin:
        return False
    return None


class Caption:
    """Builds a caption piece by piece and records character spans [begin, end)."""

    def __init__(self) -> None:
        self.text = ""

    def add(self, piece: str) -> Tuple[int, int]:
        begin = len(self.text)
        self.text += piece
        return begin, len(self.text)


# ----------------------------------------------------------------------------------------------------------------
# scenes and images

def _shape_points(shape: str, x0: float, y0: float, s: float) -> List[Tuple[float, float]]:
    if shape == "triangle":
        return [(x0 + s / 2, y0), (x0 + s, y0 + s), (x0, y0 + s)]
    if shape == "diamond":
        return [(x0 + s / 2, y0), (x0 + s, y0 + s / 2), (x0 + s / 2, y0 + s), (x0, y0 + s / 2)]
    if shape == "star":  # five points, outer radius s/2, inner radius s/5, rescaled to fill the box exactly
        pts = []
        for k in range(10):
            r = 0.5 if k % 2 == 0 else 0.2
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(ang), r * math.sin(ang)))
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        sx, sy = s / (max(xs) - min(xs)), s / (max(ys) - min(ys))
        return [(x0 + (px - min(xs)) * sx, y0 + (py - min(ys)) * sy) for px, py in pts]
    raise ValueError(f"no polygon for shape {shape!r}")


def _too_close(box: Tuple[float, ...], other: Tuple[float, ...]) -> bool:
    """Objects may overlap a little but never cover each other's central region (the middle 60% per side)."""
    def core(b):
        cx, cy, hw, hh = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2, 0.3 * (b[2] - b[0]), 0.3 * (b[3] - b[1])
        return cx - hw, cy - hh, cx + hw, cy + hh

    def intersects(a, b):
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    return intersects(box, core(other)) or intersects(other, core(box))


def sample_scene(rng: np.random.Generator) -> Tuple[int, int, List[Obj]]:
    """(width, height, objects). About a third of the objects copy the colour and shape of an earlier one, so
    images hold look-alikes (distractors for referring expressions, plural phrases for grounding)."""
    width, height = (int(v) for v in rng.integers(IMAGE_SIDE[0], IMAGE_SIDE[1] + 1, size=2))
    target = int(rng.integers(NUM_OBJECTS[0], NUM_OBJECTS[1] + 1))
    objects: List[Obj] = []
    for _ in range(200):
        if len(objects) == target:
            break
        if objects and rng.random() < 0.35:
            src = objects[int(rng.integers(len(objects)))]
            shape, color = src.shape, src.color
        else:
            shape, color = SHAPES[int(rng.integers(len(SHAPES)))], list(COLORS)[int(rng.integers(len(COLORS)))]
        size = SIZES[int(rng.integers(2))]
        s = float(rng.integers(SIZE_RANGE[size][0], SIZE_RANGE[size][1] + 1))
        x0, y0 = float(rng.integers(2, width - s - 1)), float(rng.integers(2, height - s - 1))
        box = (x0, y0, x0 + s, y0 + s)
        if any(_too_close(box, o.box) for o in objects):
            continue
        objects.append(Obj(shape, color, size, box))
    return width, height, objects


def render(rng: np.random.Generator, width: int, height: int, objects: Sequence[Obj]) -> Image.Image:
    """Low-saturation textured background (gradient + stripes + pixel noise), then the solid shapes."""
    yy = np.arange(height, dtype=np.float32)[:, None]
    xx = np.arange(width, dtype=np.float32)[None, :]
    base = rng.uniform(90, 170)
    tint = rng.uniform(-12, 12, size=3).astype(np.float32)
    angle, period = rng.uniform(0, math.pi), rng.uniform(8, 30)
    stripes = 10 * np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * (2 * math.pi / period))
    gradient = rng.uniform(-25, 25) * (xx / width) + rng.uniform(-25, 25) * (yy / height)
    noise = rng.integers(-17, 18, size=(height, width, 3), dtype=np.int16)  # uniform, std ~10 (4x cheaper than normal)
    pixels = (base + stripes + gradient)[..., None] + tint + noise
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for o in objects:
        x0, y0, x1, y1 = o.box
        if o.shape == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=COLORS[o.color])
        elif o.shape == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=COLORS[o.color])
        else:
            draw.polygon(_shape_points(o.shape, x0, y0, x1 - x0 - 1), fill=COLORS[o.color])
    return image


# ----------------------------------------------------------------------------------------------------------------
# captions per task; each returns a list of (caption, [(object index, [[b, e]], extra annotation fields)], extras)

Annots = List[Tuple[int, List[List[int]], dict]]


def _groups(objects: Sequence[Obj], attrs: Sequence[str]) -> Dict[Desc, List[int]]:
    groups: Dict[Desc, List[int]] = {}
    for i, o in enumerate(objects):
        groups.setdefault(describe(o, attrs), []).append(i)
    return groups


def _article(phrase: str) -> str:
    return "an " if phrase[0] in "aeiou" else "a "


def pretrain_caption(rng: np.random.Generator, objects: Sequence[Obj]) -> Tuple[str, Annots, dict]:
    levels = (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"))
    groups = list(_groups(objects, levels[int(rng.integers(len(levels)))]).items())
    chosen = rng.permutation(len(groups))[: int(rng.integers(1, min(4, len(groups)) + 1))]
    cap = Caption()
    cap.add(("a picture of ", "an image with ", "this shows ")[int(rng.integers(3))])
    annots: Annots = []
    for k, g in enumerate(chosen):
        desc, members = groups[int(g)]
        if k:
            cap.add(" and " if k == len(chosen) - 1 else ", ")
        phrase = noun_phrase(desc, plural=len(members) > 1)
        cap.add(NUMBER_WORDS[len(members)] + " " if len(members) > 1 else _article(phrase))
        span = list(cap.add(phrase))
        annots.extend((i, [span], {}) for i in members)
    cap.add(".")
    return cap.text, annots, {}


def grounding_caption(rng: np.random.Generator, objects: Sequence[Obj]) -> Tuple[str, Annots, dict]:
    attrs = ("color", "shape") if rng.random() < 0.6 else ("size", "color", "shape")
    groups = list(_groups(objects, attrs).items())
    order = rng.permutation(len(groups))
    cap = Caption()
    cap.add(("Here we have ", "We see ", "The scene holds ")[int(rng.integers(3))])
    annots: Annots = []
    phrases: List[List[List[int]]] = []
    for k, g in enumerate(order):
        desc, members = groups[int(g)]
        if k:
            cap.add(" and " if k == len(order) - 1 else ", ")
        phrase = noun_phrase(desc, plural=len(members) > 1)
        lead = NUMBER_WORDS[len(members)] + " " if len(members) > 1 else _article(phrase)
        span = list(cap.add(lead + phrase))
        annots.extend((i, [span], {"phrase_ids": k}) for i in members)
        phrases.append([span])
    cap.add(".")
    return cap.text, annots, {"tokens_positive_eval": phrases}


def _descs_with_shape(obj: Obj) -> List[Desc]:
    return [describe(obj, a) for a in (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"))]


def _unique_descs(objects: Sequence[Obj], i: int) -> List[Desc]:
    return [d for d in _descs_with_shape(objects[i]) if sum(matches(o, d) for o in objects) == 1]


def _spatial_options(objects: Sequence[Obj], i: int, unique: Sequence[List[Desc]]) -> List[Tuple[Desc, str, int, Desc]]:
    """(head desc, relation, anchor index, anchor desc) that single out object i only through the relation;
    ``unique[j]``: the descriptions that single out object j by themselves."""
    options = []
    for head in _descs_with_shape(objects[i]):
        rivals = [j for j, o in enumerate(objects) if j != i and matches(o, head)]
        if not rivals:
            continue
        for a, anchor in enumerate(objects):
            anchor_descs = unique[a]
            if a == i or matches(anchor, head) or not anchor_descs:
                continue
            for rel in RELATIONS:
                if _singles_out(rel, objects, i, rivals, a):
                    options.append((head, rel, a, anchor_descs[0]))
    return options


def _singles_out(rel: str, objects: Sequence[Obj], target: int, others: Sequence[int], anchor: int) -> bool:
    """The target is clearly in the relation to the anchor, and each of ``others`` clearly is not."""
    return bool(relation_holds(rel, objects[target], objects[anchor])) and all(
        relation_holds(rel, objects[j], objects[anchor]) is False for j in others)


def _relational_caption(head: Desc, rel: str, anchor_desc: Desc) -> Tuple[str, List[int]]:
    """"the <head> <rel> the <anchor>" and the head phrase's character span."""
    cap = Caption()
    cap.add("the ")
    span = list(cap.add(noun_phrase(head)))
    cap.add(f" {rel} the {noun_phrase(anchor_desc)}")
    return cap.text, span


def _has_distractor(objects: Sequence[Obj], i: int) -> bool:
    o = objects[i]
    return any(j != i and (p.color == o.color or p.shape == o.shape) for j, p in enumerate(objects))


def refexp_caption(rng: np.random.Generator, objects: Sequence[Obj],
                   taken: Sequence[int] = ()) -> Optional[Tuple[str, Annots, dict]]:
    candidates = [i for i in range(len(objects)) if i not in taken]
    with_distractor = [i for i in candidates if _has_distractor(objects, i)]
    pool = with_distractor if with_distractor and rng.random() < 0.9 else candidates
    unique_all = [_unique_descs(objects, j) for j in range(len(objects))]
    for i in rng.permutation(pool):
        i = int(i)
        unique, spatial = unique_all[i], _spatial_options(objects, i, unique_all)
        if not unique and not spatial:
            continue
        extras: Dict[str, Any] = {"referent": i}
        if spatial and (not unique or rng.random() < 0.8):
            head, rel, anchor, anchor_desc = spatial[int(rng.integers(len(spatial)))]
            text, span = _relational_caption(head, rel, anchor_desc)
            extras["relation"] = (head, rel, anchor, anchor_desc)
        else:
            cap = Caption()
            cap.add("the ")
            span = list(cap.add(noun_phrase(unique[int(rng.integers(len(unique)))])))
            text = cap.text
        return text, [(i, [span], {})], extras
    return None


OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def contrast_captions(objects: Sequence[Obj], referent: int, head: Desc, rel: str, anchor: int,
                      anchor_desc: Desc) -> List[Tuple[str, Annots, dict]]:
    """Minimal pairs for a relational expression "the <head> <rel> the <anchor>" of ``referent``: for each other
    object that ``head`` matches (a rival), the expression with the same head and anchor and a relation that holds
    for that rival alone, the opposite one first. Only the relation word tells such a pair apart."""
    matching = [j for j, o in enumerate(objects) if matches(o, head)]
    pairs = []
    for j in matching:
        if j == referent:
            continue
        for other in (OPPOSITE[rel],) + tuple(r for r in RELATIONS if r not in (rel, OPPOSITE[rel])):
            if _singles_out(other, objects, j, [k for k in matching if k != j], anchor):
                text, span = _relational_caption(head, other, anchor_desc)
                pairs.append((text, [(j, [span], {})], {"referent": j}))
                break
    return pairs


def qa_caption(rng: np.random.Generator, objects: Sequence[Obj]) -> Tuple[str, Annots, dict]:
    kinds = ["exists", "count", "query_color", "query_shape", "query_size"]
    for kind in rng.permutation(kinds):
        out = _question(str(kind), rng, objects)
        if out is not None:
            return out
    raise AssertionError("an exists question is always possible")


def _random_desc(rng: np.random.Generator, objects: Sequence[Obj], present: bool) -> Desc:
    """A non-empty attribute description: of an object in the scene when ``present``, else (almost always) one
    that matches no object."""
    attrs = [a for a in ATTRS if rng.random() < 0.6] or [ATTRS[int(rng.integers(3))]]
    if present:
        return describe(objects[int(rng.integers(len(objects)))], attrs)
    values = {"size": SIZES, "color": tuple(COLORS), "shape": SHAPES}
    for _ in range(20):  # a description matching nothing (a "no" for exists questions); give up after 20 tries
        desc = tuple((a, values[a][int(rng.integers(len(values[a])))]) for a in ATTRS)
        desc = tuple(d for d in desc if d[0] in attrs or rng.random() < 0.3)
        if not any(matches(o, desc) for o in objects):
            break
    return desc


def _question(kind: str, rng: np.random.Generator, objects: Sequence[Obj]) -> Optional[Tuple[str, Annots, dict]]:
    """One question of family ``kind``; its annotations are the boxes its description phrase refers to."""
    cap = Caption()
    if kind == "exists":
        desc = _random_desc(rng, objects, present=rng.random() < 0.5)
        phrase = noun_phrase(desc)
        cap.add("Is there " + _article(phrase))
        span, _ = list(cap.add(phrase)), cap.add("?")
        members = [i for i, o in enumerate(objects) if matches(o, desc)]
        answer, answer_type = ("yes" if members else "no"), "binary"
    elif kind == "count":
        desc = _random_desc(rng, objects, present=rng.random() < 0.7)
        cap.add("How many ")
        span, _ = list(cap.add(noun_phrase(desc, plural=True))), cap.add(" are there?")
        members = [i for i, o in enumerate(objects) if matches(o, desc)]
        answer, answer_type = str(len(members)), "count"
    else:
        queried = kind.split("_")[1]
        found = _unique_without(rng, objects, queried)
        if found is None:
            return None
        i, desc = found
        cap.add(f"What {queried} is the ")
        span, _ = list(cap.add(noun_phrase(desc))), cap.add("?")
        members, answer, answer_type = [i], objects[i].attr(queried), "attribute"
    extras = {"answer": answer, "answer_type": answer_type, "question_family": kind}
    return cap.text, [(i, [span], {}) for i in members], extras


def _unique_without(rng: np.random.Generator, objects: Sequence[Obj], queried: str) -> Optional[Tuple[int, Desc]]:
    """A random object and a description of it that does not use ``queried`` and matches only it."""
    others = [a for a in ATTRS if a != queried]
    for i in rng.permutation(len(objects)):
        options = [describe(objects[int(i)], s) for s in ([others[0]], [others[1]], others)]
        options = [d for d in options if sum(matches(o, d) for o in objects) == 1]
        if options:
            return int(i), options[int(rng.integers(len(options)))]
    return None


# ----------------------------------------------------------------------------------------------------------------
# writing a split

def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_CODES[split], index])


def _chance(objects: Sequence[Obj], referent: int) -> float:
    boxes = torch.tensor([o.box for o in objects], dtype=torch.float64)
    giou = generalized_box_iou(boxes, boxes[referent: referent + 1])[:, 0]
    return float((giou >= 0.5).double().mean())


def generate_split(out: Path, split: str, num_images: int, seed: int,
                   contrast_pairs: bool = False) -> Dict[str, float]:
    """Writes the images and annotation files of one split; returns its statistics. ``contrast_pairs``: each
    relational referring expression also gets its minimal pairs (``contrast_captions``) as more refexp entries."""
    image_dir = out / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    files: Dict[str, dict] = {t: {"images": [], "annotations": []} for t in TASKS}
    scenes = []
    chance: List[float] = []
    spatial = 0
    for index in range(num_images):
        rng = _image_rng(seed, split, index)
        width, height, objects = sample_scene(rng)
        file_name = f"{split}/{index:06d}.jpg"
        render(rng, width, height, objects).save(out / "images" / file_name, quality=92)
        scenes.append({"original_img_id": index, "file_name": file_name, "width": width, "height": height,
                       "objects": [{"shape": o.shape, "color": o.color, "size": o.size, "bbox": o.xywh()}
                                   for o in objects]})
        captions: List[Tuple[str, Tuple[str, Annots, dict]]] = [
            ("pretrain", pretrain_caption(rng, objects)), ("grounding", grounding_caption(rng, objects))]
        taken: List[int] = []
        expressions, pairs = [], []
        for _ in range(2 if rng.random() < 0.5 else 1):
            ref = refexp_caption(rng, objects, taken)
            if ref is None:
                continue
            taken.append(ref[2]["referent"])
            expressions.append(ref)
            if contrast_pairs and "relation" in ref[2]:
                pairs += contrast_captions(objects, ref[2]["referent"], *ref[2]["relation"])
        texts = [e[0] for e in expressions]
        for pair in pairs:  # a pair can repeat the image's other expression word for word
            if pair[0] not in texts:
                texts.append(pair[0])
                expressions.append(pair)
        for expression in expressions:
            captions.append(("refexp", expression))
            chance.append(_chance(objects, expression[2]["referent"]))
            spatial += is_relational(expression[0])
        captions += [("qa", qa_caption(rng, objects)) for _ in range(2)]
        if len(captions) > ENTRIES_PER_IMAGE:
            raise ValueError(f"{split} image {index}: {len(captions)} entries, more than the ENTRIES_PER_IMAGE="
                             f"{ENTRIES_PER_IMAGE} id slots per image")
        for slot, (task, (text, annots, extras)) in enumerate(captions):
            entry_id = index * ENTRIES_PER_IMAGE + slot
            entry = {"file_name": file_name, "height": height, "width": width, "id": entry_id, "caption": text,
                     "dataset_name": f"shapes_{task}", "original_img_id": index, "original_id": entry_id,
                     "sentence_id": slot, "tokens_negative": []}
            entry.update({k: v for k, v in extras.items() if k not in ("referent", "relation")})
            if task == "qa":
                entry["questionId"] = entry_id
            files[task]["images"].append(entry)
            for k, (i, spans, fields) in enumerate(annots):
                x, y, w, h = objects[i].xywh()
                files[task]["annotations"].append({
                    "id": entry_id * ENTRIES_PER_IMAGE + k, "image_id": entry_id, "bbox": [x, y, w, h],
                    "area": w * h, "iscrowd": 0, "category_id": SHAPES.index(objects[i].shape) + 1,
                    "tokens_positive": spans, **fields})
    categories = [{"id": k + 1, "name": s, "supercategory": "shape"} for k, s in enumerate(SHAPES)]
    stats = {"images": num_images, "refexp": len(chance),
             "chance_precision_at_1": float(np.mean(chance)) if chance else 0.0,
             "spatial_fraction": spatial / max(len(chance), 1)}
    info_common = {"generator": "mdetr.data.synthetic", "version": GENERATOR_VERSION, "seed": seed, "split": split}
    infos = {"refexp": {"chance_precision_at_1": stats["chance_precision_at_1"],
                        "spatial_fraction": stats["spatial_fraction"]},
             "qa": {"answer_vocab": ANSWER_VOCAB}}
    ann_dir = out / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    for task in TASKS:
        _write_json(ann_dir / f"shapes_{task}_{split}.json",
                    {"info": {**info_common, "task": task, **infos.get(task, {})}, "categories": categories,
                     **files[task]})
    mixed = {"images": [e for t in MIXED_TASKS for e in files[t]["images"]],
             "annotations": [a for t in MIXED_TASKS for a in files[t]["annotations"]]}
    _write_json(ann_dir / f"shapes_mixed_{split}.json",
                {"info": {**info_common, "task": "mixed"}, "categories": categories, **mixed})
    _write_json(ann_dir / f"shapes_scenes_{split}.json", {"info": info_common, "scenes": scenes})
    for kind, relational in REFEXP_KINDS.items():  # the refexp file split by whether an expression needs a relation
        entries = [e for e in files["refexp"]["images"] if is_relational(e["caption"]) == relational]
        ids = {e["id"] for e in entries}
        _write_json(ann_dir / f"shapes_refexp_{split}_{kind}.json",
                    {"info": {**info_common, "task": "refexp", "subset": kind}, "categories": categories,
                     "images": entries, "annotations": [a for a in files["refexp"]["annotations"]
                                                        if a["image_id"] in ids]})
    return stats


REFEXP_KINDS = {"attribute": False, "relational": True}


def is_relational(caption: str) -> bool:
    """Whether a referring expression of this world needs a spatial relation ("... left of the blue square")."""
    return any(f" {r} " in caption for r in RELATIONS)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, separators=(",", ":")))  # dumps: C encoder (dump is pure Python)


def generate_shapes_dataset(out, num_train: int = DEFAULT_SIZES["num_train"], num_val: int = DEFAULT_SIZES["num_val"],
                            num_test: int = DEFAULT_SIZES["num_test"], seed: int = 0,
                            contrast_pairs: bool = False) -> Dict[str, Dict[str, float]]:
    """Generates all splits under ``out`` (overwriting files of the same names); returns per-split statistics.
    ``contrast_pairs``: the train split's relational referring expressions get their minimal pairs (val and test
    stay as they are)."""
    out = Path(out)
    sizes = {"train": num_train, "val": num_val, "test": num_test}
    return {split: generate_split(out, split, n, seed, contrast_pairs and split == "train")
            for split, n in sizes.items()}


STAMP = "shapes_stamp.json"


def ensure_shapes_dataset(root, num_train: int = DEFAULT_SIZES["num_train"], num_val: int = DEFAULT_SIZES["num_val"],
                          num_test: int = DEFAULT_SIZES["num_test"], seed: int = 0,
                          contrast_pairs: bool = False) -> Path:
    """Generates the dataset under ``root`` unless a stamp file records the same parameters (and generator
    version). Generation goes to a temporary sibling folder that replaces ``root`` at the end, so an interrupted
    run never leaves a stamped half-dataset. A ``root`` holding anything else than a previous generation is an
    error (it would be deleted). Not safe against two processes generating at once: in distributed
    runs call it on rank 0 before the others read."""
    root = Path(root)
    params = {"version": GENERATOR_VERSION, "num_train": num_train, "num_val": num_val, "num_test": num_test,
              "seed": seed, **({"contrast_pairs": True} if contrast_pairs else {})}
    stamp = root / STAMP
    if stamp.exists():
        try:
            if json.loads(stamp.read_text()).get("params") == params:
                return root
        except (json.JSONDecodeError, OSError):
            pass
    foreign = sorted(p.name for p in root.iterdir() if p.name not in ("images", "annotations", STAMP)) \
        if root.is_dir() else []
    if foreign:  # never delete what this generator did not write
        raise ValueError(f"{str(root)!r} holds files that are not a shapes dataset ({foreign[:5]}); "
                         f"pick an empty or dedicated folder for the generated data")
    tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    stats = generate_shapes_dataset(tmp, num_train, num_val, num_test, seed, contrast_pairs)
    (tmp / STAMP).write_text(json.dumps({"params": params, "stats": stats}, indent=1))
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, root)
    return root


def render_preview(root, out, tasks: Sequence[str] = ("refexp", "grounding", "pretrain"), per_task: int = 3,
                   split: str = "val") -> Path:
    """A PNG grid of generated images with their caption and boxes (a column per task), for docs and eyeballing."""
    from PIL import ImageDraw

    root, tiles = Path(root), []
    for task in tasks:
        data = json.loads((root / "annotations" / f"shapes_{task}_{split}.json").read_text())
        boxes: Dict[int, List[List[float]]] = {}
        for ann in data["annotations"]:
            boxes.setdefault(ann["image_id"], []).append(ann["bbox"])
        for entry in data["images"][:per_task]:
            image = Image.open(root / "images" / entry["file_name"]).convert("RGB")
            tile = Image.new("RGB", (280, 300), "white")
            tile.paste(image, (0, 0))
            draw = ImageDraw.Draw(tile)
            for x, y, w, h in boxes.get(entry["id"], []):
                draw.rectangle([x, y, x + w, y + h], outline=(255, 255, 255), width=2)
            words, line, lines = entry["caption"].split(), "", []
            for word in words:
                if len(line) + len(word) > 44:
                    lines.append(line)
                    line = ""
                line = f"{line} {word}".strip()
            lines.append(line)
            draw.multiline_text((2, 258), "\n".join(lines[:3]), fill=(0, 0, 0))
            tiles.append(tile)
    grid = Image.new("RGB", (280 * per_task, 300 * len(tasks)), "white")
    for i, tile in enumerate(tiles):
        grid.paste(tile, (280 * (i % per_task), 300 * (i // per_task)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the embedded shapes dataset (MDETR annotation format).")
    parser.add_argument("--out", required=True, help="output folder (empty, or a previous generation: it is "
                        "replaced unless it already holds these parameters)")
    parser.add_argument("--num-train", type=int, default=DEFAULT_SIZES["num_train"])
    parser.add_argument("--num-val", type=int, default=DEFAULT_SIZES["num_val"])
    parser.add_argument("--num-test", type=int, default=DEFAULT_SIZES["num_test"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--contrast-pairs", action="store_true",
                        help="the train split's relational expressions also get their minimal pairs "
                        "(data.contrast_pairs)")
    parser.add_argument("--preview", help="also write a PNG grid of validation images with captions and boxes")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    # stamped like the training's own generation, so `mdetr.train --data.root=DIR` reuses it as it is
    root = ensure_shapes_dataset(args.out, args.num_train, args.num_val, args.num_test, args.seed,
                                 args.contrast_pairs)
    stats = json.loads((root / STAMP).read_text())["stats"]
    for split, s in stats.items():
        print(f"{split}: {s['images']} images, {s['refexp']} referring expressions, "
              f"chance precision@1 {s['chance_precision_at_1']:.3f}, spatial {s['spatial_fraction']:.1%}")
    print(f"written to {args.out} in {time.perf_counter() - start:.1f} s")
    if args.preview:
        print(f"preview: {render_preview(args.out, args.preview)}")


if __name__ == "__main__":
    main()

"""The MDETR annotation reader: COCO-style JSON with one image entry per (image, caption).

Reads the released files unchanged (final_refcoco*/final_flickr_*/final_mixed_train*/final_gqa_*/CLEVR and the
GQA question files) and the embedded shapes world's files (``mdetr.data.synthetic``).

``ModulatedDetection[i]`` returns ``(image, target)``: ``image`` FloatTensor [3, H, W] (ImageNet-normalized,
after the transforms) and ``target``:

================== ============================= ======================================================
key                type                          meaning
================== ============================= ======================================================
boxes              FloatTensor [T, 4]            cxcywh, normalized by the transformed image size
positive_map       BoolTensor [T, max_tokens]    token j (``<s>``/[CLS] = 0) is in box i's spans (binary)
tokens_positive    list[list[[begin, end)]]      per kept box, its char spans
caption            str
image_id           int                           the entry's ``id`` (one per image and caption)
orig_size          LongTensor [2]                (h, w) of the image file
size               LongTensor [2]                (h, w) after the transforms
dataset_name       str or None
sentence_id, original_img_id, original_id, questionId   copied where the entry has them
tokens_positive_eval  list per phrase of spans   where the entry has it (phrase grounding), with:
positive_map_eval  BoolTensor [P, max_tokens]    token j is in phrase p's spans
phrase_box_map     BoolTensor [P, T]             box t is a ground truth of phrase p (``phrase_box_map``)
phrase_ids         LongTensor [T]                where every annotation has it (shapes grounding)
answer             str                           QA only, the raw answer; plus answer_type (LongTensor
                                                 scalar) and one ``answer_<head>`` per answer head
================== ============================= ======================================================

Several annotation files (``ann_file`` a list) make one dataset: their entries in file order. Entry ids must be
unique across the files (an annotation belongs to the entry of its ``image_id``); where their ``info`` dicts
share a key, the earlier file's value holds. ``repeats`` (training) reads a file's entries more than once, in
rounds: after the files in order, the files named at least twice again, in order, and so on.
In a QA dataset, an entry without ``answer`` (e.g. a grounding sentence mixed into a QA fine-tune) trains the
detection losses only: its ``answer_type`` and every ``answer_<head>`` are -100, which the QA losses ignore.

QA targets. CLEVR scheme (entries with ``answer`` and no ``question_type``, as MDETR's clevr.py): answer_type 0
binary (yes/no), 1 attribute, 2 count; ``answer_binary`` FloatTensor (1.0 = yes), ``answer_attr`` and
``answer_reg`` LongTensor (the count), -100 where the type does not apply. The attribute vocabulary is, in order
of precedence: the ``answer_vocab`` argument, the file's ``info.answer_vocab``, else the sorted attribute
answers of the file (pass ``CLEVR_ATTRIBUTES`` for the released CLEVR checkpoints). GQA scheme (entries with
``question_type``): ``answer_vocab`` must be the content of ``gqa_answer2id_by_type.json`` (a dict
``answer_<head>`` -> {answer: id}); answer_type = obj/attr/rel/global/cat -> 0..4, ``answer_<head>`` the id in
that head's vocabulary ("unknown" for answers outside it) or -100.

``memo_images=True`` (with the deterministic ``EvalTransform`` only) reads and resizes each image file once and
keeps its uint8 pixels in ``image_memo``; the samples are the same (``pixels_of``).

Bad inputs. A missing or unreadable image, a caption with more tokens than ``max_tokens - 1`` slots (the last
class is no-object), or a span outside its caption raise ValueError naming the entry id, file and caption.
Boxes are clipped to the image and dropped when empty after clipping (MDETR does the same), with their spans;
``iscrowd`` boxes are dropped as in MDETR. An entry without annotations gives boxes [0, 4] and positive_map
[0, max_tokens].
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mdetr.boxes import box_xywh_to_xyxy
from mdetr.data.positive_map import create_positive_map
from mdetr.data.transforms import Compose, EvalTransform, ToNormalizedTensor

CLEVR_ATTRIBUTES = ["small", "large", "gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow", "cube",
                    "sphere", "cylinder", "rubber", "metal"]  # MDETR's CLEVR attribute-answer order
GQA_TYPES = {"obj": 0, "attr": 1, "rel": 2, "global": 3, "cat": 4}
COPIED_FIELDS = ("sentence_id", "original_img_id", "original_id", "questionId", "tokens_positive_eval")
IGNORE = -100


def _is_count(answer: str) -> bool:
    return answer.isdigit()


def phrase_box_map(phrase_spans: Sequence[Sequence[Sequence[int]]], box_spans: Sequence[Sequence[Sequence[int]]]
                   ) -> torch.Tensor:
    """BoolTensor [P, T]: box t belongs to phrase p when one of its ``tokens_positive`` spans overlaps one of the
    phrase's ``tokens_positive_eval`` spans (all [begin, end) character spans of one caption). MDETR's Flickr
    files give each box exactly its phrase's span; the shapes world does the same."""
    phrases = [(p, b, e) for p, spans in enumerate(phrase_spans) for b, e in spans]
    boxes = [(t, b, e) for t, spans in enumerate(box_spans) for b, e in spans]
    out = torch.zeros(len(phrase_spans), len(box_spans), dtype=torch.bool)
    if phrases and boxes:
        p_index, p_begin, p_end = torch.tensor(phrases).unbind(1)
        t_index, t_begin, t_end = torch.tensor(boxes).unbind(1)
        overlap = (p_begin[:, None] < t_end[None]) & (t_begin[None] < p_end[:, None])  # [phrase spans, box spans]
        rows, cols = overlap.nonzero(as_tuple=True)
        out[p_index[rows], t_index[cols]] = True
    return out


def read_rgb_image(path: Union[str, Path]) -> Image.Image:
    """The image file at ``path`` as RGB; ValueError naming the file when it is missing, truncated or not an
    image."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError) as err:
        raise ValueError(f"cannot read image file {str(path)!r}: {err}") from err


class ModulatedDetection(Dataset):
    """One sample per image entry (image, caption) of an MDETR annotation file. See the module docstring."""

    def __init__(self, image_dir: Union[str, Path], ann_file: Union[str, Path, Sequence[Union[str, Path]]],
                 tokenizer, transforms=None, max_tokens: int = 256,
                 answer_vocab: Optional[Union[Sequence[str], Dict[str, Dict[str, int]]]] = None,
                 memo_images: bool = False, repeats: Optional[Sequence[int]] = None):
        self.image_dir = Path(image_dir)
        files = [Path(ann_file)] if isinstance(ann_file, (str, Path)) else [Path(f) for f in ann_file]
        if not files:
            raise ValueError("ann_file must name at least one annotation file, got an empty list")
        repeats = [1] * len(files) if repeats is None else list(repeats)
        if len(repeats) != len(files) or not all(isinstance(n, int) and n >= 1 for n in repeats):
            raise ValueError(f"repeats must give each of the {len(files)} annotation files an integer >= 1 (how many "
                             f"times its entries are read), got {repeats}")
        self.ann_file = files[0] if len(files) == 1 else Path("+".join(str(f) for f in files))  # for messages
        self.tokenizer = tokenizer
        self.transforms = transforms if transforms is not None else Compose([ToNormalizedTensor()])
        # file name -> (resized uint8 pixels, width, height of the file): see ``pixels_of``
        self.image_memo: Optional[Dict[str, Tuple[np.ndarray, int, int]]] = {} if memo_images else None
        self.max_tokens = max_tokens
        self.info: dict = {}
        self.entries: List[dict] = []
        self.annotations: Dict[int, List[dict]] = {}
        owner: Dict[int, Path] = {}  # entry id -> the file that holds it
        per_file: List[List[dict]] = []  # each file's entries, for the repeats
        for path in files:
            if not path.is_file():
                raise ValueError(f"annotation file {str(path)!r} does not exist")
            with open(path) as f:
                data = json.load(f)
            self.info = {**(data.get("info") or {}), **self.info}  # an earlier file's keys win
            for entry in data["images"]:
                if entry["id"] in owner:
                    raise ValueError(f"entry id {entry['id']} of {str(path)!r} is also an entry of "
                                     f"{str(owner[entry['id']])!r}: the ids of annotation files read together "
                                     f"must be unique")
                owner[entry["id"]] = path
            self.entries.extend(data["images"])
            per_file.append(data["images"])
            for ann in data.get("annotations", []):
                self.annotations.setdefault(ann["image_id"], []).append(ann)
        for again in range(1, max(repeats)):  # the further rounds: the same entry dicts, read again
            for entries, times in zip(per_file, repeats):
                if times > again:
                    self.entries.extend(entries)
        self.qa = self._qa_scheme()
        self.answer_vocab = self._answer_vocab(answer_vocab)

    # -- QA set-up -------------------------------------------------------------------------------------------
    def _qa_scheme(self) -> Optional[str]:
        with_answer = [e for e in self.entries if "answer" in e]
        if not with_answer:
            return None
        return "gqa" if "question_type" in with_answer[0] else "clevr"

    def _answer_vocab(self, given):
        if self.qa == "gqa":
            if not isinstance(given, dict):
                raise ValueError(f"{self.ann_file}: GQA questions need answer_vocab = the dict of "
                                 f"gqa_answer2id_by_type.json ('answer_<head>' -> {{answer: id}}), "
                                 f"got {type(given).__name__}")
            return given
        if self.qa != "clevr":
            return list(given) if given is not None else None
        if given is not None:
            return list(given)
        if "answer_vocab" in self.info:
            return list(self.info["answer_vocab"])
        answers = {str(e["answer"]) for e in self.entries if "answer" in e}
        return sorted(a for a in answers if a not in ("yes", "no") and not _is_count(a))

    def _answer_targets(self, entry: dict) -> Dict[str, torch.Tensor]:
        if "answer" not in entry:  # no question (e.g. a grounding sentence mixed in): the QA losses ignore it
            heads = [f"answer_{head}" for head in GQA_TYPES] if self.qa == "gqa" else ["answer_attr", "answer_reg"]
            out = {key: torch.tensor(IGNORE, dtype=torch.long) for key in ["answer_type"] + heads}
            if self.qa == "clevr":
                out["answer_binary"] = torch.tensor(0.0)
            return out
        answer = str(entry["answer"])
        if self.qa == "gqa":
            qtype = entry["question_type"]
            out = {"answer_type": torch.tensor(GQA_TYPES[qtype])}
            for head in GQA_TYPES:
                vocab = self.answer_vocab[f"answer_{head}"]
                value = vocab.get(answer, vocab.get("unknown", IGNORE)) if head == qtype else IGNORE
                out[f"answer_{head}"] = torch.tensor(value, dtype=torch.long)
            return out
        kind, binary, attr, count = 2, 0.0, IGNORE, IGNORE
        if answer in ("yes", "no"):
            kind, binary = 0, float(answer == "yes")
        elif answer in self.answer_vocab:
            kind, attr = 1, self.answer_vocab.index(answer)
        elif _is_count(answer):
            count = int(answer)
        else:
            raise ValueError(f"entry {entry['id']} of {self.ann_file}: answer {answer!r} is neither yes/no, a count, "
                             f"nor in the attribute vocabulary {self.answer_vocab}")
        return {"answer_type": torch.tensor(kind, dtype=torch.long),
                "answer_binary": torch.tensor(binary, dtype=torch.float32),
                "answer_attr": torch.tensor(attr, dtype=torch.long),
                "answer_reg": torch.tensor(count, dtype=torch.long)}

    # -- samples ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.entries)

    def boxes_per_entry(self) -> List[int]:
        """The number of (non-crowd) boxes of each entry, in entry order, as the file has them."""
        return [sum(1 for a in self.annotations.get(e["id"], []) if not a.get("iscrowd", 0)) for e in self.entries]

    def _where(self, entry: dict) -> str:
        return f"entry id {entry.get('id')} (file {entry.get('file_name')!r}, caption {entry.get('caption')!r})"

    def _load_image(self, entry: dict) -> Image.Image:
        try:
            return read_rgb_image(self.image_dir / entry["file_name"])
        except ValueError as err:
            raise ValueError(f"{self._where(entry)}: {err}") from err

    def pixels_of(self, entry: dict) -> Tuple[np.ndarray, int, int]:
        """With ``memo_images``: the entry's image resized by the (deterministic) ``EvalTransform``, as uint8
        pixels, and the file's width and height; each file is read and resized once in the process that loads it
        (the main process with ``num_workers=0``; each worker again per epoch otherwise), then kept: H' x W' x 3
        bytes per image (~190 KB at short side 224). The samples are the same as without the memo."""
        if not isinstance(self.transforms, EvalTransform):
            raise ValueError(f"memo_images needs the deterministic eval transform (mdetr.data.transforms."
                             f"EvalTransform; for a train split data.augment=false), got {type(self.transforms).__name__}")
        key = entry["file_name"]
        found = self.image_memo.get(key)
        if found is None:
            image = self._load_image(entry)
            found = self.image_memo[key] = (self.transforms.resize_pixels(image), image.width, image.height)
        return found

    def __getitem__(self, index: int):
        entry = self.entries[index]
        caption: str = entry["caption"]
        if self.image_memo is not None:
            pixels, width, height = self.pixels_of(entry)
        else:
            image = self._load_image(entry)
            width, height = image.width, image.height
        tokenized = self.tokenizer(caption)
        num_tokens = len(tokenized["input_ids"])
        if num_tokens > self.max_tokens - 1:
            raise ValueError(f"{self._where(entry)}: the caption has {num_tokens} tokens, more than the "
                             f"{self.max_tokens - 1} token slots (max_tokens={self.max_tokens}, one is no-object)")
        boxes, spans, phrase_ids = self._boxes(entry, width, height)
        target = {
            "boxes": boxes,
            "positive_map": create_positive_map(tokenized, spans, self.max_tokens),
            "tokens_positive": spans,
            "caption": caption,
            "image_id": int(entry["id"]),
            "orig_size": torch.tensor([height, width], dtype=torch.long),
            "dataset_name": entry.get("dataset_name"),
        }
        target.update({k: entry[k] for k in COPIED_FIELDS if k in entry})
        if "tokens_positive_eval" in entry:
            phrases = entry["tokens_positive_eval"]
            target["positive_map_eval"] = create_positive_map(tokenized, phrases, self.max_tokens)
            target["phrase_box_map"] = phrase_box_map(phrases, spans)
        if phrase_ids is not None:
            target["phrase_ids"] = torch.tensor(phrase_ids, dtype=torch.long)
        if self.qa is not None:
            if "answer" in entry:
                target["answer"] = str(entry["answer"])
            target.update(self._answer_targets(entry))
        if self.image_memo is not None:
            return self.transforms.finish(pixels, target, width, height)
        return self.transforms(image, target)

    def _boxes(self, entry: dict, width: int, height: int):
        """Kept boxes (xyxy pixels, clipped), their spans and phrase ids (None unless every box has one)."""
        caption = entry["caption"]
        anns = [a for a in self.annotations.get(entry["id"], []) if not a.get("iscrowd", 0)]
        for ann in anns:
            for span in ann.get("tokens_positive", []):
                if len(span) != 2 or not 0 <= span[0] < span[1] <= len(caption):
                    raise ValueError(f"{self._where(entry)}: annotation {ann.get('id')} has span {span} outside the "
                                     f"caption (expected 0 <= begin < end <= {len(caption)})")
        if not anns:
            return torch.zeros(0, 4), [], None
        boxes = box_xywh_to_xyxy(torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4))
        boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([width, height, width, height], dtype=torch.float32))
        keep = ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).tolist()
        kept = [a for a, k in zip(anns, keep) if k]
        spans = [[list(s) for s in a.get("tokens_positive", [])] for a in kept]
        with_ids = kept and all(isinstance(a.get("phrase_ids"), int) for a in kept)
        phrase_ids = [a["phrase_ids"] for a in kept] if with_ids else None
        return boxes[torch.tensor(keep, dtype=torch.bool)], spans, phrase_ids

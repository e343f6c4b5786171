"""Inference on one image: the boxes each caption grounds, labelled with the caption's words, and QA answers.

CLI::

    python -m mdetr.predict --checkpoint runs/shapes/checkpoint.pth --image scene.jpg \\
        --caption "a red circle" --caption "the small blue square" [--out vis.png] [--threshold 0.7]

prints, per caption, the boxes with score = 1 - p(no-object) above ``--threshold`` (and the answer when the
model has QA heads), and writes one PNG with one panel per caption (a grid, in the order given; default name
``<image stem>_mdetr.png``).

Python API (results shaped like transformers' ``post_process_grounded_object_detection``, one dict per caption)::

    predictor = Predictor.from_checkpoint("runs/shapes/checkpoint.pth")
    results = predictor.predict("scene.jpg", ["a red circle", "two stars"], threshold=0.7)
    results[0]["boxes"]   # FloatTensor [N, 4], absolute xyxy pixels of the input image, clamped to it
    results[0]["scores"]  # FloatTensor [N], 1 - p(no-object), descending
    results[0]["labels"]  # list of N phrases: the caption's words each box's soft-token distribution points at
    results[0]["spans"]   # list of N lists of [begin, end) character spans of the caption (the labels' source)
    predictor.draw("scene.jpg", results[0], "a red circle").save("vis.png")

QA models add ``answer_type``, ``answer`` (None when the head's ids have no vocabulary), ``answer_id`` and
``answer_score`` to every dict. The image goes through the backbone once, whatever the number of captions; the
cross encoder and decoder run on the captions as one batch (they need image and text jointly).
"""
from __future__ import annotations

import argparse
import json
import math
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from transformers import BatchEncoding

from mdetr.checkpoint import load_checkpoint, load_model
from mdetr.data import build_dataset, make_transforms
from mdetr.data.annotations import read_rgb_image
from mdetr.data.transforms import Compose
from mdetr.evaluation.qa import ANSWER_TYPES
from mdetr.losses.qa import HEADS
from mdetr.models import MDETR, PostProcess

DEFAULT_THRESHOLD = 0.7  # on 1 - p(no-object)
DEFAULT_TOKEN_THRESHOLD = 0.1  # a token is part of a box's phrase above this probability (the reference demo's)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]  # matplotlib's tab10

ImageInput = Union[Image.Image, str, Path]
AnswerVocab = Union[Sequence[str], Dict[str, Dict[str, int]]]  # CLEVR: attribute answers; GQA: answer2id by head
Span = Tuple[int, int]


def load_image(image: ImageInput) -> Image.Image:
    """A PIL image (converted to RGB) or the path of an image file -> RGB PIL image.

    Raises FileNotFoundError (no such file) or ValueError (not a readable image), naming the file."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if not isinstance(image, (str, Path)):
        raise TypeError(f"image must be a PIL image or a file path, got {type(image).__name__}")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    return read_rgb_image(path)


def check_captions(captions: Union[str, Sequence[str]]) -> List[str]:
    """One caption or a list -> list of captions; ValueError for no caption or an empty one."""
    captions = [captions] if isinstance(captions, str) else list(captions)
    if not captions:
        raise ValueError("captions: give at least one caption")
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"captions[{i}] must be a str, got {type(caption).__name__}")
        if not caption.strip():
            raise ValueError(f"captions[{i}] is empty (got {caption!r})")
    return captions


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _merge_spans(spans: Sequence[Span], caption: str) -> List[Span]:
    """Sorted character spans, merged where they overlap, touch or are separated by whitespace only."""
    merged: List[Span] = []
    for begin, end in sorted(spans):
        if merged and not caption[merged[-1][1]:begin].strip():
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((begin, end))
    return merged


def _word_span(tokenized: BatchEncoding, index: int, token: int, caption: str) -> Optional[Span]:
    """The characters of the word that token ``token`` of caption ``index`` belongs to, without surrounding
    whitespace; None for special and padding tokens and for tokens without text."""
    span = tokenized.token_to_chars(index, token)
    if span is None or not caption[span.start:span.end].strip():
        return None
    word = tokenized.token_to_word(index, token)
    whole = tokenized.word_to_chars(index, word) if word is not None else None
    begin, end = (whole.start, whole.end) if whole is not None else (span.start, span.end)
    text = caption[begin:end]
    return begin + len(text) - len(text.lstrip()), end - len(text) + len(text.rstrip())


def box_phrases(token_probs: Tensor, tokenized: BatchEncoding, index: int, caption: str,
                token_threshold: float = DEFAULT_TOKEN_THRESHOLD) -> Tuple[List[str], List[List[Span]]]:
    """Per box, the words of the caption its soft-token distribution puts mass on.

    token_probs [N, C]: the N boxes' probabilities over the class slots (softmax over all of them, no-object
    included) for caption ``index`` of ``tokenized`` (a fast tokenizer's batch encoding of ``caption``). A box's
    phrase is the caption's tokens above ``token_threshold`` (its most probable token when none is), mapped to
    characters through the tokenizer's offsets and widened to whole words (a sub-word piece labels its word);
    special and padding tokens, and tokens without text (a byte-level BPE's lone space), have none and never count.
    -> (labels: N strings, the merged spans' text joined by spaces; spans: N lists of [begin, end))."""
    char_spans = [_word_span(tokenized, index, t, caption) for t in range(tokenized["input_ids"].shape[1])]
    word_tokens = [t for t, span in enumerate(char_spans) if span is not None]
    if not word_tokens:  # a caption the tokenizer reads as nothing but special tokens
        return [""] * len(token_probs), [[] for _ in range(len(token_probs))]
    word_probs = token_probs[:, word_tokens]  # [N, W]
    selected = (word_probs > token_threshold).tolist()
    best = word_probs.argmax(-1).tolist()
    labels, spans = [], []
    for row, fallback in zip(selected, best):
        chosen = [word_tokens[j] for j, above in enumerate(row) if above] or [word_tokens[fallback]]
        box_spans = _merge_spans([char_spans[t] for t in chosen], caption)
        labels.append(" ".join(caption[b:e] for b, e in box_spans))
        spans.append(box_spans)
    return labels, spans


def answer_names(qa_dataset: str, vocab: AnswerVocab) -> Dict[str, Dict[int, str]]:
    """Head name -> {answer id: answer} for the heads whose ids index a vocabulary: CLEVR's "attr" from the list
    of attribute answers; every GQA head from gqa_answer2id_by_type.json ({"answer_<head>": {answer: id}})."""
    if qa_dataset == "clevr":
        if isinstance(vocab, (str, dict)) or not all(isinstance(a, str) for a in vocab):
            raise ValueError(f"answer_vocab of a CLEVR-heads model must be a list of attribute answers, "
                             f"got {vocab!r:.80}")
        return {"attr": dict(enumerate(vocab))}
    if not isinstance(vocab, dict):
        raise ValueError(f"answer_vocab of a GQA model must be the dict of gqa_answer2id_by_type.json, "
                         f"got {type(vocab).__name__}")
    return {key[len("answer_"):]: {int(i): answer for answer, i in ids.items()}
            for key, ids in vocab.items() if key.startswith("answer_")}


def decode_answers(outputs: Dict[str, Tensor], qa_dataset: str,
                   names: Optional[Dict[str, Dict[int, str]]] = None) -> List[Dict[str, Any]]:
    """The QA heads' outputs -> per sample ``answer_type`` (its name), ``answer_id`` (the predicted type's head:
    1/0 for yes/no, the count, or the id in the head's vocabulary), ``answer`` (the string; None when ``names``
    has no entry for that id) and ``answer_score`` = p(type) * p(answer)."""
    type_score, type_id = outputs["pred_answer_type"].float().softmax(-1).max(-1)
    decoded = []
    for sample, (kind_index, kind_score) in enumerate(zip(type_id.tolist(), type_score.tolist())):
        head, loss_kind = HEADS[qa_dataset][kind_index]
        logits = outputs[f"pred_answer_{head}"][sample].float()
        if loss_kind == "bce":
            p_yes = logits.sigmoid().item()
            answer_id, score = int(p_yes > 0.5), max(p_yes, 1 - p_yes)
            answer = ("no", "yes")[answer_id]
        else:
            score, answer_id = (v.item() for v in logits.softmax(-1).max(-1))
            is_count = (qa_dataset, head) == ("clevr", "reg")
            answer = str(answer_id) if is_count else (names or {}).get(head, {}).get(answer_id)
        decoded.append({"answer_type": ANSWER_TYPES[qa_dataset][kind_index], "answer": answer,
                        "answer_id": answer_id, "answer_score": kind_score * score})
    return decoded


def find_answer_vocab(checkpoint: Union[str, Path], cfg, trusted: bool = False) -> Tuple[Optional[AnswerVocab], str]:
    """The answer vocabulary of a QA checkpoint and where it was found, in this order: the checkpoint's
    ``answer_vocab`` entry; the config's ``data.answer_vocab`` file; the training annotation file (the dataset's own
    rule: ``info.answer_vocab``, else its sorted attribute answers; CLEVR heads only, GQA needs the file); the
    shapes generator's vocabulary for a shapes-world run. (None, why) when none is found."""
    saved = load_checkpoint(checkpoint, trusted, mmap=True)  # lazily: no weights read
    if saved.get("answer_vocab") is not None:
        return saved["answer_vocab"], f"checkpoint {str(checkpoint)!r}"
    vocab_file = Path(cfg.data.answer_vocab) if cfg.data.answer_vocab else None
    if vocab_file is not None and vocab_file.is_file():
        return json.loads(vocab_file.read_text()), f"data.answer_vocab {str(vocab_file)!r}"
    reason = "none found: the checkpoint has none, data.answer_vocab is unset or missing"
    if cfg.model.qa_dataset == "clevr":
        try:
            dataset = build_dataset(cfg.data, "train", tokenizer=None, generate=False)
            if dataset.answer_vocab:
                return dataset.answer_vocab, f"annotation file {str(dataset.ann_file)!r}"
        except ValueError as err:  # the training annotation file is not on this machine
            reason += f"; {err}"
        if cfg.data.dataset == "shapes":
            from mdetr.data.synthetic import ANSWER_VOCAB

            return ANSWER_VOCAB, "the shapes generator"
    return None, reason


def draw(image: ImageInput, result: Dict[str, Any], caption: Optional[str] = None,
         min_side: int = 384) -> Image.Image:
    """A copy of ``image`` with ``result``'s boxes (one colour per distinct label), each tagged "label score",
    and below it ``caption`` and the answer, if any. Images with a short side under ``min_side`` pixels are
    upscaled first (bilinear) so that the text stays legible."""
    image = load_image(image)
    scale = max(1.0, min_side / min(image.size))
    canvas = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    font = ImageFont.load_default(size=max(12, round(min(canvas.size) / 30)))
    pen = ImageDraw.Draw(canvas)
    colours = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(dict.fromkeys(result["labels"]))}
    for box, score, label in zip(result["boxes"].tolist(), result["scores"].tolist(), result["labels"]):
        x0, y0, x1, y1 = (v * scale for v in box)
        colour = colours[label]
        pen.rectangle([x0, y0, x1, y1], outline=colour, width=3)
        text = f"{label} {score:.2f}"
        left, top, right, bottom = pen.textbbox((0, 0), text, font=font)
        tag_w, tag_h = right - left + 4, bottom - top + 4
        tag_x = max(0, min(x0, canvas.width - tag_w))  # inside the canvas
        tag_y = y0 - tag_h if y0 >= tag_h else y0  # above the box, or inside it at the top edge
        pen.rectangle([tag_x, tag_y, tag_x + tag_w, tag_y + tag_h], fill=colour)
        pen.text((tag_x + 2 - left, tag_y + 2 - top), text, fill=(255, 255, 255), font=font)
    lines = [caption] if caption else []
    if result.get("answer_type"):
        lines.append(answer_line(result))
    return _with_text_below(canvas, lines, font)


def answer_line(result: Dict[str, Any], missing: str = "no answer for this id") -> str:
    """"answer (type): answer  [score]" of a QA result; the id and ``missing`` when ``answer`` is None."""
    answer = result["answer"] if result["answer"] is not None else f"id {result['answer_id']} ({missing})"
    return f"answer ({result['answer_type']}): {answer}  [{result['answer_score']:.3f}]"


def _with_text_below(canvas: Image.Image, lines: Sequence[str], font: ImageFont.ImageFont) -> Image.Image:
    """``canvas`` above a white strip holding ``lines``, wrapped to its width."""
    if not lines:
        return canvas
    chars_per_line = max(10, int(canvas.width / max(font.getlength("x"), 1)) - 2)
    wrapped = [w for line in lines for w in textwrap.wrap(line, chars_per_line)]
    spacing = 4
    line_h = font.getbbox("Ag")[3] + spacing
    panel = Image.new("RGB", (canvas.width, canvas.height + line_h * len(wrapped) + 2 * spacing), "white")
    panel.paste(canvas, (0, 0))
    ImageDraw.Draw(panel).multiline_text((4, canvas.height + spacing), "\n".join(wrapped), fill=(0, 0, 0),
                                         font=font, spacing=spacing)
    return panel


def draw_panels(image: ImageInput, results: Sequence[Dict[str, Any]], captions: Sequence[str],
                min_side: int = 384) -> Image.Image:
    """One ``draw`` panel per (result, caption), on a grid of ceil(sqrt(n)) columns, row by row."""
    image = load_image(image)
    panels = [draw(image, result, caption, min_side) for result, caption in zip(results, captions)]
    columns = math.ceil(math.sqrt(len(panels)))
    rows = math.ceil(len(panels) / columns)
    cell_w, cell_h, gap = max(p.width for p in panels), max(p.height for p in panels), 8
    grid = Image.new("RGB", (columns * cell_w + (columns - 1) * gap, rows * cell_h + (rows - 1) * gap), "white")
    for i, panel in enumerate(panels):
        grid.paste(panel, ((i % columns) * (cell_w + gap), (i // columns) * (cell_h + gap)))
    return grid


class Predictor:
    """An MDETR model in eval mode with its eval transform (and answer vocabulary, for QA heads).

    ``answer_vocab``: CLEVR heads: the list of attribute answers; GQA: the dict of gqa_answer2id_by_type.json.
    Without it, QA answers that index a vocabulary come back as ids only (``answer`` None)."""

    def __init__(self, model: MDETR, transforms: Compose, answer_vocab: Optional[AnswerVocab] = None,
                 answer_vocab_source: str = "given"):
        self.model = model.eval()
        self.transforms = transforms
        self.device = next(model.parameters()).device
        if model.qa_dataset is None and answer_vocab is not None:
            raise ValueError("answer_vocab: the model has no QA heads (model.qa_dataset is None), so there are no "
                             "answers to name")
        has_names = model.qa_dataset is not None and answer_vocab is not None
        self.answer_names = answer_names(model.qa_dataset, answer_vocab) if has_names else None
        self.answer_vocab_source = answer_vocab_source
        self.postprocess = PostProcess()

    @classmethod
    def from_checkpoint(cls, checkpoint: Union[str, Path], device: Optional[str] = None, weights: str = "ema",
                        answer_vocab: Optional[Union[AnswerVocab, str, Path]] = None,
                        trusted: bool = False) -> "Predictor":
        """From a training checkpoint of ``python -m mdetr.train``. ``device`` None: CUDA when available.
        ``weights``: "ema" or "model" (see ``mdetr.checkpoint.load_model``). ``answer_vocab``: the vocabulary
        itself or a JSON file of it; None looks it up (``find_answer_vocab``). ``trusted``: unpickle any Python
        object in the file (``mdetr.checkpoint.load_checkpoint``)."""
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"checkpoint {str(checkpoint)!r} does not exist")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, cfg = load_model(checkpoint, device, weights, trusted=trusted)
        source = "given"
        if isinstance(answer_vocab, (str, Path)):
            source = f"answer_vocab file {str(answer_vocab)!r}"
            answer_vocab = json.loads(Path(answer_vocab).read_text())
        elif answer_vocab is None and model.qa_dataset is not None:
            answer_vocab, source = find_answer_vocab(checkpoint, cfg, trusted)
        return cls(model, make_transforms("val", cfg.data.transforms), answer_vocab, source)

    @torch.no_grad()
    def encode_image(self, image: Image.Image, num_captions: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The eval transform and ONE backbone pass, expanded (a view, no copy) to ``num_captions``:
        features [K, C, h, w], feature_mask [K, h, w], pos [K, d, h, w]; then the image [1, 3, H, W] and its mask
        [1, H, W] (``box_roi="pixels"`` reads them)."""
        pixels, _ = self.transforms(image, {"boxes": torch.zeros(0, 4)})
        dtype = next(self.model.parameters()).dtype  # a half or bfloat16 model takes its own dtype
        pixels = pixels[None].to(self.device, dtype)  # [1, 3, H, W], one image: no padding
        mask = torch.zeros(1, *pixels.shape[2:], dtype=torch.bool, device=self.device)
        features, feature_mask, pos = self.model.backbone(pixels, mask)
        return (features.expand(num_captions, -1, -1, -1), feature_mask.expand(num_captions, -1, -1),
                pos.expand(num_captions, -1, -1, -1), pixels, mask)

    @torch.no_grad()
    def predict(self, image: ImageInput, captions: Union[str, Sequence[str]], threshold: float = DEFAULT_THRESHOLD,
                token_threshold: float = DEFAULT_TOKEN_THRESHOLD) -> List[Dict[str, Any]]:
        """One dict per caption (module docstring): the boxes with 1 - p(no-object) > ``threshold``, best first."""
        captions = check_captions(captions)
        _check_probability("threshold", threshold)
        _check_probability("token_threshold", token_threshold)
        image = load_image(image)
        features, feature_mask, pos, pixels, mask = self.encode_image(image, len(captions))
        outputs = self.model.decode(self.model.encode_features(features, feature_mask, pos, captions, pixels, mask))
        sizes = torch.tensor([[image.height, image.width]], device=self.device).expand(len(captions), 2)
        detections = self.postprocess(outputs, sizes)
        token_probs = outputs["pred_logits"].float().softmax(-1)  # [K, Q, 256]
        answers = (decode_answers(outputs, self.model.qa_dataset, self.answer_names) if self.model.qa_dataset
                   else [{} for _ in captions])
        limits = torch.tensor([image.width, image.height] * 2, dtype=torch.float32, device=self.device)
        results = []
        for index, (caption, detection, answer) in enumerate(zip(captions, detections, answers)):
            keep = torch.nonzero(detection["scores"] > threshold)[:, 0]
            keep = keep[detection["scores"][keep].argsort(descending=True)]
            labels, spans = box_phrases(token_probs[index, keep], outputs["tokenized"], index, caption,
                                        token_threshold)
            boxes = torch.minimum(detection["boxes"][keep].clamp(min=0), limits)
            results.append({"scores": detection["scores"][keep].cpu(), "boxes": boxes.cpu(), "labels": labels,
                            "spans": spans, **answer})
        return results

    draw = staticmethod(draw)


def format_result(result: Dict[str, Any], caption: str, answer_vocab_source: str = "") -> str:
    """A few lines per caption: the caption, one line per box (score, phrase, xyxy), the answer if any."""
    lines = [repr(caption)]
    for score, label, box in zip(result["scores"].tolist(), result["labels"], result["boxes"].tolist()):
        lines.append(f"  {score:.3f}  {label!r:24}  [{', '.join(f'{v:.1f}' for v in box)}]")
    if len(lines) == 1:
        lines.append("  no box above the threshold")
    if result.get("answer_type"):
        lines.append("  " + answer_line(result, f"no answer for this id; answer vocabulary: {answer_vocab_source}; "
                                                f"pass --answer-vocab FILE"))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mdetr.predict", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a training checkpoint of python -m mdetr.train")
    parser.add_argument("--image", required=True, help="the image file")
    parser.add_argument("--caption", action="append", required=True,
                        help="a caption or question; repeat for several (the image is encoded once)")
    parser.add_argument("--out", help="the PNG to write, one panel per caption (default: <image stem>_mdetr.png in "
                        "the current folder)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="keep boxes with score = 1 - p(no-object) above this")
    parser.add_argument("--token-threshold", type=float, default=DEFAULT_TOKEN_THRESHOLD,
                        help="a token belongs to a box's phrase above this probability")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema",
                        help="the EMA or the live weights (best.pth holds its validated weights, the EMA ones when "
                        "the run kept an EMA, under both names)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--answer-vocab", help="QA: JSON answer vocabulary (CLEVR: list of attribute answers; "
                        "GQA: gqa_answer2id_by_type.json), when the checkpoint's cannot be found")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--trusted", action="store_true", help="unpickle any Python object in the checkpoint "
                        "(only for files you trust; by default tensors and plain data only)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:  # the cheap checks first: a wrong argument fails before the model loads
        _check_probability("--threshold", args.threshold)
        _check_probability("--token-threshold", args.token_threshold)
        if args.out and Path(args.out).suffix.lower() != ".png":
            raise ValueError(f"--out must name a .png file, got {args.out!r}")
        image = load_image(args.image)
        captions = check_captions(args.caption)
        predictor = Predictor.from_checkpoint(args.checkpoint, args.device, args.weights, args.answer_vocab,
                                              args.trusted)
    except (OSError, ValueError, RuntimeError) as err:  # RuntimeError: an unreadable checkpoint
        parser.error(str(err))
    try:
        results = predictor.predict(image, captions, args.threshold, args.token_threshold)
    except ValueError as err:  # a caption too long for the model, a threshold outside [0, 1]
        parser.error(str(err))
    for caption, result in zip(captions, results):
        print(format_result(result, caption, predictor.answer_vocab_source))
    out = Path(args.out or f"{Path(args.image).stem}_mdetr.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_panels(image, results, captions).save(out, format="PNG")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""mdetr.predict on tiny checkpoints: HF-style result dicts, phrases from the soft tokens, one backbone pass for
several captions, thresholds, drawing, the CLI, QA answers and bad inputs.

The tiny models' heads are set by hand so that outputs are known: the class head puts most of the mass on token
positions 2 and 3 (the second and third word of a short caption) and the box head predicts one fixed box that
sticks out of the image on the left."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from mdetr import config as C
from mdetr.data.synthetic import ANSWER_VOCAB
from mdetr.models import build_from_config
from mdetr.predict import Predictor, box_phrases, decode_answers, draw_panels, main
from mdetr.pretrained import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

IMAGE_W, IMAGE_H = 150, 100
BOX_CXCYWH = (0.1, 0.5, 0.4, 0.4)
EXPECTED_BOX = [0.0, 30.0, 45.0, 70.0]  # x0 = (0.1 - 0.2) * 150 < 0, clamped to the image
ATTR_ID = 4


def tiny_config(root, **overrides) -> C.Config:
    items = {"data.root": root, "data.transforms": "tiny", "model.pretrained_backbone": False,
             "model.d_model": 32, "model.nheads": 4, "model.enc_layers": 1, "model.dec_layers": 1,
             "model.dim_feedforward": 64, "model.num_queries": 4, "model.query_grid": 0,
             "model.token_head": "linear"}  # the tests set the Linear head's biases by hand
    items.update(overrides)
    return C.resolve("shapes", None, [f"--{k}={v}" for k, v in items.items()])


def save_checkpoint(path, cfg: C.Config, **extra) -> str:
    torch.manual_seed(0)
    model = build_from_config(cfg.model)
    with torch.no_grad():
        model.class_embed.bias.zero_()
        model.class_embed.bias[2:4] = 6.0  # p(token 2), p(token 3) ~ 0.35 each; scores = 1 - p(no-object) vary a bit
        last = model.bbox_embed.layers[-1]
        last.weight.zero_()
        last.bias.copy_(torch.logit(torch.tensor(BOX_CXCYWH)))
        if model.box_roi_refiner is not None:  # a refiner that moves the boxes, by what it reads of each one
            torch.nn.init.normal_(model.box_roi_refiner.mlp.layers[-1].weight, std=0.1)
        if cfg.model.qa_dataset == "clevr":
            model.answer_type_head.bias.copy_(torch.tensor([0.0, 8.0, 0.0]))  # type: attribute
            model.answer_attr_head.bias.zero_()
            model.answer_attr_head.bias[ATTR_ID] = 8.0
    torch.save({"model": model.state_dict(), "ema": None, "config": cfg.to_dict(), **extra}, path)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    image = root / "scene.png"
    torch.manual_seed(1)
    pixels = (torch.rand(IMAGE_H, IMAGE_W, 3) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(image)
    no_data = str(root / "no_data")  # the training annotation files are not on this machine
    return {
        "root": root,
        "image": str(image),
        "detector": save_checkpoint(root / "detector.pth", tiny_config(no_data)),
        "anchor_detector": save_checkpoint(root / "anchors.pth", tiny_config(no_data, **{"model.query_grid": 2})),
        "roi_detector": save_checkpoint(root / "roi.pth", tiny_config(no_data, **{"model.query_grid": 2,
                                                                                   "model.box_roi": "pixels"})),
        "clevr_shapes": save_checkpoint(root / "clevr.pth", tiny_config(no_data, **{"model.qa_dataset": "clevr"})),
        "clevr_stored": save_checkpoint(root / "clevr_vocab.pth", tiny_config(no_data, **{"model.qa_dataset": "clevr"}),
                                        answer_vocab=[f"word{i}" for i in range(15)]),
        "clevr_no_vocab": save_checkpoint(root / "clevr_none.pth", tiny_config(
            no_data, **{"model.qa_dataset": "clevr", "data.dataset": "mdetr"})),
    }


@pytest.fixture(scope="module")
def predictor(files):
    return Predictor.from_checkpoint(files["detector"], device="cpu")


def test_result_dicts_are_hf_style_with_absolute_boxes_and_caption_phrases(predictor, files):
    captions = ["a red circle", "the small blue square"]
    results = predictor.predict(files["image"], captions, threshold=0.5)
    assert len(results) == 2
    for result, caption, phrase in zip(results, captions, ["red circle", "small blue"]):
        assert {"boxes", "scores", "labels", "spans"} <= set(result)
        n = len(result["labels"])
        assert n == 4  # every query scores ~0.99
        assert result["boxes"].dtype == torch.float32 and result["boxes"].shape == (n, 4)
        assert result["scores"].dtype == torch.float32 and result["scores"].shape == (n,)
        assert result["scores"].tolist() == sorted(result["scores"].tolist(), reverse=True)
        assert torch.allclose(result["boxes"], torch.tensor([EXPECTED_BOX] * n), atol=1e-3)
        assert all(label in caption for label in result["labels"])
        assert set(result["labels"]) == {phrase}
        assert all(" ".join(caption[b:e] for b, e in spans) == label
                   for spans, label in zip(result["spans"], result["labels"]))
        assert "answer" not in result
        panel = predictor.draw(files["image"], result, caption)
        assert panel.width == 384 * IMAGE_W // IMAGE_H and panel.height > 384  # upscaled, caption strip below


@pytest.mark.parametrize("checkpoint", ["detector", "anchor_detector", "roi_detector"])
def test_several_captions_run_the_backbone_once_and_match_one_at_a_time(predictor, files, checkpoint):
    if checkpoint != "detector":  # anchor queries sample the (expanded) backbone outputs, box_roi its pixels too
        predictor = Predictor.from_checkpoint(files[checkpoint], device="cpu")
    calls = []
    handle = predictor.model.backbone.register_forward_hook(lambda *_: calls.append(1))
    try:
        captions = ["a red circle", "two green stars and a small square", "a blue square"]
        together = predictor.predict(files["image"], captions, threshold=0.0)
        assert len(calls) == 1
        for caption, result in zip(captions, together):
            alone = predictor.predict(files["image"], caption, threshold=0.0)[0]
            torch.testing.assert_close(result["scores"], alone["scores"], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(result["boxes"], alone["boxes"], atol=1e-4, rtol=1e-5)
            assert result["labels"] == alone["labels"]
        assert len(calls) == 1 + len(captions)
    finally:
        handle.remove()


def test_threshold_keeps_exactly_the_boxes_above_it(predictor, files):
    everything = predictor.predict(files["image"], "a red circle", threshold=0.0)[0]["scores"]
    assert len(everything) == 4 and everything.unique().numel() > 1
    cut = everything.median().item()
    kept = predictor.predict(files["image"], "a red circle", threshold=cut)[0]
    assert len(kept["labels"]) == int((everything > cut).sum()) == len(kept["boxes"])
    assert bool((kept["scores"] > cut).all())
    none = predictor.predict(files["image"], "a red circle", threshold=1.0)[0]
    assert none["boxes"].shape == (0, 4) and none["labels"] == [] and none["spans"] == []
    assert draw_panels(files["image"], [none], ["a red circle"]).size[0] >= IMAGE_W


def test_box_phrases_merge_tokens_and_fall_back_to_the_best_one():
    caption = "a purple cylinder left of two stars"
    tokenized = load_tokenizer("all-MiniLM-L6-v2")([caption, "x"], padding="longest", return_tensors="pt")
    tokens = tokenized.tokens(0)
    probs = torch.zeros(3, 256)
    cylinder = [i for i, t in enumerate(tokens) if t in ("cy", "##lind", "##er")] or [tokens.index("cylinder")]
    probs[0, [tokens.index("purple"), *cylinder]] = 0.3  # adjacent words and word pieces: one span
    probs[1, [tokens.index("purple"), tokens.index("stars")]] = 0.4  # two separate spans
    probs[2, tokens.index("two")] = 0.05  # nothing above the threshold: the most probable word token
    probs[2, 0] = 0.9  # [CLS] has no characters and never counts
    labels, spans = box_phrases(probs, tokenized, 0, caption, token_threshold=0.1)
    assert labels == ["purple cylinder", "purple stars", "two"]
    assert spans[0] == [(2, 17)] and len(spans[1]) == 2


def test_box_phrases_label_whole_words_and_skip_tokens_without_text():
    caption = "an  unbelievably red   circle"
    tokenized = load_tokenizer("all-MiniLM-L6-v2")([caption], padding="longest", return_tensors="pt")
    tokens = tokenized.tokens(0)
    pieces = [i for i, t in enumerate(tokens) if t.startswith("##")]
    assert pieces, tokens  # "unbelievably" is several word pieces
    probs = torch.zeros(2, 256)
    probs[0, pieces[-1]] = 0.5  # one piece of the word: the label is the whole word
    probs[1, [pieces[-1], tokens.index("red")]] = 0.5  # adjacent words across two spaces: one span
    labels, spans = box_phrases(probs, tokenized, 0, caption, token_threshold=0.1)
    assert labels == ["unbelievably", "unbelievably red"]
    assert spans[0] == [(4, 16)]


def test_decode_answers_per_head_and_vocabulary():
    outputs = {"pred_answer_type": torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [0, 5.0, 0]]),
               "pred_answer_binary": torch.tensor([2.0, 0, 0, 0]),
               "pred_answer_attr": torch.zeros(4, 15).index_fill_(1, torch.tensor([3]), 9.0),
               "pred_answer_reg": torch.zeros(4, 20).index_fill_(1, torch.tensor([7]), 9.0)}
    names = {"attr": {3: "cyan"}}
    answers = decode_answers(outputs, "clevr", names)
    assert [(a["answer_type"], a["answer"], a["answer_id"]) for a in answers[:3]] == [
        ("binary", "yes", 1), ("attribute", "cyan", 3), ("count", "7", 7)]
    assert 0.5 < answers[0]["answer_score"] < 1
    assert decode_answers(outputs, "clevr", None)[1]["answer"] is None  # no vocabulary: the id only
    gqa = {"pred_answer_type": torch.tensor([[0.0, 0, 9.0, 0, 0]]), "pred_answer_rel": torch.tensor([[0.0, 4.0]])}
    assert decode_answers(gqa, "gqa", {"rel": {1: "on"}})[0]["answer"] == "on"


@pytest.mark.parametrize("name, expected", [("clevr_stored", f"word{ATTR_ID}"),
                                            ("clevr_shapes", ANSWER_VOCAB[ATTR_ID])])
def test_qa_answer_uses_the_vocabulary_of_the_checkpoint_or_the_shapes_world(files, name, expected):
    result = Predictor.from_checkpoint(files[name], device="cpu").predict(files["image"], "what colour is it?")[0]
    assert (result["answer_type"], result["answer"], result["answer_id"]) == ("attribute", expected, ATTR_ID)
    assert len(result["labels"]) == 4  # boxes come with answers


def test_cli_writes_a_png_with_one_panel_per_caption(files, tmp_path, capsys):
    out = tmp_path / "vis" / "panels.png"
    main(["--checkpoint", files["detector"], "--image", files["image"], "--caption", "a red circle",
          "--caption", "a blue square", "--out", str(out), "--threshold", "0.5", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "'red circle'" in printed and "'blue square'" in printed and f"wrote {out}" in printed
    with Image.open(out) as written:
        assert written.format == "PNG"
        assert written.width > 2 * 384 and written.height > 384  # two upscaled panels side by side


def test_cli_prints_the_answer_or_says_the_vocabulary_is_missing(files, tmp_path, capsys):
    common = ["--image", files["image"], "--caption", "what colour is it?", "--device", "cpu"]
    main(["--checkpoint", files["clevr_shapes"], "--out", str(tmp_path / "a.png"), *common])
    assert f"answer (attribute): {ANSWER_VOCAB[ATTR_ID]}" in capsys.readouterr().out
    main(["--checkpoint", files["clevr_no_vocab"], "--out", str(tmp_path / "b.png"), *common])
    printed = capsys.readouterr().out
    assert f"answer (attribute): id {ATTR_ID} (no answer for this id" in printed and "--answer-vocab" in printed


def test_bad_inputs_raise_errors_that_name_the_argument(predictor, files):
    corrupt = files["root"] / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    with pytest.raises(FileNotFoundError, match="image .*does not exist"):
        predictor.predict(files["root"] / "missing.jpg", "a red circle")
    with pytest.raises(ValueError, match="cannot read image file .*corrupt.png"):
        predictor.predict(corrupt, "a red circle")
    with pytest.raises(ValueError, match=r"captions\[1\] is empty"):
        predictor.predict(files["image"], ["a red circle", "  "])
    with pytest.raises(ValueError, match="at least one caption"):
        predictor.predict(files["image"], [])
    with pytest.raises(ValueError, match="caption has .* tokens"):
        predictor.predict(files["image"], "red " * 300)
    with pytest.raises(ValueError, match="threshold must be in"):
        predictor.predict(files["image"], "a red circle", threshold=1.5)
    with pytest.raises(FileNotFoundError, match="checkpoint .*does not exist"):
        Predictor.from_checkpoint(files["root"] / "missing.pth")
    with pytest.raises(ValueError, match="answer_vocab: the model has no QA heads"):
        Predictor(predictor.model, predictor.transforms, answer_vocab=["red"])


@pytest.mark.parametrize("argument, message", [("--threshold=1.5", "--threshold must be in"),
                                               ("--token-threshold=-1", "--token-threshold must be in"),
                                               ("--out=vis.jpg", "--out must name a .png file")])
def test_cli_bad_settings_fail_before_the_model_loads(files, capsys, monkeypatch, argument, message):
    monkeypatch.setattr(Predictor, "from_checkpoint", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", files["detector"], "--image", files["image"], "--caption", "a red circle", argument])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argument, message", [("--image", "image"), ("--checkpoint", "checkpoint")])
def test_cli_bad_paths_exit_with_a_message(files, tmp_path, capsys, argument, message):
    argv = {"--checkpoint": files["detector"], "--image": files["image"]}
    argv[argument] = str(tmp_path / "missing")
    with pytest.raises(SystemExit) as exit_info:
        main([*(x for kv in argv.items() for x in kv), "--caption", "a red circle"])
    assert exit_info.value.code == 2
    assert f"{message} '{tmp_path / 'missing'}' does not exist" in capsys.readouterr().err


def test_panel_grid_is_square_ish(files):
    result = {"boxes": torch.tensor([EXPECTED_BOX]), "scores": torch.tensor([0.9]), "labels": ["red circle"]}
    grid = draw_panels(files["image"], [result] * 5, ["a red circle"] * 5, min_side=100)
    assert grid.width > 3 * 100 * IMAGE_W / IMAGE_H and grid.height > 2 * 100  # 3 columns, 2 rows

import json

import pytest

from mdetr import config as C


def test_presets_resolve_and_differ():
    shapes = C.preset("shapes")
    r101 = C.preset("mdetr_resnet101")
    assert shapes.model.backbone == "tf_efficientnet_lite0"
    assert r101.model.backbone == "resnet101.tv_in1k" and r101.model.text_encoder == "roberta-base"
    assert C.preset("clevr").model.qa_dataset == "clevr"
    with pytest.raises(ValueError, match="preset must be one of"):
        C.preset("nope")


def test_shapes_pretraining_decays_its_lr_and_fine_tunes_keep_what_they_measured():
    """The pre-training preset's linear lr decay (steps 1000..2700) and doubled GIoU weight; the fine-tunes, whose
    README numbers were measured without them, keep MDETR's GIoU weight, a constant lr and fp32."""
    shapes = C.preset("shapes")
    assert (shapes.optim.lr_drop_step, shapes.optim.lr_ramp_steps, shapes.optim.lr_gamma) == (2700, 1700, 0.05)
    assert shapes.loss.giou == 4.0 and shapes.loss.cost_giou == 2.0
    for name in ("refexp", "grounding", "clevr"):
        tune = C.preset(name)
        assert (tune.optim.lr_drop_step, tune.optim.lr_ramp_steps, tune.loss.giou) == (0, 0, 2.0), name
        assert tune.train.precision == "fp32" and tune.optim.lr_drop == tune.optim.epochs, name


def test_overrides_are_typed():
    cfg = C.resolve("shapes", None, ["--model.d_model=128", "--train.fused=true", "--optim.lr=3e-4",
                                     "--model.qa_dataset=none", "--train.output_dir=/tmp/x"])
    assert cfg.model.d_model == 128 and isinstance(cfg.model.d_model, int)
    assert cfg.train.fused is True
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.model.qa_dataset is None
    assert cfg.train.output_dir == "/tmp/x"


@pytest.mark.parametrize("item, message", [
    ("--model.nope=1", "model has no field 'nope'"),
    ("--model.d_model=abc", "model.d_model expects int"),
    ("--train.fused=maybe", "expects a boolean"),
    ("--model=3", "is a section"),
    ("--model.d_model", "section.field=value"),
    ("--train.precision=fp64", "train.precision must be one of"),
    ("--train.eval_every=0", "train.eval_every must be >= 1"),
    ("--train.device=cuda:0", "train.device must be one of"),
    ("--model.token_head=dot", "model.token_head must be one of"),
    ("--train.keep_checkpoints=-1", "train.keep_checkpoints must be >= 0"),
    ("--data.augment=true", "train.cache_features needs a frozen backbone that encodes each image alone"),
    ("--model.train_backbone=true", "train.cache_features needs a frozen backbone"),
    ("--model.backbone_per_image=false", "model.backbone_per_image=true"),
    ("--model.spatial_attention=left", "model.spatial_attention must be one of"),
    ("--model.query_grid=0", None),  # fine alone; with the decoder's spatial attention, below
    ("--train.eval_task=qa", "train.eval_task='qa' needs a model with QA heads"),
    ("--model.qa_readout=boxes", "model.qa_readout must be one of"),
    ("--train.phrase_score=mean", r"train.phrase_score must be one of \('max', 'sum'\), got 'mean'"),
    ("--model.qa_readout=objects", "model.qa_readout='objects' .* needs model.qa_dataset='clevr', got None"),
])
def test_bad_overrides_name_the_key(item, message):
    if message is None:
        C.resolve("shapes", None, [item])
        with pytest.raises(ValueError, match=r"model.spatial_attention='both' needs anchor queries"):
            C.resolve("shapes", None, [item, "--model.num_queries=100", "--model.spatial_attention=both"])
        return
    with pytest.raises(ValueError, match=message):
        C.resolve("shapes", None, [item])


def test_object_readout_needs_a_positive_no_object_weight():
    assert C.resolve("clevr", None, ["--loss.eos_coef=1.0"]).loss.eos_coef == 1.0
    with pytest.raises(ValueError, match=r"model.qa_readout='objects' .* needs 0 < loss.eos_coef <= 1, got 0.0"):
        C.resolve("clevr", None, ["--loss.eos_coef=0.0"])
    assert C.resolve("shapes", None, ["--loss.eos_coef=0.0"]).loss.eos_coef == 0.0  # no readout: the loss alone


def test_file_then_overrides_and_round_trip(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"preset": "clevr", "optim": {"epochs": 3}, "data": {"batch_size": 4}}))
    cfg = C.resolve("shapes", str(path), ["--data.batch_size=6"])
    assert cfg.preset == "clevr" and cfg.optim.epochs == 3 and cfg.data.batch_size == 6
    C.save(cfg, tmp_path / "config.yaml")
    again = C.resolve("shapes", str(tmp_path / "config.yaml"), [])
    assert again == cfg
    assert C.from_dict(cfg.to_dict()) == cfg


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.yaml"):
        C.resolve("shapes", str(tmp_path / "nothere.yaml"), [])


def test_from_dict_gives_missing_fields_their_old_behaviour():
    tree = C.preset("shapes").to_dict()
    tree["model"].update(num_queries=20)
    del tree["model"]["query_grid"]  # a checkpoint saved before anchor queries existed
    cfg = C.from_dict(tree)
    assert cfg.model.query_grid == 0 and cfg.model.num_queries == 20 and cfg.preset == "shapes"


def test_differences_name_each_changed_field_of_the_run_sections():
    old = C.preset("clevr")
    tree = old.to_dict()
    del tree["model"]["qa_layer"]  # a checkpoint saved before model.qa_layer existed: it read the first layer
    saved = C.from_dict(tree)
    new = C.resolve("clevr", None, ["--loss.qa=2", "--train.resume=auto", "--data.aspect_groups=1"])
    assert C.differences(saved, new) == ["data.aspect_groups: 4 -> 1", "model.qa_layer: 0 -> -1", "loss.qa: 1.0 -> 2.0"]
    assert C.differences(old, old) == []


def test_aspect_groups_is_checked():
    with pytest.raises(ValueError, match="data.aspect_groups must be >= 1, got 0"):
        C.resolve("shapes", None, ["--data.aspect_groups=0"])


def test_module_names_in_the_shapes_presets_name_modules_of_their_models():
    """``train.load_skip`` names modules of the default's checkpoint, ``optim.clip_groups`` modules of the model that
    trains: a rename of either module would otherwise surface only when a fine-tune starts."""
    from mdetr.engine import gradient_clip_groups
    from mdetr.models import build_from_config

    small = ["--model.pretrained_backbone=false", "--model.d_model=32", "--model.dim_feedforward=32",
             "--model.enc_layers=1", "--model.dec_layers=1"]
    default = build_from_config(C.resolve("shapes", None, small).model)
    for name in ("refexp", "grounding", "clevr"):
        cfg = C.resolve(name, None, small)
        model = build_from_config(cfg.model)
        skipped = C.module_names(cfg.train.load_skip)
        for module in skipped:
            assert any(key.startswith(module + ".") for key in default.state_dict()), (name, module)
        # what the fine-tune loads, it has: the default's tensors that are not skipped
        kept = {key for key in default.state_dict() if not any(key.startswith(m + ".") for m in skipped)}
        assert kept <= set(model.state_dict()), (name, sorted(kept - set(model.state_dict()))[:4])
        groups = gradient_clip_groups(model, C.module_names(cfg.optim.clip_groups))
        assert len(groups) == len(C.module_names(cfg.optim.clip_groups)) + 1
    assert C.module_names(" a, b ,,") == ["a", "b"]

import os

import numpy as np
import pytest
import torch

from mdetr import checkpoint as ckpt


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    ckpt.atomic_save({"epoch": 1}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.atomic_save({"epoch": 2, "bad": Boom()}, path)
    assert torch.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]  # no temporary file left behind


def test_find_resume(tmp_path):
    assert ckpt.find_resume("", tmp_path) is None
    assert ckpt.find_resume("auto", tmp_path) is None
    for epoch in (2, 10):
        ckpt.atomic_save({"epoch": epoch}, tmp_path / f"checkpoint_epoch{epoch:04d}.pth")
    assert ckpt.find_resume("auto", tmp_path).name == "checkpoint_epoch0010.pth"
    ckpt.save_checkpoint(tmp_path, {"epoch": 11}, 11)
    assert ckpt.find_resume("auto", tmp_path).name == "checkpoint.pth"
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        ckpt.find_resume(str(tmp_path / "missing.pth"), tmp_path)


def test_epoch_checkpoints_are_pruned_to_keep(tmp_path):
    for epoch in range(4):
        ckpt.save_checkpoint(tmp_path, {"epoch": epoch}, epoch, keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint.pth", "checkpoint_epoch0002.pth", "checkpoint_epoch0003.pth"]  # no temp files
    assert torch.load(tmp_path / "checkpoint_epoch0002.pth")["epoch"] == 2
    ckpt.save_checkpoint(tmp_path, {"epoch": 4}, 4)  # keep=0: nothing deleted
    assert len(ckpt.epoch_checkpoints(tmp_path)) == 3
    # the epoch file is its own file: replacing checkpoint.pth later leaves it as it was
    ckpt.atomic_save({"epoch": 99}, tmp_path / "checkpoint.pth")
    assert torch.load(tmp_path / "checkpoint_epoch0004.pth")["epoch"] == 4
    # a fresh run in a folder with an older run's later epochs: those are not counted, nor deleted
    ckpt.save_checkpoint(tmp_path, {"epoch": 0}, 0, keep=1)
    assert [p.name for p in ckpt.epoch_checkpoints(tmp_path)] == [
        "checkpoint_epoch0000.pth", "checkpoint_epoch0002.pth", "checkpoint_epoch0003.pth", "checkpoint_epoch0004.pth"]
    with pytest.raises(ValueError, match="keep must be >= 0"):
        ckpt.save_checkpoint(tmp_path, {"epoch": 5}, 5, keep=-1)


def test_corrupt_checkpoint_is_named(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="broken.pth"):
        ckpt.load_checkpoint(bad)


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    a = torch.rand(3)
    ckpt.set_rng_state(state)
    assert torch.equal(torch.rand(3), a)


def test_load_weights_for_fine_tuning(tmp_path, capsys):
    from mdetr.checkpoint import load_weights
    from mdetr.models import build_mdetr

    tiny = dict(d_model=32, nheads=4, enc_layers=1, dec_layers=1, dim_feedforward=32, num_queries=4,
                pretrained_backbone=False, freeze_text_encoder=True)
    torch.manual_seed(0)
    source = build_mdetr(**tiny)
    torch.save({"model": source.state_dict(), "ema": None}, tmp_path / "pre.pth")
    target = build_mdetr(**tiny, qa_dataset="clevr")
    load_weights(target, tmp_path / "pre.pth")
    assert "answer_type_head.weight" in capsys.readouterr().out  # the new heads are named
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    with pytest.raises(ValueError, match="shapes that differ .*query_embed.weight"):
        load_weights(build_mdetr(**dict(tiny, num_queries=5)), tmp_path / "pre.pth")
    with pytest.raises(ValueError, match="tensors it lacks .*answer_attr_head"):
        torch.save({"model": target.state_dict()}, tmp_path / "qa.pth")
        load_weights(source, tmp_path / "qa.pth")


def test_load_weights_leaves_out_the_modules_named_in_skip(tmp_path, capsys):
    from mdetr.checkpoint import load_weights
    from mdetr.models import build_mdetr

    tiny = dict(d_model=32, nheads=4, enc_layers=1, dec_layers=1, dim_feedforward=32, num_queries=4,
                pretrained_backbone=False, freeze_text_encoder=True, token_head="similarity")
    torch.manual_seed(0)
    source = build_mdetr(**tiny, relation_head=True, appearance_head=True)
    torch.save({"model": source.state_dict(), "ema": None}, tmp_path / "pre.pth")
    target = build_mdetr(**tiny, qa_dataset="clevr")  # a QA fine-tune without the pre-training's heads
    with pytest.raises(ValueError, match="tensors it lacks .*head.*train.load_skip"):
        load_weights(target, tmp_path / "pre.pth")
    capsys.readouterr()
    load_weights(target, tmp_path / "pre.pth", skip=["relation_head", "appearance_head"])
    out = capsys.readouterr().out
    assert "relation_head." in out and "appearance_head." in out and "answer_type_head.weight" in out
    for key, value in target.state_dict().items():
        if key in source.state_dict():
            assert torch.equal(value, source.state_dict()[key]), key
    kept = build_mdetr(**tiny, relation_head=True, appearance_head=True)  # skipping a module the model has: fresh
    fresh = {key: value.clone() for key, value in kept.state_dict().items()}
    load_weights(kept, tmp_path / "pre.pth", skip=["relation_head"])
    for key, value in kept.state_dict().items():
        expected = fresh[key] if key.startswith("relation_head.") else source.state_dict()[key]
        assert torch.equal(value, expected), key
    with pytest.raises(ValueError, match="train.load_skip: 'relation_heads' matches no tensor"):
        load_weights(target, tmp_path / "pre.pth", skip=["relation_heads"])


def test_atomic_writes_get_the_mode_of_a_plain_open(tmp_path):
    previous = os.umask(0o022)
    try:
        ckpt.atomic_save({"x": torch.zeros(1)}, tmp_path / "a.pth")
        ckpt.atomic_write_text("a: 1\n", tmp_path / "config.yaml")
        (tmp_path / "plain").write_text("")
    finally:
        os.umask(previous)
    modes = {name: (tmp_path / name).stat().st_mode & 0o777 for name in ("a.pth", "config.yaml", "plain")}
    assert modes == {"a.pth": 0o644, "config.yaml": 0o644, "plain": 0o644}  # mkstemp alone gives 0600


class NotPlainData:  # a pickled object that torch.load(weights_only=True) refuses
    pass


def test_checkpoints_unpickle_plain_data_only_unless_trusted(tmp_path):
    state = {"model": {"w": torch.zeros(1)}, "rng": ckpt.rng_state(), "extra": NotPlainData()}
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(RuntimeError, match=r"(?s)odd.pth' could not be read: .*load it trusted \(mdetr.evaluate / mdetr.predict --trusted, "
                       r"train.trusted_checkpoints=true, trusted=True in Python\)"):
        ckpt.load_checkpoint(tmp_path / "odd.pth")
    assert isinstance(ckpt.load_checkpoint(tmp_path / "odd.pth", trusted=True)["extra"], NotPlainData)
    del state["extra"]  # our own checkpoints: tensors, RNG states (NumPy arrays, tuples) and plain data
    torch.save(state, tmp_path / "ours.pth")
    assert set(ckpt.load_checkpoint(tmp_path / "ours.pth")) == {"model", "rng"}


@pytest.mark.parametrize("written_by", ["numpy.core", "numpy._core"])
def test_checkpoints_of_either_numpy_major_load(tmp_path, written_by):
    # NumPy 1.x pickles arrays through numpy.core.multiarray._reconstruct, NumPy 2.x through numpy._core...
    import zipfile

    state = ckpt.rng_state()
    torch.save({"rng": state, "metric": np.float64(0.5)}, tmp_path / "saved.pth")
    now = np.zeros(1).__reduce__()[0].__module__.rsplit(".", 1)[0]  # this NumPy's "numpy._core" or "numpy.core"
    with zipfile.ZipFile(tmp_path / "saved.pth") as src, zipfile.ZipFile(tmp_path / "other.pth", "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("data.pkl"):
                data = data.replace(f"{now}.multiarray".encode(), f"{written_by}.multiarray".encode())
                assert f"{written_by}.multiarray".encode() in data
            dst.writestr(item, data)
    loaded = ckpt.load_checkpoint(tmp_path / "other.pth")
    assert loaded["metric"] == 0.5 and np.array_equal(loaded["rng"]["numpy"][1], state["numpy"][1])


def test_load_model_reads_no_pretrained_weights(tmp_path, monkeypatch):
    # a run trained where its backbone's ImageNet weights were cached must load where they are not
    from mdetr import config as C
    from mdetr.models import backbone as backbone_mod
    from mdetr.models import build_from_config
    from mdetr.models import text as text_mod

    cfg = C.resolve("shapes", None, ["--model.d_model=32", "--model.nheads=4", "--model.enc_layers=1",
                                     "--model.dec_layers=1", "--model.dim_feedforward=32"])
    assert cfg.model.pretrained_backbone
    torch.manual_seed(0)
    model = build_from_config(cfg.model)
    torch.save({"model": model.state_dict(), "ema": None, "config": cfg.to_dict()}, tmp_path / "run.pth")

    def unavailable(*args, **kwargs):
        raise FileNotFoundError("no pretrained weights on this machine")

    monkeypatch.setattr(backbone_mod, "_load_pretrained", unavailable)  # the backbone's ImageNet weights
    monkeypatch.setattr(text_mod.AutoModel, "from_pretrained", unavailable)  # the text encoder's weights
    with pytest.raises(FileNotFoundError):
        build_from_config(cfg.model)  # the patches bite
    loaded, loaded_cfg = ckpt.load_model(tmp_path / "run.pth")
    assert loaded_cfg == cfg and loaded.loaded_weights == "model" and not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

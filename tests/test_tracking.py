"""metrics.jsonl after a resume: each step logged once."""
from mdetr.tracking import RunLog


def test_resume_drops_records_written_after_the_checkpoint(tmp_path):
    log = RunLog(tmp_path, tensorboard=False)
    for step in range(1, 7):
        log.log("train", {"step": step, "loss": 1.0 / step})
        if step == 4:
            log.log("val", {"step": 4, "epoch": 0, "precision@1": 0.5})
    log.close()
    # the process died at step 6; the checkpoint it left was written at step 4
    resumed = RunLog(tmp_path, tensorboard=False, resume_step=4)
    assert [(r["kind"], r["step"]) for r in resumed.records()] == [
        ("train", 1), ("train", 2), ("train", 3), ("train", 4), ("val", 4)]
    resumed.log("train", {"step": 5, "loss": 0.2})
    assert [r["step"] for r in resumed.records("train")] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left


def test_resume_without_a_log_starts_one(tmp_path):
    log = RunLog(tmp_path / "new", tensorboard=True, resume_step=10)
    log.log("train", {"step": 11, "loss": 1.0})
    log.close()
    assert [r["step"] for r in log.records()] == [11]


def test_a_fresh_run_in_a_used_folder_keeps_the_old_log_aside(tmp_path):
    old = RunLog(tmp_path, tensorboard=False)
    old.log("train", {"step": 1, "loss": 3.0})
    fresh = RunLog(tmp_path, tensorboard=False)
    assert fresh.records() == []
    fresh.log("train", {"step": 1, "loss": 2.0})
    assert [r["loss"] for r in fresh.records()] == [2.0]
    assert "3.0" in (tmp_path / "metrics.previous.jsonl").read_text()

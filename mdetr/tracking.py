"""Run logging on rank 0: ``metrics.jsonl`` (one JSON object per line), TensorBoard scalars and a PNG of the loss
and validation curves (``curves.png``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional


class RunLog:
    """``resume_step``: the step of the checkpoint a resumed run starts from. Records a previous process wrote after
    it (training it did past its last checkpoint, which the resumed run repeats) are dropped from metrics.jsonl and
    purged from TensorBoard, so each step is logged once. Without it (a fresh run), an existing metrics.jsonl is
    an earlier run's: it is renamed ``metrics.previous.jsonl`` and the new run's log starts empty."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 resume_step: Optional[int] = None):
        self.enabled = enabled
        self.dir = Path(output_dir)
        self.path = self.dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._drop_after(resume_step)
        elif self.path.exists():  # a fresh run in a used folder: its log starts empty, the old one is kept aside
            previous = self.dir / "metrics.previous.jsonl"
            self.path.replace(previous)
            print(f"{self.path} held an earlier run's records: moved to {previous.name}")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the events at or after it that earlier writers left
            self.writer = SummaryWriter(str(self.dir / "tensorboard"),
                                        purge_step=None if resume_step is None else resume_step + 1)

    def _drop_after(self, step: int) -> None:
        """Keep the records up to ``step`` (a validation record of that step included); rewritten atomically."""
        kept = [r for r in self.records() if int(r.get("step", 0)) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)

    def log(self, kind: str, record: Dict[str, float]) -> None:
        """``kind`` is "train" (per logging interval), "val" (per validation) or "epoch" (an epoch's mean training
        loss, at its end)."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"kind": kind, **record}) + "\n")
        if self.writer is not None:
            step = int(record.get("step", 0))
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)
            self.writer.flush()

    def records(self, kind: Optional[str] = None) -> List[Dict[str, float]]:
        if not self.path.exists():
            return []
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        return [r for r in rows if kind is None or r["kind"] == kind]

    def plot(self) -> Optional[Path]:
        """Loss (left) and the validation metrics (right, one point per validation) per optimizer step, to
        ``curves.png``."""
        if not self.enabled:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train, val = self.records("train"), self.records("val")
        fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.6), sharex=True)
        if train:
            ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
        ax_loss.set(xlabel="optimizer step", ylabel="total loss", title="training loss", yscale="log")
        if val:
            # precision@k (refexp), any/merged_box_recall@k (grounding), qa_accuracy; not the per-type accuracies
            for key in [k for k in val[-1] if ("@" in k or k.startswith("qa_accuracy")) and "type" not in k]:
                ax_val.plot([r["step"] for r in val], [r.get(key, float("nan")) for r in val], marker="o",
                            label=key)
            ax_val.legend(fontsize="small")
        ax_val.set(xlabel="optimizer step", ylabel="val", title="validation", ylim=(0, 1))
        fig.tight_layout()
        out = self.dir / "curves.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return out

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

"""``metrics.jsonl`` (and TensorBoard scalars where installed): one record per log interval and stage."""

from __future__ import annotations

import json
import time
from pathlib import Path

from effnetv2.pipeline.format import atomic


class MetricsLog:
    """JSON lines in ``out/metrics.jsonl`` (and TensorBoard scalars if tensorboard is installed). A resumed
    run first drops the records of steps after its checkpoint, so that the file tells one history."""

    def __init__(self, out: Path, main: bool, tensorboard: bool, keep_until: int | None = None) -> None:
        path = out / "metrics.jsonl"
        if main and keep_until is not None and path.is_file():  # resumed: drop what the checkpoint lost
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            atomic.write_text(path, "".join(x for x in lines if x.strip() and json.loads(x)["step"] <= keep_until))
        self.file = open(path, "a", encoding="utf-8") if main else None
        self.tb = None
        if main and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except ImportError:
                pass

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, float) and k != "step":
                    self.tb.add_scalar(f"{record['event']}/{k}", v, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()

"""The record of a training run: metrics.csv (one row per epoch, rewritten atomically), TensorBoard scalars when
TensorBoard is installed, and the metrics line printed after each epoch."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from cryopick.fsutil import write_text_atomic
from cryopick.progress import console

METRIC_COLUMNS = [
    "epoch", "step", "lr", "loss", "pu_loss", "loss_pos", "loss_neg", "defit_rate", "consistency_loss",
    "entropy_loss", "lambda_cons", "lambda_ent", "mask_rate", "pseudo_positive_rate", "samples_per_s",
    "val_auc_pu", "val_auc_pn", "val_precision", "val_recall", "val_f1",
    "val_true_auc", "val_true_precision", "val_true_recall", "val_true_f1", "prior",
    "val_n_positive", "val_n_unlabeled", "val_est_precision", "val_recall90_score", "val_patch_f1_threshold",
    "val_patch_f1", "val_n_peaks", "val_auc_pu_se", "val_auc_pn_se",
]


class MetricsLog:
    """metrics.csv (rewritten atomically each epoch), TensorBoard when installed, a rich line per epoch."""

    def __init__(self, exp_dir: Path, history: list[dict], quiet: bool, enabled: bool):
        self.path, self.history, self.quiet, self.enabled = exp_dir / "metrics.csv", history, quiet, enabled
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(exp_dir / "tensorboard"))
            except Exception:  # tensorboard is optional
                self.tb = None

    def log(self, row: dict) -> None:
        self.history.append(row)
        if not self.enabled:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in self.history:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
        write_text_atomic(self.path, buf.getvalue())
        if self.tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    group = "val" if key.startswith("val_") else "train"
                    self.tb.add_scalar(f"{group}/{key.removeprefix('val_')}", value, row["epoch"])
            self.tb.flush()
        if not self.quiet:
            keys = ["loss", "loss_pos", "loss_neg", "consistency_loss", "mask_rate", "pseudo_positive_rate",
                    "val_auc_pu", "val_auc_pn", "val_f1", "val_true_auc", "val_true_f1", "samples_per_s"]
            text = "  ".join(f"{k}={row[k]:.4g}" for k in keys if isinstance(row.get(k), float))
            console.print(f"  metrics: {text}", highlight=False)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

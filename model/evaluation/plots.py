"""Training curves of a run: the HF Trainer's `trainer_state.json` (of the run or its latest checkpoint)
plotted as PNGs (`eval_model.py report`)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from model.training.outputs import latest_checkpoint
from utils.errors import UserError
from utils.io import write_bytes_atomic


def find_trainer_state(run_dir: str | Path) -> Path:
    """`trainer_state.json` of a run: in `run_dir` itself, else in its latest `checkpoint-N` (also one
    level down, e.g. DPO's `adapter/` directory)."""
    root = Path(run_dir)
    if not root.is_dir():
        raise UserError("the run directory does not exist", path=str(root), field="run_dir",
                        fix="pass the --output_dir of a training stage (e.g. model_save/sft)")
    if (root / "trainer_state.json").is_file():
        return root / "trainer_state.json"
    candidates = [c for c in [latest_checkpoint(root)] + [latest_checkpoint(d) for d in sorted(root.iterdir())
                                                          if d.is_dir()] if c and (c / "trainer_state.json").is_file()]
    if not candidates:
        raise UserError("no trainer_state.json in the run directory or its checkpoints", path=str(root),
                        field="run_dir", fix="pass a training output directory that holds checkpoint-N "
                                             "directories (keep --save_strategy on)")
    return max(candidates, key=lambda c: int(c.name.rsplit("-", 1)[1]))  / "trainer_state.json"


def plot_training(state_file: str | Path, output_dir: str | Path) -> list[Path]:
    """PNG plots of a run's `log_history`: loss.png (training loss and every eval_*loss), learning_rate.png,
    and, when logged, bpc.png (eval bits per character) and rewards.png (DPO rewards). Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    state_file, output_dir = Path(state_file), Path(output_dir)
    try:
        history = json.loads(state_file.read_text(encoding="utf-8"))["log_history"]
    except (json.JSONDecodeError, KeyError) as err:
        raise UserError(f"not a trainer state file ({err})", path=str(state_file),
                        fix="pass a run directory written by the HF Trainer") from None

    def series(key):
        points = [(h["step"], h[key]) for h in history if key in h and isinstance(h[key], (int, float))
                  and math.isfinite(h[key])]
        return [p[0] for p in points], [p[1] for p in points]

    keys = sorted({k for h in history for k in h})
    groups = {"loss": ["loss"] + [k for k in keys if k.startswith("eval_") and k.endswith("loss")],
              "learning_rate": ["learning_rate"],
              "bpc": [k for k in keys if k.endswith("bpc")],
              "rewards": [k for k in keys if k.startswith("rewards/") and not k.startswith("eval_")]}
    run = state_file.parent
    run_name = f"{run.parent.name}/{run.name}" if run.name.startswith("checkpoint-") else run.name
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, names in groups.items():
        curves = [(k, *series(k)) for k in names]
        curves = [c for c in curves if c[1]]
        if not curves:
            continue
        figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
        for key, steps, values in curves:
            axes.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
        axes.set_xlabel("step")
        axes.set_ylabel(name.replace("_", " "))
        axes.set_title(f"{name.replace('_', ' ')} - {run_name}")
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        image = io.BytesIO()
        try:
            figure.savefig(image, format="png")
        finally:
            plt.close(figure)
        target = output_dir / f"{name}.png"
        write_bytes_atomic(target, image.getvalue())
        written.append(target)
    if not written:
        raise UserError("the trainer state holds no loss or learning rate values", path=str(state_file),
                        fix="train for at least --logging_steps steps before plotting")
    return written

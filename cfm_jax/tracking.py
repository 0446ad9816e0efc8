"""Experiment tracking beside metrics.jsonl: TensorBoard event files in WORKDIR/tensorboard (every
run; tensorboardX, no TensorFlow) and, with `train.wandb=PROJECT` and the `wandb` package installed,
Weights & Biases (`WANDB_MODE=offline` works as W&B documents). Each logged row's numbers become
scalars at its step: train/loss, train/lr, train/tokens_per_s, the activation and balance statistics
(ffn/..., mixer/...), and the validation metrics (eval/SET/...); the config is logged once as text. A resumed run appends to new event files; rows past the last
checkpoint that a crash left behind are truncated from metrics.jsonl but stay in the older event
files (TensorBoard then shows those steps twice)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cfm_jax.errors import one_line

TENSORBOARD = "tensorboard"  # the event files' folder inside a workdir


def scalar_name(key: str) -> str:
    """metrics.jsonl key -> tag: training values under train/, statistics and eval/ keys as they are."""
    return key if "/" in key else f"train/{key}"


class Trackers:
    def __init__(self, workdir: Path, config: dict, wandb_project: str = "", tensorboard: bool = True):
        self.tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(logdir=str(Path(workdir) / TENSORBOARD), flush_secs=30)
            self.tb.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)
        self.wandb = None
        self._last = None  # (step, seconds) of the previous row, for tokens/s
        if wandb_project:
            try:
                import wandb
            except ImportError:
                print(f"warning: train.wandb={wandb_project!r} but the wandb package is not installed; "
                      "logging to TensorBoard and metrics.jsonl only", file=sys.stderr)
            else:
                try:
                    self.wandb = wandb.init(project=wandb_project, dir=str(workdir), config=config, name=Path(workdir).name,
                                            id=Path(workdir).resolve().as_posix().replace("/", "_")[-64:], resume="allow")
                except Exception as e:  # noqa: BLE001 - not logged in, no network: training goes on
                    print(f"warning: train.wandb={wandb_project!r}: W&B did not start ({one_line(e)}); "
                          "logging to TensorBoard and metrics.jsonl only",
                          file=sys.stderr)

    def log(self, row: dict, tokens_per_step: int) -> None:
        step = int(row["step"])
        values = {scalar_name(k): float(v) for k, v in row.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._last is not None and row.get("seconds", 0) > self._last[1] and step > self._last[0]:
            values["train/tokens_per_s"] = (step - self._last[0]) * tokens_per_step / (row["seconds"] - self._last[1])
        self._last = (step, row.get("seconds", 0))
        if self.tb is not None:
            for tag, value in values.items():
                self.tb.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_events(directory: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, str]]:
    """The scalars ({tag: [(step, value), ...]}) and texts ({tag: text}) of the TensorBoard event files
    in `directory`, read with tensorboardX's protobufs (no TensorFlow or tensorboard needed)."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    texts: dict[str, str] = {}
    for path in sorted(Path(directory).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
                elif value.HasField("tensor") and value.tensor.string_val:
                    texts[value.tag.split("/")[0]] = value.tensor.string_val[0].decode()
    return scalars, texts

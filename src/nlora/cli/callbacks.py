"""Trainer callbacks: a metrics JSONL log and a Ctrl-C that checkpoints before it stops."""

from __future__ import annotations

import json
import resource
import signal
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback


def peak_memory_mb() -> float:
    """Peak accelerator memory if there is one, else the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class MetricsLogger(TrainerCallback):
    """Append one JSON line per logging step: loss, lr, grad norm, tokens/s, step seconds, peak memory."""

    def __init__(self, path: Path, resume_step: int = 0, writer: bool = True):
        self.path = path
        self.step_started = None
        self.step_seconds: list[float] = []
        self.last_time, self.last_tokens = None, 0
        if writer and path.exists():  # after --resume, drop lines past the checkpoint we continue from
            kept = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.step_started is not None:
            self.step_seconds.append(time.perf_counter() - self.step_started)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now, tokens = time.perf_counter(), state.num_input_tokens_seen or 0
        record = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
        if "train_loss" in record:  # the Trainer's end-of-training record holds the mean over the run
            record["train_loss_mean"] = record.pop("train_loss")
        if "loss" in record:  # throughput belongs to training steps, not to evaluations or the end record
            if self.last_time is not None and now > self.last_time:
                record["tokens_per_s"] = (tokens - self.last_tokens) / (now - self.last_time)
            if self.step_seconds:
                record["step_seconds"] = self.step_seconds[-1]
            self.last_time, self.last_tokens = now, tokens
        record["peak_memory_mb"] = peak_memory_mb()
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


class GracefulInterrupt(TrainerCallback):
    """On Ctrl-C (SIGINT) or SIGTERM, finish the current step, save a checkpoint and stop."""

    def __init__(self):
        self.requested = False
        self.finishing = False  # training is done: a Ctrl-C now lets the final evaluation and save complete
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        if self.finishing:
            print("\nnlora: interrupt received; training is done, finishing the final evaluation and saving the "
                  "adapter (Ctrl-C again to abort) ...", file=sys.stderr)  # fmt: skip
        else:
            print("\nnlora: interrupt received, saving a checkpoint after this step ...", file=sys.stderr)

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True

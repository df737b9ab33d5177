"""A loss study: train a small policy with two objective mixes and watch what each loss term does to the gradient.

Trains ``TinyPolicy`` on the built-in learnable synthetic data (every frame's colour names its action) twice, with
behaviour cloning alone and with BC plus an entropy bonus, from the same initial weights on the same batches.
Every ``--every`` steps it runs one diagnostics pass (:func:`mstudio.research.diagnose`) over BC's camera term,
BC's button term and the entropy bonus, and logs to TensorBoard, per mix:

- ``train/loss``, ``train/camera_loss``, ``train/button_loss``, ``train/entropy``;
- ``research/grad_norm/<term>``: how strongly each term pulls;
- ``research/grad_cosine/<a>__<b>``: whether two terms pull the same way (1), apart (0) or against each other (-1);
- ``research/noise_scale``: the gradient noise scale of BC from per-sample gradients (the batch size beyond which
  larger batches stop paying off).

    python examples/loss_study.py --out runs/loss_study          # ~2 minutes on a laptop CPU
    tensorboard --logdir runs/loss_study

It ends with a table of the diagnostics averaged over the run.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

import losses
import mstudio
from mstudio.data import EpisodeStore, RandomWindows, make_loader
from mstudio.data.synthetic import fill_store
from mstudio.models import TinyPolicy
from mstudio.research import diagnose, gradient_noise_scale, per_sample_gradients, term
from mstudio.trainer.tensorboard import MetricWriter

TERMS = {
    "camera": term(losses.behavior_clone, "camera_loss"),
    "buttons": term(losses.behavior_clone, "button_loss"),
    "entropy": losses.entropy_bonus,
}


def mixes(entropy_weight: float) -> dict[str, losses.Objective]:
    """The two objectives compared: BC alone, and BC plus a weighted entropy bonus."""
    return {"bc": losses.behavior_clone,
            "bc_entropy": losses.combine(losses.behavior_clone, losses.weighted(losses.entropy_bonus, entropy_weight))}


def study(name: str, objective: losses.Objective, batches: list[dict], args: argparse.Namespace) -> dict[str, list]:
    """Train one mix, logging the step's metrics and every ``args.every`` steps the diagnostics; returns the latter."""
    torch.manual_seed(args.seed)  # the same initial weights for every mix
    policy = TinyPolicy(hidsize=64, image_size=args.image)
    optimizer = mstudio.optim.adamw(args.lr, clip_norm=1.0)
    step = mstudio.make_train_step(policy, objective, optimizer, compile=args.compile)
    state = mstudio.init_state(policy, optimizer, args.batch, objective=objective)
    writer = MetricWriter(Path(args.out) / name)
    history: dict[str, list] = {}
    for i, batch in enumerate(batches):
        if i % args.every == 0:
            report = {key: float(value) for key, value in diagnose(policy, TERMS, state, batch).items()}
            per_sample = per_sample_gradients(policy, losses.behavior_clone, state, batch, chunk_size=4)
            report["noise_scale"] = float(gradient_noise_scale(per_sample)["noise_scale"])
            writer.scalars("research", report, i)
            for key, value in report.items():
                history.setdefault(key, []).append(value)
        state, metrics = step(state, batch)
        if i % 10 == 0 or i == len(batches) - 1:
            writer.scalars("train", {key: float(metrics[key]) for key in
                                     ("loss", "camera_loss", "button_loss", "entropy")}, i)
    history["final_bc_loss"] = [float(metrics["camera_loss"] + metrics["button_loss"])]
    history["final_entropy"] = [float(metrics["entropy"])]
    writer.close()
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/loss_study", help="TensorBoard run directory (one folder per mix)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=20, help="steps between diagnostics passes")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--entropy-weight", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="compile the train step (the diagnostics stay eager)")
    args = parser.parse_args()

    data = Path(args.out) / "data"
    store = EpisodeStore.open(data) if (data / "manifest.json").exists() else None
    if store is None:
        store = EpisodeStore.create(data, (args.image, args.image))
        fill_store(store, episodes=16, frames=(120, 240), seed=args.seed, vocabulary=16)
    loader = make_loader(store, args.window, RandomWindows(args.batch, seed=args.seed))
    batches: list[dict] = []
    while len(batches) < args.steps:  # the same batches, in the same order, for every mix
        batches += list(loader)
    batches = batches[: args.steps]

    results = {name: study(name, objective, batches, args) for name, objective in mixes(args.entropy_weight).items()}
    keys = ["grad_cosine/camera__buttons", "grad_cosine/camera__entropy", "grad_cosine/buttons__entropy",
            "grad_norm/camera", "grad_norm/buttons", "grad_norm/entropy", "noise_scale", "final_bc_loss",
            "final_entropy"]
    print(f"\nmean over {args.steps // args.every} diagnostics passes ({args.steps} steps; TensorBoard: {args.out})")
    print("| " + " | ".join(["metric", *results]) + " |")
    print("| --- " * (len(results) + 1) + "|")
    for key in keys:
        cells = [f"{statistics.fmean(v for v in results[name][key] if v != float('inf')):.3g}" for name in results]
        print(f"| {key} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

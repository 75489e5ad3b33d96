"""Stage 2: train the DeViSE head (features -> word space) on cached features with Ray Train."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch
from ray.train import Checkpoint, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from services.encoder.head import Head

log = logging.getLogger(__name__)

HIDDEN = 2000
# Ray Train's controller looks at its workers every 2 s by default, and each step of a fit (workers up,
# running, finished) waits for the next look: at 0.2 s a fit's time beyond its epochs went from 16.6 to 12.2 s
# (one measurement, bench/findings.md).
# Set in the environment to choose another.
HEALTH_CHECK_SECONDS = "0.2"


@dataclass(frozen=True)
class HeadConfig:
    epochs: int = 25
    # stop once validation hit@1 has not improved for this many epochs (0: never); the best epoch's weights
    # are kept either way. 6 was chosen on validation curves: the smallest that changed no head's best epoch
    # (python -m bench.patience, BENCHMARKS.md).
    patience: int = 6
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    dropout: float = 0.3
    # "cosine-softmax": 1 - cos(output, label) plus softmax_weight x cross-entropy over the cosines to all
    # label words / temperature (the default: best on validation of cifar10, flat and tag hit@1);
    # "cosine" (the tutorial's); "hinge": the DeViSE rank loss over the label words (it ranks labels
    # well but lands far from their words, so tags suffer); "softmax": the baseline classifier.
    loss: str = "cosine-softmax"
    margin: float = 0.1
    temperature: float = 0.1
    softmax_weight: float = 0.1
    seed: int = 0
    workers: int = 1


def build_module(input_dimension: int, output_dimension: int, dropout: float) -> torch.nn.Module:
    """The DeViSE recipe: dense 2000 -> BatchNorm/ReLU/Dropout -> dense D."""
    return torch.nn.Sequential(
        torch.nn.Linear(input_dimension, HIDDEN),
        torch.nn.BatchNorm1d(HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Dropout(dropout),
        torch.nn.Linear(HIDDEN, output_dimension),
    )


def fold(module: torch.nn.Module) -> Head:
    """Fold BatchNorm (eval statistics) into the first dense layer: a numpy Head."""
    dense1, norm, _, _, dense2 = module
    scale = (norm.weight / torch.sqrt(norm.running_var + norm.eps)).detach()
    w1 = (dense1.weight.detach().T * scale).numpy()
    b1 = ((dense1.bias.detach() - norm.running_mean) * scale + norm.bias.detach()).numpy()
    return Head(w1.astype(np.float32), b1.astype(np.float32),
                dense2.weight.detach().T.numpy().astype(np.float32), dense2.bias.detach().numpy().astype(np.float32))


def head_loss(outputs, labels, label_vectors, kind: str, margin: float, temperature: float = 0.1,
              softmax_weight: float = 0.1):
    """The training loss of `kind` (HeadConfig.loss) of a batch of head outputs against their labels' vectors."""
    if kind == "softmax":  # the baseline classifier: outputs are logits over the labels (label_vectors = I)
        return torch.nn.functional.cross_entropy(outputs, labels)
    outputs = torch.nn.functional.normalize(outputs, dim=1)
    if kind == "cosine":
        return (1 - (outputs * label_vectors[labels]).sum(1)).mean()
    if kind == "cosine-softmax":
        cosine = (1 - (outputs * label_vectors[labels]).sum(1)).mean()
        return cosine + softmax_weight * torch.nn.functional.cross_entropy(outputs @ label_vectors.T / temperature, labels)
    scores = outputs @ label_vectors.T
    true = scores.gather(1, labels[:, None])
    violations = torch.clamp(margin - true + scores, min=0)
    violations.scatter_(1, labels[:, None], 0.0)
    return violations.sum(1).mean()


@dataclass(frozen=True)
class HeadJob:
    """One head to train on rows of a shared feature matrix: `labels` (N,) are rows of `label_vectors`."""

    labels: np.ndarray
    label_vectors: np.ndarray
    train_rows: np.ndarray
    val_rows: np.ndarray
    config: HeadConfig
    name: str = "head"


def _train_loop(config: dict) -> None:
    """Runs on each Ray Train worker: every job's head in turn; rank 0 alone writes the checkpoint."""
    import ray.train

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    data = ray.get(config["data_ref"])
    results = [_train_one(job, data["features"], rank, world) for job in data["jobs"]]
    metrics = {"jobs": [job_metrics for _, job_metrics in results]}
    if rank == 0:
        with tempfile.TemporaryDirectory() as directory:
            for number, (state, _) in enumerate(results):
                torch.save(state, Path(directory) / f"head-{number}.pt")
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))
    else:
        ray.train.report(metrics)


def patience_ran_out(epoch: int, best_epoch: int, patience: int) -> bool:
    """Whether training stops after `epoch` (1-based): `patience` epochs since the best one (0: never)."""
    return patience > 0 and epoch - best_epoch >= patience


def _train_one(job: dict, features: np.ndarray, rank: int, world: int) -> tuple[dict, dict]:
    """One head's epochs on this worker's share of its training rows: (best state, its metrics)."""
    import ray.train.torch

    config = job["config"]
    torch.manual_seed(config["seed"])
    train_rows = job["train_rows"][rank::world]
    train_x = torch.from_numpy(features[train_rows].astype(np.float32))
    train_y = torch.from_numpy(job["labels"][train_rows].astype(np.int64))
    val_x = torch.from_numpy(features[job["val_rows"]].astype(np.float32))
    val_y = torch.from_numpy(job["labels"][job["val_rows"]].astype(np.int64))
    label_vectors = torch.from_numpy(job["label_vectors"].astype(np.float32))
    module = build_module(train_x.shape[1], label_vectors.shape[1], config["dropout"])
    model = ray.train.torch.prepare_model(module)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["learning_rate"], weight_decay=config["weight_decay"])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config["learning_rate"], total_steps=config["epochs"] * max(1, -(-len(train_x) // config["batch_size"]))
    )
    best, history = (-1.0, None, 0), []
    generator = torch.Generator().manual_seed(config["seed"] + rank)
    for epoch in range(config["epochs"]):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        total = 0.0
        for start in range(0, len(order), config["batch_size"]):
            rows = order[start:start + config["batch_size"]]
            if len(rows) < 2:
                continue
            loss = head_loss(model(train_x[rows]), train_y[rows], label_vectors, config["loss"], config["margin"],
                         config["temperature"], config["softmax_weight"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(rows)
        module.eval()
        with torch.no_grad():
            predicted = (torch.nn.functional.normalize(module(val_x), dim=1) @ label_vectors.T).argmax(1)
            val_hit1 = float((predicted == val_y).float().mean()) if len(val_y) else 0.0
        if val_hit1 > best[0] or not len(val_y):  # without a validation split, the last epoch's weights
            best = (val_hit1, {k: v.clone() for k, v in module.state_dict().items()}, epoch + 1)
        history.append({"epoch": epoch + 1, "loss": total / len(order), "val_hit1": val_hit1,
                        "seconds": time.perf_counter() - started})
        if len(val_y) and patience_ran_out(epoch + 1, best[2], config["patience"]):
            break
    return best[1], {"best_val_hit1": best[0], "best_epoch": best[2], "history": history}


@dataclass
class TrainedHead:
    head: Head
    val_hit1: float
    best_epoch: int
    seconds: float
    history: list[float]  # validation hit@1 after each epoch trained (fewer than configured when patience stopped it)


def split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified validation split: row numbers of (train, validation)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        n_val = int(round(len(rows) * fraction)) if len(rows) > 1 else 0
        val.extend(rows[:n_val])
        train.extend(rows[n_val:])
    return np.sort(np.asarray(train, dtype=int)), np.sort(np.asarray(val, dtype=int))


def train_head(features: np.ndarray, labels: np.ndarray, label_vectors: np.ndarray, train_rows: np.ndarray,
               val_rows: np.ndarray, config: HeadConfig, storage: Path) -> TrainedHead:
    """features (N, F), labels (N,) as rows of label_vectors (L, D, unit) -> a trained Head."""
    return train_heads(features, [HeadJob(labels, label_vectors, train_rows, val_rows, config)], storage)[0]


def worker_cpus(workers: int) -> int:
    """CPUs for each of `workers` training workers: an equal share of the largest node's (torch uses as many
    threads as its worker has CPUs; Ray gives a worker of one CPU one thread)."""
    largest = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=1)
    return max(1, int(largest) // workers)


def train_heads(features: np.ndarray, jobs: list[HeadJob], storage: Path) -> list[TrainedHead]:
    """Every job's head in one Ray Train run (one worker group, the features sent once), in turn."""
    started = time.perf_counter()
    data = {"features": features.astype(np.float32),
            "jobs": [{"labels": job.labels, "label_vectors": job.label_vectors, "train_rows": job.train_rows,
                      "val_rows": job.val_rows, "config": job.config.__dict__} for job in jobs]}
    for job in jobs:
        log.info("training the %s with Ray Train: %d epochs on %d images (%d for validation)",
                 job.name, job.config.epochs, len(job.train_rows), len(job.val_rows))
    storage.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_SECONDS)  # the controller reads ours
    workers = jobs[0].config.workers
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"data_ref": ray.put(data)},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": worker_cpus(workers)}),
        run_config=RunConfig(storage_path=str(storage.resolve()), name=f"head-{int(time.time())}"),
    )
    result = trainer.fit()
    seconds = time.perf_counter() - started  # of the whole run, which every job shared
    with result.checkpoint.as_directory() as directory:
        return [_trained(job, metrics, Path(directory) / f"head-{number}.pt", features.shape[1], seconds)
                for number, (job, metrics) in enumerate(zip(jobs, result.metrics["jobs"]))]


def _trained(job: HeadJob, metrics: dict, state: Path, input_dimension: int, seconds: float) -> TrainedHead:
    module = build_module(input_dimension, job.label_vectors.shape[1], job.config.dropout)
    module.load_state_dict(torch.load(state, weights_only=True))
    module.eval()
    for epoch in metrics["history"]:
        log.info("%s epoch %d/%d: loss %.4f, validation hit@1 %.3f (%.1f s)", job.name, epoch["epoch"],
                 job.config.epochs, epoch["loss"], epoch["val_hit1"], epoch["seconds"])
    stopped = len(metrics["history"])
    log.info("%s trained: best validation hit@1 %.3f at epoch %d%s", job.name, metrics["best_val_hit1"],
             metrics["best_epoch"], f" (stopped after {stopped}: no better for {job.config.patience})"
             if stopped < job.config.epochs else "")
    return TrainedHead(fold(module), float(metrics["best_val_hit1"]), int(metrics["best_epoch"]), seconds,
                       [epoch["val_hit1"] for epoch in metrics["history"]])

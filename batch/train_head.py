"""Stage 2: train the DeViSE head (features -> word space) on cached features with Ray Train."""

from __future__ import annotations

import logging
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


@dataclass(frozen=True)
class HeadConfig:
    epochs: int = 25
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


def _train_loop(config: dict) -> None:
    """Runs on each Ray Train worker; rank 0 alone writes the checkpoint."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config["seed"])
    data = ray.get(config["data_ref"])
    train_x = torch.from_numpy(data["train_x"][rank::world].copy())
    train_y = torch.from_numpy(data["train_y"][rank::world].copy())
    val_x, val_y = torch.from_numpy(data["val_x"].copy()), torch.from_numpy(data["val_y"].copy())
    label_vectors = torch.from_numpy(data["label_vectors"].copy())
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
        if val_hit1 > best[0]:
            best = (val_hit1, {k: v.clone() for k, v in module.state_dict().items()}, epoch + 1)
        history.append({"epoch": epoch + 1, "loss": total / len(order), "val_hit1": val_hit1,
                        "seconds": time.perf_counter() - started})
    metrics = {"best_val_hit1": best[0], "best_epoch": best[2], "history": history}
    if rank == 0:
        with tempfile.TemporaryDirectory() as directory:
            torch.save(best[1], Path(directory) / "head.pt")
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))
    else:
        ray.train.report(metrics)


@dataclass
class TrainedHead:
    head: Head
    val_hit1: float
    best_epoch: int
    seconds: float


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


def train_head(
    features: np.ndarray,
    labels: np.ndarray,
    label_vectors: np.ndarray,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    config: HeadConfig,
    storage: Path,
) -> TrainedHead:
    """features (N, F), labels (N,) as rows of label_vectors (L, D, unit) -> a trained Head."""
    started = time.perf_counter()
    data = {
        "train_x": features[train_rows].astype(np.float32), "train_y": labels[train_rows].astype(np.int64),
        "val_x": features[val_rows].astype(np.float32), "val_y": labels[val_rows].astype(np.int64),
        "label_vectors": label_vectors.astype(np.float32),
    }
    loop_config = {**config.__dict__, "data_ref": ray.put(data)}
    log.info("training the head with Ray Train: %d epochs on %d images (%d for validation)",
             config.epochs, len(train_rows), len(val_rows))
    storage.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=False),
        run_config=RunConfig(storage_path=str(storage.resolve()), name=f"head-{int(time.time())}"),
    )
    result = trainer.fit()
    module = build_module(features.shape[1], label_vectors.shape[1], config.dropout)
    with result.checkpoint.as_directory() as directory:
        module.load_state_dict(torch.load(Path(directory) / "head.pt", weights_only=True))
    module.eval()
    metrics = result.metrics
    for epoch in metrics["history"]:
        log.info("head epoch %d/%d: loss %.4f, validation hit@1 %.3f (%.1f s)", epoch["epoch"], config.epochs,
                 epoch["loss"], epoch["val_hit1"], epoch["seconds"])
    log.info("head trained: best validation hit@1 %.3f at epoch %d", metrics["best_val_hit1"], metrics["best_epoch"])
    return TrainedHead(fold(module), float(metrics["best_val_hit1"]), int(metrics["best_epoch"]),
                       time.perf_counter() - started)

"""What early stopping saves and costs: batch-train's three heads trained for every epoch (patience 0) with a
few seeds (each seed its own validation split), then each patience replayed on their validation curves.

    python -m bench.patience [--seeds 0 1 2] [--backbone efficientnet-lite2] [--data DIR]

Uses batch-train's feature cache (.cache), extracting what is missing. For each patience it prints how
many curves would keep a worse best epoch, by how much validation hit@1, and the share of epochs saved.
"""

from __future__ import annotations

import argparse

from batch import train
from batch.train_head import patience_ran_out, train_heads

PATIENCES = (3, 4, 5, 6, 8, 10)


def replay(curve: list[float], patience: int) -> tuple[float, int]:
    """(the best validation hit@1 kept, epochs run) had training stopped after `patience` epochs without a
    better one (the training loop's rule)."""
    best, best_epoch = -1.0, 0
    for epoch, hit1 in enumerate(curve, start=1):
        if hit1 > best:
            best, best_epoch = hit1, epoch
        if patience_ran_out(epoch, best_epoch, patience):
            return best, epoch
    return best, len(curve)


def curves(seeds: list[int], flags: list[str]) -> list[tuple[str, int, list[float]]]:
    """(head, seed, validation hit@1 per epoch) of every head batch-train trains, for all epochs."""
    found = []
    for seed in seeds:
        options = train.parse_args([*flags, "--seed", str(seed), "--patience", "0"])
        inputs = train.check_and_list(options)
        space = train.load_space(options, inputs.labels)
        extracted = train.extract_features(options, inputs, train.backbone_onnx(options))
        jobs, _ = train.head_jobs(options, inputs.labels, extracted, space)
        heads = train_heads(extracted.features, jobs, options.cache / "ray-train")
        found += [(job.name, seed, head.history) for job, head in zip(jobs, heads)]
    return found


def table(found: list[tuple[str, int, list[float]]]) -> str:
    lines = ["| patience | curves with a worse best | largest loss (hit@1) | mean loss | epochs saved |",
             "|---|---|---|---|---|"]
    total = sum(len(curve) for _, _, curve in found)
    for patience in PATIENCES:
        losses, run = [], 0
        for _, _, curve in found:
            kept, epochs = replay(curve, patience)
            losses.append(max(curve) - kept)
            run += epochs
        worse = sum(loss > 1e-9 for loss in losses)
        lines.append(f"| {patience} | {worse} of {len(found)} | {max(losses):.3f} | {sum(losses) / len(losses):.4f} "
                     f"| {1 - run / total:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--backbone", default=None)
    parser.add_argument("--data", default=None)
    args = parser.parse_args(argv)
    flags = [*(["--backbone", args.backbone] if args.backbone else []), *(["--data", args.data] if args.data else [])]
    found: list = []

    def job() -> None:
        found.extend(curves(args.seeds, flags))
        for name, seed, curve in found:
            print(f"{name}, seed {seed}: best {max(curve):.3f} at epoch {curve.index(max(curve)) + 1} of {len(curve)}")
        print(table(found))

    return train.run_job(job)


if __name__ == "__main__":
    raise SystemExit(main())

"""The head's training loop on Ray Train: patience stops a head whose validation hit@1 stopped improving.

Plumbing of the stopping rule: the features are two synthetic, well separated clusters (validation hit@1
is 1.0 from the first epoch on), so the rule, not the data, decides how many epochs run."""

import numpy as np
import pytest

from batch.train_head import HeadConfig, HeadJob, split, train_heads


@pytest.mark.slow  # a Ray Train run of its own
def test_patience_stops_a_head_that_no_longer_improves(ray_runtime, tmp_path):
    """Patience 2 stops 2 epochs after the best one and keeps it; patience 0, or no validation split, trains
    every epoch."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 60)
    features = (rng.normal(size=(120, 16)) + 6.0 * labels[:, None]).astype(np.float32)
    label_vectors = np.eye(2, 4, dtype=np.float32)
    train_rows, val_rows = split(labels, 0.25, seed=0)
    jobs = [HeadJob(labels, label_vectors, train_rows, val_rows, HeadConfig(epochs=8, patience=patience, batch_size=32),
                    name=f"patience {patience}") for patience in (2, 0)]
    no_validation = HeadJob(labels, label_vectors, np.arange(len(labels)), np.arange(0), HeadConfig(epochs=8, patience=2,
                                                                                                 batch_size=32))
    stopped, every_epoch, unvalidated = train_heads(features, [*jobs, no_validation], tmp_path)
    assert stopped.val_hit1 == every_epoch.val_hit1 == 1.0
    assert stopped.best_epoch == every_epoch.best_epoch
    assert len(stopped.history) == stopped.best_epoch + 2 < 8
    assert len(every_epoch.history) == 8
    # without a validation split nothing tells epochs apart: all run, and the last one's weights are kept
    assert len(unvalidated.history) == unvalidated.best_epoch == 8
    predicted = (stopped.head(features[val_rows]) @ label_vectors.T).argmax(axis=1)
    assert (predicted == labels[val_rows]).all()

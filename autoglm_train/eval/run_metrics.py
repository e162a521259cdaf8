"""The figures a training run ends with, from the Lightning objects that hold them (read by attribute, so
this module imports no Lightning): the last validation's retrieval metrics (validating again if the
final step has none), steps, samples, time, samples/s and skipped samples by reason."""

from __future__ import annotations


def final_metrics(module, trainer, datamodule, timer, run_state) -> dict[str, float]:
    if module.last_val is None or module.last_val[0] != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics = dict(module.last_val[1])
    skipped = run_state.skipped_totals()
    per_step = datamodule.batch_size * trainer.accumulate_grad_batches * trainer.world_size
    samples = trainer.global_step * per_step
    metrics.update(
        {
            "train/steps": float(trainer.global_step),
            "train/samples": float(samples),
            "time/train_s": timer.fit_s,
            "time/samples_per_s": samples / timer.train_s if trainer.global_step else 0.0,
            "data/skipped": float(sum(skipped.values())),
        }
    )
    for reason, count in skipped.items():
        metrics[f"data/skipped_{reason}"] = float(count)
    return metrics

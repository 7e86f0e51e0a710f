"""The loss curve PNG written after training."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

from glm_tune.atomic import atomic_path  # noqa: E402


def plot_loss_curve(log_history, path, title="training loss"):
    """Train (and eval, when logged) loss against the step, from a Trainer-style list of log dicts."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label, style in ((train, "train", "-"), (evals, "eval", "o--")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def plot_metrics(log_history, keys, path, title=None):
    """Each logged metric of `keys` (e.g. DPO's rewards/margins, rewards/accuracies) against the step, one panel
    each; None when none of them was logged."""
    series = {key: [(e["step"], e[key]) for e in log_history if key in e and "step" in e] for key in keys}
    series = {key: points for key, points in series.items() if points}
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.5), squeeze=False)
    for ax, (key, points) in zip(axes[0], series.items()):
        ax.plot(*zip(*points), "-")
        ax.set(xlabel="step", title=key)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return Path(path)

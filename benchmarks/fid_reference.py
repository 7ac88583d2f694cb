"""Train a FID/KID feature classifier on Fashion-MNIST and write its test-split reference.

The two bundled feature spaces were made by (2-core CPU, torch 2.13):

    python benchmarks/fid_reference.py --space cnn --epochs 4 --seed 0
    python benchmarks/fid_reference.py --space allconv --epochs 3 --seed 1

Seeded and rerunnable: it overwrites ``classifier.safetensors`` and ``reference_test.safetensors`` in the
space's asset folder (or ``--out``). Prints the classifier's test accuracy and refuses to write anything below 90%.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from tacdiff.data import load_fashion_mnist, to_model_space
from tacdiff.metrics.fid import (ARCHITECTURES, CLASSIFIER_FORMAT, DEFAULT_SPACE, FEATURE_SPACES,
                                 load_feature_extractor, save_reference)

MIN_ACCURACY = 0.90


def train(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int,
          batch_size: int, lr: float, seed: int, quiet: bool) -> None:
    """Adam with cosine learning-rate decay on shuffled batches.

    ``images`` (N, 1, 28, 28) in [-1, 1], ``labels`` (N,) in 0..9.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-len(images) // batch_size))
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        for idx in tqdm(order.split(batch_size), desc=f"epoch {epoch + 1}/{epochs}", disable=quiet):
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1]."""
    preds = torch.cat([model(b).argmax(1) for b in images.split(1000)])
    return (preds == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", choices=list(FEATURE_SPACES), default=DEFAULT_SPACE,
                        help="which feature space (classifier architecture) to train")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="default: the space's bundled asset folder")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    train_x, train_y = load_fashion_mnist("train", args.data_dir)
    test_x, test_y = load_fashion_mnist("test", args.data_dir)
    train_x, test_x = to_model_space(train_x), to_model_space(test_x)

    model = ARCHITECTURES[args.space]()
    train(model, train_x, train_y, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
          seed=args.seed, quiet=args.quiet)
    acc = accuracy(model, test_x, test_y)
    print(f"test accuracy: {acc:.4f} ({len(test_y)} images)")
    if acc < MIN_ACCURACY:
        raise SystemExit(f"accuracy {acc:.4f} < {MIN_ACCURACY}: nothing written; train longer (--epochs)")

    space = FEATURE_SPACES[args.space]
    out = args.out or space.folder
    out.mkdir(parents=True, exist_ok=True)
    weights = out / space.weights.name
    meta = {"format": CLASSIFIER_FORMAT, "architecture": args.space, "num_features": str(model.head.in_features),
            "dataset": "fashion-mnist train", "test_accuracy": f"{acc:.4f}", "seed": str(args.seed),
            "epochs": str(args.epochs), "torch": torch.__version__}
    save_file(model.state_dict(), str(weights), metadata=meta)
    reference = out / space.reference.name
    save_reference(test_x, reference, extractor=load_feature_extractor(weights),
                   metadata={"dataset": "fashion-mnist test", "seed": str(args.seed)})
    for path in (weights, reference):
        print(f"{path}: {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()

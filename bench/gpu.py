"""GPU throughput: bare model and embed stage, images/s and texts/s, at fp16 with large batches.

On a CUDA machine this measures the GPU path (fp16 weights, pinned host memory, non-blocking
copies, decoding on CPU worker threads). Without one it runs the same code on the CPU with a small
N, so the script stays tested. Random ViT-B/32 weights: speed only.

    .venv/bin/python -m bench.gpu [--images 2048] [--batch-size 256]
"""

from __future__ import annotations

import argparse

import torch

from bench.embed import compare, compare_texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    count = args.images or (2048 if cuda else 64)
    batch = args.batch_size or (256 if cuda else 32)
    name = torch.cuda.get_device_name() if cuda else "no CUDA device: CPU fallback, small N"
    print(f"device {device} ({name}), {count} images, batch {batch}")
    compare(device, count, batch, args.rounds, ["fp16" if cuda else "fp32"])
    compare_texts(device, "fp16" if cuda else "fp32", count=4 * batch if cuda else 128)


if __name__ == "__main__":
    main()

"""Random-weight CLIP checkpoints for offline trials, tests and benchmarks.

No model hub is reachable from our CI machines, so tests and benchmarks build a checkpoint here and
load it through the same ``from_pretrained`` path as a real model. The tokenizer is the real CLIP
BPE tokenizer (its vocabulary ships inside the ``open_clip_torch`` wheel), so tokenisation and
truncation behave exactly as in production. The weights are random: scores are meaningless.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import tempfile
from pathlib import Path

from sim_pipeline.core.errors import UserError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_MERGE_COUNT = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def _bpe_vocab_path() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "The CLIP vocabulary comes from the open_clip_torch wheel: "
            "run `pip install --no-deps open_clip_torch` (make setup does)."
        )
    return Path(next(iter(spec.submodule_search_locations))) / BPE_FILE


def write_clip_tokenizer_files(dest: Path) -> tuple[Path, Path]:
    """Convert open_clip's BPE file into the vocab.json/merges.txt pair CLIPTokenizer reads."""
    with gzip.open(_bpe_vocab_path(), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : CLIP_MERGE_COUNT + 1]]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    dest.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = dest / "vocab.json", dest / "merges.txt"
    vocab_path.write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    merges_path.write_text(merges_text, encoding="utf-8")
    return vocab_path, merges_path


def build_random_clip(dest: str | Path, shape: str = "tiny", seed: int = 0) -> Path:
    """Save a random-weight CLIP model + processor to ``dest`` (meaningless scores).

    ``shape="tiny"``: 32-wide, one layer, for tests. ``shape="vit-b-32"``: the real
    openai/clip-vit-base-patch32 shape (``CLIPConfig()`` defaults), for speed benchmarks.
    """
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dest = Path(dest)
    with tempfile.TemporaryDirectory() as bpe_dir:
        vocab, merges = write_clip_tokenizer_files(Path(bpe_dir))
        tokenizer = CLIPTokenizer(vocab=str(vocab), merges=str(merges))
    if shape == "tiny":
        small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                 "num_attention_heads": 2}
        config = CLIPConfig(text_config=dict(small, projection_dim=32),
                            vision_config=dict(small, patch_size=32, projection_dim=32),
                            projection_dim=32)
    elif shape == "vit-b-32":
        config = CLIPConfig()
    else:
        raise UserError(f"Unknown model shape {shape!r}: use 'tiny' or 'vit-b-32'.")
    config.text_config.bos_token_id = tokenizer.bos_token_id
    config.text_config.eos_token_id = tokenizer.eos_token_id
    config.text_config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(dest)
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(), tokenizer=tokenizer)
    processor.save_pretrained(dest)
    (dest / "README.md").write_text(
        "Random-weight CLIP checkpoint built by sim-pipeline for offline trials.\n"
        "Its weights are random: similarity scores from it are meaningless.\n",
        encoding="utf-8",
    )
    return dest


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.support.random_model DEST [--shape tiny|vit-b-32]``."""
    import argparse

    parser = argparse.ArgumentParser(description="Save a random-weight CLIP (meaningless scores).")
    parser.add_argument("dest")
    parser.add_argument("--shape", choices=("tiny", "vit-b-32"), default="tiny")
    args = parser.parse_args(argv)
    path = build_random_clip(args.dest, shape=args.shape)
    print(f"wrote a random-weight CLIP ({args.shape}) to {path}: its scores are meaningless")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

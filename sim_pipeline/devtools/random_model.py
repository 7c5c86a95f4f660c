"""Random-weight CLIP and SigLIP checkpoints for offline trials, tests and benchmarks.

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


def build_random_clip(dest: str | Path, shape: str = "tiny", seed: int = 0,
                      projection_dim: int = 32) -> Path:
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
        config = CLIPConfig(text_config=dict(small, projection_dim=projection_dim),
                            vision_config=dict(small, patch_size=32,
                                               projection_dim=projection_dim),
                            projection_dim=projection_dim)
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
    _label_random(dest, "CLIP")
    return dest


SENTENCE_PIECE_TEXT = "\n".join([
    "a photo of a cat", "a dog playing in the snow", "two people riding bikes on a road",
    "the red car parked on a street", "an aerial view of a city at night",
    "green fields under a blue sky", "a bowl of fruit on a wooden table", "ünïcödé text",
] * 25)


def train_sentencepiece(dest: Path, vocab_size: int = 60) -> Path:
    """A small SentencePiece unigram model trained here from a short text (the ``sentencepiece``
    package), with SigLIP's special tokens: pad 0, eos 1, unk 2."""
    import sentencepiece as spm

    dest.mkdir(parents=True, exist_ok=True)
    corpus = dest / "corpus.txt"
    corpus.write_text(SENTENCE_PIECE_TEXT, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(dest / "spiece"), vocab_size=vocab_size,
        model_type="unigram", hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", minloglevel=2,
        num_threads=1)
    corpus.unlink()
    return dest / "spiece.model"


def build_random_siglip(dest: str | Path, seed: int = 0, text_positions: int = 64) -> Path:
    """Save a tiny random-weight SigLIP (``SiglipModel`` + ``SiglipProcessor``) with a real
    SentencePiece tokenizer trained here. Its scores are meaningless."""
    import torch
    from transformers import SiglipConfig, SiglipModel, SiglipProcessor, SiglipTokenizer
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dest = Path(dest)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = SiglipTokenizer(vocab_file=str(train_sentencepiece(Path(folder))),
                                    model_max_length=text_positions)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 2}
    config = SiglipConfig(
        text_config=dict(small, vocab_size=len(tokenizer), max_position_embeddings=text_positions,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None),
        vision_config=dict(small, image_size=32, patch_size=8))
    torch.manual_seed(seed)
    SiglipModel(config).eval().save_pretrained(dest)
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(dest)
    _label_random(dest, "SigLIP")
    return dest


def build_random_siglip2(dest: str | Path, seed: int = 0) -> Path:
    """Save a tiny random-weight SigLIP 2 (``Siglip2Model`` + ``Siglip2Processor``, NaFlex
    patches) whose ``Siglip2Tokenizer`` has a character vocabulary with byte fallback. Its scores
    are meaningless."""
    import torch
    from transformers import Siglip2Config, Siglip2Model, Siglip2Processor
    from transformers.models.siglip2.image_processing_pil_siglip2 import (
        Siglip2ImageProcessorPil,
    )
    from transformers.models.siglip2.tokenization_siglip2 import Siglip2Tokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for symbol in [*"abcdefghijklmnopqrstuvwxyz0123456789▁", *(f"<0x{b:02X}>" for b in range(256))]:
        vocab.setdefault(symbol, len(vocab))
    tokenizer = Siglip2Tokenizer(vocab=vocab, merges=[], model_max_length=64)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 2}
    config = Siglip2Config(
        text_config=dict(small, vocab_size=len(vocab), max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2),
        vision_config=dict(small, patch_size=16, num_patches=16))
    torch.manual_seed(seed)
    dest = Path(dest)
    Siglip2Model(config).eval().save_pretrained(dest)
    image_processor = Siglip2ImageProcessorPil(patch_size=16, max_num_patches=16)
    Siglip2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(dest)
    _label_random(dest, "SigLIP 2")
    return dest


def build_clip_with_default_sub_projection(dest: str | Path, seed: int = 0) -> Path:
    """A tiny CLIP whose towers' sub-configs keep ``projection_dim`` at the default 512 while the
    top-level one (what ``CLIPModel`` builds) is 24, as LAION's ViT-bigG-14 ships."""
    import json

    path = build_random_clip(dest, shape="tiny", seed=seed, projection_dim=24)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["text_config"]["projection_dim"] = config["vision_config"]["projection_dim"] = 512
    config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def _label_random(dest: Path, family: str) -> None:
    (dest / "README.md").write_text(
        f"Random-weight {family} checkpoint built by sim-pipeline for offline trials.\n"
        "Its weights are random: similarity scores from it are meaningless.\n",
        encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """``python -m sim_pipeline.devtools.random_model DEST [--shape tiny|vit-b-32]``."""
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

"""The SD 1.5 CLIP tokenizer, built offline from the BPE table that open-clip-torch ships.

A single-file checkpoint holds no tokenizer and nothing may be downloaded, so ``vocab.json`` and
``merges.txt`` are rebuilt by OpenAI's CLIP rule: the 256 byte symbols, the same with ``</w>``,
one token per merge (the first 48 894 merges), then the two special tokens. The result has the
49 408 ids SD 1.5 was trained with.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from transformers import CLIPTokenizer

from ..packages import PackageDataMissing, package_dir
from .built_once import build_once

CLIP_MERGES = 49152 - 256 - 2
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77


def byte_to_unicode() -> dict[int, str]:
    """OpenAI's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


def open_clip_bpe_path() -> Path:
    path = (
        package_dir("open_clip", "pip install --no-deps open-clip-torch==3.3.0")
        / "bpe_simple_vocab_16e6.txt.gz"
    )
    if not path.is_file():
        raise PackageDataMissing(f"open-clip-torch is installed but {path} is missing")
    return path


def write_clip_vocab(directory: Path, bpe_path: Path | None = None) -> None:
    """Writes ``vocab.json``, ``merges.txt`` and the tokenizer configs into ``directory``."""
    with gzip.open(bpe_path or open_clip_bpe_path(), "rt", encoding="utf-8") as source:
        lines = source.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : CLIP_MERGES + 1]]
    symbols = list(byte_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges]
    vocab += [BOS_TOKEN, EOS_TOKEN]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    merges_text = "#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n"
    (directory / "merges.txt").write_text(merges_text, encoding="utf-8")
    config = {
        "model_max_length": MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "do_lower_case": True,
        "tokenizer_class": "CLIPTokenizer",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    specials = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
    }
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))


def sd15_tokenizer(cache_dir: Path) -> CLIPTokenizer:
    """The SD 1.5 tokenizer, built into ``cache_dir/tokenizer`` on first use."""
    directory = cache_dir / "tokenizer"
    build_once(directory, "merges.txt", write_clip_vocab)
    return CLIPTokenizer.from_pretrained(directory, local_files_only=True)

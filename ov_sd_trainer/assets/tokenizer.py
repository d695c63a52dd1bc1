"""An offline CLIP tokenizer whose vocabulary the project writes itself.

No tokenizer files can be downloaded here, so we write a byte-level BPE vocabulary in CLIP's
format: the 256 byte symbols (plain and end-of-word), merges that assemble each caption word into
one token, and the two special tokens. Any text tokenizes (unknown words fall back to byte
symbols); the caption words become single tokens, as in the real CLIP vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _word_merges(word: str) -> list[tuple[str, str]]:
    """Left-to-right merges that turn `word` into the single token `word</w>`."""
    byte_encoder = bytes_to_unicode()
    symbols = [byte_encoder[b] for b in word.encode("utf-8")]
    symbols[-1] += "</w>"
    merges = []
    current = symbols[0]
    for s in symbols[1:]:
        merges.append((current, s))
        current += s
    return merges


def write_clip_tokenizer_files(directory: str | Path, words: list[str], model_max_length: int = 77) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json for `CLIPTokenizer`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    byte_symbols = list(bytes_to_unicode().values())
    vocab_list = byte_symbols + [s + "</w>" for s in byte_symbols]
    merges: list[tuple[str, str]] = []
    seen = set()
    for word in sorted({w.lower() for w in words}):
        for a, b in _word_merges(word):
            if (a, b) not in seen:
                seen.add((a, b))
                merges.append((a, b))
                if a + b not in vocab_list:
                    vocab_list.append(a + b)
    vocab_list += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return directory


def build_clip_tokenizer(directory: str | Path, words: list[str], model_max_length: int = 77) -> CLIPTokenizer:
    """Write the files and load them as a `CLIPTokenizer` padded like Stable Diffusion's."""
    directory = write_clip_tokenizer_files(directory, words, model_max_length)
    return CLIPTokenizer.from_pretrained(
        str(directory),
        model_max_length=model_max_length,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,  # SD 1.x pads with end-of-text
    )

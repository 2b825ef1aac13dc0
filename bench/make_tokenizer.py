"""Build a 32,000-entry byte-level BPE tokenizer for the random-weight Llama-2-7B-shape model.

The 7B benchmark model has random weights (no download), but calibration and evaluation still
need real token ids below its vocab size of 32,000: this trains one on WikiText-2 *validation*
text. Usage: python bench/make_tokenizer.py DATA_DIR OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast


def main(data_dir: str, out_dir: str) -> None:
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=32000, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(Path(data_dir) / "wikitext-2-v1" / "valid.txt")], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.save_pretrained(out_dir)
    print(f"vocab {tokenizer.get_vocab_size()} -> {out_dir}")


if __name__ == "__main__":
    main(*sys.argv[1:])

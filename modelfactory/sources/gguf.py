"""GGUF files as base models: dequantized by transformers and saved as dense fp16 safetensors."""

from __future__ import annotations

from pathlib import Path


def dequantize_gguf(*, gguf_path: Path, out_dir: Path) -> None:
    """Load a GGUF file through transformers (dequantized) and save dense fp16 safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float16)
    # The weights are dense now, but transformers keeps the GGUF quantizer attached and then
    # refuses save_pretrained ("quantized with GGUF and is not serializable").
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    # transformers maps GGUF's EOS to <|im_start|>; the model config carries the GGUF's own id.
    eos_id = model.config.eos_token_id
    if isinstance(eos_id, int):
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

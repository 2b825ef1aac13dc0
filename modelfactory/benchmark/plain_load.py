"""Load a model folder the way a user does, generate a few tokens, print one JSON line.

Run by file path in an isolated interpreter (the factory does exactly this; on CPU it forks that
interpreter from one that has imported torch and transformers, :mod:`modelfactory.core.forkserver`)::

    python -I modelfactory/benchmark/plain_load.py MODEL_DIR --device cpu --new-tokens 4

``-I`` keeps the working directory and ``PYTHONPATH`` off ``sys.path``, so nothing of the
factory can sneak in: this file imports only the standard library, ``torch`` and
``transformers`` (which pulls in ``gptqmodel`` for GPTQ checkpoints on its own, as it does for
any user). The code that runs is the "Load it" snippet of :func:`load_code` + :func:`generate_code`
with default settings (on CUDA ``device_map="cuda"``); the model card shows the same text.

The last line of stdout is one JSON object whose first key is ``"plain_load"``; the factory
parses it (everything else on stdout/stderr is the libraries' own output). It says whether
the model loaded and generated, how long each part took, the generated text and token count,
the class of a quantized linear layer (the kernel the library picked), the library versions,
any factory module found in ``sys.modules`` (must be none), and on failure the stage, the
exception type and message and the tail of the traceback.

Deliberately free of factory imports: keep it that way (the factory also imports this module,
for the snippet text, so module level stays stdlib-only and cheap).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import time
import traceback

RESULT_VERSION = 1
DEFAULT_PROMPT = "The capital of France is"
DEFAULT_NEW_TOKENS = 4
#: Top-level packages of the factory: none of them may be imported in the plain-load process.
FACTORY_PACKAGES = ("modelfactory", "tasks", "flows")
DEVICES = ("cpu", "cuda")


def _literal(text: str) -> str:
    """A Python string literal in double quotes (JSON escaping is valid Python for these)."""
    return json.dumps(text, ensure_ascii=False)


def load_code(*, model: str, device: str, revision: str | None = None) -> str:
    """The loading half of the snippet: ``from_pretrained`` with default settings.

    *model* is a local folder (what the check runs) or a Hub repo id (what the card shows);
    *revision* only makes sense for the latter. On CUDA the model is placed with
    ``device_map="cuda"``; on CPU nothing is passed (the default is CPU).
    """
    if device not in DEVICES:
        raise ValueError(f"device {device!r}: use one of {DEVICES}")
    where = _literal(model) + (f", revision={_literal(revision)}" if revision else "")
    placement = ', device_map="cuda"' if device == "cuda" else ""
    return (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "\n"
        f"model = AutoModelForCausalLM.from_pretrained({where}{placement})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({where})\n"
    )


def generate_code(*, prompt: str = DEFAULT_PROMPT, new_tokens: int = DEFAULT_NEW_TOKENS) -> str:
    """The generating half of the snippet: a few greedy tokens, decoded and printed."""
    return (
        f"inputs = tokenizer({_literal(prompt)}, return_tensors=\"pt\").to(model.device)\n"
        f"out = model.generate(**inputs, max_new_tokens={int(new_tokens)}, do_sample=False)\n"
        "print(tokenizer.decode(out[0], skip_special_tokens=True))\n"
    )


def snippet(*, model: str, device: str, revision: str | None = None, prompt: str = DEFAULT_PROMPT,
            new_tokens: int = DEFAULT_NEW_TOKENS) -> str:
    """The whole "Load it" snippet: :func:`load_code`, a blank line, :func:`generate_code`."""
    return load_code(model=model, device=device, revision=revision) + "\n" + generate_code(
        prompt=prompt, new_tokens=new_tokens)


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in ("torch", "transformers", "gptqmodel", "accelerate"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _quantized_kernel(model) -> str:
    """Class name of the first quantized linear layer, or ``dense`` (none found).

    GPTQModel's kernels all derive from a class named ``BaseQuantLinear``; matching the name
    keeps this file free of a gptqmodel import (a dense model must not need gptqmodel).
    """
    for module in model.modules():
        if any(cls.__name__ == "BaseQuantLinear" for cls in type(module).__mro__):
            return type(module).__name__
    return "dense"


def _factory_modules() -> list[str]:
    return sorted(name for name in sys.modules if name.split(".")[0] in FACTORY_PACKAGES)


def run(model_dir: str, *, device: str, new_tokens: int, prompt: str) -> dict:
    """Run the snippet on *model_dir*; never raises (a failure is described in the result)."""
    result: dict = {"plain_load": RESULT_VERSION, "ok": False, "device": device, "model_dir": model_dir,
                    "stage": "import", "import_s": None, "load_s": None, "generate_s": None, "tokens": 0,
                    "text": None, "kernel": None, "device_name": None, "versions": _versions(),
                    "python": sys.version.split()[0], "error_type": None, "error_message": None,
                    "traceback_tail": None}
    namespace: dict = {"__name__": "__plain_load__"}
    try:
        start = time.perf_counter()
        import torch
        import transformers  # noqa: F401 - imported here so load_s times loading, not importing

        result["import_s"] = time.perf_counter() - start
        if device == "cuda":
            result["device_name"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        result["stage"] = "load"
        start = time.perf_counter()
        # exec of the snippet text itself: the model card shows exactly the code that was checked
        exec(compile(load_code(model=model_dir, device=device), "<load it: load>", "exec"), namespace)  # noqa: S102
        result["load_s"] = time.perf_counter() - start
        result["kernel"] = _quantized_kernel(namespace["model"])
        result["stage"] = "generate"
        start = time.perf_counter()
        exec(compile(generate_code(prompt=prompt, new_tokens=new_tokens), "<load it: generate>", "exec"),  # noqa: S102
             namespace)
        result["generate_s"] = time.perf_counter() - start
        out, inputs, tokenizer = namespace["out"], namespace["inputs"], namespace["tokenizer"]
        prompt_len = inputs["input_ids"].shape[1]
        result["tokens"] = int(out.shape[1] - prompt_len)
        result["text"] = tokenizer.decode(out[0][prompt_len:], skip_special_tokens=True)
        result["ok"] = result["tokens"] > 0
        if result["ok"]:
            result["stage"] = "done"
        else:
            result["error_type"] = "NoTokens"
            result["error_message"] = "generate returned no new tokens"
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        result["error_type"] = f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins.")
        result["error_message"] = str(exc)[:4000]
        result["traceback_tail"] = "".join(traceback.format_exc().splitlines(keepends=True)[-30:])[-6000:]
    result["factory_modules"] = _factory_modules()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="model folder (config.json, safetensors, tokenizer)")
    parser.add_argument("--device", choices=DEVICES, default="cpu")
    parser.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    args = parser.parse_args(argv)
    result = run(args.model_dir, device=args.device, new_tokens=args.new_tokens, prompt=args.prompt)
    sys.stdout.flush()
    print(json.dumps(result, ensure_ascii=True), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

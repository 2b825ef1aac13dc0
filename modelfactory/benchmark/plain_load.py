"""Load a model folder the way a user does, generate a few tokens, compare with a reference, print one JSON line.

Run by file path in an isolated interpreter (the factory does exactly this, in a fresh process)::

    python -I modelfactory/benchmark/plain_load.py MODEL_DIR --device cpu --new-tokens 4 [--reference REF.json]

``-I`` keeps the working directory and ``PYTHONPATH`` off ``sys.path``, so nothing of the
factory can sneak in: this file imports only the standard library, ``torch`` and
``transformers`` (which pulls in ``gptqmodel`` for GPTQ checkpoints on its own, as it does for
any user). The code that runs is the "Load it" snippet of :func:`load_code` + :func:`generate_code`
with default settings (on CUDA ``device_map="cuda"``), or with ``--backend`` another standard
GPTQModel kernel (``quantization_config=GPTQConfig(bits=..., backend=...)``); the model card shows
the same text.

With ``--reference`` (a JSON file: ``token_ids``, the prompt followed by the factory's own greedy
continuation, ``prompt_len``, and ``top1``, its model's most likely token at each continuation
position), the loaded model then scores those tokens teacher-forced in one forward pass: its
``argmax`` at each position against ``top1``, and whether every logit is finite. So "runs" means
"computes what the factory measured", not merely "produced a token" (garbage or NaN logits fail).

The last line of stdout is one JSON object whose first key is ``"plain_load"``; the factory
parses it (everything else on stdout/stderr is the libraries' own output). It says whether
the model loaded and generated, how long each part took, the generated text and token count,
the class of a quantized linear layer (the kernel the library picked), the library versions,
the teacher-forced comparison (``positions``, ``top1_agree``, ``logits_finite``), any factory
module found in ``sys.modules`` (must be none), and on failure the stage, the exception type and
message and the tail of the traceback. Judging the comparison is the factory's (a tolerance).

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

RESULT_VERSION = 2
DEFAULT_PROMPT = "The capital of France is"
DEFAULT_NEW_TOKENS = 4
#: Top-level packages of the factory: none of them may be imported in the plain-load process.
FACTORY_PACKAGES = ("modelfactory", "tasks", "flows")
DEVICES = ("cpu", "cuda")


def _literal(text: str) -> str:
    """A Python string literal in double quotes (JSON escaping is valid Python for these)."""
    return json.dumps(text, ensure_ascii=False)


def load_code(*, model: str, device: str, revision: str | None = None, backend: str | None = None,
              bits: int | None = None) -> str:
    """The loading half of the snippet: ``from_pretrained`` with default settings, or with GPTQModel's
    *backend* (and the checkpoint's *bits*) when the default kernel is not the one to use.

    *model* is a local folder (what the check runs) or a Hub repo id (what the card shows);
    *revision* only makes sense for the latter. On CUDA the model is placed with
    ``device_map="cuda"``; on CPU nothing is passed (the default is CPU).
    """
    if device not in DEVICES:
        raise ValueError(f"device {device!r}: use one of {DEVICES}")
    if (backend is None) != (bits is None):
        raise ValueError("backend and bits go together (GPTQConfig needs both)")
    where = _literal(model) + (f", revision={_literal(revision)}" if revision else "")
    placement = ', device_map="cuda"' if device == "cuda" else ""
    imports = "AutoModelForCausalLM, AutoTokenizer"
    config = ""
    if backend is not None:
        imports += ", GPTQConfig"
        config = f", quantization_config=GPTQConfig(bits={int(bits)}, backend={_literal(backend)})"
    return (
        f"from transformers import {imports}\n"
        "\n"
        f"model = AutoModelForCausalLM.from_pretrained({where}{placement}{config})\n"
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
            new_tokens: int = DEFAULT_NEW_TOKENS, backend: str | None = None, bits: int | None = None) -> str:
    """The whole "Load it" snippet: :func:`load_code`, a blank line, :func:`generate_code`."""
    return load_code(model=model, device=device, revision=revision, backend=backend, bits=bits) + "\n" + generate_code(
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


def teacher_forced(model, reference: dict) -> dict:
    """The reference's tokens scored in one forward pass: ``{positions, top1_agree, logits_finite}`` (this
    model's argmax at each continuation position against the reference's ``top1``, or one of the tokens the
    reference rates as near-tied with it, ``near``)."""
    import torch

    ids = torch.tensor([reference["token_ids"]], device=model.device)
    start = int(reference["prompt_len"]) - 1
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, start:-1].float()
    predicted = logits.argmax(-1).tolist()
    accepted = reference.get("near") or [[top1] for top1 in reference["top1"]]
    return {"positions": len(predicted), "top1_agree": sum(int(a in b) for a, b in zip(predicted, accepted, strict=True)),
            "logits_finite": bool(torch.isfinite(logits).all())}


def run(model_dir: str, *, device: str, new_tokens: int, prompt: str, backend: str | None = None,
        bits: int | None = None, reference: dict | None = None) -> dict:
    """Run the snippet on *model_dir* (then the teacher-forced comparison with *reference*); never raises
    (a failure is described in the result)."""
    result: dict = {"plain_load": RESULT_VERSION, "ok": False, "device": device, "model_dir": model_dir,
                    "backend": backend, "stage": "import", "import_s": None, "load_s": None, "generate_s": None,
                    "tokens": 0, "text": None, "kernel": None, "device_name": None, "versions": _versions(),
                    "python": sys.version.split()[0], "positions": 0, "top1_agree": 0, "logits_finite": None,
                    "error_type": None, "error_message": None, "traceback_tail": None}
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
        exec(compile(load_code(model=model_dir, device=device, backend=backend, bits=bits), "<load it: load>",  # noqa: S102
                     "exec"), namespace)
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
        if result["tokens"] <= 0:
            result["error_type"] = "NoTokens"
            result["error_message"] = "generate returned no new tokens"
            raise _Stop
        if reference is not None:
            result["stage"] = "compare"
            result.update(teacher_forced(namespace["model"], reference))
        result["ok"], result["stage"] = True, "done"
    except _Stop:
        pass
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        result["error_type"] = f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins.")
        result["error_message"] = str(exc)[:4000]
        result["traceback_tail"] = "".join(traceback.format_exc().splitlines(keepends=True)[-30:])[-6000:]
    result["factory_modules"] = _factory_modules()
    return result


class _Stop(Exception):
    """The snippet ran but its result is a failure already described in the result."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="model folder (config.json, safetensors, tokenizer)")
    parser.add_argument("--device", choices=DEVICES, default="cpu")
    parser.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--backend", help="a GPTQModel backend instead of the library's default kernel")
    parser.add_argument("--bits", type=int, help="the checkpoint's bits (with --backend)")
    parser.add_argument("--reference", help="JSON file: token_ids, prompt_len, top1 (teacher-forced comparison)")
    args = parser.parse_args(argv)
    reference = None
    if args.reference:
        with open(args.reference, encoding="utf-8") as file:
            reference = json.load(file)
    result = run(args.model_dir, device=args.device, new_tokens=args.new_tokens, prompt=args.prompt,
                 backend=args.backend, bits=args.bits, reference=reference)
    sys.stdout.flush()
    print(json.dumps(result, ensure_ascii=True), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

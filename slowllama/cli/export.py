"""Write a Hugging Face folder (e.g. a finetune export) as one GGUF file for llama.cpp, Ollama and LM Studio, with
an Ollama Modelfile beside it; or a PEFT LoRA folder (a LoRA run's output) as a GGUF LoRA adapter for llama.cpp's
--lora over its base model's GGUF.

    slowllama export EXPORT_DIR --out FILE.gguf [--type f16]
    slowllama export LORA_OUT --base BASE_DIR --out adapter.gguf
    python tools/export_gguf.py ...   (the same command)

Module by module, through slowllama/formats/gguf.py, gguf_lora.py and ollama.py (needs pip install "slowllama[gguf]").
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from slowllama.errors import ConfigError
from slowllama.formats.gguf import GGUF_TYPES, export_gguf
from slowllama.fsutil import read_json_object
from slowllama.paths import PEFT_CONFIG_FILE, check_not_under_a_file, lock_out_dir


def check_same_architecture(peft_dir: Path, base_config: Path):
    """Refuse a --base of another architecture than the model the adapters were trained on, where their
    adapter_config.json names that model as a folder still on disk: same shapes (tiny or sibling models) load
    without complaint, and the GGUF would carry the wrong architecture's RoPE layout and name."""
    trained_on = read_json_object(peft_dir / PEFT_CONFIG_FILE).get("base_model_name_or_path")
    if not isinstance(trained_on, str) or not (Path(trained_on) / "config.json").is_file():
        return  # a hub name, or a folder since moved: nothing to compare with
    try:
        theirs = read_json_object(Path(trained_on) / "config.json").get("model_type")
    except ConfigError:
        return
    ours = read_json_object(base_config).get("model_type")
    if theirs != ours:
        raise ConfigError(f"--base {base_config.parent}: a {ours} model, but {peft_dir} adapts {trained_on}, a "
                          f"{theirs} model; give that model as --base")


def export_adapter(peft_dir: Path, base: Path, out: Path, gguf_type: str) -> Path:
    from slowllama.formats.gguf_lora import check_adapter_request, export_adapter_gguf
    from slowllama.formats.hf import HFCheckpoint
    from slowllama.formats.peft import load_peft

    ckpt = HFCheckpoint(base)
    check_adapter_request(ckpt.config_path, out, gguf_type)
    check_same_architecture(peft_dir, ckpt.config_path)
    adapters = load_peft(peft_dir, ckpt.args)
    return export_adapter_gguf(adapters, ckpt.args, ckpt.config_path, out, gguf_type, name=base.name)


def main(argv=None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    source = p.add_argument_group("what to convert")
    source.add_argument("export_dir", help="a Hugging Face Llama, Mistral, Qwen2 or Qwen3 folder (config.json, "
                                           "*.safetensors, tokenizer.json), or a PEFT LoRA folder")
    source.add_argument("--base", help="for a PEFT LoRA folder: the Hugging Face base model it adapts")
    out = p.add_argument_group("the GGUF file")
    out.add_argument("--out", required=True, help="the .gguf file to write")
    out.add_argument("--type", default="f16", help=f"weight type: {', '.join(GGUF_TYPES)} (norms stay f32; "
                                                   f"default: f16)")
    out.add_argument("--no-modelfile", action="store_true", help="do not write the Ollama Modelfile beside it")
    a = p.parse_args(argv)
    folder, out = Path(a.export_dir), Path(a.out)
    try:
        check_not_under_a_file(out, "--out")
        if not out.absolute().parent.exists():
            # finetune --gguf makes OUT first; here the folder is the user's to make (a typo is not a full disk)
            raise ConfigError(f"--out {out}: the folder {out.absolute().parent} does not exist")
        # A second terminal exporting into the same --out is refused: it would replace this one's file while
        # both report success.
        lock = lock_out_dir(out)
        try:
            written = _export(folder, out, a)
        finally:
            lock.close()
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the GGUF is written to a temp file that is removed: no half file under --out
        print(f"interrupted: no partial {a.out} was left; run the export again", file=sys.stderr)
        return 130
    print(f"wrote {written} ({written.stat().st_size} bytes)")
    return 0


def _export(folder: Path, out: Path, a: argparse.Namespace) -> Path:
    """The GGUF of a model folder, or of a PEFT folder's adapters over --base."""
    if (folder / "params.json").is_file() and not (folder / "config.json").is_file():
        raise ConfigError(f"{folder}: a Meta checkpoint (params.json); GGUF export reads a Hugging Face "
                          f"folder: run finetune with --export-format hf, then export its OUT")
    # A LoRA run's OUT with --merge holds both: the merged model, or with --base its adapters.
    peft, model = (folder / PEFT_CONFIG_FILE).is_file(), (folder / "config.json").is_file()
    if peft and (a.base or not model):
        if not a.base:
            raise ConfigError(f"{folder}: a PEFT LoRA folder; give --base, the model it adapts")
        return export_adapter(folder, Path(a.base), out, a.type)
    if a.base:  # a model folder with --base: the user meant an adapter, and would get the whole model
        raise ConfigError(f"--base {a.base}: {folder} is a model folder, not a PEFT LoRA folder; "
                          f"--base is only for a LoRA folder's adapters")
    return export_gguf(folder, out, a.type, modelfile=not a.no_modelfile)


if __name__ == "__main__":
    sys.exit(main())

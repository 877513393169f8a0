"""The default base and embedder for a machine that cannot install their packages: same architecture, same tokenizers,
random weights (speed does not depend on the weights' values).

The GPU machine lent through the device tool has no registry and takes at most 64 MiB of the working tree, so the
default base's packaged GGUF (about 90 MB) and the embedder's package cannot travel. Here, ``export`` writes their
configurations and tokenizers, without weights (a few MB), to a folder; there, ``random`` builds each model from its
configuration with random weights (seed 0), saves both, and prints the two variables that make
:func:`moerge.lab.defaults.default_base` and :func:`moerge.routing.embed.default_embedder` load them::

    python benchmarks/device_kit.py export .devkit                  # here
    eval "$(python benchmarks/device_kit.py random .devkit /tmp/m)"  # there: exports MOERGE_BASE_FOLDER, ...

Everything a benchmark prints about quality (routing, answers) is meaningless with these weights; only speed and
memory are measured with them.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

WEIGHTS = (".safetensors", ".bin", ".pt", ".gguf", ".onnx", ".h5", ".msgpack")


def _copy_without_weights(src: Path, dst: Path) -> int:
    n = 0
    for f in src.rglob("*"):
        rel = f.relative_to(src)
        if not f.is_file() or f.name.endswith(WEIGHTS) or rel.parts[0] in ("onnx", "openvino"):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dst / rel)
        n += f.stat().st_size
    return n


def export(folder: Path) -> None:
    from moerge.lab.defaults import base_folder
    from moerge.routing.embed import embedder_folder

    size = _copy_without_weights(base_folder(), folder / "base")
    size += _copy_without_weights(embedder_folder(), folder / "embedder")
    print(f"wrote the base's and the embedder's configurations and tokenizers to {folder} ({size / 2**20:.1f} MiB)",
          file=sys.stderr)


def materialise(kit: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    torch.manual_seed(0)
    for name, auto in (("base", AutoModelForCausalLM), ("embedder", AutoModel)):
        dst = out / name
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(kit / name, dst)
        model = auto.from_config(AutoConfig.from_pretrained(str(dst)))
        model.save_pretrained(str(dst))  # config.json again, and model.safetensors with random weights
        (dst / "RANDOM_WEIGHTS").write_text("made by benchmarks/device_kit.py: random weights, for speed only\n")
    print(f"export MOERGE_BASE_FOLDER={out / 'base'} MOERGE_EMBEDDER_FOLDER={out / 'embedder'}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("export", help="write the configurations and tokenizers here").add_argument("folder", type=Path)
    r = sub.add_parser("random", help="build random-weight models from an exported folder, print the variables")
    r.add_argument("kit", type=Path)
    r.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "export":
        export(args.folder)
    else:
        materialise(args.kit, args.out)


if __name__ == "__main__":
    main()

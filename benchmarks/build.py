"""Build (once, cached) the benchmark models: a full-size Phi-3-mini with random weights + int4 ONNX.

Random weights have exactly the real model's compute and memory cost (same shapes, same dtypes),
so load time, prefill and decode speed, and memory are the real model's; only the text is noise.
The real weights cannot be downloaded here, and the benchmark must be reproducible offline.

- Architecture: `Phi3Config()` defaults are Phi-3-mini-4k (3.8 B parameters, 32 layers, hidden
  3072, vocab 32064, context 4096). Weights are bf16, like the published checkpoint.
- Tokenizer: the tiny fixture's (Phi-3's special tokens and chat template) with its vocabulary
  padded to 32,064 entries, so every id the random model can emit decodes to text.
- int4 ONNX: the same builder command `fetch_model -P onnx_source=build` runs (phi3flow.fetching.onnx_build);
  it peaks at about 23 GB RAM, so nothing else should run beside it.

A build is reused when its `done.json` marker exists (written last, after a complete build).
`--smoke` uses the tiny fixture itself (no build), for CI.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path

from phi3flow.fetching import onnx_build

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "tiny-phi3"
DEFAULT_CACHE = Path(os.environ.get("PHI3FLOW_BENCH_CACHE", ROOT / "benchmarks" / ".cache"))
SEED = 0
DONE = "done.json"


def full_size_checkpoint(folder: Path) -> Path:
    """Phi3ForCausalLM(Phi3Config()) with random bf16 weights and a padded fixture tokenizer."""
    if (folder / DONE).is_file():
        return folder
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    tokenizer = json.loads((FIXTURE / "tokenizer.json").read_text())
    generation = json.loads((FIXTURE / "generation_config.json").read_text())
    config = Phi3Config(
        bos_token_id=generation["bos_token_id"],
        eos_token_id=generation["eos_token_id"][0],
        pad_token_id=generation["pad_token_id"],
    )
    vocab = tokenizer["model"]["vocab"]
    for i in range(len(vocab), config.vocab_size):  # decodable filler words for ids past the fixture's
        vocab[f"\u2581w{i}"] = i
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    for name in ("tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(FIXTURE / name, folder / name)

    torch.manual_seed(SEED)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16: 7.6 GB instead of 15 GB in fp32
    try:
        model = Phi3ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(folder)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    mark_done(folder, parameters=n_params, seconds=round(time.perf_counter() - started, 1))
    logger.info("full-size checkpoint (%.2f B parameters) in %s", n_params / 1e9, folder)
    return folder


def int4_onnx(checkpoint: Path, folder: Path) -> Path:
    if (folder / DONE).is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    onnx_build.build(checkpoint, folder, "int4", "cpu")
    mark_done(folder, seconds=round(time.perf_counter() - started, 1))
    return folder


def tensors(checkpoint: Path) -> dict[str, dict]:
    """{name: {"dtype", "shape", "data_offsets"}} of every tensor, from the safetensors headers
    (the weights themselves are not read)."""
    found = {}
    for shard in checkpoint.glob("*.safetensors"):
        with shard.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        found |= {k: v for k, v in header.items() if k != "__metadata__"}
    return found


def mark_done(folder: Path, **facts) -> None:
    (folder / DONE).write_text(json.dumps(facts, indent=1))


def build(cache: Path = DEFAULT_CACHE, smoke: bool = False) -> tuple[Path, Path]:
    """(checkpoint folder, int4 ONNX folder), built into `cache` unless already there."""
    if smoke:
        checkpoint = FIXTURE
    else:
        checkpoint = full_size_checkpoint(cache / "phi3-mini-random")
    return checkpoint, int4_onnx(checkpoint, onnx_folder(cache, smoke))


def onnx_folder(cache: Path, smoke: bool) -> Path:
    return cache / ("tiny-int4" if smoke else "phi3-mini-random-int4")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    print(build(args.cache, args.smoke))


if __name__ == "__main__":
    main()

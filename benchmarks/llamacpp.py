"""llama.cpp as a peer (opt-in): the same full-size checkpoint as GGUF, Q4_0 and Q4_K_M.

`pip install -r benchmarks/requirements-llama.txt`, then `python -m benchmarks.run --llama-cpp`.
Never in requirements.txt or CI's default run: llama-cpp-python is an sdist that compiles llama.cpp
(5-20 minutes on 2 cores) and its GGML_NATIVE build is tied to the CPU it was built on.

Users who want a fast CPU chat model usually run llama.cpp (directly or through Ollama); the
benchmark measures it with the same prompt token ids, the same fixed number of new tokens
(greedy) and its own generation loop (`Llama.generate`), each quantization in its own process.

- Conversion: llama.cpp's own `convert_hf_to_gguf.py`, from the source distribution of the
  installed llama-cpp-python version (the wheel does not ship it), to a bf16 GGUF. The benchmark
  checkpoint has only `tokenizer.json` (no sentencepiece `tokenizer.model`), so Phi-3's converter
  is told to read the vocabulary the Hugging Face way (`_set_vocab_llama_hf`); a real Phi-3
  checkpoint has `tokenizer.model` and converts unchanged.
- Quantization: `llama_cpp.llama_model_quantize`, as `llama-quantize` does it.
- Settings a user who tunes it would pick, not llama-cpp-python's defaults (n_threads = cores
  // 2, flash attention off, n_ctx 512): every core for prompt and decode, flash attention on,
  n_ctx = the longest prompt plus the new tokens, n_batch = n_ctx (a prompt goes in one call,
  in n_ubatch = 512-token micro-batches, llama.cpp's default).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import time
from importlib import metadata, util
from pathlib import Path

from benchmarks import build as build_mod
from benchmarks.probe import progress

REQUIREMENTS = build_mod.ROOT / "benchmarks" / "requirements-llama.txt"
QUANTS = {"Q4_0": 2, "Q4_K_M": 15}  # llama_ftype values (llama.h: LLAMA_FTYPE_MOSTLY_*)


def version() -> str:
    """The installed llama-cpp-python, or an error that says how to install it."""
    if util.find_spec("llama_cpp") is None:
        raise SystemExit(f"--llama-cpp needs llama-cpp-python: pip install -r "
                         f"{REQUIREMENTS.relative_to(build_mod.ROOT)} (it compiles llama.cpp, "
                         "5-20 minutes), then run again.")
    return metadata.version("llama-cpp-python")


def source(cache: Path) -> Path:
    """llama.cpp's source tree as vendored in the installed version's sdist (downloaded once)."""
    wanted = version()
    folder = cache / f"llama-cpp-python-{wanted}"
    if (folder / build_mod.DONE).is_file():
        return folder / "vendor" / "llama.cpp"
    downloads = cache / "downloads"
    progress(f"llama.cpp: downloading the llama-cpp-python {wanted} source (for its converter)")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "-q", "-d", str(downloads), f"llama-cpp-python=={wanted}"], check=True)
    (archive,) = downloads.glob(f"llama_cpp_python-{wanted}.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(cache, filter="data")
    (cache / f"llama_cpp_python-{wanted}").rename(folder)
    build_mod.mark_done(folder)
    return folder / "vendor" / "llama.cpp"


def models(checkpoint: Path, cache: Path, quants: tuple[str, ...]) -> dict[str, Path]:
    """{quant: GGUF file}, converted and quantized once, then cached (a marker beside each)."""
    bf16 = cache / f"{checkpoint.name}-bf16.gguf"
    if not _done(bf16):
        progress(f"llama.cpp: converting {checkpoint.name} to GGUF (bf16)")
        started = time.perf_counter()
        _quietly([sys.executable, "-m", "benchmarks.llamacpp", "convert", str(source(cache)),
                  str(checkpoint), str(bf16)], bf16.with_suffix(".log"))
        _mark(bf16, seconds=round(time.perf_counter() - started, 1))
    out = {}
    for quant in quants:
        out[quant] = cache / f"{checkpoint.name}-{quant}.gguf"
        if not _done(out[quant]):
            progress(f"llama.cpp: quantizing to {quant}")
            started = time.perf_counter()
            _quietly([sys.executable, "-m", "benchmarks.llamacpp", "quantize", str(bf16),
                      str(out[quant]), quant], out[quant].with_suffix(".log"))
            _mark(out[quant], seconds=round(time.perf_counter() - started, 1))
    return out


def _quietly(command: list[str], log: Path) -> None:
    """Run a converter with its per-tensor lines in a log file, not on the benchmark's output."""
    with log.open("w") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise RuntimeError(f"{' '.join(command[2:4])} failed ({done.returncode}); the end of "
                           f"{log}:\n{tail}")


def _done(path: Path) -> bool:
    return path.is_file() and path.with_suffix(".done.json").is_file()


def _mark(path: Path, **facts) -> None:
    path.with_suffix(".done.json").write_text(json.dumps({**facts, "bytes": path.stat().st_size}))


def convert(src: Path, checkpoint: Path, out: Path) -> None:
    sys.path[:0] = [str(src), str(src / "gguf-py")]
    import convert_hf_to_gguf
    from conversion.phi import Phi3MiniModel

    if not (checkpoint / "tokenizer.model").is_file():  # see the module docstring
        Phi3MiniModel.set_vocab = lambda self: self._set_vocab_llama_hf()
    out.unlink(missing_ok=True)
    sys.argv = ["convert_hf_to_gguf.py", str(checkpoint), "--outtype", "bf16",
                "--outfile", str(out)]
    convert_hf_to_gguf.main()


def quantize(source_file: Path, out: Path, quant: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTS[quant]
    params.nthread = 0  # every core
    out.unlink(missing_ok=True)
    if llama_cpp.llama_model_quantize(str(source_file).encode(), str(out).encode(), params) != 0:
        out.unlink(missing_ok=True)
        raise SystemExit(f"llama_model_quantize to {quant} failed")


def weight_bytes(gguf: Path) -> int:
    """Bytes of every tensor but the token embedding table (a decode step reads one row of it)."""
    reader = str(next(gguf.parent.glob("llama-cpp-python-*/vendor/llama.cpp/gguf-py")))
    if reader not in sys.path:  # called once per quantization
        sys.path.insert(0, reader)
    from gguf import GGUFReader

    tensors = GGUFReader(gguf).tensors
    return sum(int(t.n_bytes) for t in tensors if t.name != "token_embd.weight")


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "convert":
        convert(*map(Path, args))
    elif command == "quantize":
        quantize(Path(args[0]), Path(args[1]), args[2])
    else:
        raise SystemExit(f"unknown command {command!r}: convert or quantize")

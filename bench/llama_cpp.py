"""llama.cpp beside qvl on the same random weights: bf16 / Q8_0 / Q4_K_M against qvl's bf16 / int8 / int4.

    python bench/llama_cpp.py                       # 2B text config, 28 layers; first run builds llama.cpp
    python bench/llama_cpp.py --layers 8            # quicker
    python bench/llama_cpp.py --threads 1,2         # also both sides at 2 threads (a calm machine only)

The weights are bench/quant.py's float checkpoint (Qwen2-VL-2B text config, random bf16 weights from
bench/quant_checkpoints.py's `write_float`, vision tower cut to one block), written under --workdir if
missing (quant.py's layout, so the two benches share it). llama.cpp is not a dependency of qvl: on first use this script builds it under
--cache (default /tmp/qvl-llama) and reuses it afterwards:
  sdist     `pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`; its vendor/llama.cpp
            carries convert_hf_to_gguf.py and the sources of llama-quantize and llama-bench
  build     cmake + ninja, CPU only, -DGGML_NATIVE=ON (the ISA of this CPU), only those two tools, -j2
  venv      --cache/venv for the converter: the sdist's own gguf-py (the gguf package at the version its
            convert script was written against), sentencepiece, protobuf; torch / transformers /
            safetensors are read from this interpreter's site-packages through a .pth file, so nothing is
            installed into qvl's environment
  convert   convert_hf_to_gguf.py maps Qwen2VLForConditionalGeneration to its `qwen2vl` text model (M-RoPE
            sections kept, visual.* skipped), so the VL checkpoint converts as it is, --outtype bf16. It needs
            a tokenizer: the checkpoint gets tests/tiny.py's small Qwen2-pattern BPE, whose hash the
            converter does not know, so the pre-tokenizer is named "qwen2" for it. No text is tokenized
            here (llama-bench feeds random ids), so the vocabulary only has to load.
  quantize  llama-quantize bf16 -> Q8_0 and -> Q4_K_M (re-made when the float checkpoint is newer)
Measured, per --threads value, medians of --repeats:
  llama.cpp `llama-bench -p 64 -n 16 -t T -r R -o json`: prefill = pp64 tok/s, decode = tg16 tok/s
            (16 tokens from an empty context), per GGUF
  qvl       one subprocess per variant (load_model in bf16, quantization=None / "int8" / "int4" on the fly,
            an LLMEngine without tokenizer or prefix cache, torch threads = T): decode = bench/decode.py's
            `qvl_decode`, a 1-token prompt and 16 greedy tokens, (16 - 1) / (last - first); prefill =
            bench/prefill.py's `prefill_tok_s`, 64 random tokens, max_tokens 1, 64 / time to first token
Pairs compared: bf16 / bf16, int8 / Q8_0 (both 8-bit, one scale per 32 weights in Q8_0, per output row in
qvl), int4 / Q4_K_M (Q4_K_M keeps some tensors at Q6_K; qvl's int4 keeps one fp32 scale per 128). The
LM head is float in qvl (tied to the embedding) and quantized in llama.cpp's Q8_0 / Q4_K_M, so at equal
speed per byte llama.cpp reads fewer bytes per token. So the table also gives each side's weight GB
(qvl: bench/quant.py's `_weight_bytes`, what one decode step reads; llama.cpp: llama-bench's model size,
the GGUF's tensors; the tied embedding / head counted once in both) and decode GB/s = tok/s x GB.
Prints one JSON line per pair as it goes, a table with the ratios qvl / llama.cpp per format, and one
JSON line for the whole run (rows, load average at start and end). Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

SDIST = "llama-cpp-python==0.3.36"
TOOLS = ("llama-quantize", "llama-bench")
PAIRS = [("bf16", None, "bf16"), ("int8", "int8", "Q8_0"), ("int4", "int4", "Q4_K_M")]  # qvl, quant, GGUF
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_OPENMP=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF",
]
# Run by the converter venv's python: the convert script as a module, with the pre-tokenizer named (the
# test tokenizer's hash is not in its table of known hub tokenizers; it shares Qwen2's split pattern).
_CONVERT = """
import sys
sys.path.insert(0, sys.argv[1])
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[2:]
import convert_hf_to_gguf
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
convert_hf_to_gguf.main()
"""


def _run(cmd: list[str], log: Path, timeout: int, **kw) -> None:
    """Run `cmd` with its output in `log`; on failure raise with the log's last lines (the error)."""
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, **kw).returncode
    if rc:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"{' '.join(map(str, cmd[:3]))} ... exited {rc} (log {log}):\n{tail}")


def vendor_dir(cache: Path) -> Path:
    """The sdist's vendor/llama.cpp, downloaded and unpacked once."""
    name = SDIST.replace("-", "_").replace("==", "-")
    src = cache / name / "vendor" / "llama.cpp"
    if not (src / "convert_hf_to_gguf.py").is_file():
        dl = cache / "dl"
        cache.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", str(dl)],
             cache / "download.log", 900)
        with tarfile.open(next(dl.glob(f"{name}.tar.gz"))) as t:
            t.extractall(cache, filter="data")
    return src


def build_tools(cache: Path, src: Path) -> Path:
    """llama-quantize and llama-bench, CPU only, built once into cache/build (ninja skips what is done)."""
    bin_dir = cache / "build" / "bin"
    if all((bin_dir / t).is_file() for t in TOOLS):
        return bin_dir
    print(f"building llama.cpp into {cache / 'build'} (-j2, 10+ minutes; log {cache / 'build.log'})", flush=True)
    _run(["cmake", "-S", str(src), "-B", str(cache / "build"), "-G", "Ninja", *CMAKE_FLAGS],
         cache / "cmake.log", 600)
    _run(["ninja", "-C", str(cache / "build"), "-j2", *TOOLS], cache / "build.log", 3600)
    return bin_dir


def converter_python(cache: Path, src: Path) -> Path:
    """The converter venv's python; created once, qvl's own environment untouched."""
    venv, py = cache / "venv", cache / "venv" / "bin" / "python"
    if (venv / ".qvl-ready").is_file():
        return py
    _run([sys.executable, "-m", "venv", str(venv)], cache / "venv.log", 300)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # torch / transformers / safetensors come from this interpreter: a .pth line appends its site-packages
    Path(site, "qvl-host-site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(py), "-m", "pip", "install", str(src / "gguf-py"), "sentencepiece>=0.1.98,<0.3.0",
          "protobuf>=4.21.0,<5.0.0"], cache / "venv.log", 900)
    (venv / ".qvl-ready").write_text("ok\n")
    return py


def gguf_files(cache: Path, float_dir: Path, layers: int, py: Path, src: Path, bin_dir: Path) -> dict:
    """{"bf16" | "Q8_0" | "Q4_K_M": path}: converted and quantized from `float_dir`, re-made when older."""
    from tiny import write_tokenizer

    out = cache / "gguf"
    out.mkdir(parents=True, exist_ok=True)
    born = (float_dir / "model.safetensors").stat().st_mtime
    files = {q: out / f"L{layers}-{q}.gguf" for _, _, q in PAIRS}
    if not files["bf16"].is_file() or files["bf16"].stat().st_mtime < born:
        hf = cache / "hf" / f"L{layers}"         # the checkpoint, linked, plus a tokenizer for the converter
        hf.mkdir(parents=True, exist_ok=True)
        link = hf / "model.safetensors"
        link.unlink(missing_ok=True)
        link.symlink_to(float_dir / "model.safetensors")
        (hf / "config.json").write_text((float_dir / "config.json").read_text())
        write_tokenizer(hf)
        print(f"converting {float_dir} -> {files['bf16']}", flush=True)
        _run([str(py), "-c", _CONVERT, str(src), str(hf), "--outtype", "bf16", "--outfile", str(files["bf16"])],
             cache / "convert.log", 1800)
    for q in ("Q8_0", "Q4_K_M"):
        if not files[q].is_file() or files[q].stat().st_mtime < files["bf16"].stat().st_mtime:
            print(f"quantizing -> {files[q]}", flush=True)
            _run([str(bin_dir / "llama-quantize"), str(files["bf16"]), str(files[q]), q, "2"],
                 cache / f"quantize-{q}.log", 1800)
    return files


def llama_bench(bin_dir: Path, gguf: Path, threads: int, repeats: int, log: Path) -> dict:
    """llama-bench's pp64 and tg16 for one GGUF: median tok/s of the repeats (after its own warm-up)."""
    cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-p", "64", "-n", "16", "-t", str(threads),
           "-r", str(repeats), "-o", "json"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    log.write_text(res.stderr)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {res.returncode}:\n" + "\n".join(res.stderr.splitlines()[-15:]))
    rows = json.loads(res.stdout)
    out = {"gguf_gb": round(rows[0]["model_size"] / 1e9, 3), "type": rows[0].get("model_type", "")}
    for r in rows:                          # one row per test: n_prompt 64 (prefill) or n_gen 16 (decode)
        key = "prefill_tok_s" if r["n_prompt"] else "decode_tok_s"
        out[key] = round(statistics.median(r["samples_ts"]), 2)
    return out


def qvl_child(args) -> None:
    """One qvl variant (own process: RSS and the kernels' state do not leak between variants)."""
    from decode import make_engine, qvl_decode
    from prefill import prefill_tok_s
    from quant import _weight_bytes

    from qvl.build import load_model

    torch.set_num_threads(args.threads[0])
    method = dict((n, m) for n, m, _ in PAIRS)[args.child]
    model, config = load_model(Path(args.float_dir), dtype=torch.bfloat16, quantization=method, device="cpu")
    eng = make_engine(model, config, max_num_seqs=1, enable_prefix_caching=False, max_model_len=1024)
    g = torch.Generator().manual_seed(0)
    one = torch.randint(0, 150000, (1,), generator=g).tolist()
    prompt = torch.randint(0, 150000, (64,), generator=g).tolist()
    qvl_decode(eng, one, 4, "cpu")                                  # warm-up: kernels compiled, pages touched
    dec = statistics.median(qvl_decode(eng, one, 16, "cpu")[0] for _ in range(args.repeats))
    pre = prefill_tok_s(eng, prompt, args.repeats)                  # its own warm-up, then the median
    print(json.dumps(dict(variant=args.child, threads=torch.get_num_threads(),
                          weight_gb=round(_weight_bytes(model) / 1e9, 3),
                          decode_tok_s=round(dec, 2), prefill_tok_s=round(pre, 2))))


def qvl_run(args, name: str, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--float-dir", args.float_dir, "--threads", str(threads),
           "--repeats", str(args.repeats)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if res.returncode:
        raise RuntimeError(f"qvl {name} exited {res.returncode}:\n" + "\n".join(res.stderr.splitlines()[-15:]))
    return json.loads(res.stdout.strip().splitlines()[-1])


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=28, help="decoder layers of the 2B text config")
    ap.add_argument("--threads", default="1", help="comma list; both sides run at each (default 1)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/qvl-bench-quant", help="bench/quant.py's checkpoint dir")
    ap.add_argument("--cache", default="/tmp/qvl-llama", help="llama.cpp source, build, venv and GGUFs")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--float-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.threads = [int(t) for t in args.threads.split(",")]
    if args.child:
        return qvl_child(args)
    from quant_checkpoints import ensure_checkpoints

    float_dir = Path(args.workdir) / f"L{args.layers}" / "float"
    ensure_checkpoints(float_dir.parent, args.layers, "qwen2-vl", {"float"})
    args.float_dir = str(float_dir)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    src = vendor_dir(cache)
    bin_dir = build_tools(cache, src)
    files = gguf_files(cache, float_dir, args.layers, converter_python(cache, src), src, bin_dir)

    rows, t0, load0 = [], time.time(), _load()
    for threads in args.threads:
        for name, _, q in PAIRS:
            lc = llama_bench(bin_dir, files[q], threads, args.repeats, cache / f"bench-{q}-t{threads}.log")
            ours = qvl_run(args, name, threads)
            row = dict(threads=threads, qvl=name, llama_cpp=q, qvl_weight_gb=ours["weight_gb"],
                       gguf_gb=lc["gguf_gb"], qvl_decode=ours["decode_tok_s"], llama_decode=lc["decode_tok_s"],
                       qvl_prefill=ours["prefill_tok_s"], llama_prefill=lc["prefill_tok_s"])
            row["decode_ratio"] = round(row["qvl_decode"] / row["llama_decode"], 2)
            row["prefill_ratio"] = round(row["qvl_prefill"] / row["llama_prefill"], 2)
            row["qvl_decode_gb_s"] = round(row["qvl_decode"] * row["qvl_weight_gb"], 1)   # weight read / s
            row["llama_decode_gb_s"] = round(row["llama_decode"] * row["gguf_gb"], 1)
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(f"\nQwen2-VL-2B text config, {args.layers} layers, random weights; medians of {args.repeats}; "
          f"load average {load0} at the start, {_load()} at the end ({time.time() - t0:.0f} s)")
    print(f"{'thr':>3} {'qvl':5} {'llama.cpp':9} {'GB qvl/gguf':>12} {'decode qvl':>10} {'llama':>7} {'ratio':>6} "
          f"{'prefill qvl':>11} {'llama':>7} {'ratio':>6} {'decode GB/s qvl/llama':>21}")
    for r in rows:
        print(f"{r['threads']:>3} {r['qvl']:5} {r['llama_cpp']:9} {r['qvl_weight_gb']:5.2f}/{r['gguf_gb']:<6.2f} "
              f"{r['qvl_decode']:10.2f} {r['llama_decode']:7.2f} {r['decode_ratio']:6.2f} "
              f"{r['qvl_prefill']:11.2f} {r['llama_prefill']:7.2f} {r['prefill_ratio']:6.2f} "
              f"{r['qvl_decode_gb_s']:>13.1f}/{r['llama_decode_gb_s']:<7.1f}")
    print(json.dumps(dict(bench="llama_cpp", layers=args.layers, repeats=args.repeats, sdist=SDIST,
                          load_start=load0, load_end=_load(), rows=rows)))


if __name__ == "__main__":
    main()

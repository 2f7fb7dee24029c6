"""Patched vs unpatched libllama: with no KV budget the two must compute the same thing.

    python scripts/compare_unpatched.py                      # SmolLM2-135M and a tiny random model
    python scripts/compare_unpatched.py --model tiny-qwen3 --steps 32

Builds the pinned llama.cpp tree without our patches and engine into ``build-unpatched/`` (once;
skipped when its libllama is already installed there), then runs the same greedy decode in two
subprocesses, one bound to each library (llama-cpp-python binds its library at import, so one
process cannot hold both): ``Llama`` with no budget, ``logits_all=True``, the prompt evaluated in
one call and then ``--steps`` greedy tokens one ``eval`` each. Every logit row (prompt and each
step) and the tokens are dumped to ``.npz`` and compared: the tokens must be identical and the
largest |logit difference| exactly 0.0. Exits 1 on any mismatch.

``--model`` takes a known model name, a GGUF path, or ``tiny[-ARCH]`` (a random-weight model
written with ``rkv_local.testing.make_tiny_model``, ARCH one of llama/qwen2/qwen3, with GQA);
repeat it to compare several.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUILD_DIR = ROOT / "build-unpatched"
DEFAULT_UNPATCHED_LIB = BUILD_DIR / "install" / "rkv_local" / "lib"
LIB_NAME = {"darwin": "libllama.dylib", "win32": "llama.dll"}.get(sys.platform, "libllama.so")

PROMPT = (
    "Question: A farmer has 17 sheep. All but 9 run away. How many sheep are left? "
    "Think step by step.\nAnswer:"
)
SEED = 1234
N_CTX = 512


# ---------------------------------------------------------------------------
# building the unpatched library
# ---------------------------------------------------------------------------

def build_unpatched(lib_dir: Path, python: str) -> Path:
    """Configure, build and install the unpatched library unless ``lib_dir`` already holds it."""
    if (lib_dir / LIB_NAME).exists():
        return lib_dir
    if lib_dir.resolve() != DEFAULT_UNPATCHED_LIB.resolve():
        raise SystemExit(f"no {LIB_NAME} in {lib_dir} (only the default folder is built automatically)")
    steps = [
        ["cmake", "-S", ".", "-B", str(BUILD_DIR), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
         "-DRKV_UNPATCHED=ON", f"-DPython3_EXECUTABLE={python}"],
        ["cmake", "--build", str(BUILD_DIR), "-j2"],
        ["cmake", "--install", str(BUILD_DIR), "--prefix", str(BUILD_DIR / "install")],
    ]
    for cmd in steps:
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
    if not (lib_dir / LIB_NAME).exists():
        raise SystemExit(f"the unpatched build installed no {LIB_NAME} into {lib_dir}")
    return lib_dir


# ---------------------------------------------------------------------------
# worker: one process per library
# ---------------------------------------------------------------------------

def worker(which: str, model: str, steps: int, threads: int, out: str) -> None:
    """Greedy decode ``steps`` tokens; save tokens and every logit row to ``out``."""
    if which == "patched":
        import rkv_local  # binds llama_cpp to rkv_local/lib (or $RKV_LOCAL_LIB_DIR)

        cls = rkv_local.Llama  # no kv_budget: must be llama-cpp-python's Llama, unchanged
    else:
        import llama_cpp  # bound to $LLAMA_CPP_LIB_PATH

        cls = llama_cpp.Llama
    import llama_cpp

    lib_name = str(Path(llama_cpp.llama_cpp._lib._name).resolve())
    has_engine = hasattr(llama_cpp.llama_cpp._lib, "rkv_enable")
    llm = cls(model, n_ctx=N_CTX, n_batch=N_CTX, seed=SEED, n_threads=threads, n_threads_batch=threads,
              logits_all=True, verbose=False)
    prompt = llm.tokenize(PROMPT.encode(), add_bos=True)
    if len(prompt) + steps > N_CTX:
        raise SystemExit(f"prompt ({len(prompt)}) + steps ({steps}) exceed n_ctx {N_CTX}")
    t0 = time.perf_counter()
    llm.eval(prompt)
    tokens: list[int] = []
    for _ in range(steps):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tokens.append(tok)
        llm.eval([tok])
    seconds = time.perf_counter() - t0
    logits = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)  # prompt rows + one per step
    # the high-level path too: a short greedy completion from a fresh state
    llm.reset()
    text = llm.create_completion(PROMPT, max_tokens=16, temperature=0.0, seed=SEED)["choices"][0]["text"]
    np.savez(out, prompt=np.array(prompt, dtype=np.int32), tokens=np.array(tokens, dtype=np.int32),
             logits=logits, text=np.array(text), lib=np.array(lib_name), has_engine=np.array(has_engine), seconds=np.array(seconds))
    llm.close()


def run_worker(which: str, model: Path, steps: int, threads: int, out: Path, lib_dir: Path) -> dict:
    env = dict(os.environ)
    env.pop("LLAMA_CPP_LIB_PATH", None)
    if which == "unpatched":
        env["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
    elif lib_dir is not None:
        env["RKV_LOCAL_LIB_DIR"] = str(lib_dir)
    cmd = [sys.executable, __file__, "--worker", which, "--model", str(model), "--steps", str(steps),
           "--threads", str(threads), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{which} worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


# ---------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------

def resolve(spec: str, tmp: Path) -> Path:
    from rkv_local.models import resolve_model
    from rkv_local.testing import make_tiny_model

    if spec == "tiny" or spec.startswith("tiny-"):
        arch = spec.partition("-")[2] or "llama"
        return make_tiny_model(tmp / f"tiny-{arch}.gguf", arch=arch, n_layer=2, n_head=4, n_head_kv=2,
                               head_dim=32, seed=0)
    return resolve_model(spec)


def compare(name: str, a: dict, b: dict) -> dict:
    same_prompt = np.array_equal(a["prompt"], b["prompt"])
    same_tokens = np.array_equal(a["tokens"], b["tokens"])
    first_diff = None
    if not same_tokens:
        n = min(len(a["tokens"]), len(b["tokens"]))
        diffs = np.nonzero(a["tokens"][:n] != b["tokens"][:n])[0]
        first_diff = int(diffs[0]) if len(diffs) else n
    same_shape = a["logits"].shape == b["logits"].shape
    max_abs = float(np.max(np.abs(a["logits"] - b["logits"]))) if same_shape else float("inf")
    same_text = str(a["text"]) == str(b["text"])
    return {
        "model": name,
        "prompt_tokens": int(len(a["prompt"])),
        "steps": int(len(a["tokens"])),
        "logit_rows": int(a["logits"].shape[0]),
        "identical_tokens": bool(same_prompt and same_tokens),
        "first_token_diff": first_diff,
        "max_abs_logit_diff": max_abs,
        "identical_completion_text": same_text,
        "ok": bool(same_prompt and same_tokens and max_abs == 0.0 and same_text),
        "seconds_patched": round(float(a["seconds"]), 2),
        "seconds_unpatched": round(float(b["seconds"]), 2),
        "lib_patched": str(a["lib"]),
        "lib_unpatched": str(b["lib"]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append",
                    help="known model name, GGUF path or tiny[-llama|-qwen2|-qwen3]; repeatable "
                         "(default: smollm2-135m and tiny)")
    ap.add_argument("--steps", type=int, default=64, help="greedy decode steps (default 64)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lib-dir-unpatched", type=Path, default=DEFAULT_UNPATCHED_LIB,
                    help=f"folder holding the unpatched {LIB_NAME} (default: built into {DEFAULT_UNPATCHED_LIB})")
    ap.add_argument("--lib-dir-patched", type=Path, default=None,
                    help="folder holding our patched library (default: rkv_local/lib or $RKV_LOCAL_LIB_DIR)")
    ap.add_argument("--keep", type=Path, help="keep the .npz dumps in this folder")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--worker", choices=("patched", "unpatched"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        worker(args.worker, args.model[0], args.steps, args.threads, args.out)
        return 0

    lib_unpatched = build_unpatched(args.lib_dir_unpatched, sys.executable)
    specs = args.model or ["smollm2-135m", "tiny"]
    results = []
    with tempfile.TemporaryDirectory(prefix="rkv-compare-") as tmp_name:
        tmp = Path(args.keep) if args.keep else Path(tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        for spec in specs:
            model = resolve(spec, tmp)
            stem = Path(spec).stem if os.sep in spec else spec
            a = run_worker("patched", model, args.steps, args.threads, tmp / f"{stem}-patched.npz",
                           args.lib_dir_patched)
            b = run_worker("unpatched", model, args.steps, args.threads, tmp / f"{stem}-unpatched.npz",
                           lib_unpatched)
            r = compare(spec, a, b)
            results.append(r)
            print(f"{spec}: {r['prompt_tokens']} prompt tokens + {r['steps']} greedy steps, "
                  f"{r['logit_rows']} logit rows | identical tokens: {r['identical_tokens']} | "
                  f"max |dlogit|: {r['max_abs_logit_diff']:g} | identical completion text: "
                  f"{r['identical_completion_text']} | {'OK' if r['ok'] else 'MISMATCH'} "
                  f"(decode {r['seconds_patched']} s patched, {r['seconds_unpatched']} s unpatched)",
                  flush=True)
            if r["first_token_diff"] is not None:
                print(f"  first differing step: {r['first_token_diff']}")
            if r["lib_patched"] == r["lib_unpatched"]:
                print(f"  both processes loaded {r['lib_patched']}: not a comparison", flush=True)
                r["ok"] = False
            if not (bool(a["has_engine"]) and not bool(b["has_engine"])):
                print(f"  expected the engine (rkv_enable) in the patched library only; patched has it: "
                      f"{bool(a['has_engine'])}, unpatched has it: {bool(b['has_engine'])}", flush=True)
                r["ok"] = False
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    ok = all(r["ok"] for r in results)
    print("RESULT:", "patched == unpatched" if ok else "MISMATCH", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""The requirements are listed once, in pyproject.toml: the runtime needs no plotting library, and
``make`` and the server's "install the server packages" message read the same lists (issue 36)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from rkv_local.requirements import requirements

ROOT = Path(__file__).resolve().parents[1]


def test_the_runtime_needs_no_plotting_and_the_extras_add_it():
    runtime = requirements()
    assert runtime[0] == "llama-cpp-python==0.3.36" and "numpy" in runtime
    assert not any(r.startswith("matplotlib") for r in runtime)
    assert requirements("evals") == ["matplotlib"]
    assert "pytest" in requirements("test") and not any(r.startswith("rkv-local") for r in requirements("test"))
    from rkv_local.server import SERVER_EXTRAS

    assert list(SERVER_EXTRAS) == requirements("server") and "prometheus_client" in SERVER_EXTRAS
    assert "rkv_local/requirements.py test server evals" in (ROOT / "Makefile").read_text()


def test_llama_generates_without_matplotlib_and_without_the_evals(tiny_model):
    """`from rkv_local import Llama` and a budgeted generation, with matplotlib and rkv_local.evals
    unimportable."""
    script = textwrap.dedent(f"""
        import sys

        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "matplotlib" or name.startswith("rkv_local.evals"):
                    raise ImportError(f"{{name}} is not installed")

        sys.meta_path.insert(0, Refuse())
        from rkv_local import Llama
        llm = Llama({str(tiny_model(arch="llama"))!r}, kv_budget=16, kv_buffer=8, n_ctx=128, verbose=False)
        out = llm.create_completion([1, 2, 3], max_tokens=40, temperature=0.0)
        assert llm.kv_stats().compressions > 0, llm.kv_stats()
        print("ok", out["usage"]["completion_tokens"])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok ")

"""The evaluation tools end to end on SmolLM2-135M (short lengths, few items), and answer extraction."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest

from rkv_local.evals import answers, bench, fidelity, plots, tasks
from rkv_local.evals.datasets import DATA_DIR, data_path
from rkv_local.evals.runs import parse_int_list

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# one thread: on a shared 2-core machine two threads stall each other
COMMON = ["--threads", "1"]


def invoke(module, argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def assert_png(path: Path) -> None:
    if not plots.available():   # `make` does not install matplotlib yet: the commands then skip plots
        assert not path.exists()
        return
    assert path.exists(), path
    assert path.read_bytes()[:8] == PNG_MAGIC


def copy_items(name: str, n: int, dest: Path) -> Path:
    lines = (DATA_DIR / name).read_text(encoding="utf-8").splitlines()[:n]
    target = dest / name
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


# ---------------------------------------------------------------------------
# answer extraction
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    (r"First \boxed{\frac{1}{2}}, then finally \boxed{\dfrac{3}{56}}.", r"\dfrac{3}{56}"),  # last box wins
    (r"so \boxed{\left( 3, \frac{\pi}{2} \right)} is it", r"\left( 3, \frac{\pi}{2} \right)"),  # nested braces
    (r"\boxed 7 apples", "7"),
    (r"\fbox{12}", "12"),
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("#### 1,234\nmore text", "1,234"),
    ("So the final answer is: **42**.", "42"),
    ("he had -3.5 left and then 7 apples.", "7"),           # last number, sentence full stop dropped
    (r"\boxed{} but the total is 12", "12"),                 # empty box ignored
    ("no digits here", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert answers.extract_answer(text, "gsm8k") == expected


@pytest.mark.parametrize("prediction,gold", [
    ("1,000", "1000"),
    ("18.00", "18"),
    ("$18", "18"),
    ("025", "25"),                                        # AIME leading zeros
    (r"\dfrac{3}{56}", r"\frac{3}{56}"),
    (r"\frac12", r"\frac{1}{2}"),
    ("0.5", r"\frac{1}{2}"),
    ("3/4", r"\tfrac{3}{4}"),
    (r"90^\circ", r"90^\circ"),
    (r"90^{\circ}", "90"),
    (r"\text{Evelyn}", r"\text{Evelyn}"),
    ("Evelyn", r"\text{Evelyn}"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
    ("x = 5", "5"),
    (r"10\%", "10"),
    (r"18 \text{ dollars}", "18"),
    ("3\\sqrt{13}", "3\\sqrt{13}"),
    ("-\\frac{2}{3}", "-2/3"),
])
def test_equivalent_answers(prediction, gold):
    assert answers.is_equivalent(prediction, gold)


@pytest.mark.parametrize("prediction,gold", [
    ("17", "18"), ("2x", "2"), (None, "18"), ("", "18"), ("1,2,3", "123"), (r"\frac{1}{3}", "0.33"), ("p + q", "p - q"),
])
def test_different_answers(prediction, gold):
    assert not answers.is_equivalent(prediction, gold)


def test_gold_answers():
    assert answers.gold_answer({"answer": "so 5+5=<<5+5=10>>10\n#### 1,010"}, "gsm8k") == "1,010"
    assert answers.gold_answer({"answer": "025"}, "aime") == "025"


def test_parse_int_list():
    assert parse_int_list("1k,2K,4096") == [1024, 2048, 4096]
    with pytest.raises(argparse.ArgumentTypeError):
        parse_int_list("0")


def test_data_names_are_the_shipped_benchmarks(tmp_path, monkeypatch):
    sizes = {"gsm8k": 1319, "math500": 500, "aime24": 30}
    for name, size in sizes.items():
        assert data_path(name) == DATA_DIR / f"{name}.jsonl"
        assert len(DATA_DIR.joinpath(f"{name}.jsonl").read_text(encoding="utf-8").splitlines()) == size
    # a file of that name in the working folder wins
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gsm8k").write_text("{}\n")
    assert data_path("gsm8k") == Path("gsm8k")


def test_append_record_after_a_torn_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"run_id": "a", "config": "full", "item": "0:x"}\n{"run_id": "a", "conf')
    tasks.append_record(path, {"run_id": "a", "config": "full", "item": "1:y"})
    done = tasks.load_done(path, "a")
    assert set(done) == {("full", "0:x"), ("full", "1:y")}


# ---------------------------------------------------------------------------
# commands end to end
# ---------------------------------------------------------------------------


def test_bench(smollm2_path, tmp_path):
    out = tmp_path / "bench"
    rc = invoke(bench, [str(smollm2_path), *COMMON, "--methods", "rkv", "--budgets", "32", "--kv-buffer", "16",
                        "--lengths", "48,96", "--prompt-tokens", "40", "--sample-every", "16",
                        "--loops", "eval,completion", "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "bench.json").read_text())
    limits = [r for r in result["runs"] if r.get("kind") == "limit"]
    runs = [r for r in result["runs"] if r.get("kind") != "limit"]
    assert len(runs) == 8 and {r["label"] for r in runs} == {"full", "rkv@32", "full (completion)",
                                                             "rkv@32 (completion)"}
    # the physical limit: a full cache timed up to B + b = 48 cells, once per length and loop (the
    # completion loop samples its last token without evaluating it)
    assert len(limits) == 4
    assert {(r["label"], r["n_tokens"]) for r in limits} == {("limit@48", 48), ("limit@48 (completion)", 47)}
    for r in runs:
        assert r["decode_tps"] > 0 and r["prefill_tps"] > 0
        assert r["n_tokens"] == r["prompt_tokens"] + r["length"] - (r["loop"] == "completion")
        assert r["kv_bytes_used"] > 0 and r["peak_rss_bytes"] > 0
        assert r["checkpoints"][-1]["generated"] == r["length"]
    full = {(r["length"], r["loop"]): r for r in runs if r["method"] == "full"}
    for r in runs:
        if r["method"] == "rkv":
            assert r["compressions"] > 0 and r["cells_peak"] <= 32 + 16
            assert r["kv_bytes_used"] < full[r["length"], r["loop"]]["kv_bytes_used"]
        else:
            assert r["compressions"] == 0 and r["kv_bytes_used"] == r["kv_bytes_full"]
    summary = {(s["length"], s["label"]): s for s in result["summary"]}
    assert summary[(96, "full")]["decode_speedup"] == pytest.approx(1.0)
    assert summary[(96, "full")]["tail_speedup"] == pytest.approx(1.0)
    assert summary[(96, "full (completion)")]["decode_speedup"] == pytest.approx(1.0)
    for r in runs:
        # checkpoints every 16 tokens and at each quarter: the last quarter of 96 starts at 72
        points = {p["generated"]: p["seconds"] for p in r["checkpoints"]}
        if r["length"] == 96:
            assert r["tail_tps"] == pytest.approx((96 - 72) / (points[96] - points[72]))
            assert r["quarter_tps"] == pytest.approx([24 / points[24], 24 / (points[48] - points[24]),
                                                      24 / (points[72] - points[48]), r["tail_tps"]])
        assert r["tail_tps"] > 0
    assert 0 < summary[(96, "rkv@32")]["kv_fraction"] < 1
    rkv96 = summary[(96, "rkv@32")]
    assert rkv96["limit_tps"] == pytest.approx(np.median([r["tail_tps"] for r in limits if r["loop"] == "eval"]))
    assert rkv96["share_of_limit"] == pytest.approx(rkv96["decode_tps"] / rkv96["limit_tps"])
    assert rkv96["x_eval"] == pytest.approx(1.0)
    streamed = summary[(96, "rkv@32 (completion)")]
    assert streamed["x_eval"] == pytest.approx(streamed["decode_tps"] / rkv96["decode_tps"])
    assert streamed["limit_tps"] == pytest.approx(np.median([r["tail_tps"] for r in limits
                                                             if r["loop"] == "completion"]))
    assert summary[(96, "full")]["share_of_limit"] is None
    markdown = (out / "bench.md").read_text()
    assert "| 96 | rkv@32 |" in markdown and "| 96 | rkv@32 (completion) |" in markdown and "¼ 4 / ¼ 1" in markdown
    assert_png(out / "bench_speed.png")
    assert_png(out / "bench_memory.png")


def test_fidelity(smollm2_path, tmp_path):
    data = copy_items("math500.jsonl", 3, tmp_path)
    out = tmp_path / "fidelity"
    # 256: a budget the text never reaches (no position after a compression, nothing to rank)
    argv = [str(smollm2_path), *COMMON, "--data", str(data), "--methods", "full,rkv", "--budgets", "32,256",
            "--kv-buffer", "16", "--texts", "1", "--length", "160", "--max-answer-tokens", "80", "--out", str(out)]
    assert invoke(fidelity, argv) == 0
    result = json.loads((out / "fidelity.json").read_text())
    assert result["settings"]["chunk"] == 16 and not result["settings"]["texts_cached"]
    rows = {r["label"]: r for r in result["summary"]}
    full, rkv = rows["full"], rows["rkv@32"]
    assert full["positions"] == rkv["positions"] > 0
    # the full cache against itself: the same distributions
    assert full["top1"] == 1.0 and full["kl"] == pytest.approx(0.0, abs=1e-9)
    assert full["nll_diff"] == pytest.approx(0.0, abs=1e-9)
    assert 0.0 <= rkv["top1"] <= 1.0 and rkv["kl"] >= -1e-6 and rkv["compressions"] > 0
    assert rkv["positions_compressed"] > 0
    # llama-perplexity's statistics, over all positions and after the first compression
    stats, after = rkv["stats"], rkv["stats_compressed"]
    assert stats["positions"] == rkv["positions"] and after["positions"] == rkv["positions_compressed"]
    assert stats["kld_mean"] == rkv["kl"] and stats["same_top1"] == rkv["top1"]
    assert 0 <= stats["kld_median"] <= stats["kld_p90"] <= stats["kld_p95"] <= stats["kld_p99"] <= stats["kld_max"]
    assert full["stats"]["kld_max"] == pytest.approx(0.0, abs=1e-9) and full["stats"]["dp_rms"] == pytest.approx(0.0, abs=1e-7)
    assert full["stats_compressed"] is None and full["positions_compressed"] == 0
    unreached = rows["rkv@256"]
    assert unreached["positions_compressed"] == 0 and unreached["stats_compressed"] is None
    assert "kld_vs_best" not in unreached and rkv["best"] == "rkv@32" and rkv["kld_vs_best"] == 0.0
    texts = json.loads((out / "fidelity_texts.json").read_text())["texts"]
    assert len(texts[0]["tokens"]) <= 160 and any(texts[0]["generated"])
    assert "| rkv@32 |" in (out / "fidelity.md").read_text()
    assert_png(out / "fidelity.png")
    # the texts come from the cache the second time
    args = argparse.ArgumentParser()
    fidelity.add_arguments(args)
    again, cached = fidelity.load_or_make_texts(smollm2_path, data, args.parse_args(argv), out)
    assert cached and again == texts


def test_fidelity_quick_sweep_free_running_and_advice(smollm2_path, tmp_path):
    """--quick with a λ/window sweep, free running and budget advice in one run."""
    data = copy_items("math500.jsonl", 2, tmp_path)
    out = tmp_path / "fidelity"
    argv = [str(smollm2_path), *COMMON, "--data", str(data), "--quick", "--methods", "rkv,streamingllm",
            "--lambdas", "0.5", "--windows", "4", "--free-running", "1", "--advise", "--max-p99-kld", "1e9",
            "--context", "4k,32k", "--out", str(out)]
    assert invoke(fidelity, argv) == 0
    result = json.loads((out / "fidelity.json").read_text())
    s = result["settings"]
    assert (s["n_texts"], s["length"], s["budgets"], s["kv_buffer"]) == (1, 448, [32, 64], 32)
    rows = {r["label"]: r for r in result["summary"]}
    assert set(rows) == {"rkv@32", "rkv@64", "streamingllm@32", "streamingllm@64",
                         "rkv@32,λ0.5", "rkv@64,λ0.5", "rkv@32,w4", "rkv@64,w4"}
    assert rows["rkv@64,λ0.5"]["lam"] == 0.5 and rows["rkv@64,w4"]["window"] == 4
    assert rows["rkv@64,w4"]["series"] == "rkv,w4" and rows["rkv@64"]["series"] == "rkv"
    # SmolLM2: 30 layers x 3 KV heads x 64 dims x (K, V) x 2 bytes per token
    assert {r["bytes_per_cell"] for r in rows.values()} == {30 * 3 * 64 * 2 * 2}
    advice = {a["series"]: a for a in result["advice"]}
    assert set(advice) == {"rkv", "streamingllm", "rkv,λ0.5", "rkv,w4"}
    assert all(a["budget"] == 32 for a in advice.values())        # any budget meets an unbounded target
    assert advice["rkv"]["memory"][1] == {"context": 32768, "kv_mib": 23040 * 64 / 2**20, "full_kv_mib": 23040 * 32768 / 2**20}
    # a target no budget meets, and one only the larger budget may meet
    args = argparse.Namespace(max_p99_kld=0.0, min_same_top1=None, context=[32768])
    assert all(a["budget"] is None for a in fidelity.advice(result["summary"], args, 23040.0))
    args.max_p99_kld = rows["rkv@64"]["stats_compressed"]["kld_p99"]
    chosen = {a["series"]: a["budget"] for a in fidelity.advice(result["summary"], args, 23040.0)}
    assert chosen["rkv"] == (32 if rows["rkv@32"]["stats_compressed"]["kld_p99"] <= args.max_p99_kld else 64)
    md = (out / "fidelity.md").read_text()
    assert "Budget advice" in md and "Free running" in md and "| rkv@32,λ0.5 |" in md
    free = {r["label"]: r for r in result["free_running"]}
    assert set(free) == set(rows)
    for r in free.values():
        assert r["problems"] == 1 and 0 < r["length_mean"] <= 256 and 0 <= r["divergence"][0] <= 256


def test_free_running_agrees_with_the_full_cache_until_it_compresses(smollm2_path, tmp_path):
    """A budget the answer never reaches writes the full cache's answer; a small one leaves it."""
    rows = [json.loads(line) for line in (DATA_DIR / "math500.jsonl").read_text().splitlines()[:2]]
    args = argparse.Namespace(free_running=2, first_item=0, max_answer_tokens=48, threads=1, n_gpu_layers=0)
    configs = [fidelity.RunConfig("rkv", 1024, 128), fidelity.RunConfig("streamingllm", 16, 16)]
    result = {r["label"]: r for r in fidelity.free_running(smollm2_path, rows, configs, args)}
    roomy, tight = result["rkv@1024"], result["streamingllm@16"]
    assert roomy["identical"] == 2 and roomy["lengths"] == roomy["full_lengths"]
    assert roomy["divergence"] == roomy["full_lengths"]
    # the tight cache holds 32 of a prompt of more than 100 tokens: its answers start elsewhere
    assert tight["identical"] < 2 and min(tight["divergence"]) < 48


def test_tasks_resume(smollm2_path, tmp_path):
    data = copy_items("gsm8k.jsonl", 3, tmp_path)
    out = tmp_path / "tasks"
    base = [str(smollm2_path), *COMMON, "--data", str(data), "--methods", "rkv", "--budgets", "32",
            "--kv-buffer", "16", "--max-tokens", "48", "--out", str(out)]
    assert invoke(tasks, base + ["--limit", "2"]) == 0
    results = out / "tasks_results.jsonl"
    first = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(first) == 4 and {r["config"] for r in first} == {"full", "rkv@32"}
    for r in first:
        assert r["gold"] == answers.gold_answer(json.loads(data.read_text().splitlines()[r["index"]]), "gsm8k")
        assert 0 < r["completion_tokens"] <= 48 and r["text"]
    assert any(r["compressions"] > 0 for r in first if r["config"] == "rkv@32")

    # a second run over three problems only answers the third
    assert invoke(tasks, base + ["--limit", "3"]) == 0
    second = [json.loads(line) for line in results.read_text().splitlines()]
    assert second[:4] == first and len(second) == 6
    assert {r["index"] for r in second[4:]} == {2}
    result = json.loads((out / "tasks.json").read_text())
    assert result["settings"]["skipped"] == 4 and result["settings"]["task"] == "gsm8k"
    for row in result["summary"]:
        assert row["n"] == 3 and 0.0 <= row["accuracy"] <= 1.0
    assert_png(out / "tasks_accuracy.png")
    assert "rkv@32" in (out / "tasks.md").read_text()


def test_tasks_in_parallel_answer_as_one_at_a_time_and_resume(smollm2_path, tmp_path):
    data = copy_items("gsm8k.jsonl", 3, tmp_path)
    base = [str(smollm2_path), *COMMON, "--data", str(data), "--methods", "rkv", "--budgets", "32",
            "--kv-buffer", "16", "--max-tokens", "48"]

    def answers_in(out):
        return {(r["config"], r["index"]): r["text"]
                for r in map(json.loads, (out / "tasks_results.jsonl").read_text().splitlines())}

    assert invoke(tasks, base + ["--limit", "3", "--out", str(tmp_path / "one")]) == 0
    parallel = tmp_path / "parallel"
    assert invoke(tasks, base + ["--limit", "2", "--parallel", "3", "--out", str(parallel)]) == 0
    assert len(answers_in(parallel)) == 4
    assert invoke(tasks, base + ["--limit", "3", "--parallel", "3", "--out", str(parallel)]) == 0
    assert json.loads((parallel / "tasks.json").read_text())["settings"]["skipped"] == 4
    together, alone = answers_in(parallel), answers_in(tmp_path / "one")
    assert together.keys() == alone.keys() and len(together) == 6
    # Mostly bitwise equal. How the scheduler packs prompt chunks of several sequences into one
    # decode depends on timing, and a batch rounds differently from a lone chunk; a compression can
    # turn that into another kept set, so an answer may part from its lone twin (seen for one of six,
    # early or late, on a loaded machine; BatchedLlama's docstring)
    same = [k for k in alone if together[k] == alone[k]]
    assert len(same) >= 4
    assert all(together[k].strip() for k in alone)


def test_bench_parallel_fills_a_fixed_kv_memory(smollm2_path, tmp_path):
    out = tmp_path / "throughput"
    argv = [str(smollm2_path), *COMMON, "--parallel", "--lengths", "160", "--budgets", "128", "--kv-buffer", "32",
            "--prompt-tokens", "40", "--out", str(out)]
    assert invoke(bench, argv) == 0
    result = json.loads((out / "throughput.json").read_text())
    rows = {(r["label"], r["n_seq"]): r for r in result["rows"]}
    # the memory of one full sequence (prompt + 160 tokens, padded to 256 cells) holds this many of 128 + 32 cells
    full_cells = -(-(result["settings"]["prompt_tokens"] + 161) // 256) * 256
    fit = full_cells // 256
    assert set(rows) == {("full", 1)} | {(label, n) for label in ("rkv@128", "limit@160") for n in range(1, fit + 1)
                                         if n == fit or n & (n - 1) == 0}
    assert rows[("full", 1)]["kv_bytes"] == result["rows"][0]["kv_memory"] == fit * rows[("rkv@128", 1)]["kv_bytes"]
    for r in result["rows"]:
        # the limit's short caches generate as many tokens, in requests of 160 - prompt tokens back to back
        assert r["generated"] == r["n_seq"] * 160
        if r["label"] == "limit@160":
            assert r["tokens_per_request"] == 160 - result["settings"]["prompt_tokens"] - 1
            assert r["requests_per_seq"] == -(-160 // r["tokens_per_request"]) > 1
        else:
            assert r["requests_per_seq"] == 1
        assert r["aggregate_tps"] > 0 and r["per_seq_tps"] == pytest.approx(r["aggregate_tps"] / r["n_seq"])
        assert r["steps"] >= 160 and 0 < r["step_overhead"] < 1
    assert rows[("rkv@128", 1)]["share_of_limit"] > 0 and rows[("rkv@128", 1)]["x_full"] > 0
    assert "limit@160" in (out / "throughput.md").read_text()
    assert_png(out / "throughput.png")

    # a memory of three budgeted sequences: rkv sweeps 1, 2, 3 and the limit with it
    per_seq = rows[("rkv@128", 1)]["kv_bytes"]
    assert invoke(bench, argv + ["--kv-memory", str(3 * per_seq), "--methods", "rkv"]) == 0
    result = json.loads((out / "throughput.json").read_text())
    assert sorted(r["n_seq"] for r in result["rows"] if r["label"] == "rkv@128") == [1, 2, 3]
    assert sorted(r["n_seq"] for r in result["rows"] if r["label"] == "full") == [1]

"""The benchmark's interleaved timer: every rival timed in every round, order rotating, medians per rival."""

import benchmarks.run as bench


def test_interleaved_medians_rotates_and_takes_medians(monkeypatch):
    clock, calls = [0.0], []
    cost = {"a": [1.0, 5.0, 2.0, 3.0], "b": [10.0, 30.0, 20.0, 90.0]}  # per timed call

    def make(name):
        def fn():
            calls.append(name)
            if len(calls) > 2:  # after the warm-up round
                clock[0] += cost[name][sum(c == name for c in calls[2:]) - 1]

        return fn

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    t = bench.interleaved_medians({"a": make("a"), "b": make("b")}, iters=4, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert t == {"a": 2.5, "b": 25.0}


def test_only_generation_prints_its_rows_and_leaves_latest_json(monkeypatch, tmp_path, capsys):
    row = ("greedy small b1", "mmgpt", "2.0 tokens/s", "")
    goal = bench.target("generate_small_b1_vs_ved", 2.0, 1.0, 2.0, 3.0, "tokens/s")
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    monkeypatch.setattr(bench, "generation_targets", lambda iters, have_coca: ([goal], [row]))
    monkeypatch.setattr(bench, "matmul_peak", lambda: 1 / 0)  # nothing else runs
    assert bench.main(["--only", "generation", "--skip-coca", "--iters", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "| greedy small b1 | mmgpt | 2.0 tokens/s |  |" in out
    assert "| generate_small_b1_vs_ved | 2.0 | 1.0 | 2.0 | >=3.0 | NO |" in out
    assert not (tmp_path / "latest.json").exists()


def test_optimizer_step_benchmark_times_both_optimizers_on_the_recipe():
    from benchmarks.optimizer_step import measure

    res = measure(1, ["batch_size=4", "model.tokenizer_texts=200"])
    assert set(res) == {"adamw", "muon"}
    assert all(0 < r["optimizer_ms"] < r["step_ms"] for r in res.values())


def test_decode_kernels_benchmark_checks_each_kernel_against_addmm():
    """Every one-row kernel it times computes the product (checked inside against addmm) over the small
    decoder's 62 MB of weights."""
    from benchmarks import decode_kernels

    times, n_bytes = decode_kernels.measure(iters=1)
    assert set(times) == set(decode_kernels.KERNELS) and all(t > 0 for t in times.values())
    assert round(n_bytes / 1e6) == 62

"""The pure parts of the GPU benchmark's Python scripts (bench/plot_gpu.py, bench/hf_peer.py): the
combined table and its target verdicts from bench-gpu / peer / dysco-client JSON, and the mapping of
our config.json onto transformers' config arguments. Neither needs torch, transformers nor a GPU."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_module(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plot_gpu = load_module("plot_gpu")
hf_peer = load_module("hf_peer")


def bench_json(plain_ms, dysco_ms, floor=8.0, dysco_floor=13.4):
    return {
        "bench": "bench-gpu", "label": "qwen3-8b", "model_name": "synthetic-qwen3-8b",
        "architecture": "qwen3", "dtype": "bfloat16", "device": "cuda:0", "timed_steps": 20,
        "bandwidth_bytes_per_s": 4.3e12, "matmul_flops_per_s": 7.7e14, "dysco": True,
        "ttft": {"tokens": 131072, "seconds": 11.0, "flops": 6.9e15, "floor_s": 9.0,
                 "ratio": 11.0 / 9.0},
        "contexts": [{
            "context": 131072, "plain_ms_p50": plain_ms, "plain_floor_ms": floor,
            "plain_ratio": plain_ms / floor, "dysco_ms_p50": dysco_ms,
            "dysco_floor_ms": dysco_floor, "dysco_ratio": dysco_ms / dysco_floor,
            "dysco_over_plain": dysco_ms / plain_ms, "dysco_speculative_ms": 5.0,
            "dysco_select_ms": 1.0, "dysco_real_ms": 9.0, "num_selected": 4096}],
    }


def server_json(one, many):
    def phase(n, tok_s, itl_ms):
        return {"concurrency": n, "generated_tokens_per_s": tok_s, "errors": 0,
                "ttft": {"p50_ms": 2000.0}, "inter_token_latency": {"mean_ms": itl_ms,
                                                                   "p50_ms": itl_ms}}
    return {"config": {"concurrency": 16, "prompt_tokens": 32000, "max_new_tokens": 128,
                       "dysco": True},
            "phases": [phase(1, one, 20.0), phase(16, many, 25.0)],
            "throughput_ratio": many / one}


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_table_has_ratios_to_floor_and_peer_and_target_verdicts(tmp_path):
    files = [
        write(tmp_path, "b.json", bench_json(plain_ms=8.8, dysco_ms=20.0)),
        write(tmp_path, "p.json", {"peer": "transformers", "model_name": "synthetic-qwen3-8b",
                                   "transformers": "5.17.0", "errors": [],
                                   "contexts": [{"context": 131072, "per_token_ms_p50": 62.3,
                                                 "ttft_s": 12.9, "compiled": True}]}),
        write(tmp_path, "s.json", server_json(one=40.0, many=480.0)),
        write(tmp_path, "junk.json", {"something": "else"}),
    ]
    benches, peers, servers = plot_gpu.load(files)
    assert (len(benches), len(peers), len(servers)) == (1, 1, 1)
    text = plot_gpu.table(benches, peers, servers)
    # plain 8.8 / floor 8.0 = 1.10x; DySCO 20.0 / 13.4 = 1.49x; DySCO/plain 2.27x; plain/peer 0.14x.
    assert "| 131072 | 8.80 | 8.00 | 1.10x | 20.00 | 13.40 | 1.49x | 2.27x | 62.30 | 0.14x |" in text
    assert "plain at 131072: 1.10x its floor (target <= 1.15x): met" in text
    assert "DySCO at 131072: 1.49x its floor (target <= 1.15x): missed" in text
    assert "DySCO/plain at 131072: 2.27x (target <= 1.75x): missed" in text
    assert "131072-token prefill: 1.22x the FLOP floor (target <= 1.3x): met" in text
    # 480 / 40 = 12x over the window; decode 16 / 25 ms against 1 / 20 ms = 12.8x.
    assert "12.00x (window), 12.80x (decode)" in text and "target >= 10x): met" in text
    assert "| 131072 | 11.00 | 9.00 | 1.22x | 12.90 | 0.85x |" in text


def test_table_without_peer_or_server(tmp_path):
    benches, peers, servers = plot_gpu.load([write(tmp_path, "b.json", bench_json(20.0, 40.0))])
    text = plot_gpu.table(benches, peers, servers)
    assert "| 131072 | 20.00 | 8.00 | 2.50x |" in text and "| - | - | - |" in text
    assert "sessions" not in text


def test_hf_config_kwargs_maps_our_config():
    pkg = {"architecture": "qwen3", "dtype": "bfloat16", "vocab_size": 151936, "hidden_size": 4096,
           "intermediate_size": 12288, "num_layers": 36, "num_attention_heads": 32,
           "num_kv_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
           "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                            "original_max_position_embeddings": 32768},
           "max_position_embeddings": 131072, "tie_word_embeddings": False,
           "special_tokens": {"bos_token_id": None, "eos_token_ids": [151645, 151643]}}
    arch, dtype, kw, rope = hf_peer.hf_config_kwargs(pkg)
    assert (arch, dtype) == ("qwen3", "bfloat16")
    assert kw["num_hidden_layers"] == 36 and kw["num_key_value_heads"] == 8
    assert kw["eos_token_id"] == [151645, 151643] and "bos_token_id" not in kw
    assert "mlp_bias" not in kw
    assert rope == {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0,
                    "original_max_position_embeddings": 32768}
    with pytest.raises(ValueError):
        hf_peer.hf_config_kwargs(dict(pkg, architecture="gpt2"))


def test_parse_contexts():
    assert hf_peer.parse_contexts("32768,8192,8192") == [8192, 32768]
    with pytest.raises(ValueError):
        hf_peer.parse_contexts("1")


def test_table_of_a_cut_prefill_with_no_context(tmp_path):
    data = bench_json(8.8, 20.0)
    data["contexts"] = []
    data["ttft"].update(tokens=16384, cut=True)
    benches, peers, servers = plot_gpu.load([write(tmp_path, "b.json", data)])
    text = plot_gpu.table(benches, peers, servers)
    assert "| 16384 (cut: --max-prefill-s) |" in text


def test_table_shows_where_the_time_goes(tmp_path):
    data = bench_json(8.8, 20.0)
    data["profile"] = {"context": 131072, "steps": 5, "device_events": True,
                       "plain": {"wall_ms_per_step": 8.8, "device_ms_per_step": 8.1,
                                 "top": [{"name": "paged_attention_decode_kernel",
                                          "ms_per_step": 4.6, "calls_per_step": 36}],
                                 "span_ms_per_step": 8.75, "busy_ms_per_step": 8.5,
                                 "gaps": [{"after": "GemvKernel", "before": "SiluMulKernel",
                                           "ms_per_step": 0.072, "count_per_step": 36}]},
                       "dysco": {"error": "CUPTI unavailable"}}
    benches, peers, servers = plot_gpu.load([write(tmp_path, "b.json", data)])
    text = plot_gpu.table(benches, peers, servers)
    assert ("plain step at 131072 (5 profiled steps): 8.80 ms wall, 8.10 ms of device events; "
            "top: paged_attention_decode_kernel 4.600 ms x36") in text
    assert "Profile (dysco): unavailable: CUPTI unavailable" in text
    assert ("Device timeline, plain step at 131072: 8.500 ms busy of a 8.750 ms span (0.250 ms "
            "idle); longest idle: after GemvKernel before SiluMulKernel 0.0720 ms x36") in text


def test_table_splits_the_dysco_step_by_pass(tmp_path):
    data = bench_json(8.8, 20.0)
    data["profile"] = {"context": 131072, "steps": 5, "device_events": True,
                       "plain": {"wall_ms_per_step": 8.8, "device_ms_per_step": 8.1, "top": []},
                       "dysco": {"wall_ms_per_step": 15.6, "device_ms_per_step": 15.0, "top": []},
                       "dysco_by_pass": [{"name": "MmaSplitAttentionKernel",
                                          "speculative_calls_per_step": 24,
                                          "speculative_ms_per_call": 0.1446,
                                          "real_calls_per_step": 36, "real_ms_per_call": 0.1601,
                                          "plain_ms_per_call": 0.1445}]}
    benches, peers, servers = plot_gpu.load([write(tmp_path, "b.json", data)])
    text = plot_gpu.table(benches, peers, servers)
    assert ("DySCO step by pass at 131072 (ms a call): MmaSplitAttentionKernel speculative 24 x "
            "0.1446 ms, real 36 x 0.1601 ms (plain 0.1445 ms)") in text
    # With the control profile (the plain step again after the DySCO steps).
    data["profile"]["dysco_by_pass"][0]["plain_after_ms_per_call"] = 0.1502
    benches, peers, servers = plot_gpu.load([write(tmp_path, "c.json", data)])
    text = plot_gpu.table(benches, peers, servers)
    assert ("real 36 x 0.1601 ms (plain 0.1445 ms, plain after 0.1502 ms)") in text


def test_sessions_line_gives_the_steady_decode_ratio_and_the_bandwidth_ceiling(tmp_path):
    # One session's step reads the weights (W) and its KV of both passes (kv); 16 sessions' step
    # reads W once and 16 kv: at most 16 (W + kv) / (W + 16 kv) times one session's tokens/s.
    bench = bench_json(plain_ms=9.6, dysco_ms=16.6)
    per_token, layers, probe_last = 147456, 36, 24
    kv = 32768 * per_token * (1 + (probe_last + 1) / layers)
    weights = 24.78e9
    bench.update({"kv_bytes_per_token": per_token, "num_layers": layers,
                  "probe_last_layer": probe_last})
    bench["contexts"].append({**bench["contexts"][0], "context": 32768,
                              "dysco_bytes": weights + kv})
    server = server_json(one=42.0, many=59.0)
    server["phases"][1]["inter_token_latency"] = {"mean_ms": 115.0, "p50_ms": 47.0}
    server["phases"][0]["inter_token_latency"] = {"mean_ms": 10.6, "p50_ms": 10.5}
    files = [write(tmp_path, "b.json", bench), write(tmp_path, "s.json", server)]
    text = plot_gpu.table(*plot_gpu.load(files))
    ceiling = 16 * (weights + kv) / (weights + 16 * kv)
    assert 3.3 < ceiling < 3.5
    # steady decode: 16 / 47 ms against 1 / 10.5 ms = 3.57x; decode (means) 16 / 115 vs 1 / 10.6.
    assert (f"1.40x (window), {16 * 10.6 / 115.0:.2f}x (decode), {16 * 10.5 / 47.0:.2f}x "
            f"(steady decode)") in text
    assert f"the bandwidth ceiling is {ceiling:.2f}x, below the target): missed" in text
    assert "Bandwidth ceiling of that ratio at 32768 tokens" in text


def test_bandwidth_ceiling_splits_bytes_as_the_bench_floor_does(tmp_path):
    # bench-gpu writes the KV passes its DySCO floor counts (the speculative pass's last layer reads
    # only the keys of its probed KV heads); the ceiling takes the weights as the rest of the bytes.
    bench = bench_json(plain_ms=9.6, dysco_ms=16.6)
    per_token, layers, passes = 147456, 36, 1 + (24 + 0.5 / 8) / 36
    kv = 32768 * per_token * passes
    weights = 24.78e9
    bench.update({"kv_bytes_per_token": per_token, "num_layers": layers, "probe_last_layer": 24,
                  "dysco_kv_passes": passes})
    bench["contexts"].append({**bench["contexts"][0], "context": 32768,
                              "dysco_bytes": weights + kv})
    ceiling, at = plot_gpu.bandwidth_ceiling(bench, 16, 32768)
    assert at == 32768
    assert abs(ceiling - 16 * (weights + kv) / (weights + 16 * kv)) < 1e-9
    # Without the field (older files) the last probe layer's KV counts whole: another split.
    del bench["dysco_kv_passes"]
    assert abs(plot_gpu.bandwidth_ceiling(bench, 16, 32768)[0] - ceiling) > 1e-3


timeline = load_module("timeline")


def two_steps():
    # Step 0: a (0-10), b starts early under a (8-15), idle, c (20-22); host gap; step 1 the same + 100.
    step = [["a", 0.0, 10.0], ["b", 8.0, 7.0], ["c", 20.0, 2.0]]
    return step + [[n, s + 100.0, d] for n, s, d in step]


def test_timeline_splits_steps_at_the_longest_gaps_and_counts_busy_time():
    events = two_steps()
    steps = timeline.split_steps(events, 2)
    assert [len(s) for s in steps] == [3, 3]
    assert steps[1][0] == ["a", 100.0, 10.0]
    # Busy: the union of the intervals, 0-15 and 20-22 in each step.
    assert timeline.busy_us(steps[0]) == pytest.approx(17.0)
    assert timeline.busy_us(events) == pytest.approx(34.0)


def test_timeline_increments_are_each_kernels_share_of_the_critical_path():
    inc = timeline.increments(timeline.split_steps(two_steps(), 2)[0])
    # a: its whole duration; b: from a's end (10) to its own (15); c: from 15 to 22, its idle included.
    assert inc == {"a": (1, 10.0), "b": (1, pytest.approx(5.0)), "c": (1, pytest.approx(7.0))}
    # A kernel wholly inside the one ahead adds nothing.
    assert timeline.increments([["x", 0.0, 10.0], ["y", 2.0, 3.0]])["y"] == (1, 0.0)


def test_timeline_window_and_runs(tmp_path):
    events = [["k", 0.0, 1.0], ["k", 1.5, 1.0], ["Select", 3.0, 4.0], ["Norm", 8.0, 1.0]]
    w = timeline.window(events, "Select", "Norm")
    assert [e[0] for e in w] == ["Select", "Norm"]
    assert timeline.window(events, "Norm", "Select") is None
    runs = timeline.runs(events)
    assert [(r[0], r[1]) for r in runs] == [("k", 2), ("Select", 1), ("Norm", 1)]
    assert runs[0][4] == pytest.approx(0.5)  # the idle inside the run of k
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"context": 8, "steps": 1, "dysco": events, "plain": events}))
    assert timeline.main([str(path), "--window", "Select", "Norm"]) == 0
    assert timeline.main([str(path), "--window", "Nothing", "Norm"]) == 1


def test_timeline_summary_names_kernels_shortly(tmp_path, capsys):
    assert timeline.short_name(
        "void dysco::kernels::(anonymous namespace)::GemvKernel<c10::BFloat16, 1, 2>(c10::BFloat16*)"
    ) == "GemvKernel"
    assert timeline.short_name("Memcpy HtoD (Pinned -> Device)") == "Memcpy HtoD"
    assert timeline.short_name(
        "dysco::kernels::(anonymous namespace)::SelectFusedKernel(float*)") == "SelectFusedKernel"
    events = [["a", 0.0, 10.0], ["b", 8.0, 7.0], ["Select", 20.0, 2.0], ["Norm", 23.0, 1.0]]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"context": 8, "steps": 1, "dysco": events, "plain": events}))
    assert timeline.main([str(path), "--summary", "--window", "Select", "Norm"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("dysco step 0 at 8: span 24.0 us, busy 18.0 us; critical path a call: a x1 10.0 us; "
                        "Select x1 7.0 us; b x1 5.0 us; Norm x1 2.0 us")
    assert lines[1] == ("dysco window Select..Norm: span 4.0 us, busy 3.0 us; Select x1 2.0 us; "
                        "Norm x1 1.0 us")

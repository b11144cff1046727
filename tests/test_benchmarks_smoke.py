"""Every speed benchmark this project keeps for issue 14 still runs at a tiny size and writes its results/speed.md
section (no times are asserted: they depend on the machine). The GPU script is checked for syntax and for
command lines its Python parts accept."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(script: str, *args: str, timeout: int = 600) -> str:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _section(md: Path, key: str) -> str:
    text = md.read_text()
    m = re.search(f"<!-- {key}:start -->(.*)<!-- {key}:end -->", text, re.S)
    assert m, f"no {key} section in {md}"
    return m.group(1)


def test_sampling_speed_tiny(tmp_path):
    md = tmp_path / "speed.md"
    out = _run("sampling_speed.py", "--tiny", "--repeats", "1", "--threads", "1", "--md", str(md))
    assert "load average before" in out
    body = _section(md, "sampling_speed_cpu")
    # NBP: 5 generation rows (fast greedy, sampled, reference draw; plain greedy, sampled), one more (sampled with
    # the torch-op passes) where the compiled passes are built, + 2 step rows (fast, plain); NTP: 3 (fast greedy,
    # sampled; plain greedy) + 2, and greedy without the screened head, and also without the compiled GEMV, where
    # the kernels are built
    from nbp.generator import kernels

    compiled = kernels.enabled()
    assert body.count("| NBP |") == 7 + compiled and body.count("| NTP |") == 5 + 2 * compiled
    assert ("torch-op passes |" in body) == compiled and ("NBP with the torch-op passes" in body) == compiled
    assert "sort-based reference draw" in body and "bare forward" in body and "Hardware limits" in body
    assert body.count("(same ids as fast)") == 2 + 2 * compiled  # greedy: plain NBP, plain NTP (and ablations) agree
    assert ("the screened head makes it" in body) == compiled and ("candidate ids again per row" in body) == compiled


def test_filter_cost_tiny(tmp_path):
    from nbp.generator import kernels

    md = tmp_path / "speed.md"
    out = _run("filter_cost.py", "--tiny", "--repeats", "1", "--threads", "1", "--md", str(md))
    assert "load average before" in out
    body = _section(md, "filter_cost_cpu")
    rows = re.findall(r"^\| ([^|]+) \| (-?[0-9.]+) \(", body, re.M)  # (label, median ms) of every timed row
    labels = [label for label, _ in rows]
    both = kernels.enabled()  # the compiled passes and the torch ops, or the torch ops alone
    assert labels[:3] == ["greedy generation", "sampled generation"] + (["sampled generation, torch ops"] if both
                                                                           else ["whole draw"]), labels
    assert sum(label.endswith("torch ops") for label in labels) == 4 * both, labels
    assert len(rows) == 12 + 4 * both and labels[-2].startswith("the rest of the draw"), labels
    assert ("compiled (nbp.generator.kernels)" in body) == both
    assert body.count("greedy generation, paired per repeat") == 1 + both


def test_gpu_decode_tiny_on_cpu(tmp_path):
    md = tmp_path / "speed.md"
    _run("gpu_decode.py", "--tiny", "--device", "cpu", "--batch", "1", "--md", str(md))
    body = _section(md, "gpu_decode_cpu")
    assert body.count("| 1 | NBP |") == 2 and body.count("| 1 | NTP |") == 2  # eager and the fixed-shape path
    assert "NBP: identical" in body and "NTP: identical" in body  # greedy equality on CPU


def test_generator_speed_tiny_on_cpu(tmp_path):
    md = tmp_path / "speed.md"
    _run("generator_speed.py", "--device", "cpu", "--preset", "tiny", "--grid", "3", "4", "4", "--block", "1", "1", "4",
         "--vocab", "100", "--task", "class", "--classes", "2", "--modes", "sdpa", "--batch", "2", "--fp32",
         "--warmup", "1", "--steps", "1", "--threads", "1", "--md", str(md))
    assert "| sdpa | tiny | 2 |" in _section(md, "generator_speed_cpu")


def test_training_overhead_tiny(tmp_path):
    md = tmp_path / "speed.md"
    out = _run("training_overhead.py", "--tiny", "--threads", "1", "--md", str(md))
    body = _section(md, "training_overhead_cpu")
    assert "load average before" in out
    rows = [r for r in body.splitlines() if r.startswith("| train_")]
    assert [r.split(" | ")[0] for r in rows] == ["| train_tokenizer embedded", "| train_generator embedded_nbp"]
    for r in rows:  # the pieces add up: loop >= step, and the share is a percentage in [0, 100]
        cells = [c.strip() for c in r.strip("|").split("|")]
        loop, step, val = float(cells[2]), float(cells[3]), float(cells[7])
        assert loop >= step + val - 1e-6 and 0 <= float(cells[8].rstrip("%")) <= 100
    assert float([c.strip() for c in rows[1].strip("|").split("|")][7]) > 0  # the generator validated


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def test_resource_plan_tiny(tmp_path):
    import json

    from nbp.suites import SUITES

    md, reuse = tmp_path / "speed.md", tmp_path / "generator_speed.json"
    row = {"mode": "sdpa", "preset": "base", "batch": 8, "seq_len": 1264, "precision": "bf16", "step_s": 0.5,
           "params": 1, "mfu": None, "peak_mem_gib": 30.0}  # a generator_speed.py --json row, taken as base's step
    reuse.write_text(json.dumps({"rows": [row]}))
    _run("resource_plan.py", "--tiny", "--threads", "1", "--reuse-json", str(reuse), "--md", str(md))
    body = _section(md, "resource_plan_cpu")
    base = next(_cells(r) for r in body.splitlines() if r.startswith("| train_generator base |"))
    assert base[2:6] == ["8", "0.5000", "16.00", "30.0"] and "generator_speed.py's row" in base[1]
    parts = [_cells(r)[0] for r in body.splitlines() if r.startswith("| ") and len(_cells(r)) == 7][1:]
    assert parts == ["train_tokenizer", "tokenizer encode", "tokenizer decode", "train_generator base",
                     "train_generator xl", "train_generator 3b", "sampling K600 NBP", "sampling K600 NTP",
                     "sampling UCF NBP", "i3d"]
    for r in body.splitlines():  # every part measured: a batch and a positive rate
        if r.startswith("| ") and _cells(r)[0] in parts:
            assert int(_cells(r)[2]) >= 1 and float(_cells(r)[4]) > 0, r
    plan = [_cells(r) for r in body.splitlines() if r.startswith("| ") and len(_cells(r)) == 9][1:]
    for suite in ("ucf101", "k600", "k600_ablations"):
        lists = SUITES[suite][1]
        want = {("prepare", d) for d in lists["datasets"]} | {("real_stats", d) for d in lists["datasets"]}
        want |= {(s, t) for t in lists["tokenizers"] for s in ("train_tokenizer", "eval_tokenizer", "tokenize")}
        want |= {(s, g) for g in lists["generators"] for s in ("train_generator", "eval_generator")}
        got = [(c[1], c[2]) for c in plan if c[0] == suite]
        assert sorted(got) == sorted(want), suite
        assert all(float(c[5]) > 0 for c in plan if c[0] == suite and c[1] != "prepare")  # GPU-hours
    k600_clips = next(c for c in plan if c[:3] == ["k600", "prepare", "k600"])
    assert float(k600_clips[7]) == pytest.approx(422_000 * 17 * 128 * 128 * 3 / 1e9, rel=1e-3)  # uint8 clip cache
    assert "3B (" in body and "ZeRO-2 over 8 GPUs" in body
    yaml_block = body.split("```yaml\n")[1].split("```")[0]
    import yaml

    res = yaml.safe_load(yaml_block)["set-resources"]
    assert set(res) == {"real_stats", "train_tokenizer", "eval_tokenizer", "tokenize", "train_generator", "eval_generator"}
    assert res["train_generator"]["gpu"] == 8 and all(v["runtime"] >= 1 for v in res.values())


def test_gpu_script_is_valid_and_its_command_lines_parse():
    import importlib.util

    script = ROOT / "benchmarks" / "gpu.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    mods = {}
    for name in ("gpu_decode", "sampling_speed", "resource_plan"):
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        mods[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mods[name])
    text = script.read_text().replace("\\\n", " ")
    seen = set()
    for line in text.splitlines():
        m = re.search(r"\$PY benchmarks/(\w+)\.py (.*)", line)
        if m and m.group(1) in mods:
            args = [a.replace('"$MD"', "x.md") for a in shlex.split(m.group(2).replace('"$MD"', "x.md"))]
            mods[m.group(1)].parse(args)
            seen.add(m.group(1))
    assert seen == set(mods)


def test_embedded_seeds_sets_the_training_seeds_and_tables_the_spread(tmp_path):
    """`benchmarks/embedded_seeds.py`: the seed edit reaches exactly the three training entries (comments kept), and
    the table's spread is the known mean, sample std and min-max of the runs of one machine and thread count."""
    import importlib.util
    import shutil

    from nbp.config import load_config

    spec = importlib.util.spec_from_file_location("embedded_seeds", ROOT / "benchmarks" / "embedded_seeds.py")
    es = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(es)
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    before = load_config(ROOT / "params.yaml")
    es.set_seeds(params, 7)
    after = load_config(params)
    assert [getattr(after, s)[e].seed for s, e in es.SEED_KEYS] == [7, 7, 7]
    assert after.train_generator["embedded_ntp"].block == before.train_generator["embedded_ntp"].block
    assert after.train_tokenizer["ucf101"] == before.train_tokenizer["ucf101"]
    assert "# The `run` section is THE switch" in params.read_text()

    def rec(seed, threads, psnr, machine="cpu A"):
        return {"seed": seed, "threads": threads, "machine": machine, "wall_s": 600, "commit": "abc",
                "metrics": {label: psnr for label, *_ in es.METRICS}}

    md = es.table([rec(0, 2, 1.0), rec(1, 2, 2.0), rec(2, 2, 3.0), rec(0, 1, 5.0), rec(0, 2, 9.0, "cpu B")])
    rows = {tuple(c.strip() for c in ln.split("|")[1:4]): ln for ln in md.splitlines() if ln.startswith("| cpu")}
    assert "| 2.00 ± 1.00 (1.00-3.00) |" in rows[("cpu A", "2", "0, 1, 2")]  # PSNR: mean, stdev (n - 1), range
    assert "5.00 (one seed)" in rows[("cpu A", "1", "0")]
    assert "9.00 (one seed)" in rows[("cpu B", "2", "0")]  # another machine is not pooled

"""scripts/gpu_check.py stays runnable where no GPU is lent: its checks pass on the CPU (tiny model)
and it writes the report an operator's GPU run would. (The benchmarks it runs on a GPU have their
own tests in tests/test_bench.py.)"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_on_the_cpu_and_writes_its_report(tmp_path):
    out = tmp_path / "report.json"
    args = ["--device", "cpu", "--dtype", "float32", "--base-model", "tiny", "--checks-only", "--out", str(out)]
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", *args], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["ok"] is True and report["dtype"] == "torch.float32"
    assert report["checks"]["mixed_forward"]["max_abs_logit_diff"] <= 1e-4
    assert report["checks"]["mixed_generation"]["rows_identical"] == report["checks"]["mixed_generation"]["rows"]
    assert set(report["checks"]["training_multi_user_equals_alone"]) == {"lora", "pt-peft"}
    assert report["benchmarks"] == {}  # --checks-only

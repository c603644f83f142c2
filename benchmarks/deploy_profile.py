"""Where ONNX Runtime spends the time of our W8/A8 DeiT-Tiny at batch 1 (after deploy.py).

    python benchmarks/deploy.py && python benchmarks/deploy_profile.py

ONNX Runtime's own profiler, 30 runs on 2 threads; the share of kernel time per
operator type. Writes ``benchmarks/results/deploy_profile.json``.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnxruntime as ort
from common import CACHE, machine, write_results


def main() -> None:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 2
    options.enable_profiling = True
    options.profile_file_prefix = str(CACHE / "deploy" / "profile")
    options.log_severity_level = 3
    session = ort.InferenceSession(str(CACHE / "deploy" / "deit_tiny_patch16_224_ours_w8a8.onnx"), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    for _ in range(30):
        session.run(None, {"images": x})
    events = json.loads(open(session.end_profiling()).read())
    time = Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            time[event["args"]["op_name"]] += event["dur"]
    total = sum(time.values())
    shares = {op: round(100 * t / total, 1) for op, t in time.most_common()}
    print(shares)
    write_results("deploy_profile", {"command": "python benchmarks/deploy_profile.py", "machine": machine(), "scaled_down": False,
                                     "percent_of_kernel_time": shares})


if __name__ == "__main__":
    main()

"""Integer ONNX deployment: file size, CPU latency and accuracy of what `sparseinv export` writes.

    python benchmarks/deploy.py [--per-class 100]

DeiT-Tiny (real weights): W8/A8 with the default method (``recon``) from the first 32
images of the 64-image sparse pool (made here when missing), exported as integer
QDQ ONNX; the peer a user would otherwise pick, ONNX Runtime's ``quantize_static`` (QDQ,
per-channel int8 weights, uint8 activations, MinMax calibration) calibrated on the same
32 images (fed whole: ONNX Runtime cannot feed kept tokens only, so their black
patches are seen); fp32 ONNX and fp32 PyTorch. DeiT-Small and DeiT-Base (random weights):
speed and size only, ours calibrated (method ``calib``) and the peer on the same 32 noise
images. Latency per image at batch 1 and batch 32 on 2 threads, all in one run.
Writes ``benchmarks/results/deploy.json`` and ``deploy.md``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import numpy as np
import torch
from common import CACHE, DEIT_TINY, DEIT_TINY_CKPT, RESULTS, ensure_pool, machine, pool_config, write_results
from quantization import val_subset

from sparseinv import load_model, sparse_forward
from sparseinv.data import evaluate_tensors
from sparseinv.quant.export import export_onnx, integer_ops, onnx_logits, onnx_session
from sparseinv.quant import QuantConfig, noise_batches, pool_batches, quantize_

THREADS = 2
SCRATCH = CACHE / "deploy"


def latency(run, images: torch.Tensor, repeats: int) -> float:
    """Median seconds per image of ``run(images)`` after one warm-up."""
    run(images)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(images)
        times.append(time.perf_counter() - start)
    return statistics.median(times) / images.shape[0]


def ort_static(fp_path: str, out: str, images: torch.Tensor) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"images": images[i : i + 1].numpy()} for i in range(images.shape[0])])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(fp_path, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)


def measure(name: str, model, calib, images, labels, real: bool) -> dict:
    """Every variant of one model: files, integer ops, latency, and (real weights) top-1."""
    SCRATCH.mkdir(parents=True, exist_ok=True)
    fp_path, ours_path, peer_path = (str(SCRATCH / f"{name}_{kind}.onnx") for kind in ("fp32", "ours_w8a8", "ort_static"))
    method = "recon" if real else "calib"
    start = time.perf_counter()
    qmodel = quantize_(copy.deepcopy(model), QuantConfig.for_method(method, 8, 8), calib, progress=False)
    fit = time.perf_counter() - start
    export_onnx(model, fp_path)
    notes = export_onnx(qmodel, ours_path)
    dense_calib = torch.cat([x for x, _ in calib])  # whole images, black patches included, for the peer
    ort_static(fp_path, peer_path, dense_calib)
    sessions = {kind: onnx_session(path, threads=THREADS) for kind, path in
                (("fp32 ONNX", fp_path), ("ours W8/A8 ONNX", ours_path), ("ORT quantize_static W8/A8", peer_path))}
    torch.set_num_threads(THREADS)
    runs = {"fp32 PyTorch": lambda x: model(x)}
    runs.update({kind: (lambda x, s=s: onnx_logits(s, x, x.shape[0])) for kind, s in sessions.items()})
    rows = {}
    sample = images[:32]
    for kind, run in runs.items():
        with torch.no_grad():
            row = {"latency_ms_batch1": 1000 * latency(run, sample[:1], 20), "latency_ms_batch32": 1000 * latency(run, sample, 3)}
        path = {"fp32 ONNX": fp_path, "ours W8/A8 ONNX": ours_path, "ORT quantize_static W8/A8": peer_path}.get(kind)
        if path:
            row["file_mib"] = os.path.getsize(path) / 2**20
            row["ops_after_optimisation"] = integer_ops(path)
        rows[kind] = row
        print(name, kind, row, flush=True)
    result = {"rows": rows, "fit_seconds": fit, "export_notes": notes, "method": method}
    if real:
        with torch.no_grad():
            rows["fp32 PyTorch"]["top1"] = evaluate_tensors(model, images, labels, progress=False)["top1"]
            rows["ours W8/A8 fake-quant PyTorch"] = {"top1": evaluate_tensors(qmodel, images, labels, progress=False)["top1"]}
            reference = torch.cat([sparse_forward(qmodel, images[i : i + 100]).logits for i in range(0, images.shape[0], 100)])
        for kind, session in sessions.items():
            logits = onnx_logits(session, images, 100)
            rows[kind]["top1"] = 100.0 * float((logits.argmax(1) == labels).float().mean())
            if kind == "ours W8/A8 ONNX":
                result["largest_logit_difference_vs_fake_quant"] = float((logits - reference).abs().max())
                result["top1_agreement_with_fake_quant"] = 100.0 * float((logits.argmax(1) == reference.argmax(1)).float().mean())
        print(name, "top-1", {k: v.get("top1") for k, v in rows.items()}, flush=True)
    return result


def markdown(payload: dict) -> str:
    lines = [f"Latency per image on {THREADS} CPU threads ({payload['machine']['processor']}, {payload['machine']['cpu_count']} cores), "
             f"top-1 (1000-way) on {payload['eval_images']} imagenette val images (DeiT-Tiny only).", "",
             "| model | variant | file MiB | ms/image, batch 1 | ms/image, batch 32 | top-1 |", "| --- | --- | --- | --- | --- | --- |"]
    for name, result in payload["models"].items():
        for kind, row in result["rows"].items():
            size = f"{row['file_mib']:.1f}" if "file_mib" in row else "-"
            b1 = f"{row['latency_ms_batch1']:.1f}" if "latency_ms_batch1" in row else "-"
            b32 = f"{row['latency_ms_batch32']:.1f}" if "latency_ms_batch32" in row else "-"
            top1 = f"{row['top1']:.1f}" if "top1" in row else "-"
            lines.append(f"| {name} | {kind} | {size} | {b1} | {b32} | {top1} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=100, help="val images per class (default 100: 1000 images)")
    parser.add_argument("--models", nargs="*", default=["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"])
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    tiny = load_model(DEIT_TINY, DEIT_TINY_CKPT)
    images, labels = val_subset(tiny, args.per_class)
    payload = {"command": "python benchmarks/deploy.py", "machine": machine(), "threads": THREADS, "eval_images": int(images.shape[0]),
               "scaled_down": True, "note": f"top-1 on the first {args.per_class} val images per class, not all 3925", "models": {}}
    for name in args.models:
        if name == DEIT_TINY:
            pool = ensure_pool("imagenet_sparse_64", DEIT_TINY, DEIT_TINY_CKPT, pool_config(sparse=True, num_images=64), tiny)
            calib = pool_batches(tiny, pool, DEIT_TINY, 32, 32)
            payload["models"][name] = measure(name, tiny, calib, images, labels, real=True)
        else:
            torch.manual_seed(0)
            model = load_model(name, pretrained=False)
            payload["models"][name] = measure(name, model, noise_batches(model, 32, 32), images, labels, real=False)
        write_results("deploy", payload)
        (RESULTS / "deploy.md").write_text(markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()

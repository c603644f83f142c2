"""``sparseinv demo --quick``: the whole main job on the real DeiT-Tiny, and its report."""

from __future__ import annotations

import json
import re

from conftest import SHARED
from sparseinv.cli import main
from sparseinv.demo import BITS, SOURCES


def test_quick_demo_writes_a_complete_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--quiet", "--shared", str(SHARED), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())

    inv = report["inversion"]
    assert inv["dense"]["tokens_per_phase"] == [196]
    sparse_tokens = inv["sparse"]["tokens_per_phase"]
    assert sparse_tokens[0] == 196 and sparse_tokens == sorted(sparse_tokens, reverse=True) and len(sparse_tokens) == 3
    # The output mask keeps int(N * prod(1 - r)) patches (SPEC), one more or less than the last phase fed.
    assert abs(inv["sparse"]["patches_kept"] - sparse_tokens[-1]) <= 1 and inv["sparse"]["patches_kept"] < 196
    for kind in ("dense", "sparse"):
        assert inv[kind]["seconds"] > 0 and 0 <= inv[kind]["success_rate"] <= 1
    assert inv["speedup"] == inv["dense"]["seconds"] / inv["sparse"]["seconds"]
    assert report["val_images"] == 10  # one per class
    assert 0 <= report["full_precision"] <= 100
    assert set(report["quantization"]) == {f"W{w}/A{a} {s}" for w, a in BITS for s in SOURCES}
    for cell in report["quantization"].values():
        assert 0 <= cell["top1"] <= 100 and cell["fit_seconds"] > 0
    assert set(report["distillation"]) == {"sparse", "dense"} and 0 <= report["teacher_top1"] <= 100
    assert all(0 <= d["top1"] <= 100 and d["train_seconds"] > 0 for d in report["distillation"].values())

    markdown = (out / "report.md").read_text()
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert set(pictures) == {"pools/sparse/grid.png", "pools/dense/grid.png", "tokens.png", "accuracy_vs_time.png"}
    for picture in pictures:
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for cell in report["quantization"].values():  # every number of the table is in the report and on screen
        assert f"{cell['top1']:.1f}" in markdown and f"{cell['top1']:.1f}" in printed
    assert f"{inv['speedup']:.2f}x faster" in markdown
    assert not (out / "students").exists()


def test_demo_without_weights_says_what_to_pass(tmp_path, capsys):
    assert main(["demo", "--quick", "--shared", str(tmp_path / "nothing"), "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pass --checkpoint FILE or --shared FOLDER" in err, err

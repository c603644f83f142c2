"""``sparseinv demo --quick``: the whole main job on the real DeiT-Tiny, and its report."""

from __future__ import annotations

import json
import re

import pytest

from conftest import SHARED
from sparseinv.cli import main
from sparseinv.demo import BITS, SOURCES

pytestmark = pytest.mark.slow


def test_quick_demo_writes_a_complete_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--quiet", "--shared", str(SHARED), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())

    inv = report["inversion"]
    assert inv["dense"]["tokens_per_phase"] == [196]
    sparse_tokens = inv["sparse"]["tokens_per_phase"]
    assert sparse_tokens[0] == 196 and sparse_tokens == sorted(sparse_tokens, reverse=True) and len(sparse_tokens) == 3
    # The demo's promise, in work rather than seconds (no test depends on timing): sparse inversion
    # feeds fewer token-steps than dense over the same steps, and its images keep exactly the last
    # phase's patches (the default last-phase mask).
    def token_steps(kind):
        return sum(t * (end - start) for t, (start, end) in zip(inv[kind]["tokens_per_phase"], inv[kind]["phase_bounds"]))
    assert token_steps("sparse") < 0.8 * token_steps("dense")
    assert inv["sparse"]["patches_kept"] == sparse_tokens[-1] < 196
    # The images are on their labels: the model classifies every one as the class it was inverted toward.
    for kind in ("dense", "sparse"):
        assert inv[kind]["success_rate"] == 1.0, kind
    assert inv["speedup"] == inv["dense"]["seconds"] / inv["sparse"]["seconds"]
    assert report["val_images"] == 10  # one per class
    assert set(report["quantization"]) == {f"W{w}/A{a} {s}" for w, a in BITS for s in SOURCES}
    assert set(report["distillation"]) == {"sparse", "dense"}
    markdown = (out / "report.md").read_text()
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert set(pictures) == {"pools/sparse/grid.png", "pools/dense/grid.png", "tokens.png", "accuracy_vs_time.png"}
    for picture in pictures:
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Every number of the report's table is report.json's, in the markdown and on screen.
    numbers = [report["full_precision"], report["teacher_top1"], *(c["top1"] for c in report["quantization"].values()),
               *(d["top1"] for d in report["distillation"].values())]
    for value in numbers:
        assert f"{value:.1f}" in markdown and f"{value:.1f}" in printed, value
    for kind in ("dense", "sparse"):
        assert f"{inv[kind]['seconds']:.1f}" in markdown and f"{inv[kind]['success_rate']:.2f}" in markdown
    assert f"{inv['speedup']:.2f}x faster" in markdown
    assert not (out / "students").exists()
    # An estimate was printed before the work started and is kept beside the time it took.
    assert printed.index("estimated time on this machine: about") < printed.index("== 1/4")
    assert report["estimated_seconds"] > 0 and report["step_seconds"] > 0


def test_demo_without_weights_says_what_to_pass(tmp_path, capsys):
    assert main(["demo", "--quick", "--shared", str(tmp_path / "nothing"), "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pass --checkpoint FILE or --shared FOLDER" in err, err


@pytest.mark.parametrize(("recon_iters", "bits", "measured"), [(60, ((8, 8), (4, 8), (4, 4)), 753.0), (30, ((4, 8), (4, 4)), 405.0)])
def test_the_printed_estimate_matches_the_runs_it_was_fitted_to(recon_iters, bits, measured):
    """Two runs of the default size on 2 cores without AMX (one model step 0.683 s): the
    estimate, from that step alone, is within 10% of the time each took."""
    from sparseinv.demo import DemoConfig, estimate_seconds

    estimate = estimate_seconds(DemoConfig(recon_iters=recon_iters, bits=bits), 0.683, 200, 196)
    assert abs(estimate - measured) < 0.1 * measured, estimate
    quick = estimate_seconds(DemoConfig.quick(), 0.683, 10, 196)
    assert quick < 0.25 * estimate

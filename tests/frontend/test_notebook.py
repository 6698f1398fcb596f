"""examples/kvcomm_tour.ipynb runs headless, start to end, and writes its three figures.

Executed with ``jupyter nbconvert --to notebook --execute``. The notebook starts its own CPU server (``ServerProcess`` with ``--enable-metrics``: the session
``kvcomm_server`` runs without metrics, and the anchor panel reads ``/metrics``), so this covers
the path a user takes. Its kernel is ``python3`` of the interpreter running pytest (.venv).
"""

import json
import os
import pathlib
import subprocess
import sys

import nbformat

REPO = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "examples" / "kvcomm_tour.ipynb"
FIGURES = ("kvcomm_tour_ttft.png", "kvcomm_tour_reuse.png", "kvcomm_tour_anchors.png")
CELL_TIMEOUT_S = 900           # the run cell starts a server and prefills on a shared 2-core CPU
MIN_PNG_BYTES = 15_000         # bare 6.4x3.4 in. axes at 120 dpi: 10 KB; the tour's: 24-48 KB
SUMMARY = ("import json, sys\nprint(json.dumps({'prefix': sys.prefix, 'anchors': anchors, "
           "'modes': [[c.mode for c in r.calls] for r in runs['kvcomm']]}))")


def test_tour_notebook_runs_and_writes_its_figures(tmp_path, monkeypatch):
    monkeypatch.delenv("KVCOMM_URL", raising=False)
    monkeypatch.setenv("KVCOMM_TOUR_FIGURES", str(tmp_path / "figures"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(cell.get("outputs") for cell in nb.cells), "commit the notebook cleared"
    nb.cells.append(nbformat.v4.new_code_cell(SUMMARY))
    source = tmp_path / "tour.ipynb"
    nbformat.write(nb, source)
    jupyter = pathlib.Path(sys.executable).parent / "jupyter"
    subprocess.run([str(jupyter), "nbconvert", "--to", "notebook", "--execute",
                    f"--ExecutePreprocessor.timeout={CELL_TIMEOUT_S}",
                    "--ExecutePreprocessor.kernel_name=python3", "--allow-errors",
                    "--output", "executed.ipynb", "--output-dir", str(tmp_path), str(source)],
                   check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                   timeout=CELL_TIMEOUT_S * 2)
    nb = nbformat.read(tmp_path / "executed.ipynb", as_version=4)

    errors = [out for cell in nb.cells for out in cell.get("outputs", [])
              if out.output_type == "error"]
    assert not errors, [f"{e.ename}: {e.evalue}" for e in errors]
    for name in FIGURES:
        path = tmp_path / "figures" / name
        assert path.is_file(), f"{name} not written"
        assert path.stat().st_size > MIN_PNG_BYTES, f"{name}: {path.stat().st_size} bytes"
    summary = json.loads(nb.cells[-1].outputs[0].text)
    assert summary["prefix"] == sys.prefix, "the kernel runs another Python than pytest's"
    assert any(a for a in summary["anchors"]), f"no anchors read from /metrics: {summary}"
    assert any(m == "reuse" for modes in summary["modes"] for m in modes), summary

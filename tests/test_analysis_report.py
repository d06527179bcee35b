"""write_report: every figure on disk, the findings in report.md, atomic replacement."""

import pytest

import analysis
from analysis import report as report_module
from tests.synthetic import Planted, make_manifest, make_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL_FIGURES = [name for name, *_ in report_module.FIGURES]


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "report"
    table = make_table(seed=0, planted=Planted(diverged=2))
    path = analysis.write_report(table, out, manifest=make_manifest(), margin=0.004)
    return path


def test_report_writes_every_figure(full_report):
    for name in ALL_FIGURES:
        figure = full_report / name
        assert figure.is_file(), name
        assert figure.stat().st_size > 5000, name
        assert figure.read_bytes()[:8] == PNG_SIGNATURE, name


def test_report_markdown_links_figures_and_findings(full_report):
    text = (full_report / "report.md").read_text()
    for name in ALL_FIGURES:
        assert f"]({name})" in text, name
    assert "Figure not drawn" not in text
    assert "TOST margin: 0.004 bpb" in text
    assert "- **1 best warmdown** [agrees]" in text
    assert "- **4 penalty law int6** [agrees]" in text
    assert "2 diverged" in text
    assert (full_report / "summary.txt").read_text().startswith("QAT warmdown study")


def test_micro_report_explains_missing_figures(tmp_path):
    path = analysis.write_report(make_table(phases=("micro",)), tmp_path / "micro")
    text = (path / "report.md").read_text()
    for name in ("warmdown.png", "probe_ratio.png", "energy.png", "energy_vs_bpb.png"):
        assert (path / name).stat().st_size > 0, name
    for name in ("penalty_law.png", "int4_boundary.png"):
        assert not (path / name).exists(), name
    assert "Figure not drawn, not supported: no done int4 cells" in text


def test_report_replaces_previous_report(tmp_path):
    out = tmp_path / "report"
    table = make_table(phases=("micro",))
    analysis.write_report(table, out)
    (out / "stale.txt").write_text("from the previous run")
    analysis.write_report(table, out)
    assert not (out / "stale.txt").exists()
    assert (out / "report.md").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no temporary folders left


def test_report_refuses_foreign_folder(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "precious.csv").write_text("1,2,3")
    with pytest.raises(ValueError, match="non-empty folder without report.md"):
        analysis.write_report(make_table(phases=("micro",)), out)
    assert (out / "precious.csv").read_text() == "1,2,3"


def test_report_refuses_file_destination(tmp_path):
    out = tmp_path / "report.md"
    out.write_text("not a folder")
    with pytest.raises(ValueError, match="is a file"):
        analysis.write_report(make_table(phases=("micro",)), out)


def test_failed_report_keeps_old_one(tmp_path, monkeypatch):
    out = tmp_path / "report"
    table = make_table(phases=("micro",))
    analysis.write_report(table, out)
    before = (out / "report.md").read_text()

    def broken(result, path):
        raise RuntimeError("drawing failed")

    figures = list(report_module.FIGURES)
    figures[-2] = ("energy.png", "Energy", broken, False)
    monkeypatch.setattr(report_module, "FIGURES", tuple(figures))
    with pytest.raises(RuntimeError, match="drawing failed"):
        analysis.write_report(table, out)
    assert (out / "report.md").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]

"""How reports show numbers, settings, legends and colours (issue 17): no raw floats or dicts, a
legend for every line style, one colour per family in every figure of the audit and the OOD report."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import pytest  # noqa: E402
import torch  # noqa: E402

from stableflows.audit.fmt import FAMILY_PALETTE, KNOWN_FAMILIES, NONFINITE_COLOR, family_colors, num, settings_text  # noqa: E402


@pytest.mark.parametrize("value,text", [
    (0.0014705881476402283, "0.001471"), (1.23e-17, "1.23e-17"), (2.1e-16, "2.1e-16"), (123456.789, "1.235e+05"),
    (3.0, "3"), (50, "50"), (0.0, "0"), (math.inf, "inf"), (-math.inf, "-inf"), (math.nan, "nan"), (None, "-"),
    (True, "yes"), (torch.tensor(0.25), "0.25"), (torch.tensor(7), "7")])
def test_numbers_have_four_significant_digits_in_any_magnitude(value, text):
    assert num(value) == text


def test_settings_are_key_value_text_not_python_dicts():
    text = settings_text({"step_size": 0.0014705881476402283, "pgd": {"steps": 50, "constraints": ["cell", "linf"]},
                          "shadow": None, "tolerance": 1e-3})
    assert text == "step_size 0.001471, pgd.steps 50, pgd.constraints cell, linf, shadow -, tolerance 0.001"
    assert "{" not in text and "[" not in text


def test_a_family_keeps_its_colour_whatever_else_is_shown():
    one = family_colors(["test", "grayed", "pgd:cell"])
    other = family_colors(["uniform", "pgd:cell", "my_set", "grayed", "train"])
    assert one["grayed"] == other["grayed"] and one["pgd:cell"] == other["pgd:cell"]
    every = family_colors(list(KNOWN_FAMILIES) + ["extra_a", "extra_b"])
    known = [every[n] for n in KNOWN_FAMILIES]
    assert len(set(known)) == len(known)  # no two known families share a colour
    reserved = {NONFINITE_COLOR, "#ff7f0e", "tab:red", "red", "#d62728"}  # non-finite values, tolerances, culprits
    assert not reserved & set(every.values())
    assert {every["extra_a"], every["extra_b"]} <= set(FAMILY_PALETTE)


@pytest.fixture(scope="module")
def small_report():
    from stableflows.audit import audit
    from stableflows.models import glow

    torch.manual_seed(0)
    flow = glow(shape=(1, 4, 4), levels=1, steps_per_level=2, hidden=8).eval()
    x = torch.randint(0, 17, (16, 1, 4, 4)).float()
    return audit(flow, x, levels=17, families="test,uniform,constant", spectra_points=2, repeat=3)


def test_repeated_passes_figure_explains_both_line_styles(small_report):
    from stableflows.audit.plots import fig_repeated

    fig = fig_repeated(small_report)
    ax = fig.axes[0]
    legends = [a for a in ax.get_children() if isinstance(a, matplotlib.legend.Legend)]
    texts = {t.get_text() for leg in legends for t in leg.get_texts()}
    assert {"test", "uniform", "constant"} <= texts
    assert {"median over the examples", "max over the examples"} <= texts
    colors = family_colors(list(small_report.families) + list(small_report.attacks))
    by_label = {line.get_label(): line.get_color() for line in ax.get_lines() if not line.get_label().startswith("_")}
    for name in ("test", "uniform", "constant"):
        assert matplotlib.colors.to_hex(by_label[name]) == matplotlib.colors.to_hex(colors[name])

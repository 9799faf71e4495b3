"""The HTML report: one self-contained file drawn from a Plan and its measurements."""

from batchfit.report.html import render_report, write_report

__all__ = ["render_report", "write_report"]

"""HTML reports with effective-robustness scatter plots (see ``html.render_report``)."""
from robustbench_ft.report.html import render_report

__all__ = ["render_report"]

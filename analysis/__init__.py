"""Statistics and report of the QAT warmdown study.

`analyze` recomputes the study's claims on a collected result table,
`format_text` prints them, and `write_report` writes a folder with a Markdown
report and PNG figures.
"""

from .data import NotSupported
from .report import write_report
from .findings import Finding
from .study import Analysis, analyze
from .text import format_text

__all__ = ["Analysis", "Finding", "NotSupported", "analyze", "format_text", "write_report"]

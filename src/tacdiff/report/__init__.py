"""Reports: sample grids and plots."""

from tacdiff.report.grid import save_grid

__all__ = ["save_grid"]

"""Reports: sample grids and plots."""

from tacdiff.report.grid import save_grid
from tacdiff.report.plots import plot_step_errors, plot_tables

__all__ = ["plot_step_errors", "plot_tables", "save_grid"]

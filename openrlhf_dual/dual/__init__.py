"""CAN's dual step as pure math: arrays in, lambda* and predictions out (numpy/scipy only)."""

from openrlhf_dual.dual.frontier import Frontier, frontier, plot_frontier
from openrlhf_dual.dual.objective import predict
from openrlhf_dual.dual.solver import DualSolution, solve_dual

__all__ = ["DualSolution", "Frontier", "frontier", "plot_frontier", "predict", "solve_dual"]

"""Clients to helpers: assignment and scheduling with the shortest makespan (parallel split learning).

Many clients each keep the first and last layers of a model and offload the middle to one of a few
helpers; this package decides which helper serves which client and in what order each helper runs
its forward and backward tasks. See docs/scheduling.md.
"""
from pipeline.scheduling.baselines import balanced_greedy_fcfs, random_fcfs
from pipeline.scheduling.bounds import lower_bound
from pipeline.scheduling.compare import Comparison, compare
from pipeline.scheduling.exact import brute_force, milp
from pipeline.scheduling.instance import Instance, generate
from pipeline.scheduling.ours import solve
from pipeline.scheduling.solution import Infeasible, Schedule
from pipeline.scheduling.simulator import InvalidSchedule, simulate

__all__ = ["Comparison", "Infeasible", "Instance", "InvalidSchedule", "Schedule", "balanced_greedy_fcfs",
           "brute_force", "compare", "generate", "lower_bound", "milp", "random_fcfs", "simulate", "solve"]

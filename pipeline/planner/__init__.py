"""The split planner: which contiguous layers each peer of a chain owns (pure, no networking).

    layers = layers_from_profile("resnet101_cifar")            # or LayerCost(...) from measurements
    devices = [Device("a", memory_budget=2**30, speed=2.0), Device("b", forward_s=..., backward_s=...)]
    p = plan(devices, layers, scheme="fast", microbatches=4)    # raises PlanInfeasible if it cannot fit
    p.ranges, p.step_s, p.stages, p.assignment

Cost and memory model: pipeline.planner.model. Algorithms: pipeline.planner.solve.
"""
from pipeline.planner.baselines import even_split, proportional_split
from pipeline.planner.chain import over_budget, plan_chain, too_big
from pipeline.planner.measured import devices_from_profile, layers_from_profile
from pipeline.planner.model import (DEFAULT_BANDWIDTH, DEFAULT_LATENCY, SCHEMES, Device, LayerCost, Plan,
                                    PlanInfeasible, StagePlan, evaluate, format_bytes, place_backward,
                                    stage_memory)
from pipeline.planner.rotations import plan_rotations
from pipeline.planner.solve import moved_bytes, plan
from pipeline.swaps import swap_moves

__all__ = ["DEFAULT_BANDWIDTH", "DEFAULT_LATENCY", "SCHEMES", "Device", "LayerCost", "Plan", "PlanInfeasible",
           "StagePlan", "devices_from_profile", "even_split", "evaluate", "format_bytes", "layers_from_profile",
           "moved_bytes", "over_budget", "place_backward", "plan", "plan_chain", "plan_rotations", "too_big",
           "proportional_split", "stage_memory", "swap_moves"]

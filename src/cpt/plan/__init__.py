"""Plan stage: every speed and memory choice of a run, made once at setup (a frozen RunPlan).

    run_plan.py  the RunPlan object, saved beside a run as run_plan.json
    rules.py     the small rules: compile, CUDA graphs, split masters, host-layer placement
    estimate.py  peak memory and tokens/s of a set of choices, from the model's shape alone
    decide.py    config + model shape + hardware -> RunPlan; `cpt plan`
"""
from cpt.plan.decide import decide, estimate_for, format_run_plan, memory_plan
from cpt.plan.estimate import format_plan, model_flops_per_token, plan, shape_from_config
from cpt.plan.run_plan import RunPlan

__all__ = ["decide", "estimate_for", "format_run_plan", "memory_plan", "format_plan", "model_flops_per_token", "plan",
           "shape_from_config", "RunPlan"]

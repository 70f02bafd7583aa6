"""The RL loop and its Ray orchestration: driver, steps, job, scheduler over the draw ledger, weight
pushes."""

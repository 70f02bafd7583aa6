"""Rule-based rewards for GRPO on vision-language tasks (classification, detection, grounding).

    from rewards import get_reward, available, CompositeReward, RewardTerm
    fn = get_reward("rec_iou", threshold=0.5)
    scores = fn(completions, solutions)          # list[float], one per completion

Every reward takes ``(completions: list[str], solutions: list, **info)`` and returns one
float per completion. They use only the standard library, never raise on any completion
text, and run in time linear in the text. The rules, and where they depart from the
reference implementations, are in each module's docstring.

Registered rewards (value range):
    format          [0, 1]  <think>..</think><answer>..</answer> structure
    cls_accuracy    [0, 1]  CLS-RL: answer equals label (case, whitespace, _ ignored)
    cls_equality    [0, 1]  No-Thinking: stripped completion equals label exactly
    cls_contains    [0, 1]  Visual-RFT: answer and label contain one another
    det_iou         [0, 1]  Visual-RFT detection: matched IoU sum / max(#gt, #pred)
    det_confidence  [0, 1]  Visual-RFT detection: confidence calibration
    grounding_giou  [0, 2]  LISA grounding: GIoU + 1 of the first (x1,y1),(x2,y2)
    rec_iou         [0, 1]  VLM-R1 REC: IoU of the first [x1,y1,x2,y2] (threshold=t: IoU > t)
    length          [0, 1]  sigmoid length bonus from info["completion_lengths"]
    eval_cls_rl     {0, 1}  CLS-RL's eval: equal ignoring case, or contains the label (_ as space)
    eval_visual_rft {0, 1}  Visual-RFT's eval: answer tag required, containment without spaces/_
    eval_grounding_iou50 {0, 1}  grounding accuracy: first (x1,y1),(x2,y2) has IoU > 0.5 with a box
"""

# imported for their side effect: each module registers its rewards
from . import classification, detection, eval_protocols, format_check, grounding, length  # noqa: F401
from .composite import CompositeReward, RewardTerm
from .registry import (
    BoundReward,
    RewardParamError,
    UnknownRewardError,
    available,
    get_reward,
    get_spec,
    register,
)

__all__ = [
    "BoundReward",
    "CompositeReward",
    "RewardParamError",
    "RewardTerm",
    "UnknownRewardError",
    "available",
    "get_reward",
    "get_spec",
    "register",
]

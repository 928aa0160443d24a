"""What ``detrkd distill --method NAME`` can name, without importing torch (``--help`` lists it).

``SUMMARIES``: each method's one line; ``RECIPES``: a name -> the ``methods`` mapping it stands for,
with the paper's lambda as ``weight``. A method's own name is a recipe of that method alone; ``qskd``
is the QSKD paper's combination; ``none`` trains the student without distillation (the no-KD row).
"""

from __future__ import annotations

from typing import Any

SUMMARIES: dict[str, str] = {
    "agfd": "QSKD feature distillation: BN-MSE of the encoder memory under the teacher's attention "
            "of GQS-selected queries",
    "lapd": "QSKD prediction distillation: positives paired through their GT, hard negatives matched "
            "inside each GT group",
    "kd_detr": "KD-DETR: the same general (random) and specific (teacher query) points decoded by both "
               "models, foreground-rebalanced",
    "kd_detr_hetero": "KD-DETR heterogeneous: a DETR teacher into a torchvision CNN student (faster_rcnn, "
                      "retinanet) at the student's top-10 anchors per GT, decoded as teacher queries",
    "active_sampling": "matching-free: an attention sampling module samples both models' outputs at the "
                       "teacher's predictions",
    "global_alignment": "baseline, DETRDistill style: all teacher x student predictions Hungarian-matched "
                        "per image and layer",
    "fitnet": "baseline: plain feature MSE of the encoder memory (a connector when widths differ)",
    "fpn_fitnet": "FitNet into a torchvision CNN student: its FPN sampled at the teacher's memory tokens "
                  "regresses them through a connector",
}

RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "qskd": {"agfd": {"weight": 50.0}, "lapd": {"weight": 1.0}},
    "agfd": {"agfd": {"weight": 50.0}},
    "lapd": {"lapd": {"weight": 1.0}},
    "kd_detr": {"kd_detr": {"weight": 1.0}},
    "kd_detr_hetero": {"kd_detr_hetero": {"weight": 1.0}},
    "active_sampling": {"active_sampling": {"weight": 1.0}},
    "global_alignment": {"global_alignment": {"weight": 1.0}},
    "fitnet": {"fitnet": {"weight": 50.0}},
    "fpn_fitnet": {"fpn_fitnet": {"weight": 50.0}},
    "none": {},
}
RECIPE_SUMMARIES: dict[str, str] = {
    "qskd": "QSKD (the paper's recipe): agfd (lambda 50) + lapd (lambda 1)",
    "none": "no distillation: the student's own detection loss only (the no-KD baseline)",
}


def methods_for(names: list[str]) -> dict[str, dict[str, Any]]:
    """The ``methods`` mapping of ``--method`` names (combined; a method named twice is an error)."""
    methods: dict[str, dict[str, Any]] = {}
    for name in names:
        if name not in RECIPES:
            raise ValueError(f"--method {name!r}: not a method or recipe; choose from {', '.join(RECIPES)}")
        for method, options in RECIPES[name].items():
            if method in methods:
                raise ValueError(f"--method {name!r}: {method} is already named by another --method")
            methods[method] = dict(options)
    return methods


def help_text() -> str:
    """The methods and recipes, one line each (``detrkd distill --help``)."""
    width = max(map(len, RECIPES))
    lines = ["methods and recipes (--method, repeatable; options: --set methods.NAME.KEY=VALUE; "
             "all options: detrkd methods):"]
    for name in RECIPES:
        text = RECIPE_SUMMARIES.get(name) or SUMMARIES[name]
        weight = RECIPES[name].get(name, {}).get("weight")
        lines.append(f"  {name:<{width}}  {text}" + (f" (lambda {weight:g})" if weight is not None else ""))
    return "\n".join(lines)

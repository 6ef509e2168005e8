"""The paper's published figures (Sec. VII, Tables III-VIII), as (PSNR dB, SSIM) on Set12 unless stated."""

from __future__ import annotations

# Table IV: image vs noise as the equilibrium, Set12, per sigma.
TABLE_IV: dict[float, dict[str, tuple[float, float]]] = {
    15.0: {"noise": (33.20, 0.9118), "image": (31.92, 0.8883)},
    25.0: {"noise": (30.84, 0.8736), "image": (30.40, 0.8663)},
    50.0: {"noise": (27.72, 0.8075), "image": (26.55, 0.7440)},
}

# Table V: with / without post-normalisation, Set12 sigma 25: performance, ||z*||_F, Var(z*).
TABLE_V: dict[str, dict[str, float]] = {
    "post-norm": {"psnr": 30.84, "ssim": 0.8736, "norm": 11173.89, "var": 8.28},
    "no-post-norm": {"psnr": 30.78, "ssim": 0.8735, "norm": 36920.28, "var": 88.78},
}
# Fig. 8's caption numbers (Monarch, sigma 25).
FIG_8_MONARCH = {"post-norm": (30.67, 0.9273), "no-post-norm": (30.64, 0.9261)}

# Table VI: attention heads, Set12 sigma 25.
TABLE_VI: dict[int, tuple[float, float]] = {1: (30.79, 0.8736), 4: (30.84, 0.8736), 8: (30.78, 0.8735)}

# Table VII: implicit layer made of the non-local block only, the transformation block only, or both.
TABLE_VII: dict[str, tuple[float, float]] = {"nl": (30.10, 0.8558), "trans": (30.62, 0.8716),
                                             "both": (30.84, 0.8736)}

# Table VIII: neighbourhood size q, Set12 sigma 25.
TABLE_VIII: dict[int, tuple[float, float]] = {50: (30.79, 0.8737), 55: (30.81, 0.8745), 60: (30.82, 0.8739),
                                              65: (30.84, 0.8736), 70: (30.83, 0.8735)}

# Table III, NERD's row: depth maps (Middlebury 2006, half size, left view), per sigma and image.
TABLE_III_NERD: dict[float, dict[str, tuple[float, float]]] = {
    15.0: {"Aloe": (40.93, 0.9865), "Bowling": (43.85, 0.9908), "Flowerpots": (43.13, 0.9867),
           "Lampshade": (43.72, 0.9910), "Midd": (43.29, 0.9899), "Monopoly": (44.30, 0.9920),
           "Plastic": (46.17, 0.9936), "Average": (43.63, 0.9901)},
    25.0: {"Aloe": (37.50, 0.9736), "Bowling": (40.17, 0.9818), "Flowerpots": (39.13, 0.9805),
           "Lampshade": (39.94, 0.9819), "Midd": (39.36, 0.9805), "Monopoly": (40.37, 0.9838),
           "Plastic": (42.72, 0.9866), "Average": (39.88, 0.9812)},
    50.0: {"Aloe": (33.81, 0.9494), "Bowling": (36.03, 0.9646), "Flowerpots": (34.40, 0.9584),
           "Lampshade": (35.39, 0.9618), "Midd": (34.65, 0.9603), "Monopoly": (35.60, 0.9649),
           "Plastic": (37.43, 0.9711), "Average": (35.33, 0.9615)},
}
# File stems of ../shared/data/Middlebury2006 -> the paper's image names.
DEPTH_NAMES = {"Aloe": "Aloe", "Bowling1": "Bowling", "Flowerpots": "Flowerpots", "Lampshade1": "Lampshade",
               "Midd1": "Midd", "Monopoly": "Monopoly", "Plastic": "Plastic"}

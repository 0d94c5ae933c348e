"""PhiID atoms as linear functions of mutual informations and redundancies (MMI, CCS), shared by every
path; the constants of the decomposition (atom names, modes, swapped atoms). Works on floats, numpy arrays and
torch tensors alike."""
from __future__ import annotations

import numpy as np

__all__ = ["ATOM_NAMES", "MODES", "SWAPPED_ATOM", "DegeneratePairWarning"]


ATOM_NAMES = ("rtr", "rtx", "rty", "rts", "xtr", "xtx", "xty", "xts",
              "ytr", "ytx", "yty", "yts", "str", "stx", "sty", "sts")
MI_NAMES = ("I_xta", "I_xtb", "I_yta", "I_ytb", "I_xyta", "I_xytb", "I_xtab", "I_ytab", "I_xytab")
RED_NAMES = ("R_xyta", "R_xytb", "R_xytab", "R_abtx", "R_abty", "R_abtxy")
PART_NAMES = MI_NAMES + RED_NAMES + ("D",)  # everything the atoms are a linear function of
MODES = ("per_prompt", "concat", "pooled")
REDUNDANCIES = ("MMI", "CCS")
BACKENDS = ("numpy", "torch")
REDUNDANCY_ARGS = {
    "R_xyta": ("I_xta", "I_yta", "I_xyta"),
    "R_xytb": ("I_xtb", "I_ytb", "I_xytb"),
    "R_xytab": ("I_xtab", "I_ytab", "I_xytab"),
    "R_abtx": ("I_xta", "I_xtb", "I_xtab"),
    "R_abty": ("I_yta", "I_ytb", "I_ytab"),
    "R_abtxy": ("I_xyta", "I_xytb", "I_xytab"),
}
DOUBLE_ARGS = ("I_xta", "I_xtb", "I_yta", "I_ytb")  # MMI double redundancy: argmin of these
SWAPPED_ATOM = {"rtr": "rtr", "rtx": "rty", "rty": "rtx", "rts": "rts",
                "xtr": "ytr", "ytr": "xtr", "xtx": "yty", "yty": "xtx",
                "xty": "ytx", "ytx": "xty", "xts": "yts", "yts": "xts",
                "str": "str", "stx": "sty", "sty": "stx", "sts": "sts"}
MIN_SAMPLES = 5          # phyid needs steps - tau >= 5 for an invertible 4x4 covariance
CONSTANT_RTOL = 1e-12    # a row is constant when sd <= CONSTANT_RTOL * max|value|
SINGULAR_RTOL = 1e-10    # a pair is singular when its minimum residual variance is below this
_ROW = {"x": 0, "y": 1, "a": 2, "b": 3}
_MI_SETS = {name: ([_ROW[c] for c in name[2:].split("t")[0]], [_ROW[c] for c in name[2:].split("t")[1]])
            for name in MI_NAMES}
class DegeneratePairWarning(UserWarning):
    """Some head pairs are undefined (constant, non-finite or collinear series); see the module docstring."""


# ----------------------------------------------------------------------------------------------------------------
# atoms from MIs and redundancies (shared by every path; works on floats, numpy arrays and torch tensors)

_ATOM_FORMULAS = {
    "rtr": lambda p: p["D"],
    "rtx": lambda p: p["R_xyta"] - p["D"],
    "rty": lambda p: p["R_xytb"] - p["D"],
    "rts": lambda p: p["R_xytab"] - p["R_xyta"] - p["R_xytb"] + p["D"],
    "xtr": lambda p: p["R_abtx"] - p["D"],
    "xtx": lambda p: p["I_xta"] - p["R_xyta"] - p["R_abtx"] + p["D"],
    "xty": lambda p: p["I_xtb"] - p["R_xytb"] - p["R_abtx"] + p["D"],
    "xts": lambda p: (p["I_xtab"] - p["I_xta"] - p["I_xtb"] + p["R_xyta"] + p["R_xytb"] - p["R_xytab"]
                      + p["R_abtx"] - p["D"]),
    "ytr": lambda p: p["R_abty"] - p["D"],
    "ytx": lambda p: p["I_yta"] - p["R_xyta"] - p["R_abty"] + p["D"],
    "yty": lambda p: p["I_ytb"] - p["R_xytb"] - p["R_abty"] + p["D"],
    "yts": lambda p: (p["I_ytab"] - p["I_yta"] - p["I_ytb"] + p["R_xyta"] + p["R_xytb"] - p["R_xytab"]
                      + p["R_abty"] - p["D"]),
    "str": lambda p: p["R_abtxy"] - p["R_abtx"] - p["R_abty"] + p["D"],
    "stx": lambda p: (p["I_xyta"] - p["I_xta"] - p["I_yta"] + p["R_xyta"] + p["R_abtx"] + p["R_abty"]
                      - p["R_abtxy"] - p["D"]),
    "sty": lambda p: (p["I_xytb"] - p["I_xtb"] - p["I_ytb"] + p["R_xytb"] + p["R_abtx"] + p["R_abty"]
                      - p["R_abtxy"] - p["D"]),
    "sts": lambda p: (p["I_xytab"] - p["I_xyta"] - p["I_xytb"] - p["I_xtab"] - p["I_ytab"]
                      + p["I_xta"] + p["I_xtb"] + p["I_yta"] + p["I_ytb"]
                      + p["R_xytab"] - p["R_xyta"] - p["R_xytb"] + p["R_abtxy"] - p["R_abtx"] - p["R_abty"] + p["D"]),
}


def atoms_from_parts(p, names=ATOM_NAMES):
    """dict of the 16 PART_NAMES (MIs, redundancies, double redundancy D) -> dict of the atoms `names`
    (default all 16): the explicit solution of the PhiID lattice equations."""
    return {name: _ATOM_FORMULAS[name](p) for name in names}


def mmi_parts(mi, xp=np):
    """MMI on time means. mi: dict MI name -> mean (any shape) -> dict of the 16 parts (means).
    phyid keeps the whole local array of the first MI when its mean is strictly smaller, else the second, and
    takes the argmin of DOUBLE_ARGS for D; the mean of the kept array is therefore min(first, second) and
    min(DOUBLE_ARGS) whichever way ties are broken, so means need only minimum (NaN never reaches here:
    undefined pairs are masked before)."""
    parts = dict(mi)
    for red, (first, second, _) in REDUNDANCY_ARGS.items():
        parts[red] = xp.minimum(mi[first], mi[second])
    parts["D"] = xp.minimum(xp.minimum(mi["I_xta"], mi["I_xtb"]), xp.minimum(mi["I_yta"], mi["I_ytb"]))
    return parts


def _keep_if_signs_agree(signs, value, xp):
    """value where every array in signs equals sign(value), else 0 (phyid: all np.sign equal)."""
    value_sign = xp.sign(value)
    agree = signs[0] == value_sign
    for other in signs[1:]:
        agree &= other == value_sign
    return xp.where(agree, value, 0.0)


def ccs_local_redundancies(mi, xp=np):
    """CCS on local values. mi: dict MI name -> local MI [..., time] -> dict RED_NAMES + "D" -> local values.
    A redundancy is the local co-information m1 + m2 - m12 where sign(m1), sign(m2), sign(m12) and its own sign
    agree, else 0; D likewise from q (below) and the four single-variable MIs. Linear in mi: scaling every
    MI by a constant scales the result by it."""
    sign = {name: xp.sign(v) for name, v in mi.items()}
    red = {}
    for name, (first, second, joint) in REDUNDANCY_ARGS.items():
        coinfo = mi[first] + mi[second] - mi[joint]
        red[name] = _keep_if_signs_agree((sign[first], sign[second], sign[joint]), coinfo, xp)
    q = (-(mi["I_xta"] + mi["I_xtb"] + mi["I_yta"] + mi["I_ytb"])
         + mi["I_xtab"] + mi["I_ytab"] + mi["I_xyta"] + mi["I_xytb"] - mi["I_xytab"]
         + red["R_xyta"] + red["R_xytb"] - red["R_xytab"] + red["R_abtx"] + red["R_abty"] - red["R_abtxy"])
    red["D"] = _keep_if_signs_agree(tuple(sign[n] for n in DOUBLE_ARGS), q, xp)
    return red


def mmi_local_redundancies(mi, xp=np, means=None):
    """MMI on local arrays (phyid's exact rule, needed only for local atoms). mi: MI name -> [..., time]
    (any leading batch axes). Each redundancy keeps the whole local array of its first MI where that array's
    time mean is strictly smaller, else the second; D keeps the DOUBLE_ARGS array with the smallest mean (the
    first one on ties: argmin semantics). means: MI name -> [..., 1] to compare instead of the arrays' own
    time means (e.g. closed-form means when mi holds linear coefficients rather than local values)."""
    means = means or {name: v.mean(-1, keepdims=True) for name, v in mi.items()}
    red = {name: xp.where(means[first] < means[second], mi[first], mi[second])
           for name, (first, second, _) in REDUNDANCY_ARGS.items()}
    best, best_mean = mi[DOUBLE_ARGS[0]], means[DOUBLE_ARGS[0]]
    for name in DOUBLE_ARGS[1:]:
        smaller = means[name] < best_mean
        best, best_mean = xp.where(smaller, mi[name], best), xp.where(smaller, means[name], best_mean)
    red["D"] = best
    return red

"""Activations without a network: synthetic processes with known PhiID (positive controls) and imported files.

Model specs handled here (notebook 01 writes activations.npz from them; no weights, no network):

    synthetic:planted-core[:<L>x<H>]   L layers x H heads (default 12 x 4) of a stationary Gaussian VAR(1)
    synthetic:no-core[:<L>x<H>]        the same per-head variance and lag-1 autocorrelation, independent heads
    file:<path.npz>                    activations computed elsewhere (validated on the way in, see read_file)

The process. Every (prompt, head) series is one coordinate of x_t = A x_{t-1} + e_t, e_t ~ N(0, Q), started from
its stationary law N(0, Sigma), Sigma = A Sigma A' + Q (scipy.linalg.solve_discrete_lyapunov); Cov(x_t, x_{t-1})
= A Sigma. Heads fall into three independent groups by normalised depth d = layer / (L - 1): early (d < 1/3),
core (1/3 <= d <= 2/3) and late (d > 2/3), k heads each group, J = the k x k matrix of ones:

    core (synergy)       A = phi (I - J/k), Q = I + c J: the differences between core heads are AR(phi), the
                         common mode is fresh noise at every step. One head's past is a difference masked by the
                         common mode; two heads' pasts give their difference, which predicts the difference of
                         their futures: information that only the pair carries (high sts, rtr ~ 0).
    early, late          A = phi J/k, Q = I + c J: a slow shared driver (the group mean, AR(phi)) plus white
    (redundancy)         private noise. Each head's past predicts every head's future about equally well
                         (high rtr, sts ~ 0).
    no-core              A = diag(rho_h), Q = diag(var_h (1 - rho_h^2)): every head an independent AR(1) with the
                         planted head's stationary variance var_h and lag-1 autocorrelation rho_h.

Population atoms. Under MMI with tau = 1 the atom means depend only on the 4x4 covariance of (x past, y past,
x future, y future) (lib.estimators.phiid module docstring); pair_covariance builds it from Sigma and A Sigma and
lib.estimators.phiid.mmi_atoms_from_correlation, the formula the engine applies to fitted matrices, gives the atoms.

Positivity. Head norms are positive; the activations are offset + x with offset = 10 x the largest stationary sd
(a value below 0 is a 10-sd event). PhiID z-scores every row and uses correlations only, so an affine shift
leaves every atom unchanged (tests check it).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["ActivationsFileError", "is_network_free", "SyntheticSpec", "parse_spec", "spec_problem",
           "network_free_shape", "VarProcess", "head_map", "depth_groups", "process_for", "population_atoms",
           "population_matrices", "population_head_means", "simulate", "positive_offset", "synthetic_activations",
           "read_file", "NoNetwork", "build_run", "write_run", "baseline_plan"]

SYNTHETIC = "synthetic:"
FILE = "file:"
KINDS = ("planted-core", "no-core")
DEFAULT_SHAPE = (12, 4)
PHI, COMMON = 0.9, 1.0             # group persistence and common-mode noise variance (per unit private noise)
OFFSET_SDS = 10.0
MIN_FILE_STEPS = 10                # PhiID needs tau + 5 steps; the claims keep series of >= 10 steps
MIN_FILE_PROMPTS = 2               # split halves (04) and prompt bootstraps need two prompts
_SHAPE = re.compile(r"(\d+)x(\d+)")


class ActivationsFileError(ValueError):
    """An imported activations file that the pipeline cannot use (one line: the file, the problem, the fix)."""


def is_network_free(spec) -> bool:
    """True for the specs of this module (synthetic:..., file:...): no weights, no forward pass."""
    return str(spec).startswith((SYNTHETIC, FILE))


# ----------------------------------------------------------------------------- specs

@dataclass(frozen=True)
class SyntheticSpec:
    kind: str            # "planted-core" or "no-core"
    n_layers: int
    n_heads: int

    @property
    def planted(self) -> bool:
        return self.kind == "planted-core"


def parse_spec(spec: str) -> SyntheticSpec:
    """'synthetic:<kind>[:<L>x<H>]' -> SyntheticSpec; ValueError naming what is allowed."""
    parts = str(spec).split(":")
    if parts[0] + ":" != SYNTHETIC or len(parts) not in (2, 3) or parts[1] not in KINDS:
        raise ValueError(f"{spec!r} is not a synthetic model: use synthetic:<kind>[:<layers>x<heads>] with kind in "
                         f"{list(KINDS)}, e.g. synthetic:planted-core:12x4")
    shape = DEFAULT_SHAPE
    if len(parts) == 3:
        m = _SHAPE.fullmatch(parts[2])
        if not m or int(m.group(1)) < 3 or int(m.group(2)) < 1:
            raise ValueError(f"{spec!r}: the shape must be <layers>x<heads> with layers >= 3 (early, core and late "
                             f"thirds) and heads >= 1, e.g. 12x4")
        shape = (int(m.group(1)), int(m.group(2)))
    return SyntheticSpec(parts[1], *shape)


def spec_problem(spec) -> str | None:
    """None when spec is a valid synthetic: or file: spec, else what is wrong (for lib.pipeline.params' model rule)."""
    spec = str(spec)
    try:
        if spec.startswith(SYNTHETIC):
            parse_spec(spec)
        else:
            read_file(file_path(spec))
    except ValueError as e:
        return str(e)
    return None


def network_free_shape(spec: str) -> tuple[int, int]:
    """(n_layers, n_heads) of a synthetic: or file: spec (a file is read and checked)."""
    if str(spec).startswith(FILE):
        f = read_file(file_path(spec))
        return f.n_layers, f.n_heads
    s = parse_spec(spec)
    return s.n_layers, s.n_heads


def file_path(spec: str) -> Path:
    """'file:<path>' -> the path (relative paths from the repository root, where notebooks run)."""
    from lib import REPO_ROOT
    path = Path(str(spec)[len(FILE):]).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


# ----------------------------------------------------------------------------- the process

@dataclass
class VarProcess:
    """x_t = A x_{t-1} + e_t, e_t ~ N(0, Q), one coordinate per head (head h is in layer head_layer[h])."""
    A: np.ndarray              # [heads, heads]
    Q: np.ndarray              # [heads, heads] innovation covariance
    head_layer: np.ndarray     # [heads]
    head_index: np.ndarray     # [heads]
    n_layers: int
    n_heads: int

    def covariance(self) -> np.ndarray:
        """Stationary covariance Sigma [heads, heads]: Sigma = A Sigma A' + Q."""
        from scipy.linalg import solve_discrete_lyapunov
        S = solve_discrete_lyapunov(self.A, self.Q)
        return (S + S.T) / 2

    def lag1(self) -> np.ndarray:
        """Cov(x_t, x_{t-1}) = A Sigma [heads (future), heads (past)]."""
        return self.A @ self.covariance()


def head_map(n_layers: int, n_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """(head_layer [heads], head_index [heads]) of an n_layers x n_heads layout, layer-major."""
    return np.repeat(np.arange(n_layers), n_heads), np.tile(np.arange(n_heads), n_layers)


def depth_groups(n_layers: int, n_heads: int) -> np.ndarray:
    """Group of every head by normalised depth: "early" (< 1/3), "core" (1/3-2/3), "late" (> 2/3) -> [heads]."""
    d = head_map(n_layers, n_heads)[0] / (n_layers - 1)
    return np.where(d < 1 / 3, "early", np.where(d > 2 / 3, "late", "core"))


def _group_blocks(k: int, synergistic: bool, phi: float, common: float) -> tuple[np.ndarray, np.ndarray]:
    """(A, Q) of one group of k heads (module docstring)."""
    J = np.ones((k, k))
    A = phi * (np.eye(k) - J / k) if synergistic else phi * J / k
    return A, np.eye(k) + common * J


def planted_process(n_layers: int = 12, n_heads: int = 4, phi: float = PHI, common: float = COMMON) -> VarProcess:
    """The planted-core process: synergistic core group, redundant early and late groups, groups independent."""
    groups = depth_groups(n_layers, n_heads)
    n = len(groups)
    A, Q = np.zeros((n, n)), np.zeros((n, n))
    for name in ("early", "core", "late"):
        idx = np.flatnonzero(groups == name)
        A[np.ix_(idx, idx)], Q[np.ix_(idx, idx)] = _group_blocks(len(idx), name == "core", phi, common)
    return VarProcess(A, Q, *head_map(n_layers, n_heads), n_layers, n_heads)


def matched_independent(process: VarProcess) -> VarProcess:
    """Independent AR(1) heads with the process's per-head stationary variance and lag-1 autocorrelation."""
    var = np.diag(process.covariance())
    rho = np.diag(process.lag1()) / var
    return VarProcess(np.diag(rho), np.diag(var * (1 - rho ** 2)), process.head_layer, process.head_index,
                      process.n_layers, process.n_heads)


def process_for(spec: SyntheticSpec, planted: bool | None = None) -> VarProcess:
    """The process of a spec; planted=False gives the no-core twin of a planted-core spec."""
    process = planted_process(spec.n_layers, spec.n_heads)
    return process if (spec.planted if planted is None else planted) else matched_independent(process)


# ----------------------------------------------------------------------------- population atoms

def pair_covariance(sigma: np.ndarray, lag1: np.ndarray, i: int, j: int) -> np.ndarray:
    """4x4 covariance of (x_i past, x_j past, x_i future, x_j future) from Sigma and Cov(x_t, x_{t-1})."""
    idx = [i, j]
    same, cross = sigma[np.ix_(idx, idx)], lag1[np.ix_(idx, idx)]      # cross[f, p] = Cov(future f, past p)
    return np.block([[same, cross.T], [cross, same]])


def population_atoms(process: VarProcess, i: int, j: int) -> dict:
    """The 16 MMI atom means (tau = 1, nats) of source head i -> target head j, in closed form."""
    from lib.estimators.phiid import mmi_atoms_from_correlation
    return mmi_atoms_from_correlation(pair_covariance(process.covariance(), process.lag1(), i, j))


def population_matrices(process: VarProcess, names=("sts", "rtr")) -> dict:
    """atom name -> [heads, heads] population atoms of every ordered pair (NaN on the diagonal)."""
    from lib.estimators.phiid import mmi_atoms_from_correlation
    sigma, lag1, n = process.covariance(), process.lag1(), len(process.A)
    out = {name: np.full((n, n), np.nan) for name in names}
    for i in range(n):
        for j in range(n):
            if i != j:
                atoms = mmi_atoms_from_correlation(pair_covariance(sigma, lag1, i, j))
                for name in names:
                    out[name][i, j] = atoms[name]
    return out


def population_head_means(process: VarProcess, names=("sts", "rtr")) -> dict:
    """atom name -> [heads]: each head's mean atom over its partners (what rank_diff ranks), in closed form."""
    return {name: np.nanmean(M, axis=1) for name, M in population_matrices(process, names).items()}


# ----------------------------------------------------------------------------- series

def simulate(process: VarProcess, n_series: int, n_steps: int, rng) -> np.ndarray:
    """n_series independent stretches of the stationary process -> [series, heads, steps] (float64)."""
    n = len(process.A)
    L0 = np.linalg.cholesky(process.covariance())
    Lq = np.linalg.cholesky(process.Q + 1e-12 * np.eye(n))
    X = np.empty((n_series, n, n_steps))
    x = rng.standard_normal((n_series, n)) @ L0.T
    for t in range(n_steps):
        if t:
            x = x @ process.A.T + rng.standard_normal((n_series, n)) @ Lq.T
        X[:, :, t] = x
    return X


def positive_offset(process: VarProcess) -> float:
    """The shift that makes head norms positive: OFFSET_SDS x the largest stationary sd."""
    return float(OFFSET_SDS * np.sqrt(np.diag(process.covariance()).max()))


def synthetic_activations(spec: SyntheticSpec, n_prompts: int, n_steps: int, seed: int = 0,
                          planted: bool | None = None, stream: int = 0) -> np.ndarray:
    """Positive activations [prompts, heads, steps] (float32): offset + the process (module docstring). The
    random numbers come from (seed, planted, stream): the random_init copy uses stream 1."""
    planted = spec.planted if planted is None else planted
    process = process_for(spec, planted)
    rng = np.random.default_rng([seed, int(planted), stream])
    X = positive_offset(process) + simulate(process, n_prompts, n_steps, rng)
    if not (X > 0).all():
        raise ValueError("a synthetic activation came out <= 0 (a 10-sd event): use another seed")
    return X.astype(np.float32)


# ----------------------------------------------------------------------------- imported files

def _fail(path, problem: str, fix: str):
    raise ActivationsFileError(f"activations file {path}: {problem}; {fix}")


def _load_npz(path: Path) -> dict:
    if not path.is_file():
        _fail(path, "does not exist", "give the path of an .npz file (relative to the repository root or absolute)")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as e:                                           # noqa: BLE001  (any unreadable file)
        _fail(path, f"is not a readable .npz ({type(e).__name__})", "write it with numpy.savez(path, activations=..., "
              "n_layers=..., n_heads=...)")


def _scalar_int(arrays: dict, key: str, path) -> int:
    v = arrays.get(key)
    if v is None:
        _fail(path, f"has no {key!r}", f"add {key}=<int> (keys: activations [prompts, heads, steps], n_layers, n_heads)")
    if v.ndim != 0 or v.dtype.kind not in "iu" or int(v) < 1:
        _fail(path, f"{key!r} must be one positive integer, got {v!r}", f"save {key}=<int> (e.g. np.int64(12))")
    return int(v)


def _check_activations(X, n_layers: int, n_heads: int, path) -> np.ndarray:
    if X is None:
        _fail(path, "has no 'activations'", "add activations [prompts, heads, steps] (head norms, float)")
    if X.ndim != 3 or X.dtype.kind not in "fiu":
        _fail(path, f"'activations' must be a 3-D number array [prompts, heads, steps], got {X.dtype} shape {X.shape}",
              "reshape it to [prompts, heads, steps]")
    if X.shape[1] != n_layers * n_heads:
        _fail(path, f"'activations' has {X.shape[1]} heads but n_layers x n_heads = {n_layers} x {n_heads} = "
                    f"{n_layers * n_heads}", "fix n_layers / n_heads or the head axis (axis 1, layer-major)")
    if X.shape[0] < MIN_FILE_PROMPTS:
        _fail(path, f"has {X.shape[0]} prompt(s)", f"give at least {MIN_FILE_PROMPTS} prompts (axis 0)")
    if X.shape[2] < MIN_FILE_STEPS:
        _fail(path, f"has {X.shape[2]} steps", f"give at least {MIN_FILE_STEPS} steps (axis 2): PhiID needs tau + 5 "
                                              f"and the claims keep series of >= {MIN_FILE_STEPS} steps")
    bad = int(np.size(X) - np.isfinite(X).sum())
    if bad:
        _fail(path, f"'activations' has {bad} NaN or infinite value(s)", "remove or impute them before importing")
    if (X < 0).any():
        _fail(path, f"'activations' has {int((X < 0).sum())} negative value(s) (min {float(X.min()):.4g})",
              "head norms are >= 0: pass norms, or shift the series (PhiID is unchanged by an affine shift)")
    return X.astype(np.float32)


def _optional(arrays: dict, key: str, shape: tuple, path) -> np.ndarray | None:
    v = arrays.get(key)
    if v is not None and (v.shape != shape or v.dtype.kind not in "iu"):
        _fail(path, f"{key!r} must be integers of shape {shape}, got {v.dtype} {v.shape}", f"fix or drop {key!r}")
    return v


@dataclass
class ImportedActivations:
    activations: np.ndarray         # float32 [prompts, heads, steps]
    n_layers: int
    n_heads: int
    tokens: np.ndarray | None       # int [prompts, steps]
    prompt_ids: np.ndarray | None   # int [prompts]
    path: Path
    sha256: str


def read_file(path) -> ImportedActivations:
    """Read and validate an imported activations .npz (module docstring); ActivationsFileError (one line naming
    the file, the problem and the fix) on the first problem found."""
    from lib.storage.store import file_checksum
    path = Path(path)
    arrays = _load_npz(path)
    n_layers, n_heads = _scalar_int(arrays, "n_layers", path), _scalar_int(arrays, "n_heads", path)
    X = _check_activations(arrays.get("activations"), n_layers, n_heads, path)
    tokens = _optional(arrays, "tokens", (X.shape[0], X.shape[2]), path)
    prompt_ids = _optional(arrays, "prompt_ids", (X.shape[0],), path)
    return ImportedActivations(X, n_layers, n_heads, tokens, prompt_ids, path, file_checksum(path))


# ----------------------------------------------------------------------------- notebook 01

@dataclass
class NoNetwork:
    """What notebook 01 prints about the 'model' of a network-free spec (the fields of lib.model.architectures.ArchInfo it uses)."""
    n_layers: int
    n_heads: int
    source: str
    weights_id: str
    n_kv_heads: int = 0
    head_dim: int | None = None

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads

    def head_map(self):
        return tuple(a.tolist() for a in head_map(self.n_layers, self.n_heads))


def _synthetic_prompts(ids) -> list:
    from lib.model.prompts import Prompt
    return [Prompt(int(i), "synthetic", f"synthetic series {int(i)} (no text: no network)") for i in ids]


def _activation_run(X, tokens, prompt_ids, n_layers, n_heads, spec):
    from lib.experiments.activation_run import ActivationRun
    n_prompts, _, n_steps = X.shape
    prompt_ids = np.arange(n_prompts) if prompt_ids is None else np.asarray(prompt_ids)
    tokens = np.zeros((n_prompts, n_steps), np.int64) if tokens is None else np.asarray(tokens, np.int64)
    layer, index = head_map(n_layers, n_heads)
    return ActivationRun(activations=X, tokens=tokens, prompt_input_ids=np.zeros((n_prompts, 1), np.int64),
                         prompt_lengths=np.ones(n_prompts, np.int64), prompts=_synthetic_prompts(prompt_ids),
                         head_layer=layer, head_index=index, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads,
                         pad_token_id=0, model=spec, chat_template=False)


def build_run(spec: str, n_prompts: int, n_tokens: int, seed: int = 0, random_init: bool = False):
    """(ActivationRun, NoNetwork, provenance dict) of a synthetic: or file: spec, nothing written. Synthetic
    series are n_prompts x heads x n_tokens steps (dummy token ids 0); random_init gives the no-core twin (own
    random numbers); a file gives its own sizes."""
    if str(spec).startswith(FILE):
        f = read_file(file_path(spec))
        run = _activation_run(f.activations, f.tokens, f.prompt_ids, f.n_layers, f.n_heads, spec)
        info = {"activations_file": str(f.path), "sha256": f.sha256,
                "note": "activations imported from the file: n_prompts, n_tokens and seed are not used"}
        return run, NoNetwork(f.n_layers, f.n_heads, spec, f"sha256:{f.sha256}"), info
    s = parse_spec(spec)
    planted = s.planted and not random_init
    X = synthetic_activations(s, n_prompts, n_tokens, seed, planted, stream=int(random_init))
    process = process_for(s, planted)
    run = _activation_run(X, None, None, s.n_layers, s.n_heads, spec)
    info = {"process": "planted-core VAR(1)" if planted else "no-core: independent AR(1), matched variance and "
            "lag-1 autocorrelation", "planted": planted, "phi": PHI, "common": COMMON,
            "offset": positive_offset(process), "seed": seed}
    weights = hashlib.sha256(f"{s}|{planted}|{PHI}|{COMMON}".encode()).hexdigest()[:16]
    return run, NoNetwork(s.n_layers, s.n_heads, spec, f"synthetic:{weights}"), info


def write_run(out_dir, spec: str, n_prompts: int, n_tokens: int, seed: int = 0, random_init: bool = False,
              tag: str = ""):
    """Notebook 01 for a network-free spec: build (validate) everything first, then write the activations file
    (tag "" or random_init) and its manifest section. random_init on a planted-core spec gives the no-core twin;
    a file has no random-init copy (ValueError). -> (ActivationRun, NoNetwork, None tokenizer, None model)."""
    from lib.storage.store import ensure_writable_dir
    if random_init and not str(spec).startswith(SYNTHETIC):
        raise ValueError(f"{spec}: imported activations have no randomly initialised copy; set random_init: false "
                         f"and baseline_random_init: false")
    run, arch, info = build_run(spec, n_prompts, n_tokens, seed, random_init)
    out_dir = ensure_writable_dir(out_dir)
    run.save(out_dir, tag, None, {"model": spec, "random_init": random_init, "seed": seed, "network": "none",
                                  "weights_id": arch.weights_id, "n_prompts": run.activations.shape[0],
                                  "n_tokens": run.activations.shape[2], **info})
    return run, arch, None, None


def baseline_plan(spec: str, baseline_random_init: bool, revisions) -> tuple[list, str]:
    """([(tag, random_init)], note) of notebook 01's baselines for a network-free spec."""
    if revisions:
        raise ValueError(f"{spec}: a network-free model has no training checkpoints; set revisions: []")
    if not baseline_random_init:
        return [], ""
    if str(spec).startswith(FILE):
        return [], f"{spec}: no random-init copy of imported activations (C3 is not tested)"
    return [("random_init", True)], "random_init = the no-core twin (same per-head variance and autocorrelation)"

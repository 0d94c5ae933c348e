"""The scorecard: every claim C1-C7 evaluated from a run folder (a claim that cannot be evaluated is
`not tested` with the reason), written to claims.json when its inputs, settings or rules changed."""
from __future__ import annotations

from pathlib import Path

from lib.pipeline.claims.ablation_claim import claim_c5
from lib.pipeline.claims.block_claims import claim_c4, claim_c6, claim_c7
from lib.pipeline.claims.head_claims import add_trend_null, claim_c1, claim_c2, claim_c3, head_evidence
from lib.pipeline.claims.rules import Claim, EXPERIMENT_ARTIFACTS, PAPER, not_tested
from lib.pipeline.verdicts import VERDICTS
from lib.storage import artifacts
from lib.storage.store import ArtifactError

__all__ = ["write_claims", "weights_note", "evaluate", "failed_notebooks", "current_only", "inputs_signature",
           "load_claims"]


# ----------------------------------------------------------------------------- the scorecard

def _guard(cid: str, fn, *args, **kwargs) -> Claim:
    """A claim that cannot be evaluated is `not tested` with the reason; the scorecard never stops a run."""
    try:
        return fn(*args, **kwargs)
    except (ArtifactError, FileNotFoundError) as e:
        return not_tested(cid, str(e))
    except Exception as e:                                      # noqa: BLE001  (reported in claims.json)
        return not_tested(cid, f"could not evaluate: {type(e).__name__}: {e}")


def _evidence(out_dir, tag, truncate, n_surrogates, seed, null_kind="circular"):
    try:
        return head_evidence(out_dir, tag, truncate, n_surrogates, seed, null_kind), None
    except Exception as e:                                      # noqa: BLE001  (reported in claims.json)
        return None, f"{type(e).__name__}: {e}"


def evaluate(out_dir, n_surrogates: int = 20, n_boot: int = 1000, seed: int = 0,
             stale: dict | None = None) -> list[Claim]:
    """Every claim C1-C7 from the artifacts of out_dir (absent inputs -> not tested). stale: notebook -> why its
    results are not current (lib.pipeline.bookkeeping.stale_notebooks; None: the notebooks whose last run failed, from the
    manifest)."""
    tags = [t for t in artifacts.tags("activations", out_dir)]
    trained, why = _evidence(out_dir, "", False, n_surrogates, seed) if "" in tags else (None, "no activations.npz")
    rand = _evidence(out_dir, "random_init", False, n_surrogates, seed)[0] if "random_init" in tags else None
    eos = _evidence(out_dir, "", True, n_surrogates, seed)[0] if trained is not None else None
    if eos is not None and eos.steps == trained.steps:
        eos = None                                      # no prompt ends its turn early: nothing to add
    checkpoints = {t: e for t in tags if t.startswith("rev-")
                   for e in [_evidence(out_dir, t, False, n_surrogates, seed)[0]] if e is not None}
    c1 = claim_c1(trained, rand, eos, n_boot, seed) if trained else not_tested("C1", why, ["activations", "phiid"])
    c3 = claim_c3(trained, rand, checkpoints, n_boot, seed) if trained else not_tested("C3", why)
    c2 = _guard("C2", claim_c2, trained, eos, n_boot, seed) if trained else not_tested("C2", why)
    trend = _evidence(out_dir, "", False, n_surrogates, seed, "trend")[0] if trained is not None else None
    if trend is not None:
        add_trend_null(c1, c2, trend, n_boot, seed)
    return current_only(stale if stale is not None else failed_notebooks(out_dir), [c1, c2, c3,
                                  _guard("C4", claim_c4, out_dir), _guard("C5", claim_c5, out_dir, seed=seed),
                                  _guard("C6", claim_c6, out_dir), _guard("C7", claim_c7, out_dir)])


def failed_notebooks(out_dir) -> dict[str, str]:
    """notebook -> why its results are not current, from the manifest alone: its last run failed or did not
    finish (lib.pipeline.bookkeeping.stale_notebooks adds code, package and input changes)."""
    from lib.storage.store import read_manifest
    entries = read_manifest(out_dir).get("notebooks", {})
    return {stem: f"its last run {e.get('status', 'did not finish')}" + (f" ({e['error']})" if e.get("error") else "")
            for stem, e in sorted(entries.items()) if e.get("status") != "ok"}


def current_only(stale: dict, claims: list[Claim]) -> list[Claim]:
    """A claim resting on a notebook whose last run failed, or whose results are stale (lib.pipeline.bookkeeping.stale_notebooks:
    code, packages, inputs changed), is `not tested` with the reason: no verdict from a previous run's files."""
    from lib.pipeline.provenance import claim_notebooks
    for i, c in enumerate(claims):
        why = [f"{nb}: {stale[nb]}" for nb in claim_notebooks(c.source, c.notebook) if nb in stale]
        if why:
            claims[i] = not_tested(c.id, "not from current results: " + "; ".join(why), c.source)
    return claims


def write_claims(out_dir, n_surrogates: int = 20, n_boot: int = 1000, seed: int = 0,
                 stale: dict | None = None) -> Path:
    """Evaluate every claim and write <out_dir>/claims.json atomically; -> its path. stale: see evaluate."""
    from lib.storage.store import update_manifest
    stale = stale if stale is not None else failed_notebooks(out_dir)
    signature = inputs_signature(out_dir, stale, n_surrogates, n_boot, seed)
    previous = artifacts.path("claims", out_dir)
    if previous.exists() and _saved_signature(out_dir) == signature:
        return previous                                   # same inputs, settings and rules: nothing to redo
    claims = evaluate(out_dir, n_surrogates, n_boot, seed, stale)
    data = {"paper": PAPER, "verdicts": list(VERDICTS), "rules_doc": "lib/pipeline/claims/__init__.py (package docstring)",
            "model": _run_model(out_dir), "inputs": signature, "claims": [c.as_dict() for c in claims]}
    note = weights_note(data["model"])
    if note:
        data["weights"] = note
    path = artifacts.save("claims", out_dir, data)
    update_manifest(out_dir, "claims", {"file": path.name, "paper": PAPER, "model": data["model"],
                                        **({"weights": note} if note else {}),
                                        "verdicts": {c.id: c.verdict for c in claims}})
    return path


def inputs_signature(out_dir, stale: dict, *settings) -> dict:
    """What claims.json was computed from: size and modification time of every input file, the settings and a
    hash of this package's modules (a rerun of any notebook, or changed rules, recomputes the scorecard)."""
    tags = artifacts.tags("activations", out_dir)
    files = [artifacts.path("activations", out_dir, tag=t) for t in tags]
    files += [artifacts.path("phiid", out_dir, tag=t, mode="per_prompt") for t in tags]
    files += [artifacts.path(n, out_dir) for n in ("ablation_kl", *EXPERIMENT_ARTIFACTS.values())
              if n in artifacts.ARTIFACTS]
    return {"files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.exists()},
            "settings": list(settings), "rules": _rules_hash(),
            "not_current": stale}


def _rules_hash() -> str:
    """sha256 (16 hex digits) of the claims package's modules, in file-name order: the rules claims.json follows."""
    import hashlib
    modules = sorted(Path(__file__).parent.glob("*.py"))
    return hashlib.sha256(b"".join(p.read_bytes() for p in modules)).hexdigest()[:16]


def _saved_signature(out_dir):
    try:
        return artifacts.load("claims", out_dir).get("inputs")
    except ArtifactError:
        return None


def _run_model(out_dir) -> str:
    if not artifacts.path("activations", out_dir).exists():
        return ""
    return str(artifacts.load("activations", out_dir, keys=["model"]).get("model", ""))


def weights_note(model_spec: str) -> str:
    """What the weights of a bundled model are (stated in claims.json, the manifest and the index)."""
    from lib.model.bundled import bundled_note
    return bundled_note(model_spec)


def load_claims(out_dir) -> list[dict]:
    """The claims of a run ([] when claims.json is absent)."""
    p = artifacts.path("claims", out_dir)
    return artifacts.load("claims", out_dir)["claims"] if p.exists() else []

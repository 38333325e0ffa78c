"""How much of the variance in edit success does the edit layer explain, and how much more the
tracing effect? (paper §4.3, §5.3, Tables 1-8).

Three OLS models per (method, problem, metric), as statsmodels formulas:

- ``score ~ C(layer)``          the edit layer as a categorical variable ("Layer")
- ``score ~ trace``             the tracing effect at the edit layer ("Trace")
- ``score ~ C(layer) * trace``  both, interacted ("Both")

The R² that tracing adds is R²(Both) - R²(Layer), tested with the F-test of the nested models.
Every statistic that cannot be computed (too few rows, a constant column, no residual degrees of
freedom) comes back as NaN with the reason, never as an exception.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import patsy
import statsmodels.api as sm
from scipy import stats

log = logging.getLogger(__name__)

#: The paper's three regressions, by the column names the tables use.
FORMULAS: dict[str, str] = {
    "layer": "score ~ C(layer)",
    "trace": "score ~ trace",
    "both": "score ~ C(layer) * trace",
}

#: A total sum of squares below this (relative to n) means the score is constant.
_TSS_EPS = 1e-12


@dataclass
class Rows:
    """The rows one regression uses (finite trace and score), as arrays."""

    fact: np.ndarray  # integer fact codes
    layer: np.ndarray
    trace: np.ndarray
    score: np.ndarray
    exog: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.score)

    @property
    def n_facts(self) -> int:
        return int(np.unique(self.fact).size)

    @property
    def n_layers(self) -> int:
        return int(np.unique(self.layer).size)


@dataclass
class Design:
    """The rows of one (method, problem) slice and each formula's exog, built once by patsy.

    The exog matrices are exactly what ``statsmodels.formula.api.ols(FORMULAS[name], data)``
    builds; building them once per slice (rather than per score and per bootstrap) and working
    on arrays afterwards is what keeps the analysis fast.
    """

    source: pd.DataFrame  # the slice's rows with a finite trace, in order
    fact_names: np.ndarray
    fact: np.ndarray
    layer: np.ndarray
    trace: np.ndarray
    exog: dict[str, np.ndarray]

    @classmethod
    def build(
        cls, df: pd.DataFrame, trace: str = "trace", layer: str = "layer", fact: str = "fact_id"
    ) -> Design:
        keep = np.isfinite(df[trace].to_numpy(dtype=float)) if len(df) else np.zeros(0, bool)
        source = df[keep].reset_index(drop=True)
        codes, names = pd.factorize(source[fact].astype(str).to_numpy())
        layers = source[layer].to_numpy(dtype=int)
        traces = source[trace].to_numpy(dtype=float)
        if len(source) == 0:
            exog = {name: np.zeros((0, 0)) for name in FORMULAS}
        else:
            data = {"layer": layers, "trace": traces}
            exog = {
                name: np.asarray(
                    patsy.dmatrix(formula.split("~", 1)[1], data, return_type="matrix")
                )
                for name, formula in FORMULAS.items()
            }
        return cls(source, np.asarray(names), codes, layers, traces, exog)

    def select(self, score: str) -> Rows:
        """The rows with a finite ``score``, and the matching exog rows."""
        if score in self.source.columns and len(self.source):
            y = self.source[score].to_numpy(dtype=float)
            mask = np.isfinite(y)
        else:
            y = np.full(len(self.source), np.nan)
            mask = np.zeros(len(self.source), bool)
        return Rows(
            self.fact[mask],
            self.layer[mask],
            self.trace[mask],
            y[mask],
            {name: x[mask] for name, x in self.exog.items()},
        )

    def frame(self, rows: Rows) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "fact_id": self.fact_names[rows.fact] if len(rows) else np.array([], dtype=str),
                "layer": rows.layer,
                "trace": rows.trace,
                "score": rows.score,
            }
        )


def regression_frame(
    df: pd.DataFrame, score: str, trace: str = "trace", layer: str = "layer", fact: str = "fact_id"
) -> pd.DataFrame:
    """The rows a regression uses: fact_id, layer, trace, score, with NaN trace or score removed."""
    design = Design.build(df, trace, layer, fact)
    return design.frame(design.select(score))


def _is_constant(values: np.ndarray) -> bool:
    return len(values) == 0 or float(np.ptp(values)) <= 1e-12 * max(
        1.0, float(np.abs(values).max())
    )


@dataclass
class RegressionResult:
    """R², added R², nested F-test, RMSE and MAE of the three models (NaN with ``reason``)."""

    n: int = 0
    n_facts: int = 0
    n_layers: int = 0
    n_missing_score: int = 0
    r2_layer: float = math.nan
    r2_trace: float = math.nan
    r2_both: float = math.nan
    added_r2: float = math.nan
    f_stat: float = math.nan
    f_pvalue: float = math.nan
    f_df_num: float = math.nan
    f_df_denom: float = math.nan
    rmse_layer: float = math.nan
    rmse_trace: float = math.nan
    rmse_both: float = math.nan
    mae_layer: float = math.nan
    mae_trace: float = math.nan
    mae_both: float = math.nan
    pearson_r: float = math.nan
    pearson_p: float = math.nan
    reason: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def fit_regressions(
    df: pd.DataFrame,
    score: str,
    trace: str = "trace",
    layer: str = "layer",
    fact: str = "fact_id",
    design: Design | None = None,
) -> RegressionResult:
    """Fit the paper's three OLS models of ``score`` on one (method, problem) slice of the join.

    ``design`` (from :meth:`Design.build` on the same ``df``) skips rebuilding the exog.
    """
    if score not in df.columns:
        return RegressionResult(reason=f"column {score} absent from the results")
    design = design or Design.build(df, trace, layer, fact)
    rows = design.select(score)
    exog = rows.exog
    out = RegressionResult(n=len(rows), n_missing_score=len(df) - len(rows))
    reasons: list[str] = []
    if out.n_missing_score:
        reasons.append(f"{out.n_missing_score} rows with missing {score} or trace left out")
    if len(rows) < 2:
        reasons.append(f"only {len(rows)} usable rows")
        out.reason = "; ".join(reasons)
        return out
    out.n_facts = rows.n_facts
    out.n_layers = rows.n_layers
    y = rows.score
    x = rows.trace
    tss = float(((y - y.mean()) ** 2).sum())
    score_constant = tss <= _TSS_EPS * len(y)
    if score_constant:
        reasons.append("score is constant: R² undefined")
    if _is_constant(x):
        reasons.append("trace is constant")
    if out.n_layers == 1:
        reasons.append("one layer only: C(layer) is the intercept")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fits = {name: sm.OLS(y, exog[name]).fit() for name in FORMULAS}
    for name, fit in fits.items():
        resid = np.asarray(fit.resid)
        setattr(out, f"rmse_{name}", float(np.sqrt(np.mean(resid**2))))
        setattr(out, f"mae_{name}", float(np.mean(np.abs(resid))))
        if not score_constant:
            setattr(out, f"r2_{name}", float(1.0 - fit.ssr / tss))
    if not score_constant:
        out.added_r2 = out.r2_both - out.r2_layer
    _nested_f_test(fits["both"], fits["layer"], tss, out, reasons)
    out.pearson_r, out.pearson_p, why = pearson(x, y)
    if why and why not in " ".join(reasons):
        reasons.append(f"correlation: {why}")
    out.reason = "; ".join(reasons)
    return out


def _nested_f_test(full, restricted, tss: float, out: RegressionResult, reasons: list[str]) -> None:
    """F-test of ``score ~ C(layer) * trace`` against ``score ~ C(layer)`` (paper footnote 2)."""
    df_num = float(full.df_model - restricted.df_model)
    df_denom = float(full.df_resid)
    out.f_df_num, out.f_df_denom = df_num, df_denom
    if df_num <= 0:
        reasons.append(
            "F-test undefined: trace adds no column beyond layer (constant or collinear)"
        )
        return
    if df_denom <= 0:
        reasons.append("F-test undefined: no residual degrees of freedom")
        return
    if full.ssr <= _TSS_EPS * max(tss, 1.0):
        reasons.append("F-test undefined: layer x trace model fits exactly")
        return
    f_stat = ((restricted.ssr - full.ssr) / df_num) / (full.ssr / df_denom)
    out.f_stat = float(max(f_stat, 0.0))
    out.f_pvalue = float(stats.f.sf(out.f_stat, df_num, df_denom))


def pearson(x: np.ndarray, y: np.ndarray) -> tuple[float, float, str]:
    """Pearson's r with its two-sided p value (t test, n - 2 dof, as scipy), or NaN and why."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3:
        return math.nan, math.nan, f"only {len(x)} points"
    if _is_constant(x):
        return math.nan, math.nan, "trace is constant"
    if _is_constant(y):
        return math.nan, math.nan, "score is constant"
    xc, yc = x - x.mean(), y - y.mean()
    r = float(np.clip((xc @ yc) / np.sqrt((xc @ xc) * (yc @ yc)), -1.0, 1.0))
    dof = len(x) - 2
    if abs(r) == 1.0:
        return r, 0.0, ""
    t = r * math.sqrt(dof / (1.0 - r * r))
    return r, float(2.0 * stats.t.sf(abs(t), dof)), ""


def layer_correlations(
    df: pd.DataFrame, score: str, trace: str = "trace", layer: str = "layer"
) -> pd.DataFrame:
    """Pearson correlation of score and trace within each edit layer (paper Figs. 4, 15)."""
    rows = []
    if score in df.columns and len(df):
        layers = df[layer].to_numpy(dtype=int)
        x_all = df[trace].to_numpy(dtype=float)
        y_all = df[score].to_numpy(dtype=float)
        for lay in np.unique(layers):
            sel = layers == lay
            x, y = x_all[sel], y_all[sel]
            r, p, why = pearson(x, y)
            n = int((np.isfinite(x) & np.isfinite(y)).sum())
            rows.append({"layer": int(lay), "n": n, "pearson_r": r, "p_value": p, "reason": why})
    return pd.DataFrame(rows, columns=["layer", "n", "pearson_r", "p_value", "reason"])


@dataclass
class MixedResult:
    """Random intercept per fact (statsmodels MixedLM, ML fit) as a robustness check.

    ``lr_pvalue`` tests adding trace (and its interaction with layer) by a likelihood ratio;
    ``r2m_*`` are Nakagawa-Schielzeth marginal R² (variance of the fixed-effect predictions over
    fixed + fact + residual variance); ``fact_share`` is the fact intercept's variance share in the
    layer-only model.
    """

    mixed_lr_stat: float = math.nan
    mixed_lr_df: float = math.nan
    mixed_lr_pvalue: float = math.nan
    mixed_r2m_layer: float = math.nan
    mixed_r2m_both: float = math.nan
    mixed_added_r2m: float = math.nan
    mixed_fact_share: float = math.nan
    mixed_converged: bool = False
    mixed_reason: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _independent_columns(x: np.ndarray) -> np.ndarray:
    """Drop columns that are linear combinations of others (MixedLM needs a full-rank exog)."""
    from scipy.linalg import qr

    if x.shape[1] == 0:
        return x
    _, r, piv = qr(x, mode="economic", pivoting=True)
    diag = np.abs(np.diag(r))
    tol = diag.max() * max(x.shape) * np.finfo(float).eps if diag.size else 0.0
    rank = int((diag > tol).sum())
    return x[:, np.sort(piv[:rank])]


@dataclass
class _MixedFit:
    llf: float
    fe_params: np.ndarray
    var_fact: float
    scale: float
    converged: bool
    how: str


def random_intercept_ml(y: np.ndarray, x: np.ndarray, groups: np.ndarray) -> _MixedFit:
    """ML fit of y = x b + u_fact + e by maximising the profile likelihood in the one variance ratio.

    With V_g = I + g J per fact, V_g^-1 = I - g / (1 + g n_g) J and log|V_g| = log(1 + g n_g), so
    b and the residual variance have closed forms for each g, and g >= 0 is a bounded 1-D search
    (g = 0 included exactly). It is the same likelihood statsmodels' MixedLM maximises; unlike
    MixedLM.fit it does not fail when the fact variance sits on the boundary 0.
    """
    from scipy.optimize import minimize_scalar

    codes, uniques = pd.factorize(np.asarray(groups))
    n_g = np.bincount(codes).astype(float)
    n = len(y)
    sx = np.zeros((len(uniques), x.shape[1]))
    np.add.at(sx, codes, x)
    sy = np.bincount(codes, weights=y)
    xtx, xty = x.T @ x, x.T @ y

    def solve(gamma: float) -> tuple[float, np.ndarray, float]:
        w = gamma / (1.0 + gamma * n_g)
        a = xtx - (sx.T * w) @ sx
        b = xty - sx.T @ (w * sy)
        beta = np.linalg.lstsq(a, b, rcond=None)[0]
        r = y - x @ beta
        q = float(r @ r - (w * np.bincount(codes, weights=r, minlength=len(uniques)) ** 2).sum())
        sigma2 = max(q / n, 1e-300)
        llf = -0.5 * n * (math.log(2 * math.pi * sigma2) + 1.0) - 0.5 * float(
            np.log1p(gamma * n_g).sum()
        )
        return llf, beta, sigma2

    res = minimize_scalar(
        lambda t: -solve(math.exp(t))[0],
        bounds=(-30.0, 12.0),
        method="bounded",
        options={"xatol": 1e-9},
    )
    gamma = math.exp(res.x)
    if solve(0.0)[0] >= -res.fun:
        gamma = 0.0
    llf, beta, sigma2 = solve(gamma)
    return _MixedFit(llf, beta, gamma * sigma2, sigma2, bool(res.success), "profile likelihood")


def _fit_mixed(y: np.ndarray, x: np.ndarray, groups: np.ndarray) -> _MixedFit:
    """statsmodels MixedLM (ML), checked against the direct profile-likelihood maximum.

    Both maximise the same likelihood; the better optimum is kept. MixedLM.fit raises when the
    fact variance is on the boundary (its Hessian is singular), and may stop early; the direct
    fit covers both cases.
    """
    from statsmodels.regression.mixed_linear_model import MixedLM, MixedLMParams
    from statsmodels.tools.sm_exceptions import ConvergenceWarning

    direct = random_intercept_ml(y, x, groups)
    # starting MixedLM at the direct optimum saves most of its iterations (5x faster)
    start = MixedLMParams.from_components(
        fe_params=direct.fe_params, cov_re=np.array([[max(direct.var_fact / direct.scale, 1e-6)]])
    )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit = MixedLM(y, x, groups=groups).fit(
                reml=False, start_params=start, method=["lbfgs", "powell"]
            )
    except (np.linalg.LinAlgError, ValueError) as err:
        direct.how = f"profile likelihood (MixedLM.fit failed: {err})"
        return direct
    converged = bool(getattr(fit, "converged", True)) and not any(
        issubclass(w.category, ConvergenceWarning) and "boundary" not in str(w.message)
        for w in caught
    )
    if np.isfinite(fit.llf) and fit.llf >= direct.llf - 1e-6:
        return _MixedFit(
            float(fit.llf),
            np.asarray(fit.fe_params),
            float(np.asarray(fit.cov_re)[0, 0]),
            float(fit.scale),
            converged,
            "MixedLM",
        )
    direct.how = "profile likelihood (higher than MixedLM.fit's optimum)"
    return direct


def mixed_effects(
    df: pd.DataFrame, score: str, trace: str = "trace", design: Design | None = None
) -> MixedResult:
    """Layer-only vs. layer x trace with a random intercept per fact (beyond the paper)."""
    out = MixedResult()
    if score not in df.columns:
        out.mixed_reason = f"column {score} absent"
        return out
    design = design or Design.build(df, trace)
    rows = design.select(score)
    mats = rows.exog
    n_facts = rows.n_facts
    if n_facts < 3:
        out.mixed_reason = f"only {n_facts} facts"
        return out
    y = rows.score
    if _is_constant(y):
        out.mixed_reason = "score is constant"
        return out
    if np.bincount(rows.fact).max() < 2:
        out.mixed_reason = "one row per fact: the fact intercept is not identified"
        return out
    groups = rows.fact
    x_layer = _independent_columns(mats["layer"])
    x_both = _independent_columns(mats["both"])
    fits = {"layer": _fit_mixed(y, x_layer, groups), "both": _fit_mixed(y, x_both, groups)}
    out.mixed_converged = all(f.converged for f in fits.values())
    reasons = sorted({f"{name}: {f.how}" for name, f in fits.items() if f.how != "MixedLM"})
    if not out.mixed_converged:
        reasons.append("optimizer reported non-convergence")
    out.mixed_lr_df = float(x_both.shape[1] - x_layer.shape[1])
    if out.mixed_lr_df > 0:
        out.mixed_lr_stat = float(max(2.0 * (fits["both"].llf - fits["layer"].llf), 0.0))
        out.mixed_lr_pvalue = float(stats.chi2.sf(out.mixed_lr_stat, out.mixed_lr_df))
    else:
        reasons.append("trace adds no column beyond layer")
    r2m = {}
    for name, x in (("layer", x_layer), ("both", x_both)):
        fit = fits[name]
        var_fixed = float(np.var(x @ fit.fe_params))
        total = var_fixed + fit.var_fact + fit.scale
        r2m[name] = var_fixed / total if total > 0 else math.nan
        if name == "layer" and total > 0:
            out.mixed_fact_share = fit.var_fact / total
    out.mixed_r2m_layer, out.mixed_r2m_both = r2m["layer"], r2m["both"]
    out.mixed_added_r2m = r2m["both"] - r2m["layer"]
    out.mixed_reason = "; ".join(reasons)
    return out

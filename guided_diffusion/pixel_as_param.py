"""PixelAsParam: a guided sampling step read as an optimizer step on the pixels.

A guided step moves x_t along named directions (Dinh, Liu & Xu, ICML 2023):

    x_{t-1} = base + cls + div,   where base already contains den

- den: the denoising direction, the part of base that comes from the model's x0 prediction;
- cls: the guidance direction (or several, one per named objective);
- div: the diversity noise (zero at t = 0; absent where a path has no noise).

Each sampler builds its directions here, next to its equations:

- DDPM (`ddpm_directions`): base = mu = c1 * x0_hat + c2 * x_t, den = c1 * x0_hat,
  cls = Sigma * s * grad log p(y | x_t), div = exp(logvar / 2) * z.
- DDIM (`ddim_directions`, beyond the reference code). With a = alpha_bar_t, a' = alpha_bar_{t-1},
  sigma = eta * sqrt((1 - a') / (1 - a)) * sqrt(1 - a / a') and e = sqrt(1 - a' - sigma^2), ADM's
  guided DDIM step (eps' = eps - sqrt(1 - a) * g, x0' = x0 + (1 - a) / sqrt(a) * g) expands to
      x_{t-1} = sqrt(a') * x0 + e * eps                            (base, the unguided DDIM mean)
              + [sqrt(a') (1 - a) / sqrt(a) - e sqrt(1 - a)] * g    (cls)
              + sigma * z                                          (div, zero at t = 0)
  and, as eps = (x_t / sqrt(a) - x0) / sqrt(1/a - 1), base's x0 part is
  den = [sqrt(a') - e / sqrt(1/a - 1)] * x0. With eta = 0, div is zero and never projects.
- DPM-Solver++ (`dpmpp_directions`, beyond the paper; `dpm_solver.py`). A step is
  x_{i-1} = A x_i + B D + N z with the solver's data term D = (1 + c) x0' - c x0_prev (x0_prev:
  the previous step's guided data prediction, the solver's history; c = 0 at first order). The
  guidance enters x0 as in ADM's condition_score, bounded by --x0_threshold (thr) per objective:
  x0' = x0 + p with p = thr(x0 + (1 - a) / sqrt(a) * g) - x0. The step then expands to
      x_{i-1} = A x_i + B [(1 + c) x0 - c x0_prev]                  (base)
              + B (1 + c) * p                                      (cls)
              + N z                                                (div: the SDE's noise, zero
                                                                    for dpmpp_2m and at t = 0)
  with den = B [(1 + c) x0 - c x0_prev], the part of base from the model's data predictions. At
  first order (c = 0) this is DDIM's expansion with eta = 0 (dpmpp_2m) or eta = 1
  (dpmpp_2m_sde), coefficient for coefficient. The history keeps the plain guided x0': a
  projection changes the step, not the data estimate the next step extrapolates from.
- Classifier-free guidance (`classifier_free_directions`), two networks (conditional c,
  unconditional u), on the x0 predictions: base = den = x0_c (clipped) and
  cls = delta = -w * (eps_c - eps_u) * sqrt(1/a - 1), so that plain guidance is
  x0 = clip(x0_c + delta); the step then uses the posterior mean of the combined x0 and u's
  variance. There is no div (the noise comes after), so the div modes are refused there.

When two directions conflict (negative inner product) they are made compatible with the
per-sample PCGrad projection

    proj(a, b, w) = a - w * min(0, <a, b>) / ||b||^2 * b     (a unchanged where b = 0)

and paired projections use each partner's value from before the pair. Modes:

- none:         x = base + cls + div (ADM-G);
- cls_den:      cls1 = proj(cls, den, cw), den1 = proj(den, cls, dw);
                x = base - den + den1 + cls1 + div;
- cls_den_div:  as cls_den, then cls2 = proj(cls1, div, cw), div1 = proj(div, cls1, dw);
                x = base - den + den1 + cls2 + div1;
- cls_den_div2: as cls_den_div but div1 = proj(div, cls, dw) (the original cls).

cw (`cweight`) scales every correction applied to a guidance direction, dw (`dweight`) every
correction applied to the sampler's own directions (den, div); both are 1 in the paper, and
dw = 0 gives a one-sided projection that never alters the model's directions. `bound`
(`--pxp_bound KAPPA`, beyond the paper; off by default) caps the coefficient of den's and div's
corrections at KAPPA: with KAPPA = 1 a correction is never larger than the guidance itself, where
the paper's coefficient -<den, cls> / ||cls||^2 grows without limit as ||cls|| falls at low noise.

Several objectives (beyond the paper): a guidance function may return {name: gradient}; each is
a direction of its own. In the modes other than none they first resolve their conflicts among
themselves (PCGrad: each projected against every other one as given), then each is paired with
den and, in the div modes, with div, in the order given. `projection_plan` writes this rule once;
`combine_general` applies it with `project` (the reference) and `combine_fused` applies it to the
coefficients of one Gram matrix (the fast path; the two agree to rounding). A new mode is a new
branch of `projection_plan`; a new objective is a new entry of the guidance function's dict.

Which steps use all this is one rule, `PxPConfig.step_kind`, for every sampler and guidance:
outside `guidance_window` (`--guidance_window lo,hi`: guide only at lo <= t/T < hi, as in
Kynkaanniemi et al. 2024) the step is unguided (classifier-free: the conditional network alone,
in one call); outside `window` (`--pxp_window lo,hi`), or with mode none and the sgd optimizer,
it is ADM's plain guided step, bit for bit; elsewhere its directions are combined. On the digits benchmark projecting only in the noisy half (0.5,1) kept
the accuracy gain per scale without the FID cost of projecting at low noise.

The guidance directions can also be smoothed across steps like an optimizer's update
(`GuidanceOptimizer`: momentum or Adam moments per sample and objective), rescaled to the step's
own norm so only their direction changes; "sgd" (the default) is the paper's plain step.
"""

import math
from dataclasses import dataclass, field, fields
from typing import Callable, NamedTuple, Optional, Union

import torch as th

from . import dpm_solver
from .errors import UsageError

MODES = ("none", "cls_den", "cls_den_div", "cls_den_div2")
OPTIMIZERS = ("sgd", "momentum", "adam")
SAMPLER_DIRECTIONS = ("den", "div")  # every other name is a guidance direction
IN_BASE = ("den",)  # directions that base already contains
ALL_STEPS = (0.0, 1.0)

# how a guided step is taken, as PxPConfig.step_kind decides
UNGUIDED, PLAIN, DIRECTIONS = "unguided", "plain", "directions"


def parse_window(window, flag="pxp_window"):
    """(lo, hi) from the flag string "lo,hi" (or a pair): the range of t/T whose steps it selects."""
    try:
        lo, hi = (float(v) for v in (window.split(",") if isinstance(window, str) else window))
    except (TypeError, ValueError) as e:
        raise UsageError(f"{flag} {window!r}: expected two fractions lo,hi such as 0.5,1") from e
    if not 0 <= lo < hi <= 1:
        raise UsageError(f"{flag} {lo:g},{hi:g}: need 0 <= lo < hi <= 1 (e.g. 0.5,1 selects the noisy half of the steps)")
    return lo, hi


def resolve_mode(mode, class_cond):
    """The paper's recipe for `auto`: cls_den for class-conditional models, else cls_den_div2."""
    if mode == "auto":
        return "cls_den" if class_cond else "cls_den_div2"
    return mode


def _flag(name, default):
    """A PxPConfig field that is also the sampling flag `name`."""
    return field(default=default, metadata={"flag": name})


@dataclass(frozen=True)
class PxPConfig:
    """How guided steps are taken: which directions are projected, how strongly, and at which steps.

    Every field is a sampling flag (its name in `flags()`); windows may be given as "lo,hi".
    """

    mode: str = _flag("pxp_mode", "none")
    dweight: float = _flag("dweight", 1.0)
    cweight: float = _flag("cweight", 1.0)
    optimizer: str = _flag("pxp_optimizer", "sgd")
    window: tuple = _flag("pxp_window", ALL_STEPS)  # steps with lo <= t/T < hi combine directions; the others are plain ADM-G
    bound: float = _flag("pxp_bound", math.inf)  # the largest coefficient of a correction to den or div
    guidance_window: tuple = _flag("guidance_window", ALL_STEPS)  # steps with lo <= t/T < hi are guided at all

    def __post_init__(self):
        if self.mode == "auto":
            raise UsageError(f"pxp_mode 'auto' depends on the model: resolve it with resolve_mode(mode, class_cond) or name one of {', '.join(MODES)}")
        if self.mode not in MODES:
            raise UsageError(f"unknown pxp_mode {self.mode!r}: use auto (the paper's recipe for the model) or one of {', '.join(MODES)}")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown pxp_optimizer {self.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
        if not self.bound >= 0:
            raise UsageError(f"pxp_bound {self.bound}: the bound on den's and div's corrections must be >= 0 (inf: the paper's unbounded rule)")
        object.__setattr__(self, "window", parse_window(self.window, "pxp_window"))
        object.__setattr__(self, "guidance_window", parse_window(self.guidance_window, "guidance_window"))

    @classmethod
    def from_flags(cls, class_cond=None, **flags):
        """The config of sampling flags (the names of `flags()`; missing ones keep their defaults).

        :param class_cond: whether the model is class-conditional, to resolve pxp_mode "auto".
        """
        names = {f.metadata["flag"]: f.name for f in fields(cls)}
        unknown = sorted(set(flags) - set(names))
        if unknown:
            raise UsageError(f"unknown flag(s) {', '.join(unknown)}: the PixelAsParam flags are {', '.join(names)}")
        values = {names[flag]: value for flag, value in flags.items()}
        if class_cond is not None and "mode" in values:
            values["mode"] = resolve_mode(values["mode"], class_cond)
        return cls(**values)

    def flags(self):
        """{flag: value} of this config as sampling flags, windows written "lo,hi"."""
        values = {f.metadata["flag"]: getattr(self, f.name) for f in fields(self)}
        return {k: f"{v[0]:g},{v[1]:g}" if isinstance(v, tuple) else v for k, v in values.items()}

    def step_kind(self, t, num_timesteps):
        """The one rule: how a guided step at timestep index t (an int, or a tensor of equal ones) is taken.

        UNGUIDED outside guidance_window; PLAIN (ADM's guided step) outside window or when nothing
        is projected or smoothed (mode none, optimizer sgd); DIRECTIONS otherwise.
        """
        if not _inside(self.guidance_window, t, num_timesteps):
            return UNGUIDED
        if (self.mode == "none" and self.optimizer == "sgd") or not _inside(self.window, t, num_timesteps):
            return PLAIN
        return DIRECTIONS

    def require(self, names, path):
        """Refuse (UsageError) a mode that projects against a direction that `path` does not build."""
        missing = _missing_partners(self.mode, names)
        if missing:
            possible = [m for m in MODES if not _missing_partners(m, names)]
            raise UsageError(
                f"pxp_mode {self.mode} projects against {', '.join(missing)}, which {path} does not have: use {' or '.join(possible)}"
            )


def _inside(window, t, num_timesteps):
    """Whether step index t (int or tensor of equal indices) lies in a window of t/T; no look at t for all steps."""
    if window == ALL_STEPS:
        return True
    index = int(t[0]) if isinstance(t, th.Tensor) else int(t)
    return window[0] <= index / num_timesteps < window[1]


# ----------------------------------------------------------------- directions and their builders


class Directions(NamedTuple):
    """The pieces of a guided step: x_{t-1} = base + cls + div, with den a part of base.

    cls is one guidance direction or a dict {name: direction}, one per objective; div is None
    where the path has no noise direction.
    """

    base: th.Tensor
    den: th.Tensor
    cls: Union[th.Tensor, dict]
    div: Optional[th.Tensor] = None

    def named(self):
        """The ordered list of named directions: den, the guidance ones (a single one is "cls"), div."""
        guidance = list(self.cls.items()) if isinstance(self.cls, dict) else [("cls", self.cls)]
        clash = [name for name, _ in guidance if name in SAMPLER_DIRECTIONS]
        if clash:
            raise UsageError(f"a guidance objective is named {clash[0]!r}, the name of a sampler direction: rename it")
        return [("den", self.den), *guidance, *([("div", self.div)] if self.div is not None else [])]


def _each(gradient, fn):
    """fn applied to a gradient, or to each of a dict of named gradients."""
    return {name: fn(g) for name, g in gradient.items()} if isinstance(gradient, dict) else fn(gradient)


def total_guidance(gradient):
    """A guidance function's gradient, its named gradients summed (ADM-G's plain step has one direction)."""
    return sum(gradient.values()) if isinstance(gradient, dict) else gradient


def ddpm_directions(mean, pred_xstart, posterior_coef1, variance, log_variance, gradient, noise, nonzero):
    """DDPM: base = mu, den = c1 * x0_hat, cls = Sigma * gradient, div = exp(logvar / 2) * z (nonzero: 0 at t = 0)."""
    return Directions(
        base=mean.float(),
        den=posterior_coef1 * pred_xstart.float(),
        cls=_each(gradient, lambda g: variance * g.float()),
        div=nonzero * th.exp(0.5 * log_variance) * noise,
    )


def ddim_directions(x0, eps, alpha_bar, alpha_bar_prev, sqrt_recipm1, sigma, gradient, noise, nonzero):
    """DDIM (see the module docstring): base = sqrt(a') x0 + e eps, den = [sqrt(a') - e / sqrt(1/a - 1)] x0,
    cls = [sqrt(a') (1 - a) / sqrt(a) - e sqrt(1 - a)] * gradient, div = sigma z; sqrt_recipm1 = sqrt(1/a - 1)."""
    e = th.sqrt(1 - alpha_bar_prev - sigma**2)
    cls_coef = th.sqrt(alpha_bar_prev) * (1 - alpha_bar) / th.sqrt(alpha_bar) - e * th.sqrt(1 - alpha_bar)
    return Directions(
        base=x0 * th.sqrt(alpha_bar_prev) + e * eps,
        den=(th.sqrt(alpha_bar_prev) - e / sqrt_recipm1) * x0,
        cls=_each(gradient, lambda g: cls_coef * g.float()),
        div=nonzero * sigma * noise,
    )


def data_pulls(x0, gradient, scale, bound):
    """What the guidance does to a data prediction, per objective: bound(x0 + scale * g) - x0 (bound: e.g. a threshold),
    taken as scale * g itself wherever bound leaves x0 + scale * g alone (no rounding there)."""

    def pull(g):
        step = scale * g.float()
        v = x0 + step
        bounded = bound(v)
        return th.where(bounded == v, step, bounded - x0)

    return _each(gradient, pull)


def dpmpp_directions(x, x0, pulls, previous_x0, x_coef, data_coef, history, noise_coef, noise):
    """DPM-Solver++ (see the module docstring): base = A x + den, den = B [(1 + c) x0 - c x0_prev],
    cls = B (1 + c) * pull (from `data_pulls`), div = N z (zero where noise is None: the ODE)."""
    den = data_coef * dpm_solver.data_term(x0, previous_x0, history)
    cls_coef = data_coef * (1 + history)
    return Directions(
        base=x_coef * x + den,
        den=den,
        cls=_each(pulls, lambda p: cls_coef * p),
        div=th.zeros_like(x) if noise is None else noise_coef * noise,
    )


def classifier_free_directions(x0_c, eps_c, eps_u, scale, sqrt_recipm1):
    """Classifier-free guidance on x0: base = den = x0_c, cls = -w (eps_c - eps_u) sqrt(1/a - 1); no div."""
    return Directions(base=x0_c, den=x0_c, cls=-scale * (eps_c - eps_u) * sqrt_recipm1)


def named_guidance(**cond_fns):
    """One guidance function from several named ones: it returns {name: gradient}, a direction each.

    ADM-G's plain step sums them; PixelAsParam projects their conflicts (e.g.
    `named_guidance(cls=class_guidance, known=known_pixels_guidance)`).
    """

    def cond_fn(x, t, **kwargs):
        return {name: fn(x, t, **kwargs) for name, fn in cond_fns.items()}

    return cond_fn


# ----------------------------------------------------------------- the rule and its two combiners


class Projection(NamedTuple):
    """target <- proj(target, partner): a correction of one direction along another."""

    target: str
    partner: str
    original: bool = False  # against the partner as given, not its value from before the stage


def projection_plan(mode, names):
    """The mode's rule over the ordered direction names: a list of stages, each a tuple of projections
    that read the directions' values from before the stage (so a pair is projected symmetrically)."""
    if mode == "none":
        return []
    guidance = [n for n in names if n not in SAMPLER_DIRECTIONS]
    stages = [(Projection(g, h, original=True),) for g in guidance for h in guidance if h != g]  # PCGrad among objectives
    stages += [(Projection(g, "den"), Projection("den", g)) for g in guidance]
    if mode in ("cls_den_div", "cls_den_div2"):
        stages += [(Projection(g, "div"), Projection("div", g, original=mode == "cls_den_div2")) for g in guidance]
    return stages


def _missing_partners(mode, names):
    """The directions a mode's plan projects against that are not among names."""
    return sorted({p.partner for stage in projection_plan(mode, names) for p in stage} - set(names))


def _flat_dot(a, b):
    """Per-sample inner products <a_i, b_i> over all non-batch dimensions."""
    return (a * b).flatten(1).sum(dim=1)


def _per_sample(v, like):
    """Reshape a [N] tensor to broadcast against `like`."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def _safe_div(num, den):
    """num / den, and 0 where den is 0 (a zero partner direction projects nothing)."""
    return num / th.where(den > 0, den, math.inf)


def correction(dot, partner_norm2, weight=1.0, bound=math.inf):
    """The PCGrad coefficient c of a <- a + c * b: -w * min(0, <a, b>) / ||b||^2, at most bound (0 where b = 0)."""
    coef = _safe_div(-weight * dot.clamp(max=0), partner_norm2)
    return coef if bound == math.inf else coef.clamp(max=bound)


def project(a, b, weight=1.0, bound=math.inf):
    """proj(a, b, w): remove w times a's component against b where <a, b> < 0, per sample (coefficient at most bound)."""
    coef = correction(_flat_dot(a, b), _flat_dot(b, b), weight, bound)
    return a + _per_sample(coef, a).to(a.dtype) * b


def _apply_plan(config, names, original, project_step):
    """Run the mode's plan on the given direction values; returns (final values by name, fired stats:
    for every pair that a plan may project, whether this mode's projection met a conflict there).

    project_step(a, b, weight, bound) returns (a projected against b, <a, b>) for the values
    used: tensors (the reference) or coefficient vectors over a Gram matrix (the fast path).
    """
    current, fired = dict(original), {}
    for stage in projection_plan(config.mode, names):
        before = dict(current)
        for p in stage:
            partner = (original if p.original else before)[p.partner]
            weight, bound = (config.dweight, config.bound) if p.target in SAMPLER_DIRECTIONS else (config.cweight, math.inf)
            current[p.target], dot = project_step(before[p.target], partner, weight, bound)
            if p.target not in SAMPLER_DIRECTIONS:
                fired[f"fired_{p.target}_{p.partner}"] = dot < 0
    guidance = [n for n in names if n not in SAMPLER_DIRECTIONS]
    pairs = [(g, h) for g in guidance for h in guidance if h != g] + [(g, s) for g in guidance for s in names if s in SAMPLER_DIRECTIONS]
    some = next(iter(original.values()))
    never = th.zeros(len(some), dtype=th.bool, device=some.device)
    return current, {f"fired_{a}_{b}": fired.get(f"fired_{a}_{b}", never) for a, b in pairs}


def _cosines(names, gram):
    """Per-sample cosines between every pair of the given directions (0 where one is zero), from their [N, K, K] Gram matrix."""
    norm2 = gram.diagonal(dim1=1, dim2=2)
    cosines = _safe_div(gram, (norm2[:, :, None] * norm2[:, None, :]).sqrt()).float()
    return {f"cos_{a}_{b}": cosines[:, i, j] for i, a in enumerate(names) for j, b in enumerate(names) if i < j}


def combine_general(base, directions, config):
    """The reference combiner: x = base + the directions after the mode's projections (den's change only, as base holds den).

    :param directions: an ordered list of (name, tensor): "den", the guidance directions, "div".
    :return: (sample, stats): per-sample cosines between the given directions and, for each
        projection of a guidance direction, whether its conflict was there ("fired").
    """
    names = [name for name, _ in directions]
    original = dict(directions)
    current, fired = _apply_plan(config, names, original, lambda a, b, w, bound: (project(a, b, w, bound), _flat_dot(a, b)))
    sample = base
    for name in names:
        sample = sample + (current[name] - original[name] if name in IN_BASE else current[name])
    stacked = th.stack([v for _, v in directions], dim=1).flatten(2).double()
    return sample, {**_cosines(names, th.bmm(stacked, stacked.transpose(1, 2))), **fired}


def combine_fused(base, directions, config):
    """combine_general's result from one per-sample Gram matrix: every direction after the plan is a
    combination of the given ones, so the projections cost one batched reduction plus one weighted sum."""
    names = [name for name, _ in directions]
    stacked = th.stack([v for _, v in directions], dim=1).flatten(2)  # [N, K, F]
    gram = th.bmm(stacked, stacked.transpose(1, 2)).double()  # [N, K, K]
    unit = th.eye(len(names), dtype=gram.dtype, device=gram.device).expand(len(stacked), -1, -1)
    original = {name: unit[:, k] for k, name in enumerate(names)}  # coefficient vectors [N, K]

    def project_step(a, b, weight, bound):
        gram_b = th.bmm(gram, b[:, :, None])[:, :, 0]
        a_dot_b = (a * gram_b).sum(1)
        return a + correction(a_dot_b, (b * gram_b).sum(1), weight, bound)[:, None] * b, a_dot_b

    current, fired = _apply_plan(config, names, original, project_step)
    coefs = th.stack(list(current.values())).sum(0) - sum(original[name] for name in IN_BASE if name in original)
    update = th.bmm(coefs[:, None, :].to(stacked.dtype), stacked).reshape(base.shape)
    return base + update, {**_cosines(names, gram), **fired}


def combine(d: Directions, config: PxPConfig, guidance_state=None):
    """x_{t-1} from a step's directions under config (the fused combiner); returns (sample, stats).

    guidance_state (a GuidanceOptimizer carried across a loop's steps) first smooths the guidance.
    """
    directions = d.named()
    if guidance_state is not None:
        directions = [(n, v if n in SAMPLER_DIRECTIONS else guidance_state.step(v, n)) for n, v in directions]
    return combine_fused(d.base, directions, config)


class GuidanceOptimizer:
    """Per-sample optimizer state for each guidance direction across a loop's steps.

    "momentum" follows the running sum m = beta1 * m + cls, "adam" the bias-corrected
    m / (sqrt(v) + eps); either is rescaled to the current cls's norm, so the step size
    stays the paper's and only the direction is smoothed. "sgd" returns cls unchanged.
    """

    def __init__(self, kind="sgd", beta1=0.9, beta2=0.999, eps=1e-12):
        if kind not in OPTIMIZERS:
            raise UsageError(f"unknown pxp_optimizer {kind!r}: use one of {', '.join(OPTIMIZERS)}")
        self.kind, self.beta1, self.beta2, self.eps = kind, beta1, beta2, eps
        self.moments = {}  # guidance direction name -> (steps, m, v)

    def step(self, cls, name="cls"):
        """The update direction to use in place of this step's guidance direction cls (named as in Directions.named)."""
        if self.kind == "sgd":
            return cls
        steps, m, v = self.moments.get(name, (0, None, None))
        steps += 1
        if self.kind == "momentum":
            m = cls if m is None else self.beta1 * m + cls
            update = m
        else:
            m = (1 - self.beta1) * cls if m is None else self.beta1 * m + (1 - self.beta1) * cls
            v = (1 - self.beta2) * cls**2 if v is None else self.beta2 * v + (1 - self.beta2) * cls**2
            update = (m / (1 - self.beta1**steps)) / ((v / (1 - self.beta2**steps)).sqrt() + self.eps)
        self.moments[name] = (steps, m, v)
        scale = _safe_div(_flat_dot(cls, cls).sqrt(), _flat_dot(update, update).sqrt())
        return _per_sample(scale, cls) * update


@dataclass
class ClassifierFree:
    """Classifier-free guidance: a class-conditional network beside the unconditional model.

    :param cond_model: the conditional network, called with the loop's model_kwargs (labels y).
    :param scale: the guidance weight w in eps = (1 + w) eps_c - w eps_u.
    """

    cond_model: Callable
    scale: float


class StepStats:
    """Per-timestep means of a loop's PixelAsParam statistics, accumulated over batches and ranks.

    Cosines are averaged over samples; `fired_*` entries become the fraction of samples whose
    projection fired at that step.
    """

    def __init__(self):
        self.sums = {}  # timestep index -> {name: sum over samples}
        self.counts = {}  # timestep index -> number of samples

    def add(self, t, stats):
        """Accumulate one step's per-sample statistics (the `pxp` entry of a step's output)."""
        sums = self.sums.setdefault(int(t), {})
        for name, values in stats.items():
            sums[name] = sums.get(name, 0.0) + values.double().sum().item()
        self.counts[int(t)] = self.counts.get(int(t), 0) + len(next(iter(stats.values())))

    def merge(self, other):
        """Add another accumulator's sums (e.g. from another rank)."""
        for t, sums in other.sums.items():
            mine = self.sums.setdefault(t, {})
            for name, value in sums.items():
                mine[name] = mine.get(name, 0.0) + value
            self.counts[t] = self.counts.get(t, 0) + other.counts[t]

    def to_dict(self):
        """{"steps": [{"t": t, "samples": n, name: mean, ...}]} from the first step taken (largest t) to t = 0."""
        return {
            "steps": [
                {"t": t, "samples": self.counts[t], **{k: v / self.counts[t] for k, v in sorted(self.sums[t].items())}}
                for t in sorted(self.sums, reverse=True)
            ]
        }


def plot_stats(stats_dict, path):
    """Plot cosines and firing rates against the timestep to `path` (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise UsageError("plotting needs matplotlib: pip install matplotlib") from e
    steps = stats_dict["steps"]
    ts = [s["t"] for s in steps]
    fig, (ax_cos, ax_fired) = plt.subplots(1, 2, figsize=(10, 3.5))
    for name in sorted(k for k in steps[0] if k.startswith("cos_")):
        ax_cos.plot(ts, [s[name] for s in steps], label=name[4:].replace("_", "-"))
    for name in sorted(k for k in steps[0] if k.startswith("fired_")):
        ax_fired.plot(ts, [s[name] for s in steps], label=name[6:].replace("_", "-"))
    ax_cos.set(xlabel="timestep index t", ylabel="mean cosine", title="cosine between directions")
    ax_fired.set(xlabel="timestep index t", ylabel="fraction of samples", title="projection fired", ylim=(-0.05, 1.05))
    for ax in (ax_cos, ax_fired):
        ax.invert_xaxis()  # sampling runs from large t to 0
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

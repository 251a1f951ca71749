"""Named, weighted reward functions evaluated together, with clear errors.

A set can be built from a spec string with :func:`reward_set_from_spec`
(``"step_rar,step_rvr"``, ``"accuracy"``, ``"step_rar=1,step_rvr=0.5,mymod:fn=2"``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import numbers
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from .functions import (
    accuracy_reward,
    make_accuracy_reward,
    make_step_k,
    make_step_rar_reward,
    make_step_rvr_reward,
    step_k,
    step_rar_reward,
    step_rvr_reward,
)
from .layout import R1VL_LAYOUT, Layout
from .published import published_step_rar_reward, published_step_rvr_reward

__all__ = [
    "RewardError",
    "RewardResult",
    "RewardSet",
    "BUILTIN_REWARDS",
    "load_reward_function",
    "default_reward_set",
    "function_name",
    "reward_set_from_spec",
]

RewardFn = Callable[..., Sequence]

#: names :func:`load_reward_function` resolves without a module.
BUILTIN_REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "step_rar": step_rar_reward,
    "step_rvr": step_rvr_reward,
    "step_k": step_k,
    # R1-VL's published accuracy_reward / validity_reward (see .published)
    "step_rar_code": published_step_rar_reward,
    "step_rvr_code": published_step_rvr_reward,
}

#: builtins that read a layout: name -> factory taking ``layout=`` and ``name=``
#: (the published-code rewards read their fixed headers whatever the layout).
_LAYOUT_FACTORIES: dict[str, Callable[..., RewardFn]] = {
    "accuracy": make_accuracy_reward,
    "step_rar": make_step_rar_reward,
    "step_rvr": make_step_rvr_reward,
    "step_k": make_step_k,
}


class RewardError(ValueError):
    """A reward function failed or returned something unusable.

    Attributes: ``function`` (its name) and ``sample`` (the sample index, or
    ``None`` when the failure is not tied to one sample).
    """

    def __init__(self, message: str, *, function: str | None = None, sample: int | None = None):
        super().__init__(message)
        self.function = function
        self.sample = sample


def function_name(fn: Any) -> str:
    """A readable name for a reward callable (handles ``functools.partial``)."""
    name = getattr(fn, "__name__", None)
    if name is None and hasattr(fn, "func"):
        name = getattr(fn.func, "__name__", None)
    if name is None:
        name = type(fn).__name__
    return name


@dataclass
class RewardResult:
    """Rewards of one batch.

    Attributes:
        total: weighted sum per sample, ``None`` counted as 0.
        per_function: name -> per-sample values (``None`` = not applicable).
        weights: name -> weight used.
    """

    total: list[float]
    per_function: dict[str, list[float | None]]
    weights: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.total)

    def stats(self) -> dict[str, dict[str, float]]:
        """name -> ``{"mean", "std", "count"}`` over the non-``None`` values.

        ``std`` is the unbiased sample standard deviation (0.0 for fewer than
        two values); ``mean``/``std`` are NaN when ``count`` is 0.
        """
        out = {}
        for name, vals in self.per_function.items():
            xs = [v for v in vals if v is not None]
            c = len(xs)
            if c == 0:
                out[name] = {"mean": math.nan, "std": math.nan, "count": 0}
                continue
            mean = math.fsum(xs) / c
            std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (c - 1)) if c > 1 else 0.0
            out[name] = {"mean": mean, "std": std, "count": c}
        return out

    def log_dict(self, prefix: str = "rewards/") -> dict[str, float]:
        """Flat ``{prefix+name+"/mean": ..., ...}`` for a metrics logger."""
        d = {}
        for name, s in self.stats().items():
            d[f"{prefix}{name}/mean"] = s["mean"]
            d[f"{prefix}{name}/std"] = s["std"]
        if self.total:
            d[f"{prefix}total/mean"] = math.fsum(self.total) / len(self.total)
        return d


def _coerce_value(v: Any, name: str, i: int) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, numbers.Real):
        x = float(v)
    elif hasattr(v, "item") and hasattr(v, "__float__") and not isinstance(v, (str, bytes)):
        try:  # 0-d tensors / numpy scalars
            x = float(v)
        except (TypeError, ValueError):
            x = None
        if x is None:
            raise RewardError(
                f"reward function {name!r} returned a non-number for sample {i}: {v!r}", function=name, sample=i
            )
    else:
        raise RewardError(
            f"reward function {name!r} returned a non-number for sample {i}: {v!r} ({type(v).__name__}); "
            "expected float or None",
            function=name,
            sample=i,
        )
    if not math.isfinite(x):
        raise RewardError(f"reward function {name!r} returned {x} for sample {i}", function=name, sample=i)
    return x


def _slice_columns(columns: Mapping[str, Any], i: int, n: int) -> dict[str, Any]:
    out = {}
    for k, v in columns.items():
        if isinstance(v, (list, tuple)) and len(v) == n:
            out[k] = v[i : i + 1]
        else:
            out[k] = v
    return out


class RewardSet:
    """Named reward functions with weights.

    ``funcs`` is a ``{name: callable}`` mapping or a list of callables (named
    by ``__name__``; duplicates get ``_2``, ``_3``...); a string entry is
    resolved with :func:`load_reward_function`.  ``weights`` maps names to
    weights (missing names weigh 1.0); a list of weights in ``funcs`` order is
    also accepted.

    Calling the set runs every function as
    ``f(prompts=prompts, completions=completions, **columns)`` and returns a
    :class:`RewardResult`.  Any failure raises :class:`RewardError` naming
    the function and, where it can be found, the sample.
    """

    def __init__(
        self,
        funcs: Mapping[str, RewardFn | str] | Sequence[RewardFn | str],
        weights: Mapping[str, float] | Sequence[float] | None = None,
    ):
        items: list[tuple[str, RewardFn]] = []
        if isinstance(funcs, Mapping):
            for name, f in funcs.items():
                items.append((str(name), load_reward_function(f) if isinstance(f, str) else f))
        else:
            used: dict[str, int] = {}
            for f in funcs:
                f = load_reward_function(f) if isinstance(f, str) else f
                base = function_name(f)
                used[base] = used.get(base, 0) + 1
                items.append((base if used[base] == 1 else f"{base}_{used[base]}", f))
        if not items:
            raise ValueError("RewardSet needs at least one reward function")
        for name, f in items:
            if not callable(f):
                raise TypeError(f"reward {name!r} is not callable: {f!r}")
        self.funcs: dict[str, RewardFn] = dict(items)
        if weights is None:
            w = {name: 1.0 for name in self.funcs}
        elif isinstance(weights, Mapping):
            unknown = set(weights) - set(self.funcs)
            if unknown:
                raise ValueError(f"weights given for unknown reward functions {sorted(unknown)}; known: {list(self.funcs)}")
            w = {name: float(weights.get(name, 1.0)) for name in self.funcs}
        else:
            weights = list(weights)
            if len(weights) != len(self.funcs):
                raise ValueError(f"{len(weights)} weights for {len(self.funcs)} reward functions")
            w = {name: float(x) for name, x in zip(self.funcs, weights)}
        for name, x in w.items():
            if not math.isfinite(x):
                raise ValueError(f"weight of {name!r} is {x}")
        self.weights: dict[str, float] = w

    @property
    def names(self) -> list[str]:
        return list(self.funcs)

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={self.weights[n]:g}" for n in self.funcs)
        return f"RewardSet({inner})"

    def _locate(self, name: str, f: RewardFn, prompts, completions, columns, n: int) -> int | None:
        """Index of the first sample on which ``f`` raises alone, if any."""
        for i in range(n):
            p = prompts[i : i + 1] if isinstance(prompts, (list, tuple)) and len(prompts) == n else prompts
            try:
                f(prompts=p, completions=completions[i : i + 1], **_slice_columns(columns, i, n))
            except Exception:
                return i
        return None

    def evaluate(self, name: str, prompts, completions, **columns) -> list[float | None]:
        """Run one function and validate its output."""
        f = self.funcs[name]
        n = len(completions)
        try:
            vals = f(prompts=prompts, completions=completions, **columns)
        except Exception as e:
            i = self._locate(name, f, prompts, completions, columns, n) if n > 1 else (0 if n == 1 else None)
            where = f" on sample {i}" if i is not None else ""
            raise RewardError(
                f"reward function {name!r} raised{where}: {type(e).__name__}: {e}", function=name, sample=i
            ) from e
        if vals is None or isinstance(vals, (str, bytes, dict)):
            raise RewardError(
                f"reward function {name!r} returned {type(vals).__name__}; expected a list of {n} floats/None",
                function=name,
            )
        try:
            vals = list(vals)
        except TypeError:
            raise RewardError(
                f"reward function {name!r} returned {type(vals).__name__}; expected a list of {n} floats/None",
                function=name,
            ) from None
        if len(vals) != n:
            raise RewardError(
                f"reward function {name!r} returned {len(vals)} values for {n} completions", function=name
            )
        return [_coerce_value(v, name, i) for i, v in enumerate(vals)]

    def __call__(self, prompts, completions, **columns) -> RewardResult:
        n = len(completions)
        per: dict[str, list[float | None]] = {}
        for name in self.funcs:
            per[name] = self.evaluate(name, prompts, completions, **columns)
        total = [0.0] * n
        for name, vals in per.items():
            w = self.weights[name]
            if w == 0.0:
                continue
            for i, v in enumerate(vals):
                if v is not None:
                    total[i] += w * v
        return RewardResult(total=total, per_function=per, weights=dict(self.weights))


def load_reward_function(spec: str | RewardFn) -> RewardFn:
    """Resolve a spec to a callable; a callable is returned unchanged.

    A spec is a builtin name (``"step_rar"``, see :data:`BUILTIN_REWARDS`),
    ``"package.module:function"`` or ``"path/to/file.py:function"`` (a file
    ending in ``.py``, relative to the working directory; it is executed as a
    module of its own).  ``function`` may be dotted (``"mod:Class.method"``).
    """
    if callable(spec) and not isinstance(spec, str):
        return spec
    if not isinstance(spec, str):
        raise RewardError(f"reward function spec must be 'module:function' or a callable, got {spec!r}")
    s = spec.strip()
    if ":" not in s:
        if s in BUILTIN_REWARDS:
            return BUILTIN_REWARDS[s]
        raise RewardError(
            f"reward function spec {spec!r} is not 'module:function' and not a builtin "
            f"({', '.join(sorted(BUILTIN_REWARDS))})",
            function=spec,
        )
    mod_name, _, attr = s.rpartition(":")  # the last ':' (a Windows path has others)
    if not mod_name or not attr:
        raise RewardError(f"reward function spec {spec!r} must look like 'module:function'", function=spec)
    mod = _load_file(mod_name, spec) if mod_name.endswith(".py") else _import(mod_name, spec)
    obj: Any = mod
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise RewardError(f"module {mod_name!r} has no attribute {attr!r} (reward function {spec!r})", function=spec) from None
    if not callable(obj):
        raise RewardError(f"{spec!r} is not callable ({type(obj).__name__})", function=spec)
    return obj


def _import(mod_name: str, spec: str):
    try:
        return importlib.import_module(mod_name)
    except ImportError as e:
        raise RewardError(f"cannot import module {mod_name!r} for reward function {spec!r}: {e}", function=spec) from e


def _load_file(path: str, spec: str):
    """Execute ``path`` as a module named after its absolute path (so that two
    files of the same name do not collide), registered in ``sys.modules``."""
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(full):
        raise RewardError(f"no file {path!r} for reward function {spec!r}", function=spec)
    stem = os.path.splitext(os.path.basename(full))[0]
    name = f"_fastgrpo_reward_{stem}_{hashlib.sha1(full.encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    file_spec = importlib.util.spec_from_file_location(name, full)
    mod = importlib.util.module_from_spec(file_spec)
    sys.modules[name] = mod
    try:
        file_spec.loader.exec_module(mod)
    except Exception as e:
        del sys.modules[name]
        raise RewardError(f"loading {path!r} for reward function {spec!r} failed: {type(e).__name__}: {e}", function=spec) from e
    return mod


def reward_set_from_spec(spec: str | Sequence[str], layout: Layout | None = None) -> RewardSet:
    """A :class:`RewardSet` from ``"name[=weight],..."`` (or a list of such entries).

    Each name is a builtin (:data:`BUILTIN_REWARDS`: ``accuracy``, ``step_rar``,
    ``step_rvr``, ``step_k``, and ``step_rar_code`` / ``step_rvr_code``, R1-VL's
    published-code rewards) or ``module:function`` / ``path/to/file.py:function``.
    A weight is a finite number (default 1).  The set holds exactly the entries
    given, keyed by the builtin's name or the function's ``__name__``:

    * ``"accuracy"`` -- outcome-only GRPO;
    * ``"step_rar,step_rvr"`` -- StepGRPO, the total of :func:`default_reward_set`
      (``"step_rar,step_rvr,accuracy=0,step_k=0"`` is that set exactly,
      logging-only members included);
    * ``"step_rar_code,step_rvr_code"`` -- the published R1-VL reward;
    * ``"step_rar=1,step_rvr=0.5,mymod:fn=2"``.

    ``layout`` (default :data:`~fastgrpo.rewards.layout.R1VL_LAYOUT`) is given to
    the builtins that read one.  Raises :class:`RewardError` naming the entry for
    an empty spec or entry, an unknown name, a weight that is not a finite
    number, a name given twice, or a function that cannot be loaded.
    """
    entries = spec.split(",") if isinstance(spec, str) else list(spec)
    if not entries or all(isinstance(e, str) and not e.strip() for e in entries):
        raise RewardError(f"empty reward spec {spec!r}; give e.g. 'step_rar,step_rvr'")
    funcs: dict[str, RewardFn] = {}
    weights: dict[str, float] = {}
    source: dict[str, str] = {}
    for entry in entries:
        if not isinstance(entry, str):
            raise RewardError(f"reward spec entry {entry!r} is not a string (in {spec!r})")
        name, eq, w = entry.partition("=")
        name = name.strip()
        if not name:
            raise RewardError(f"empty reward spec entry {entry!r} in {spec!r}")
        weight = _spec_weight(w, entry, spec) if eq else 1.0
        if ":" in name:
            try:
                f = load_reward_function(name)
            except RewardError as e:
                raise RewardError(f"reward spec entry {entry!r}: {e}", function=name) from e
            key = function_name(f)
        elif name in BUILTIN_REWARDS:
            factory = _LAYOUT_FACTORIES.get(name)
            f = factory(layout=R1VL_LAYOUT if layout is None else layout, name=name) if factory else BUILTIN_REWARDS[name]
            key = name
        else:
            raise RewardError(
                f"unknown reward {name!r} in spec entry {entry!r}; builtins: {', '.join(BUILTIN_REWARDS)}, "
                "or 'module:function' / 'path/to/file.py:function'",
                function=name,
            )
        if key in funcs:
            raise RewardError(f"reward {key!r} given twice in spec {spec!r} (entries {source[key]!r} and {entry!r})", function=key)
        funcs[key], weights[key], source[key] = f, weight, entry
    return RewardSet(funcs, weights)


def _spec_weight(text: str, entry: str, spec: Any) -> float:
    try:
        w = float(text)
    except ValueError:
        raise RewardError(f"weight {text.strip()!r} of reward spec entry {entry!r} is not a number (in {spec!r})") from None
    if not math.isfinite(w):
        raise RewardError(f"weight {text.strip()!r} of reward spec entry {entry!r} is not finite (in {spec!r})")
    return w


def default_reward_set(
    layout: Layout = R1VL_LAYOUT,
    form: str = "paper",
    *,
    alpha: float = 0.1,
    soft: bool = True,
    backend: str | None = None,
) -> RewardSet:
    """StepGRPO's reward ``r = r_acc + r_val``.

    ``step_rar`` (weight 1) is ``r_acc``, which already contains the answer
    accuracy (``1 + alpha*k`` when correct), and ``step_rvr`` (weight 1) is
    ``r_val``; so the total lies in ``[0, 2 + alpha]``.  ``accuracy`` and
    ``step_k`` are included with weight 0 for logging only -- adding accuracy
    again would count it twice.  ``form="code", soft=False`` is the published
    R1-VL reward exactly (both StepRAR and StepRVR in their published-code form).
    """
    published = form == "code" and not soft
    return RewardSet(
        {
            "step_rar": make_step_rar_reward(alpha=alpha, form=form, soft=soft, layout=layout, backend=backend),
            "step_rvr": make_step_rvr_reward(layout=layout, form="code" if published else "paper"),
            "accuracy": make_accuracy_reward(layout=layout, backend=backend),
            "step_k": make_step_k(soft=soft, layout=layout),
        },
        weights={"step_rar": 1.0, "step_rvr": 1.0, "accuracy": 0.0, "step_k": 0.0},
    )

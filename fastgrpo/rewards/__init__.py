"""Rule-based rewards for StepGRPO (pure Python; imports nothing heavy).

* :mod:`.layout` -- solution layouts (R1-VL ``### Step N:``, ``<think>/<answer>`` tags) and the parser.
* :mod:`.answer` -- final-answer extraction and equivalence.
* :mod:`.steps` -- soft key-step matching (StepRAR's ``k``) and a rule-based key-step extractor.
* :mod:`.functions` -- TRL-signature reward functions: StepRAR, StepRVR, accuracy, ``k``.
* :mod:`.published` -- StepRAR and StepRVR exactly as R1-VL's published code computes them.
* :mod:`.retrieval` -- R1-Router Step-GRPO rewards: retrieval steps, answer recall, step-type dispatch.
* :mod:`.rewardset` -- named, weighted reward sets with validated outputs, built from a spec string.

The StepGRPO reward is ``r = r_acc + r_val`` = ``step_rar + step_rvr``
(see :func:`default_reward_set`); StepRAR already contains the accuracy.
"""

from .answer import (
    BACKENDS,
    answers_match,
    available_backends,
    extract_answer,
    get_backend,
    normalize_answer,
    parse_number,
    set_backend,
)
from .functions import (
    FORMS,
    accuracy_reward,
    completion_text,
    final_answer,
    make_accuracy_reward,
    make_step_k,
    make_step_rar_reward,
    make_step_rvr_reward,
    step_k,
    step_rar_reward,
    step_rvr_reward,
    step_validity,
)
from .layout import R1VL_LAYOUT, R1VL_MULTIMODAL_LAYOUT, TAG_LAYOUT, Layout, ParsedSolution, parse
from .published import (
    published_answer_text,
    published_correct,
    published_key_step_fraction,
    published_step_rar_reward,
    published_step_rvr_reward,
    published_step_text,
    published_valid,
)
from .retrieval import (
    answer_recall_reward,
    embedding_similarity,
    lexical_similarity,
    make_retrieval_step_reward,
    make_step_type_reward,
    parse_answer_step,
    parse_retrieval_step,
    retrieval_step_reward,
    step_type_reward,
)
from .rewardset import (
    BUILTIN_REWARDS,
    RewardError,
    RewardResult,
    RewardSet,
    default_reward_set,
    function_name,
    load_reward_function,
    reward_set_from_spec,
)
from .steps import coerce_key_steps, extract_key_steps, key_step_fraction, matched_groups, normalize_math, soft_form, surface_forms


def clear_caches() -> None:
    """Drop the memoised parses and answer comparisons (for benchmarks)."""
    from . import answer as _a
    from . import layout as _l
    from . import published as _p
    from . import steps as _s

    _l.clear_cache()
    _a.clear_cache()
    _p.clear_cache()
    _s._hay.cache_clear()
    _s._needle.cache_clear()


__all__ = [
    "BACKENDS",
    "BUILTIN_REWARDS",
    "FORMS",
    "Layout",
    "ParsedSolution",
    "R1VL_LAYOUT",
    "R1VL_MULTIMODAL_LAYOUT",
    "TAG_LAYOUT",
    "RewardError",
    "RewardResult",
    "RewardSet",
    "accuracy_reward",
    "answers_match",
    "available_backends",
    "clear_caches",
    "coerce_key_steps",
    "completion_text",
    "default_reward_set",
    "extract_answer",
    "extract_key_steps",
    "final_answer",
    "function_name",
    "get_backend",
    "key_step_fraction",
    "load_reward_function",
    "make_accuracy_reward",
    "make_step_k",
    "make_step_rar_reward",
    "make_step_rvr_reward",
    "matched_groups",
    "normalize_answer",
    "normalize_math",
    "soft_form",
    "parse",
    "parse_number",
    "published_answer_text",
    "published_correct",
    "published_key_step_fraction",
    "published_step_rar_reward",
    "published_step_rvr_reward",
    "published_step_text",
    "published_valid",
    "reward_set_from_spec",
    "set_backend",
    "step_k",
    "step_rar_reward",
    "step_rvr_reward",
    "step_validity",
    "surface_forms",
    # retrieval (R1-Router)
    "answer_recall_reward",
    "embedding_similarity",
    "lexical_similarity",
    "make_retrieval_step_reward",
    "make_step_type_reward",
    "parse_answer_step",
    "parse_retrieval_step",
    "retrieval_step_reward",
    "step_type_reward",
]

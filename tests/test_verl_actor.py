"""verl 0.9.1's own actor (``TrainingWorker`` on its FSDP2 engine) computing log-probs and
entropies through fastgrpo (``fastgrpo.integrations.verl``: ``use_fused_kernels=True``,
``fused_kernel_options.impl_backend="fastgrpo"``), against verl's own paths on the same tiny
Qwen2: its fused ``torch`` backend and its plain logits path (``use_fused_kernels=False``).
Padded and remove-padding layouts; inference (log-probs, entropies), then PPO updates through
verl's ``train_mini_batch`` and ``ppo_loss`` (loss metrics, gradients, parameters after each
update).

Runs in CI's peers environment (``.ci/run``; verl installed ``--no-deps`` as
``.ci/peers-requirements.txt`` lists); skipped where verl is not importable unless
``FASTGRPO_REQUIRE_PEERS=1``.  The worker runs in a subprocess of its own (verl keeps a global
platform and process group).

What is stubbed, and why it cannot touch the numbers (the same for every arm compared):
* verl 0.9.1 has no CPU platform (it falls back to CUDA): ``_CPUPlatform`` below is verl's own
  extension point (``PlatformBase`` + ``set_platform``) answering "cpu" / "gloo" / no-op for
  device selection, seeding and profiling hooks, and ``VERL_ENGINE_DEVICE=cuda`` picks the FSDP
  engine class verl registers for CUDA (``FSDPEngineWithLMHead``; nothing in it is
  device-specific beyond the platform calls).  ``torch.cpu`` gets ``max_memory_allocated`` /
  ``max_memory_reserved`` returning 0 (verl logs them as metrics).
* the process group is initialized (gloo, one rank) before verl would ask for NCCL.
* ``monkey_patch.is_trl_available`` returns False: it only guards a ``state_dict`` patch on TRL's
  value-head class (absent from TRL 1.16, which the dev extra installs), a model not used here.
* attention is ``sdpa`` (``override_config``) since flash-attn cannot install on CPU, and
  ``USE_HUB_KERNELS=0`` keeps transformers from "kernelizing" the meta-device model verl builds
  on ranks > 0 (which it refuses: "Unsupported device type 'meta'"); on CPU there are no hub
  kernels to use anyway.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from gloo_helpers import free_port

REQUIRE = os.environ.get("FASTGRPO_REQUIRE_PEERS") == "1"
ARMS = ("fastgrpo", "torch", "logits")   # impl_backend, or verl's plain logits path
LAYOUTS = ("rmpad", "padded")
# verl 0.9.1's own fused torch backend fails on an untied lm_head under FSDP2 (verl shards the
# head as a unit of its own, which the fused forward never calls: "aten.mm.default got mixed
# torch.Tensor and DTensor"), so there fastgrpo is compared with verl's logits path only
UNTIED_ARMS = ("fastgrpo", "logits")
STEPS = 3


def _verl_importable():
    try:
        import verl.workers.engine_workers  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not installed here"
        return f"verl's engine not importable ({type(e).__name__}: {e})"
    return None


# ----------------------------------------------------------------------------- subprocess side


def _cpu_platform():
    import contextlib

    from verl.plugin.platform.platform_base import PlatformBase

    class _CPUPlatform(PlatformBase):
        device_name = property(lambda self: "cpu")
        vendor_name = property(lambda self: "cpu")
        device_module = property(lambda self: torch.cpu)   # verl special-cases torch.cpu

        def is_available(self): return True
        def current_device(self): return "cpu"
        def device_count(self): return 1
        def set_device(self, device_index): pass
        def synchronize(self, device_index=None): pass
        def manual_seed(self, seed): torch.manual_seed(seed)
        def manual_seed_all(self, seed): torch.manual_seed(seed)
        def set_allocator_settings(self, settings): pass
        def empty_cache(self): pass
        def get_device_capability(self, device_index=0): return (None, None)
        def communication_backend_name(self): return "gloo"
        def visible_devices_envvar(self): return "CPU_VISIBLE_DEVICES"
        def profiler_start(self): pass
        def profiler_stop(self): pass
        def ray_resource_name(self): return "CPU"
        def ray_noset_envvars(self): return []
        def is_ipc_supported(self): return False
        def cudart(self): return None

        @contextlib.contextmanager
        def nvtx_range(self, msg):
            yield

    for name in ("max_memory_allocated", "max_memory_reserved"):
        if not hasattr(torch.cpu, name):
            setattr(torch.cpu, name, lambda *a, **k: 0)
    return _CPUPlatform()


def _model_dir(path, tied):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from test_integrations import _tiny_tokenizer
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    _tiny_tokenizer().save_pretrained(path)


def _batch(step, rows=slice(None)):
    """A verl rollout batch (left-padded prompts, right-padded responses) as the trainer's
    ``left_right_2_no_padding`` hands it to the actor."""
    from tensordict import TensorDict

    from verl.workers.utils.padding import left_right_2_no_padding
    b, p, r = 4, 4, 5
    g = torch.Generator().manual_seed(100 + step)
    prompt = torch.randint(4, 96, (b, p), generator=g)
    resp = torch.randint(4, 96, (b, r), generator=g)
    pmask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]])
    rmask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    ids, am = torch.cat([prompt, resp], 1), torch.cat([pmask, rmask], 1)
    td = TensorDict({"prompts": prompt, "input_ids": ids, "attention_mask": am,
                     "position_ids": (am.cumsum(1) - 1).clamp(min=0), "responses": resp,
                     "response_mask": rmask,
                     "old_log_probs": -4.5 + 0.3 * torch.randn(b, r, generator=g),
                     "ref_log_prob": -4.5 + 0.3 * torch.randn(b, r, generator=g),
                     "advantages": torch.randn(b, 1, generator=g).expand(b, r).contiguous()},
                    batch_size=[b])
    return left_right_2_no_padding(td[rows])


def _run_arm(model_dir, arm, layout, rows=slice(None)):
    """One verl TrainingWorker: log-probs / entropies of a batch, then STEPS PPO updates."""
    from functools import partial

    from verl.trainer.config.config import CheckpointConfig
    from verl.utils import tensordict_utils as tu
    from verl.workers.config import (ActorConfig, FSDPEngineConfig, FSDPOptimizerConfig,
                                     HFModelConfig)
    from verl.workers.engine_workers import TrainingWorker, TrainingWorkerConfig
    from verl.workers.utils.losses import ppo_loss
    from verl.workers.utils.padding import no_padding_2_padding

    fused = arm != "logits"
    mc = HFModelConfig(path=model_dir, use_remove_padding=layout == "rmpad",
                       use_fused_kernels=fused,
                       fused_kernel_options={"impl_backend": arm} if fused else {},
                       override_config={"attn_implementation": "sdpa"})
    ec = FSDPEngineConfig(strategy="fsdp2", use_torch_compile=False, forward_only=False,
                          micro_batch_size_per_gpu=2, infer_micro_batch_size_per_gpu=2,
                          use_dynamic_bsz=False, model_dtype="fp32",
                          mixed_precision={"param_dtype": "fp32", "reduce_dtype": "fp32",
                                           "buffer_dtype": "fp32"})
    oc = FSDPOptimizerConfig(optimizer="SGD", lr=0.5, weight_decay=0.0, clip_grad=1e6)
    worker = TrainingWorker(TrainingWorkerConfig(
        model_type="language_model", model_config=mc, engine_config=ec, optimizer_config=oc,
        checkpoint_config=CheckpointConfig()))
    worker.reset()
    actor = ActorConfig(strategy="fsdp2", rollout_n=1, ppo_mini_batch_size=4,
                        ppo_micro_batch_size_per_gpu=2, clip_ratio_low=0.2, clip_ratio_high=0.28,
                        loss_agg_mode="token-mean", entropy_coeff=0.01, use_kl_loss=True,
                        kl_loss_coef=0.05, kl_loss_type="low_var_kl")
    worker.set_loss_fn(partial(ppo_loss, config=actor))

    out = {}
    td = _batch(0, rows)
    tu.assign_non_tensor(td, calculate_entropy=True, compute_loss=False, temperature=0.9)
    res = worker.infer_batch(td)
    out["log_probs"] = no_padding_2_padding(tu.get(res, "log_probs"), td).float()
    out["entropy"] = no_padding_2_padding(tu.get(res, "entropy"), td).float()
    module = worker.engine.module
    grads = []
    step_fn = worker.engine.optimizer_step

    def optimizer_step():   # the gradients verl is about to apply (instrumentation only)
        grads.append({n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
                      .detach().clone() for n, p in module.named_parameters()
                      if p.grad is not None})
        return step_fn()
    worker.engine.optimizer_step = optimizer_step
    for step in range(STEPS):
        td = _batch(step, rows)
        tu.assign_non_tensor(td, calculate_entropy=True, global_batch_size=4, mini_batch_size=4,
                             epochs=1, seed=1, dataloader_kwargs={"shuffle": False},
                             compute_loss=True, temperature=0.9)
        metrics = tu.get(worker.train_mini_batch(td), "metrics")
        if step == 0:
            out["metric_keys"] = sorted(metrics)
        for k in ("pg_loss", "kl_loss", "entropy_loss", "grad_norm", "pg_clipfrac", "ppo_kl"):
            for name in (k, f"actor/{k}"):
                if name in metrics:
                    out[f"metric/{k}/{step}"] = torch.tensor(metrics[name],
                                                             dtype=torch.float64).reshape(-1)
        for n, g in grads[-1].items():
            out[f"grad/{n}/{step}"] = g
        for n, p in module.named_parameters():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[f"param/{n}/{step}"] = full.detach().clone()
    return out


def _setup(rank, world, port):
    """The process's verl environment (see the module docstring), and a list recording the
    type of each weight verl's actor hands fastgrpo."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      VERL_ENGINE_DEVICE="cuda", USE_HUB_KERNELS="0")
    torch.set_num_threads(1)
    from verl.plugin.platform.platform_manager import set_platform
    set_platform(_cpu_platform())
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import verl.models.transformers.monkey_patch as verl_patch
    verl_patch.is_trl_available = lambda: False

    import fastgrpo.integrations.verl as fv             # registers impl_backend="fastgrpo"
    calls = []
    real = fv.fused_logprobs
    fv.fused_logprobs = lambda *a, **k: calls.append(type(a[1]).__name__) or real(*a, **k)
    return calls


def _rank_main(rank, world, port, model_dir, result_path):
    """One of two data-parallel ranks: half the batch each, untied (FSDP-sharded) lm_head."""
    import torch.distributed as dist
    calls = _setup(rank, world, port)
    half = 4 // world
    res = _run_arm(f"{model_dir}-untied", "fastgrpo", "rmpad",
                   rows=slice(rank * half, (rank + 1) * half))
    res["weight_types"] = sorted(set(calls))
    if rank == 0:
        torch.save(res, result_path)
    dist.destroy_process_group()


def main_two_ranks(model_dir, result_path, port):
    import torch.multiprocessing as mp
    mp.spawn(_rank_main, args=(2, port, model_dir, result_path), nprocs=2, join=True)


def main(model_dir, result_path, port):
    import torch.distributed as dist
    calls = _setup(0, 1, port)
    from transformers import Qwen2ForCausalLM
    original_forward = Qwen2ForCausalLM.forward   # verl patches the class: one model a process
    results = {}
    for tied in (True, False):
        path = f"{model_dir}-{'tied' if tied else 'untied'}"
        _model_dir(path, tied)
        for layout in LAYOUTS:
            for arm in ARMS if tied else UNTIED_ARMS:
                Qwen2ForCausalLM.forward = original_forward
                before = len(calls)
                res = _run_arm(path, arm, layout)
                res["fastgrpo_calls"] = torch.tensor(len(calls) - before)
                results[(tied, layout, arm)] = res
    torch.save(results, result_path)
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def verl_results(tmp_path_factory):
    why = _verl_importable()
    if why:
        if REQUIRE:
            pytest.fail(f"FASTGRPO_REQUIRE_PEERS=1 but {why}")
        pytest.skip(why)
    d = tmp_path_factory.mktemp("verl_actor")
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    code = (f"import sys; sys.path.insert(0, {here!r}); import test_verl_actor as t; "
            f"t.main({str(d / 'model')!r}, {str(d / 'out.pt')!r}, {free_port()})")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = torch.load(d / "out.pt")
    code = (f"import sys; sys.path.insert(0, {here!r}); import test_verl_actor as t; "
            f"t.main_two_ranks({str(d / 'model')!r}, {str(d / 'two.pt')!r}, {free_port()})")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results["two_ranks"] = torch.load(d / "two.pt")
    return results


def _close(a, b, what, rel=2e-5):
    scale = float(b.abs().max()) if b.numel() else 0.0
    torch.testing.assert_close(a.double(), b.double(), rtol=rel, atol=rel * scale + 1e-7,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_verl_actor_with_fastgrpo_equals_verl(verl_results, tied, layout):
    fast = verl_results[(tied, layout, "fastgrpo")]
    assert int(fast["fastgrpo_calls"]) > 0, "verl's actor never called fastgrpo"
    for arm in (ARMS if tied else UNTIED_ARMS)[1:]:
        ref = verl_results[(tied, layout, arm)]
        assert int(ref["fastgrpo_calls"]) == 0
        assert fast.keys() == ref.keys()
        mask = ref["log_probs"] != 0
        assert mask.sum() >= 10 and (ref["entropy"][mask] > 0).all()
        assert fast["metric_keys"] == ref["metric_keys"]
        assert any(k.startswith("metric/entropy_loss") for k in ref)   # the entropy's gradient
        for key in sorted(k for k in ref if k not in ("fastgrpo_calls", "metric_keys")):
            _close(fast[key], ref[key], f"{layout}: fastgrpo vs verl {arm}: {key}")
    # the updates moved the parameters (so equal parameters are evidence, not a no-op)
    first = [k for k in fast if k.startswith("param/") and k.endswith("/0")]
    assert any(float((fast[k] - fast[k.replace("/0", f"/{STEPS - 1}")]).abs().max()) > 1e-4
               for k in first)
    assert len([k for k in fast if k.startswith("grad/")]) >= 10


def test_verl_two_ranks_equal_one_rank(verl_results):
    """Two data-parallel ranks of verl's actor, half the batch each, the untied lm_head an FSDP
    unit of its own (so fastgrpo receives the sharded DTensor and returns a sharded gradient):
    the gradients and parameters over the PPO updates equal the one-rank run."""
    two, one = verl_results["two_ranks"], verl_results[(False, "rmpad", "fastgrpo")]
    assert "DTensor" in two["weight_types"], two["weight_types"]
    keys = [k for k in one if k.startswith(("param/", "grad/"))]
    assert len(keys) > 20
    for key in keys:
        _close(two[key], one[key], f"2 ranks vs 1: {key}")


CONFIG_CHECK = r'''
import os, sys
from hydra import compose, initialize_config_dir
import verl.trainer.config
sys.path.insert(0, {here!r})
import test_verl_actor
test_verl_actor._model_dir({model!r}, tied=False)
with initialize_config_dir(config_dir=os.path.dirname(verl.trainer.config.__file__),
                           version_base=None):
    cfg = compose("ppo_trainer", overrides=[
        "actor_rollout_ref.model.path={model}",
        "actor_rollout_ref.model.external_lib=fastgrpo.integrations.verl",
        "actor_rollout_ref.model.use_fused_kernels=True",
        "actor_rollout_ref.model.fused_kernel_options.impl_backend=fastgrpo"])
assert "fastgrpo.integrations.verl" not in sys.modules
from verl.utils.config import omega_conf_to_dataclass
from verl.utils.experimental.torch_functional import FusedLinearForPPO
model_config = omega_conf_to_dataclass(cfg.actor_rollout_ref.model)   # what each worker builds
print("REGISTERED", "fastgrpo.integrations.verl" in sys.modules,
      getattr(FusedLinearForPPO, "_fastgrpo_installed", False),
      model_config.use_fused_kernels, model_config.fused_kernel_options["impl_backend"])
'''


def test_verl_config_values_register_the_backend(tmp_path):
    """The three config values of docs/scaling.md, through verl's own hydra config and the
    HFModelConfig each worker builds, import fastgrpo's module and register the backend."""
    why = _verl_importable()
    if why:
        if REQUIRE:
            pytest.fail(f"FASTGRPO_REQUIRE_PEERS=1 but {why}")
        pytest.skip(why)
    here = os.path.dirname(os.path.abspath(__file__))
    code = CONFIG_CHECK.format(here=here, model=str(tmp_path / "model"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "REGISTERED True True True fastgrpo" in proc.stdout, proc.stdout[-2000:]


def test_verl_qwen2_vl_forward_imports():
    """verl's Qwen2-VL / Qwen2.5-VL forward (``verl/models/transformers/qwen2_vl.py``, which its
    ``apply_monkey_patch`` imports for those models whatever the backend) does not import with
    the transformers fastgrpo needs: verl 0.9.1 declares transformers>=5.5.3,<5.11, fastgrpo
    >=5.25, and 5.25 has no ``Qwen2VLCausalLMOutputWithPast``.  Recorded as an expected failure
    naming the error and versions; any other outcome fails: another import error, or the module
    importing (then the VL comparison with verl's own paths is to be written, as above)."""
    why = _verl_importable()
    if why:
        if REQUIRE:
            pytest.fail(f"FASTGRPO_REQUIRE_PEERS=1 but {why}")
        pytest.skip(why)
    import transformers
    import verl
    try:
        import verl.models.transformers.qwen2_vl
    except ImportError as e:
        if "Qwen2VLCausalLMOutputWithPast" not in str(e):
            raise
        pytest.xfail(f"verl {verl.__version__}'s qwen2_vl.py with transformers "
                     f"{transformers.__version__}: {e}")
    pytest.fail(f"verl {verl.__version__}'s Qwen2-VL forward imports with transformers "
                f"{transformers.__version__}: compare it with impl_backend=fastgrpo as "
                f"test_verl_actor_with_fastgrpo_equals_verl does for Qwen2")

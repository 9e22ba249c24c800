"""torch.compile of the norm layers and of training (``train.compile``).

Compiled and eager give the same outputs, gradients and running statistics to float rounding, with
``fullgraph=True`` (a graph break is an error): BN, NBN, CBN in both responsibility modes (and on
both CPU implementations of the per-pixel path), CBN with ``em=False``, and SBN's split path. The
numerics use the ``aot_eager`` backend (dynamo's graph and AOTAutograd's joint forward/backward on
torch's own kernels: seconds on CPU); one test runs inductor, the backend ``train.compile`` uses.
"""

from __future__ import annotations

import copy
import json
from contextlib import nullcontext

import pytest
import torch
import torch.nn as nn

from ltbench import data
from ltbench.nn import cbn_cpu, norm
from ltbench.spec import config, methods
from ltbench.training import step
from ltbench.training import trainer as train

GROUPS = torch.tensor([0, 1, 1, 0, 1, 0])
# compound step (CBN's first-batch initialization), SBN's split step, compound step, then eval
SCHEDULE = (False, True, False)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Dynamo's recompile limit counts the graphs of one code object over every model: start afresh."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(params=["c", "torch"])
def impl(request, monkeypatch):
    """Both CPU implementations of CBN's per-pixel operator (as tests/test_cbn_fast.py)."""
    if request.param == "c" and not cbn_cpu.compiler_found():
        pytest.skip("needs a C compiler ($CC or cc)")
    monkeypatch.setenv("LTBENCH_CBN_KERNEL", request.param)
    cbn_cpu.reset()
    yield request.param
    cbn_cpu.reset()


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.detach().double(), b.detach().double(), atol=2e-5, rtol=2e-4)


def tiny(name: str, channels_last: bool = False, **options) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 3, padding=1), norm.make(name, 4, **options), nn.ReLU(inplace=True)]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    return model.to(memory_format=torch.channels_last) if channels_last else model


def train_step(model: nn.Module, x: torch.Tensor, split: bool, seed: int):
    torch.manual_seed(seed)  # CBN's first-batch initialization draws from the global RNG
    with norm.split_mode(model, GROUPS) if split else nullcontext():
        y = model(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return [y, *grads, *(b.clone() for b in model.buffers())]


def assert_compiles_like_eager(
    eager: nn.Module, backend: str = "aot_eager", split: bool = False, channels_last: bool = False
) -> None:
    compiled = copy.deepcopy(eager)
    compiled.compile(backend=backend, fullgraph=True)
    g = torch.Generator().manual_seed(1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for i, split_step in enumerate(SCHEDULE):
        x = (torch.randn(6, 3, 5, 4, generator=g) + torch.linspace(-1, 2, 3)[:, None, None]).contiguous(
            memory_format=fmt
        )
        split_step = split and split_step
        for a, b in zip(train_step(eager, x, split_step, i), train_step(compiled, x, split_step, i), strict=True):
            close(a, b)
    eager.eval()
    compiled.eval()
    with torch.no_grad():
        close(eager(x), compiled(x))


@pytest.mark.parametrize("name,options", [("bn", {}), ("nbn", {"alpha": "separate"})])
def test_bn_and_nbn_compile_like_eager(name, options):
    assert_compiles_like_eager(tiny(name, **options))


@pytest.mark.parametrize(
    "options",
    [
        {"responsibilities": "pixel"},
        {"responsibilities": "sample"},
        {"responsibilities": "pixel", "train_stats": "running", "detach_responsibilities": True},
        {"em": False},
    ],
    ids=["pixel", "sample", "pixel-running-detached", "em-false"],
)
def test_cbn_and_sbn_compile_like_eager(options, impl, monkeypatch):
    calls = []
    moments = cbn_cpu.moments
    monkeypatch.setattr(cbn_cpu, "moments", lambda *a, **k: (calls.append(1), moments(*a, **k))[1])
    assert_compiles_like_eager(tiny("cbn", num_components=2, **options), split=True)
    # the C loops run behind the compiled operator exactly where they run eagerly
    assert bool(calls) == (impl == "c" and options.get("responsibilities") == "pixel" and options.get("em", True))


def test_cbn_channels_last_compiles_like_eager():
    assert_compiles_like_eager(tiny("cbn", channels_last=True, num_components=3), split=True, channels_last=True)


@pytest.mark.slow  # inductor generates and builds C++ for four graphs: about a minute on two cores
def test_cbn_and_sbn_compile_with_inductor():
    """The backend of ``train.compile``: inductor's generated code around CBN's operators."""
    assert_compiles_like_eager(tiny("cbn", num_components=2), backend="inductor", split=True)


def test_compile_setting_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert train.compile_mode("auto", cpu) == "none" and train.compile_mode("auto", cuda) == train.GPU_COMPILE
    assert train.GPU_COMPILE in ("none", "default", "reduce-overhead")
    for mode in ("none", "default", "reduce-overhead"):
        assert train.compile_mode(mode, cpu) == train.compile_mode(mode, cuda) == mode
    with pytest.raises(Exception, match="compile"):
        config.validate({"train": {"compile": "max-autotune"}, "experiments": {}})


def _spec(method: str, **train_overrides) -> dict:
    c = config.validate(
        {
            "train": {
                "epochs": 1,
                "warmup_epochs": 0,
                "batch_size": 64,
                "device": "cpu",
                "checkpoint_every": 0,
                **train_overrides,
            },
            "experiments": {
                "e": {"datasets": ["digits-lt"], "ratios": [10], "methods": [method], "backbones": ["resnet8"]}
            },
        }
    )
    return config.cell_spec(c, "digits-lt", method, "resnet8")


def _model_kinds() -> dict[str, list[str]]:
    """The built-in methods grouped by what the compiled model call sees (norm layers, forward paths,
    views, head, logit rectification); losses, samplers and the classifier stage (which calls
    ``model.features`` outside the compiled call) differ within a group."""
    kinds: dict[str, list[str]] = {}
    for name in methods.builtin():
        r = methods.recipe(name)
        key = json.dumps([r["norm"], r["paths"], r["views"], r["head"], r["logit_rectification"]], sort_keys=True)
        kinds.setdefault(key, []).append(name)
    return {names[0]: names for names in kinds.values()}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(_model_kinds()))
def test_every_builtin_methods_step_compiles_like_eager(method):
    """One training step of the recipe (every path × view, its loss, the backward) and an eval
    forward on ResNet-8, compiled with ``fullgraph=True`` against eager."""
    spec = _spec(method)
    recipe = spec["recipe"]
    eager = train.build_model(spec, 10, 1)
    compiled = copy.deepcopy(eager)
    compiled.compile(backend="eager", fullgraph=True)
    criterion = torch.nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 16, 16, generator=g), torch.arange(8) % 10
    groups = norm.class_groups(10, recipe["norm"]["options"].get("num_components", 1))[y]
    views = {v: x.flip(3) if v == "strong" else x for v in recipe["views"]}
    losses = []
    for model in (eager, compiled):
        torch.manual_seed(0)
        loss, _ = step.step_loss(recipe, criterion, step.PathsForward(model, recipe, False)(views, groups), y)
        loss.backward()
        losses.append(loss)
    close(*losses)
    grad = lambda p: torch.zeros_like(p) if p.grad is None else p.grad  # noqa: E731
    for a, b in zip(eager.parameters(), compiled.parameters(), strict=True):
        close(grad(a), grad(b))
    for a, b in zip(eager.buffers(), compiled.buffers(), strict=True):
        close(a, b)
    eager.eval()
    compiled.eval()
    with torch.no_grad():
        close(eager(x), compiled(x))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    data.prepare("digits-lt", 10, d, d / "digits.npz")
    return d / "digits.npz"


@pytest.mark.slow
def test_compiled_training_matches_eager_and_is_recorded(prepared, tmp_path, monkeypatch):
    """``train.compile: default`` compiles the model in place (one epoch of the full CBN method: both
    paths, both views, evaluation and CBN's diagnostics), with no graph break, to the eager run's
    numbers; ``metrics.json`` records the mode. The backend is dynamo's ``eager`` (no code generation:
    the test is about the trainer's use of torch.compile, the numerics of the backends are above)."""
    seen = []
    original = nn.Module.compile

    def compile_(self, **kwargs):
        seen.append(kwargs)
        return original(self, backend="eager", fullgraph=True)

    monkeypatch.setattr(nn.Module, "compile", compile_)
    method = "baseline+cbn+sbn+dpl"
    eager = train.run(_spec(method), 10, 0, prepared, tmp_path / "eager")
    assert eager["environment"]["compile"] == "none" and not seen  # auto on CPU
    compiled = train.run(_spec(method, compile="default"), 10, 0, prepared, tmp_path / "compiled")
    assert seen == [{"mode": "default"}] and compiled["environment"]["compile"] == "default"
    loss = [json.loads((tmp_path / d / "train.jsonl").read_text())["train_loss"] for d in ("eager", "compiled")]
    assert loss[0] == pytest.approx(loss[1], rel=1e-4)  # float rounding: an epoch of steps accumulates it
    assert compiled["per_class_acc"] == pytest.approx(eager["per_class_acc"], abs=2.0)

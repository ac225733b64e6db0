"""The hivemind swarmtrain was written against is the one installed, and every one of its methods that
swarmtrain overrides is listed in swarmtrain.hivemind_compat with the signature it has here. Upgrading
hivemind starts with this test."""
import hashlib
import importlib
import inspect
import pkgutil

import hivemind
import pytest

import swarmtrain
from swarmtrain import hivemind_compat


def _resolve(owner: str):
    module, _, name = owner.partition(":")
    return getattr(importlib.import_module(module), name)


def test_the_pinned_hivemind_is_installed():
    assert hivemind.__version__ == hivemind_compat.PINNED_VERSION


HOOKS = hivemind_compat.hooks(hivemind_compat.OVERRIDDEN) + hivemind_compat.hooks(hivemind_compat.CALLED)


@pytest.mark.parametrize("owner,name,signature", HOOKS, ids=[f"{o.rpartition(':')[2]}.{n}" for o, n, _ in HOOKS])
def test_each_hook_has_the_signature_it_was_written_against(owner, name, signature):
    method = vars(_resolve(owner)).get(name)
    assert method is not None, f"{owner} no longer defines {name}"
    assert str(inspect.signature(method)) == signature


def test_the_state_averager_arguments_repeat_hivemind_s_own():
    source = inspect.getsource(hivemind.Optimizer._make_state_averager)
    assert hashlib.sha256(source.encode()).hexdigest() == hivemind_compat.MAKE_STATE_AVERAGER_SHA256, (
        "hivemind's Optimizer._make_state_averager changed: compare its arguments with "
        f"hivemind_compat.state_averager_arguments, then update the hash\n{source}")


def _swarmtrain_classes():
    """Every class defined in swarmtrain that derives from a hivemind class, and the classes the package
    composes at run time (access guard and mixins in front of hivemind averagers)."""
    from swarmtrain.access.guard import guarded_class
    from swarmtrain.averaging.local import InStepWeightMixin, LocalStateAverager
    from swarmtrain.compression.averager import CountingGradientAverager, SparseGradientAverager
    from swarmtrain.compression.factory import with_mixin

    classes = set()
    for info in pkgutil.walk_packages(swarmtrain.__path__, "swarmtrain."):
        if info.name == "swarmtrain.__main__":
            continue
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if inspect.isclass(value) and value.__module__ == module.__name__ and any(
                    base.__module__.startswith("hivemind") for base in value.__mro__):
                classes.add(value)
    for averager in (CountingGradientAverager, SparseGradientAverager):
        classes.add(guarded_class(with_mixin(InStepWeightMixin, averager)))
    classes.add(guarded_class(LocalStateAverager))
    return classes


def test_every_overridden_hivemind_method_is_listed():
    listed = {(owner, name) for owner, name, _ in hivemind_compat.hooks(hivemind_compat.OVERRIDDEN)}
    unlisted = set()
    for cls in _swarmtrain_classes():
        for klass in cls.__mro__:
            if not klass.__module__.startswith("swarmtrain"):
                continue
            for name, value in vars(klass).items():
                if name.startswith("__") or not callable(value):
                    continue
                defining = next((base for base in cls.__mro__
                                 if base.__module__.startswith("hivemind") and name in vars(base)), None)
                if defining is not None and (f"{defining.__module__}:{defining.__qualname__}", name) not in listed:
                    unlisted.add(f"{klass.__module__}.{klass.__qualname__}.{name} overrides "
                                 f"{defining.__module__}:{defining.__qualname__}.{name}")
    assert not unlisted, "add these to swarmtrain.hivemind_compat.OVERRIDDEN:\n" + "\n".join(sorted(unlisted))


def test_an_averager_stopped_mid_round_finalizes_its_runners():
    """hivemind's _shutdown calls finalize() on the futures of the running groups; ours on the runners."""
    import asyncio
    from types import SimpleNamespace

    from hivemind.averaging.averager import DecentralizedAverager

    async def scenario(shutdown):
        finalized = []
        runner = SimpleNamespace(finalize=lambda cancel: finalized.append(cancel))
        resolved, pending = asyncio.get_running_loop().create_future(), asyncio.get_running_loop().create_future()
        resolved.set_result(runner)
        averager = SimpleNamespace(client_mode=True, _running_groups={b"a": resolved, b"b": pending})
        await shutdown(averager, 1.0)
        return finalized, pending.cancelled()

    with pytest.raises(AttributeError, match="finalize"):
        asyncio.run(scenario(DecentralizedAverager._shutdown))
    assert asyncio.run(scenario(hivemind_compat.CleanShutdownMixin._shutdown)) == ([True], True)

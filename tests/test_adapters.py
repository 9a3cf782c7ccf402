"""Users' LoRAs as per-sample data: a batch that mixes users computes each row as that user's run
alone would, rows without an adapter see the base model, and adapters stay hot in a cache bounded
by bytes."""

from __future__ import annotations

import pytest
import torch

from easyphoto.engines.adapters import (
    Adapter,
    AdapterCache,
    AdapterLayer,
    SampleAdapter,
    add_low_rank_update_,
)
from easyphoto.engines.backends.torch_backend import TorchBackend
from easyphoto.engines.lora import LoraLayer, LoraWeights
from easyphoto.engines.models.family import ModelFamily
from easyphoto.engines.roles.diffusion import describe_stage


def _lora(backend: TorchBackend, seed: int, rank: int = 4) -> LoraWeights:
    """A random LoRA on every targeted layer of the UNet and the text encoder, its updates about a
    tenth of the layers' weights, as a trained one's are (with updates larger than the weights the
    tiny random net turns chaotic, and fp32 summation order alone moves its outputs by 1e-4)."""
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for target, modules in backend.lora_targets().items():
        for module, shape in modules.items():
            down = torch.randn(rank, *shape[1:], generator=generator) * 0.1
            up = torch.randn(shape[0], rank, *[1] * (len(shape) - 2), generator=generator) * 0.1
            layers.append(LoraLayer(target, module, down, up, alpha=float(rank)))
    return LoraWeights(f"random-{seed}", layers)


@pytest.fixture(scope="module")
def backend(tiny: ModelFamily) -> TorchBackend:
    backend = TorchBackend(tiny, "cpu")
    backend.add_role(describe_stage(tiny, ("canny", "tile")))
    return backend


def _rows(samples: list[SampleAdapter | None], repeat: int) -> list[SampleAdapter | None]:
    return [sample for sample in samples for _ in range(repeat)]


def _close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Within 1e-4 of the largest value, the issue's bar for a batched row against its run alone."""
    return float((got - expected).abs().max()) <= 1e-4 * float(expected.abs().max())


@pytest.mark.parametrize("role", ["unet", "stage_canny_tile", "text_encoder"])
def test_each_row_of_a_mixed_batch_equals_its_users_run_alone(backend: TorchBackend, role: str) -> None:
    ann = backend.adapter("ann@v1", lambda: _lora(backend, 1))
    bob = backend.adapter("bob@v4", lambda: _lora(backend, 2))
    users = [SampleAdapter(ann, 0.9), SampleAdapter(bob, 0.6), None, SampleAdapter(ann, 0.3)]
    description = backend.roles[role]
    one = description.sample_inputs("opt", seed=7)  # a CFG pair: 2 rows
    mixed = {name: torch.cat([value] * len(users)) for name, value in one.items()}
    outputs = backend.infer(role, mixed, _rows(users, 2))
    output = description.outputs[0].name
    alone = [backend.infer(role, one, _rows([user], 2))[output] for user in users]
    for index, expected in enumerate(alone):
        assert _close(outputs[output][2 * index : 2 * index + 2], expected), (role, index)
    base = backend.infer(role, one)[output]
    assert torch.equal(alone[2], base)  # no adapter: the base model, bit for bit
    assert not _close(alone[0], base) and not _close(alone[1], alone[0])  # the adapters do change rows


def test_rows_of_one_user_apart_in_a_batch_each_equal_the_users_run_alone(backend: TorchBackend) -> None:
    """Each run of neighbouring rows gets the update: ann's first rows and her last ones."""
    ann = SampleAdapter(backend.adapter("ann@v1", lambda: _lora(backend, 1)), 0.9)
    bob = SampleAdapter(backend.adapter("bob@v4", lambda: _lora(backend, 2)), 0.6)
    one = backend.roles["unet"].sample_inputs("opt", seed=3)
    mixed = {name: torch.cat([value] * 3) for name, value in one.items()}
    rows = _rows([ann, bob, ann], 2)
    outputs = backend.infer("unet", mixed, rows)["noise_pred"]
    alone = {id(user): backend.infer("unet", one, _rows([user], 2))["noise_pred"] for user in (ann, bob)}
    for index, user in enumerate([ann, bob, ann]):
        assert _close(outputs[2 * index : 2 * index + 2], alone[id(user)]), index


@pytest.mark.parametrize("layout", ["linear", "conv", "conv channels-last"])
def test_the_in_place_low_rank_update_adds_weight_times_up_down_x(layout: str) -> None:
    generator = torch.Generator().manual_seed(5)
    down, up = torch.randn(3, 8, generator=generator), torch.randn(6, 3, generator=generator)
    if layout == "linear":
        x, output = torch.randn(4, 5, 8, generator=generator), torch.randn(4, 5, 6, generator=generator)
        expected = output + 0.7 * (x @ down.T @ up.T)
    else:
        x, output = torch.randn(4, 8, 3, 2, generator=generator), torch.randn(4, 6, 3, 2, generator=generator)
        expected = output + 0.7 * torch.einsum("or,ri,bihw->bohw", up, down, x)
        if layout == "conv channels-last":
            output = output.to(memory_format=torch.channels_last)
            assert not output.is_contiguous()
    start = output.clone()
    add_low_rank_update_(output[1:3], x[1:3], AdapterLayer(down, up), layout != "linear", 0.7)
    assert torch.allclose(output[1:3], expected[1:3], atol=1e-5)
    assert torch.equal(output[[0, 3]], start[[0, 3]])  # the other rows untouched


def test_the_hot_cache_drops_the_least_recently_used_past_its_bytes(backend: TorchBackend) -> None:
    loads: list[str] = []

    def load(name: str, seed: int) -> Adapter:
        loads.append(name)
        return Adapter.from_lora(name, _lora(backend, seed), torch.device("cpu"), torch.float32)

    size = load("probe", 9).nbytes
    cache = AdapterCache(max_bytes=int(2.5 * size))
    first = cache.get("a@v1", lambda: load("a@v1", 1))
    cache.get("b@v1", lambda: load("b@v1", 2))
    assert cache.get("a@v1", lambda: load("a@v1", 1)) is first  # a hit: not loaded again
    cache.get("c@v1", lambda: load("c@v1", 3))  # over the budget: b, the least recently used, goes
    assert cache.keys == ["a@v1", "c@v1"] and cache.size <= cache.max_size
    assert loads == ["probe", "a@v1", "b@v1", "c@v1"]
    cache.get("b@v1", lambda: load("b@v1", 2))  # a cold user is loaded on demand
    assert loads[-1] == "b@v1" and cache.keys == ["c@v1", "b@v1"]


def test_a_call_with_adapters_for_a_role_without_lora_is_refused(backend: TorchBackend) -> None:
    from easyphoto.rpc.errors import EngineInputError

    ann = backend.adapter("ann@v1", lambda: _lora(backend, 1))
    vae = backend.roles["vae_decoder"]
    with pytest.raises(EngineInputError, match="takes no LoRA"):
        backend.infer("vae_decoder", vae.sample_inputs("min"), [SampleAdapter(ann, 1.0)])


def test_backends_over_one_model_share_one_set_of_hooks(tiny: ModelFamily, backend: TorchBackend) -> None:
    """A second backend on the same modules must not add its update again on every call."""
    layer = next(iter(backend.lora_targets()["unet"]))
    before = len(tiny.unet.get_submodule(layer)._forward_hooks)
    TorchBackend(tiny, "cpu")
    TorchBackend(tiny, "cpu")
    assert len(tiny.unet.get_submodule(layer)._forward_hooks) == before == 1


def test_hooks_on_a_model_do_not_keep_it_alive() -> None:
    """A trainer loads a fresh family per job: the hooks its backend installs must go with it
    (a registry of hooks keyed weakly by model, each hook holding the model, kept every one)."""
    import gc
    import weakref

    from easyphoto.engines.adapters import AdapterHooks

    def hooked() -> weakref.ref[torch.nn.Module]:
        model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        hooks = AdapterHooks.on({"unet": model}, {"unet": {"0": (4, 4)}})
        assert AdapterHooks.on({"unet": model}, {"unet": {"0": (4, 4)}}) is hooks  # installed once
        assert model(torch.ones(1, 4)).shape == (1, 4)
        return weakref.ref(model)

    models = [hooked() for _ in range(3)]
    gc.collect()
    assert [m() for m in models] == [None, None, None]

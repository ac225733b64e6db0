import pytest

from swarmtrain.compression.spec import ACCEPTED_FORMS, CompressionSpec, parse_compression_spec


@pytest.mark.parametrize(
    "text,expected",
    [
        ("none", CompressionSpec("none")),
        ("FP16", CompressionSpec("fp16")),
        ("gaussiank:0.01", CompressionSpec("gaussiank", 0.01)),
        (" topk:1e-3+8bit ", CompressionSpec("topk", 0.001, True)),
        ("randomk:1", CompressionSpec("randomk", 1.0)),
        ("gaussiank:0.02+2bit", CompressionSpec("gaussiank", 0.02, two_bit_values=True)),
        ("GaussianK:0.02:4096+2bit", CompressionSpec("gaussiank", 0.02, two_bit_values=True, chunk=4096)),
        ("topk:0.1:64", CompressionSpec("topk", 0.1, chunk=64)),
    ],
)
def test_valid_specs(text, expected):
    spec = parse_compression_spec(text)
    assert spec == expected
    assert spec.value_format == ("8bit" if spec.eight_bit_values else "2bit" if spec.two_bit_values else "fp16")
    assert parse_compression_spec(str(spec)) == spec  # str() is a valid spec again


@pytest.mark.parametrize(
    "text",
    ["", "  ", "gzip", "gaussiank", "gaussiank:", "topk:0", "topk:1.5", "topk:abc", "topk:nan", "fp16+8bit",
     "none:0.1", "randomk:-0.1", None, 0.01, "fp16+2bit", "gaussiank:0.01:1", "gaussiank:0.01:x",
     "gaussiank:0.01:-8", "randomk:0.01:4096", "gaussiank:0.01+8bit+2bit"],
)
def test_invalid_specs_name_the_accepted_forms(text):
    with pytest.raises(ValueError) as error:
        parse_compression_spec(text)
    assert ACCEPTED_FORMS in str(error.value)


def test_factory_maps_specs_to_averagers():
    from hivemind.compression import Float16Compression, NoCompression

    import swarmtrain.compression.factory as factory_module
    from swarmtrain.compression.averager import SparseGradientAverager
    from swarmtrain.compression.factory import make_averager_factory

    sparse = make_averager_factory(parse_compression_spec("gaussiank:0.01+8bit"))
    assert sparse.func is SparseGradientAverager and sparse.keywords["spec"].eight_bit_values
    captured = {}

    def Probe(*args, **kwargs):  # stands in for the averager: records what the factory passes
        captured.update(kwargs)

    original = factory_module.CountingGradientAverager
    factory_module.CountingGradientAverager = Probe
    try:
        make_averager_factory(parse_compression_spec("fp16"))(parameters=[], compression=NoCompression())
        assert isinstance(captured["compression"], Float16Compression)
        make_averager_factory(parse_compression_spec("none"))(parameters=[])
        assert isinstance(captured["compression"], NoCompression)
    finally:
        factory_module.CountingGradientAverager = original


def test_a_mixin_goes_in_front_and_keeps_the_class_name():
    from swarmtrain.compression.averager import CountingGradientAverager
    from swarmtrain.compression.factory import with_mixin

    class Mixin:
        pass

    mixed = with_mixin(Mixin, CountingGradientAverager)
    assert mixed.__mro__[1:3] == (Mixin, CountingGradientAverager)
    assert mixed.__name__ == CountingGradientAverager.__name__  # hivemind names RPC handlers after it
    assert with_mixin(Mixin, CountingGradientAverager) is mixed and with_mixin(None, Mixin) is Mixin

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
    ],
)
def test_valid_specs(text, expected):
    spec = parse_compression_spec(text)
    assert spec == expected
    assert parse_compression_spec(str(spec)) == spec  # str() is a valid spec again


@pytest.mark.parametrize(
    "text",
    ["", "  ", "gzip", "gaussiank", "gaussiank:", "topk:0", "topk:1.5", "topk:abc", "topk:nan", "fp16+8bit",
     "none:0.1", "randomk:-0.1", None, 0.01],
)
def test_invalid_specs_name_the_accepted_forms(text):
    with pytest.raises(ValueError) as error:
        parse_compression_spec(text)
    assert ACCEPTED_FORMS in str(error.value)


def test_factory_maps_specs_to_averagers():
    from hivemind.compression import Float16Compression, NoCompression

    from swarmtrain.compression.averager import SparseGradientAverager, make_grad_averager_factory

    sparse = make_grad_averager_factory("gaussiank:0.01+8bit")
    assert sparse.func is SparseGradientAverager and sparse.keywords["spec"].eight_bit_values
    captured = {}

    def Probe(*args, **kwargs):  # stands in for the averager: records what the factory passes
        captured.update(kwargs)

    import swarmtrain.compression.averager as averager_module

    original = averager_module.CountingGradientAverager
    averager_module.CountingGradientAverager = Probe
    try:
        make_grad_averager_factory("fp16")(parameters=[], compression=NoCompression())
        assert isinstance(captured["compression"], Float16Compression)
        make_grad_averager_factory(parse_compression_spec("none"))(parameters=[])
        assert isinstance(captured["compression"], NoCompression)
    finally:
        averager_module.CountingGradientAverager = original
    with pytest.raises(ValueError, match="accepted|one of"):
        make_grad_averager_factory("gaussian:0.01")

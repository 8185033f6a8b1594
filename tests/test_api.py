"""The public import surface (qatkit/api.py) resolves to the functions the pipeline uses."""


def test_public_api_names_the_pipeline():
    from qatkit import api
    from qatkit.export.gguf import export_model
    from qatkit.models.load import load, resolve
    from qatkit.prepare import convert, model_plan, prepare
    from qatkit.runtime.llamacpp import score
    from qatkit.train.loop import train

    assert (api.resolve, api.load, api.plan, api.prepare, api.train, api.convert, api.export, api.score) == (
        resolve, load, model_plan, prepare, train, convert, export_model, score)
    assert all(callable(getattr(api, name)) for name in api.__all__)

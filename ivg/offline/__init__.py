"""Offline artifacts: the asset registry (models and data from PyPI packages) and the build-once store.

The `asset:` name scheme (ModelSpec names and data paths such as `asset:smollm2-135m-instruct`) is
registered with ivg.models through the `ivg.schemes` entry point (pyproject.toml), and again here for
code run from a checkout without installing it: the decoder knows schemes, not assets.
"""

from ivg.models import register_scheme


def _resolve_asset(name: str):
    from ivg.offline.assets import resolve  # lazy: the registry's builders import more

    return resolve(name)


register_scheme("asset", _resolve_asset)

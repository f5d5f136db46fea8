"""What every test shares."""
import sys
from collections import OrderedDict

import pytest


@pytest.fixture(autouse=True)
def restore_mmengine_default_scope():
    """Put mmengine's default scope back as it was before the test.

    A test that builds in a toolkit's scope (``init_default_scope``, or a Runner, which sets
    its config's ``default_scope``) leaves that scope current for the whole process: a later
    test building through mmengine's root registry (e.g. an mmpretrain classifier after the
    mmaction2 configs) would look in that toolkit's registry and fail with a KeyError.
    Tests that never import mmengine are not touched.
    """
    before = sys.modules.get("mmengine.registry")
    scopes = before.DefaultScope._instance_dict.copy() if before is not None else None
    yield
    registry = sys.modules.get("mmengine.registry")
    if registry is not None:  # mmengine's overwrite_default_scope restores the scopes the same way
        registry.DefaultScope._instance_dict = scopes if scopes is not None else OrderedDict()

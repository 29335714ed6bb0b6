"""The ci profile does what tests/fuzz/conftest.py says: a fixed seed AND the example database, so the failures that
dev runs saved in tests/fuzz/.hypothesis-examples replay in every CI run. hypothesis' @seed also sets
database=None; with the two decorators the wrong way round, no saved failure had replayed in CI."""
import os

import pytest
from hypothesis import given, settings, strategies as st

from tests.fuzz.conftest import EXAMPLES_DB
from tests.fuzz.strategies import FUZZ_SEED, fuzz


@pytest.mark.skipif(os.environ.get("FASTFT_FUZZ_PROFILE", "ci") != "ci", reason="checks the ci profile")
def test_fuzz_tests_keep_the_seed_and_the_example_database():
    @fuzz(3)
    @given(x=st.integers())
    def probe(x):
        pass

    used = probe._hypothesis_internal_use_settings  # what @given runs with (hypothesis keeps it here)
    assert probe._hypothesis_internal_use_seed == FUZZ_SEED
    assert used.database is not None and used.database == settings.get_profile("ci").database
    assert str(EXAMPLES_DB) in repr(used.database)
    assert used.max_examples == int(os.environ.get("FASTFT_FUZZ_EXAMPLES", 3))

"""fastft.kernels.autotune.tuner shares one Tuner per kernel name and config *content*: two different config lists
of one kernel name (and length) get their own tuners (one would otherwise launch the other's configs), an equal
list built anew gets the same one."""
from fastft.kernels.autotune import tuner


def test_different_configs_of_one_name_get_their_own_tuner():
    a = tuner("test_registry_kernel", [{"BLOCK": 32, "num_warps": 4}, {"BLOCK": 64, "num_warps": 4}])
    b = tuner("test_registry_kernel", [{"BLOCK": 16, "num_warps": 2}, {"BLOCK": 128, "num_warps": 8}])
    assert a is not b
    assert b.configs == [{"BLOCK": 16, "num_warps": 2}, {"BLOCK": 128, "num_warps": 8}]
    again = tuner("test_registry_kernel", [{"BLOCK": 32, "num_warps": 4}, {"BLOCK": 64, "num_warps": 4}])
    assert again is a

"""dropout_keep draws one Philox number per element: (row, col) -> row·n_cols + col. A layout slip such as
row + col·n_cols maps (r + K, c) and (r, c + 1) to the same draw, so the keep-mask repeats itself along a
diagonal; the mean-rate statistics tests do not see that."""
from fastft.kernels.rank_ops import dropout_mask
from tests.utils import interpreter_only


@interpreter_only
def test_dropout_mask_has_no_shifted_copies():
    M, K, p = 96, 32, 0.5
    keep = dropout_mask(4321, M, K, p, "cpu")
    # independent draws agree at rate p² + (1 − p)² = 0.5 (±0.02 over these sizes)
    pairs = {"(r+K, c) vs (r, c+1)": (keep[K:, :-1], keep[:-K, 1:]),
             "(r+1, c) vs (r, c)": (keep[1:], keep[:-1]),
             "(r, c+1) vs (r, c)": (keep[:, 1:], keep[:, :-1])}
    for name, (a, b) in pairs.items():
        agree = (a == b).float().mean().item()
        assert agree < 0.6, f"keep-mask repeats, {name}: agreement {agree:.2f}"

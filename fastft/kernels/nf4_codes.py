"""The 16 NF4 code values (quantiles of N(0, 1) scaled to [-1, 1], the QLoRA paper's table), as bitsandbytes
stores them. One home for the Python side: the Triton kernels and fastft.quant both read them from here
(csrc/ keeps its own copy; the tests hold all of them to bitsandbytes' table)."""

NF4_CODE_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
